"""Model card rendering and Hub upload for saved EchoDiff pipelines.

``push_pipeline(pipe_or_folder, "user/echodiff-adm-edm", metrics={"FID-50k": 3.75})`` saves the pipeline
(remote-code layout, see ``EchoDiffPipeline.save_pretrained``), renders ``model_cards/echodiff_model_card.md``
with huggingface_hub's ``ModelCard`` (metrics go to the card's ``model-index``) and uploads the folder.
The ``HfApi`` is injectable, so the whole path runs offline in tests.

A card states only what is recorded: the training data (and so the licence and the model-index dataset) from
the frame dataset's own build record (:func:`training_data_facts`), the number of generated images and the
reference set of its metrics from ``evaluation``, the usage id from the real repo (a local path until pushed).
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from safetensors import SafetensorError, safe_open

from pipelines.data.layout import ECHONET_LICENSE, SYNTHETIC_DATA_LICENSE
from pipelines.errors import MissingInputError, NonFiniteError, UserInputError
from pipelines.utils import MODEL_CARDS_DIR, looks_like_local_path, save_image_grid

MODEL_CARD_TEMPLATE = MODEL_CARDS_DIR / "echodiff_model_card.md"
DEFAULT_TAGS = ["diffusers", "echodiff", "edm", "unconditional-image-generation", "medical-imaging", "echocardiography"]
SAMPLE_GRID_FILE = "samples.png"  # saved next to the card (README.md) and shown in it


def training_data_facts(dataset: str | os.PathLike | None) -> dict:
    """What a card says about the training data, from the frame dataset's own build record.

    Returns ``kind`` ("synthetic", "echonet-dynamic" or "unrecorded"), ``name`` (text), ``dataset_type``
    (model-index), ``license`` (card fields), ``datasets`` (Hub ids: only a Hub dataset has one) and
    ``note``. Unrecorded data (a Hub id, an older build) is treated as EchoNet-Dynamic: the safe terms.
    """
    from pipelines.data.frame_reader import recorded_data_source

    text = None if dataset is None else str(dataset)
    local = text is not None and (Path(text).expanduser().exists() or looks_like_local_path(text))
    kind = recorded_data_source(text)["kind"] if local else None
    hub_ids = [text] if text is not None and not local else []
    if kind == "synthetic":
        return {"kind": "synthetic", "name": "EchoDiff synthetic EchoNet-layout frames (make_synthetic_echonet.py)",
                "dataset_type": "echodiff-synthetic-echonet", "license": dict(SYNTHETIC_DATA_LICENSE),
                "datasets": hub_ids, "note": "Synthetic videos made by EchoDiff's generator: no patient data and "
                "no EchoNet-Dynamic data; a test of the pipeline, not a model of real echocardiograms."}
    name = "EchoNet-Dynamic frames (build_echonet_frames.py)"
    note = ("Derived from EchoNet-Dynamic (Stanford; access through Stanford AIMI), released under a research use "
            "agreement that forbids redistribution: check it before using generated images or this model.")
    dataset_type = "echonet-dynamic"
    if kind is None:  # not known: say so, and take EchoNet-Dynamic's terms (the safe side)
        name = f"the frame dataset {text!r} (its build records no source)"
        dataset_type = "echonet-layout-frames"
        note = ("Whether it is EchoNet-Dynamic or synthetic data is not recorded, so EchoNet-Dynamic's research use "
                "agreement (no redistribution) is assumed: check the data's origin before sharing this model.")
    return {"kind": kind or "unrecorded", "name": name, "dataset_type": dataset_type,
            "license": dict(ECHONET_LICENSE), "datasets": hub_ids, "note": note}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise MissingInputError(f"{path} not found: expected a folder written by EchoDiffPipeline.save_pretrained")
    return json.loads(path.read_text(encoding="utf-8"))


def count_parameters(folder: str | os.PathLike) -> int | None:
    """Number of parameters stored in the safetensors files of a saved model folder (None if it has none)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for key in weights.keys():
                count = 1
                for size in weights.get_slice(key).get_shape():
                    count *= size
                total += count
    return total


def describe_pipeline_folder(folder: str | os.PathLike) -> dict:
    """Facts about a saved pipeline for its model card (network, sizes, preconditioning, sampler)."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    unet_config = _read_json(folder / "unet" / "config.json")
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    size = unet_config.get("sample_size")
    resolution = f"{size}x{size}" if isinstance(size, int) else "x".join(str(s) for s in size or [])
    num_parameters = count_parameters(folder / "unet")
    return {
        "pipeline_class": index["_class_name"][-1] if isinstance(index["_class_name"], list) else index["_class_name"],
        "network_class": unet_config.get("_class_name", index.get("unet", [None, "?"])[1]),
        "num_parameters": f"{num_parameters:,}" if num_parameters is not None else "unknown",
        "resolution": resolution,
        "channels": unet_config.get("in_channels"),
        "label_dim": unet_config.get("label_dim", 0),
        "preconditioning": scheduler_config.get("preconditioning", "edm"),
        "solver": scheduler_config.get("solver", "heun"),
        "discretization": scheduler_config.get("discretization", "edm"),
        "s_churn": scheduler_config.get("s_churn", 0.0),
        "has_discriminator": bool(index.get("discriminator") and index["discriminator"][0]),
    }


def _metric_type(name: str) -> str:
    """'FID-50k (30 steps)' -> 'fid': the metric's leading word, lower case."""
    match = re.match(r"[A-Za-z0-9]+", name)
    if not match:
        raise UserInputError(f"metric name {name!r} must start with a letter or digit")
    return match.group(0).lower()


def build_card_data(model_name: str, metrics: Mapping[str, float] | None = None, card_data: Mapping | None = None,
                    training_data: Mapping | None = None, dataset_name: str | None = None) -> ModelCardData:
    """``ModelCardData`` for an EchoDiff model; ``metrics`` ({name: value}) become model-index eval results on
    ``dataset_name`` (the reference set); the licence, ``datasets`` and dataset type come from ``training_data``
    (:func:`training_data_facts`); ``card_data`` overrides any field."""
    training_data = training_data or training_data_facts(None)
    dataset_type = training_data["dataset_type"]
    dataset_name = dataset_name or training_data["name"]
    fields = {"library_name": "diffusers", "pipeline_tag": "unconditional-image-generation", "tags": list(DEFAULT_TAGS),
              "model_name": model_name, **training_data["license"]}
    if training_data["kind"] == "synthetic":
        fields["tags"].append("synthetic-data")
    if training_data["datasets"]:
        fields["datasets"] = list(training_data["datasets"])
    fields.update(card_data or {})
    eval_results = []
    for name, value in (metrics or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserInputError(f"metrics[{name!r}] must be a number, got {value!r}")
        eval_results.append(EvalResult(task_type="unconditional-image-generation", dataset_type=dataset_type,
                                       dataset_name=dataset_name, metric_type=_metric_type(name), metric_name=name,
                                       metric_value=float(value)))
    if eval_results:
        fields["eval_results"] = eval_results
    return ModelCardData(**fields)


def render_model_card(folder: str | os.PathLike, repo_id: str | None = None, metrics: Mapping[str, float] | None = None,
                      card_data: Mapping | None = None, sections: Sequence[str] = (),
                      template_path: str | os.PathLike = MODEL_CARD_TEMPLATE, training_dataset: str | None = None,
                      evaluation: Mapping | None = None, sample_grid: str | None = None,
                      location: str | os.PathLike | None = None) -> ModelCard:
    """The model card of the pipeline saved in ``folder``: the template, then each of ``sections`` (Markdown).

    ``repo_id``: the Hub repo (the usage example loads it); None: not pushed, the example loads ``folder``.
    ``training_dataset``: the frame dataset it was trained on (folder or Hub id; see :func:`training_data_facts`).
    ``evaluation``: how ``metrics`` were measured, ``{"num_generated": N, "reference": "what real set"}``; the
    card says so when it is not given. ``sample_grid``: a file in ``folder`` the card shows. ``location``: where
    the folder will live when it is written aside and renamed (the unpushed usage example and the name use it).
    """
    location = Path(location if location is not None else folder)
    if not Path(template_path).is_file():
        raise FileNotFoundError(f"model card template {template_path} not found")
    card_data = dict(card_data or {})
    training_data = training_data_facts(training_dataset)
    evaluation = dict(evaluation or {})
    reference = evaluation.get("reference")
    model_name = card_data.pop("model_name", (repo_id or location.resolve().name).split("/")[-1])
    data = build_card_data(model_name, metrics, card_data, training_data=training_data, dataset_name=reference)
    facts = describe_pipeline_folder(folder)
    return ModelCard.from_template(data, template_path=str(template_path), repo_id=repo_id,
                                   usage_id=repo_id or str(location), model_name=model_name,
                                   metrics=dict(metrics or {}), training_data=training_data, evaluation=evaluation,
                                   sample_grid=sample_grid, sections=[s.strip("\n") for s in sections], **facts)


def write_model_card(folder: str | os.PathLike, repo_id: str | None = None, metrics: Mapping[str, float] | None = None,
                     card_data: Mapping | None = None, sections: Sequence[str] = (), training_dataset: str | None = None,
                     evaluation: Mapping | None = None, sample_grid=None,
                     template_path: str | os.PathLike = MODEL_CARD_TEMPLATE,
                     location: str | os.PathLike | None = None) -> Path:
    """Render the card (see :func:`render_model_card`) into ``folder/README.md``; ``sample_grid`` (uint8
    images (N, C, H, W), or a PNG path) is saved as ``folder/samples.png`` and shown in the card."""
    path = Path(folder) / "README.md"
    grid_name = None
    if sample_grid is not None:
        grid_name = SAMPLE_GRID_FILE
        if isinstance(sample_grid, (str, os.PathLike)):
            if Path(sample_grid).resolve() != (Path(folder) / grid_name).resolve():
                shutil.copyfile(sample_grid, Path(folder) / grid_name)
        else:
            save_image_grid(sample_grid, Path(folder) / grid_name, padding=0)
    elif (Path(folder) / SAMPLE_GRID_FILE).is_file():
        grid_name = SAMPLE_GRID_FILE  # a re-rendered card keeps the grid already there
    render_model_card(folder, repo_id, metrics, card_data, sections, template_path=template_path,
                      training_dataset=training_dataset, evaluation=evaluation, sample_grid=grid_name,
                      location=location).save(str(path))
    return path


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise UserInputError(f"repo_id must look like 'name' or 'user/name', got {repo_id!r}")


def _point_card_at(folder: Path, given_id: str, repo_id: str) -> None:
    """A card rendered for a bare repo name (the Hub adds the caller's namespace): its usage lines name the
    repo that now exists."""
    card = folder / "README.md"
    if given_id == repo_id or not card.is_file():
        return
    text = card.read_text(encoding="utf-8")
    for before, after in ((f'"{given_id}"', f'"{repo_id}"'), (f"--model {given_id} ", f"--model {repo_id} ")):
        text = text.replace(before, after)
    card.write_text(text, encoding="utf-8")


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = True, api: HfApi | None = None,
                token: str | None = None, commit_message: str | None = None, write_card=None):
    """Upload a saved folder as it is (its README.md included) to a Hub model repo; private by default.

    ``write_card(folder, full_repo_id)``, if given, writes the card once the repo exists (so its usage example
    names the real id, namespace included); otherwise a card made for a bare name is pointed at the real id.
    """
    _check_repo_id(repo_id)
    api = api if api is not None else HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    if write_card is not None:
        write_card(Path(folder), repo_url.repo_id)
    else:
        _point_card_at(Path(folder), repo_id, repo_url.repo_id)
    return api.upload_folder(repo_id=repo_url.repo_id, folder_path=str(folder), repo_type="model", token=token,
                             commit_message=commit_message or "Upload EchoDiff pipeline")


def push_pipeline(pipeline_or_folder, repo_id: str, private: bool = True, metrics: Mapping[str, float] | None = None,
                  card_data: Mapping | None = None, sections: Sequence[str] = (), api: HfApi | None = None,
                  token: str | None = None, commit_message: str | None = None, training_dataset: str | None = None,
                  evaluation: Mapping | None = None, sample_grid=None):
    """Save a pipeline (to a temporary folder) or take a saved folder, write its card, upload it.

    Returns the ``upload_folder`` result. ``api`` defaults to ``HfApi(token=token)``. The card's other
    arguments are :func:`write_model_card`'s.
    """
    _check_repo_id(repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(pipeline_or_folder, (str, os.PathLike)):
            folder = Path(pipeline_or_folder)
            if not (folder / "model_index.json").is_file():
                raise FileNotFoundError(f"{folder / 'model_index.json'} not found: expected a folder written by "
                                        "EchoDiffPipeline.save_pretrained")
        else:
            folder = Path(tmp)
            pipeline_or_folder.save_pretrained(folder)

        def write_card(target: Path, full_id: str) -> None:
            write_model_card(target, full_id, metrics, card_data, sections, training_dataset=training_dataset,
                             evaluation=evaluation, sample_grid=sample_grid)

        write_card(folder, repo_id)  # bad metrics or folders fail here, before the Hub is touched
        return push_folder(folder, repo_id, private=private, api=api, token=token, commit_message=commit_message,
                           write_card=write_card)


# Component libraries a saved pipeline may name in model_index.json (diffusers' own loadable libraries);
# anything else must be a code file inside the folder: a name elsewhere on sys.path is never imported.
PIPELINE_LIBRARIES = ("diffusers", "transformers", "onnxruntime.training")


def check_model_index(folder: str | os.PathLike) -> dict:
    """Read ``folder/model_index.json`` and refuse any component whose library is neither a pipeline library
    nor a code file of the folder: importing a module runs it, so an index must not pick what gets imported."""
    folder = Path(folder)
    path = folder / "model_index.json"
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserInputError(f"{path}: not a readable pipeline index ({type(err).__name__}: {err})") from err
    if not isinstance(index, dict) or "_class_name" not in index:
        raise UserInputError(f"{path}: expected a JSON object with '_class_name' (written by save_pretrained)")
    class_name = index["_class_name"]
    if isinstance(class_name, list):
        if len(class_name) != 2 or not all(isinstance(v, str) for v in class_name):
            raise UserInputError(f"{path}: _class_name must be a class name or [module, class], got {class_name!r}")
        if not (folder / f"{class_name[0]}.py").is_file():
            raise UserInputError(f"{path}: _class_name names module {class_name[0]!r}, which is not a code file "
                                 "of the folder; only the folder's own code or diffusers' pipelines are loaded")
    elif not isinstance(class_name, str):
        raise UserInputError(f"{path}: _class_name must be a string or [module, class], got {class_name!r}")
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue  # a config value, not a component
        if len(entry) != 2:
            raise UserInputError(f"{path}: component {name!r} must be [library, class], got {entry!r}")
        library = entry[0]
        if library is None or library in PIPELINE_LIBRARIES or _is_diffusers_pipeline_module(library):
            continue
        if not isinstance(library, str) or not (folder / name / f"{library}.py").is_file():
            raise UserInputError(f"{path}: component {name!r} names library {library!r}, which is neither a "
                                 f"pipeline library ({', '.join(PIPELINE_LIBRARIES)}) nor a code file "
                                 f"{name}/{library}.py of the folder; refusing to import it")
    return index


def _is_diffusers_pipeline_module(library) -> bool:
    from diffusers import pipelines

    return isinstance(library, str) and library.isidentifier() and hasattr(pipelines, library)


def check_finite_weights(pipeline, source: str | os.PathLike) -> None:
    """Refuse a pipeline whose networks hold NaN / inf (a corrupted file samples black images with exit 0)."""
    import torch

    for component, module in pipeline.components.items():
        if isinstance(module, torch.nn.Module):
            check_finite_module(module, f"'{source}': {component}")


def check_finite_module(module, what: str) -> None:
    """NonFiniteError naming ``what`` and the first parameter / buffer with NaN / inf."""
    import torch

    for tensor_name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(f"{what} weight {tensor_name!r} holds {bad} NaN/inf value(s) of {tensor.numel()}; "
                                 "the file is corrupted or came from a diverged run")


def load_pipeline(path_or_hub_id: str | os.PathLike, device: str | None = None, trust_remote_code: bool | None = None,
                  **kwargs):
    """A saved EchoDiff pipeline through diffusers' own loader (``dtype``, ``variant``, ``device_map`` pass through).

    A saved pipeline carries its code, which diffusers runs only with ``trust_remote_code``. The default
    trusts a local folder (it is on your disk) but not a Hub id: pass ``trust_remote_code=True`` once
    you have read the repository's code. ``model_index.json`` is checked first (:func:`check_model_index`)
    and the loaded weights must be finite.
    """
    from diffusers import DiffusionPipeline

    local = Path(path_or_hub_id).expanduser()
    is_local = local.is_dir()
    if trust_remote_code is None:
        trust_remote_code = is_local
    if looks_like_local_path(path_or_hub_id) and not is_local:
        raise MissingInputError(f"'{path_or_hub_id}' is neither a saved pipeline folder (no such folder) nor a Hub id")
    if is_local and not (local / "model_index.json").is_file():
        raise UserInputError(f"'{path_or_hub_id}' is a folder but not a saved pipeline (no model_index.json)")
    if not is_local and not trust_remote_code:
        raise UserInputError(f"'{path_or_hub_id}' is a Hub id: its pipeline code runs when loaded, so pass "
                             "trust_remote_code=True (CLI --trust_remote_code) after reading the repository's code")
    try:
        folder = local if is_local else Path(DiffusionPipeline.download(
            str(path_or_hub_id), revision=kwargs.get("revision"), variant=kwargs.get("variant"),
            trust_remote_code=trust_remote_code))
    except Exception as exc:  # network, missing repo, no model_index.json: all name the id
        raise UserInputError(f"'{path_or_hub_id}' could not be loaded as a pipeline (download failed: "
                             f"{type(exc).__name__}: {exc})") from exc
    check_model_index(folder)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
        raise UserInputError(f"'{path_or_hub_id}' could not be loaded as a pipeline "
                             f"({type(exc).__name__}: {exc})") from exc
    check_finite_weights(pipe, path_or_hub_id)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device else pipe


def attach_guide(pipeline, guide: str | os.PathLike, device: str | None = None, trust_remote_code: bool | None = None):
    """Register the UNet of the pipeline saved at ``guide`` (folder or Hub id) as ``pipeline.guide_unet``.

    Autoguidance needs a guide of the same data and preconditioning: a guide whose scheduler holds another
    preconditioning is refused (its D would not be comparable). Returns the pipeline, ready to save.
    """
    guide_pipe = load_pipeline(guide, device=device, trust_remote_code=trust_remote_code)
    ours, theirs = _preconditioning_settings(pipeline), _preconditioning_settings(guide_pipe)
    if ours != theirs:
        raise UserInputError(f"the guide '{guide}' must use the model's preconditioning {ours}, it has {theirs}")
    pipeline.register_modules(guide_unet=guide_pipe.unet)
    return pipeline


def _preconditioning_settings(pipeline) -> dict | None:
    """The preconditioning a pipeline's D uses (the pipeline's own config; older code: its scheduler's)."""
    preconditioning = getattr(pipeline, "preconditioning", None)
    if preconditioning is None:
        preconditioning = getattr(pipeline.scheduler, "preconditioning", None)
    return None if preconditioning is None else preconditioning.to_config()
