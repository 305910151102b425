"""Model card rendering and Hub upload for saved EchoDiff pipelines.

``push_pipeline(pipe_or_folder, "user/echodiff-adm-edm", metrics={"FID-50k": 3.75})`` saves the pipeline
(remote-code layout, see ``EchoDiffPipeline.save_pretrained``), renders ``model_cards/echodiff_model_card.md``
with huggingface_hub's ``ModelCard`` (metrics go to the card's ``model-index``) and uploads the folder.
The ``HfApi`` is injectable, so the whole path runs offline in tests.
"""

import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from safetensors import SafetensorError, safe_open

from pipelines.errors import MissingInputError, NonFiniteError, UserInputError
from pipelines.utils import MODEL_CARDS_DIR, looks_like_local_path

MODEL_CARD_TEMPLATE = MODEL_CARDS_DIR / "echodiff_model_card.md"
DEFAULT_TAGS = ["diffusers", "echodiff", "edm", "unconditional-image-generation", "medical-imaging", "echocardiography"]
DEFAULT_DATASET = ("echonet-dynamic", "EchoNet-Dynamic frames (1 in 5, 64x64)")


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
                    dataset_type: str = DEFAULT_DATASET[0], dataset_name: str = DEFAULT_DATASET[1]) -> ModelCardData:
    """``ModelCardData`` for an EchoDiff model; ``metrics`` ({name: value}) become model-index eval results."""
    fields = {"library_name": "diffusers", "pipeline_tag": "unconditional-image-generation", "tags": list(DEFAULT_TAGS),
              "model_name": model_name}
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


def render_model_card(folder: str | os.PathLike, repo_id: str, metrics: Mapping[str, float] | None = None,
                      card_data: Mapping | None = None, sections: Sequence[str] = (),
                      template_path: str | os.PathLike = MODEL_CARD_TEMPLATE) -> ModelCard:
    """The model card of the pipeline saved in ``folder``: the template, then each of ``sections`` (Markdown)."""
    if not Path(template_path).is_file():
        raise FileNotFoundError(f"model card template {template_path} not found")
    card_data = dict(card_data or {})
    dataset = (card_data.pop("dataset_type", DEFAULT_DATASET[0]), card_data.pop("dataset_name", DEFAULT_DATASET[1]))
    model_name = card_data.pop("model_name", repo_id.split("/")[-1])
    data = build_card_data(model_name, metrics, card_data, dataset_type=dataset[0], dataset_name=dataset[1])
    facts = describe_pipeline_folder(folder)
    return ModelCard.from_template(data, template_path=str(template_path), repo_id=repo_id, model_name=model_name,
                                   metrics=dict(metrics or {}), dataset_name=dataset[1],
                                   sections=[s.strip("\n") for s in sections], **facts)


def write_model_card(folder: str | os.PathLike, repo_id: str, metrics: Mapping[str, float] | None = None,
                     card_data: Mapping | None = None, sections: Sequence[str] = ()) -> Path:
    """Render the card (see :func:`render_model_card`) into ``folder/README.md``."""
    path = Path(folder) / "README.md"
    render_model_card(folder, repo_id, metrics, card_data, sections).save(str(path))
    return path


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise UserInputError(f"repo_id must look like 'name' or 'user/name', got {repo_id!r}")


def push_folder(folder: str | os.PathLike, repo_id: str, private: bool = True, api: HfApi | None = None,
                token: str | None = None, commit_message: str | None = None):
    """Upload a saved folder as it is (its README.md included) to a Hub model repo; private by default."""
    _check_repo_id(repo_id)
    api = api if api is not None else HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token)
    return api.upload_folder(repo_id=repo_url.repo_id, folder_path=str(folder), repo_type="model", token=token,
                             commit_message=commit_message or "Upload EchoDiff pipeline")


def push_pipeline(pipeline_or_folder, repo_id: str, private: bool = True, metrics: Mapping[str, float] | None = None,
                  card_data: Mapping | None = None, sections: Sequence[str] = (), api: HfApi | None = None,
                  token: str | None = None, commit_message: str | None = None):
    """Save a pipeline (to a temporary folder) or take a saved folder, write its card, upload it.

    Returns the ``upload_folder`` result. ``api`` defaults to ``HfApi(token=token)``.
    """
    _check_repo_id(repo_id)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(pipeline_or_folder, (str, os.PathLike)):
            folder = Path(pipeline_or_folder)
        else:
            folder = Path(tmp)
            pipeline_or_folder.save_pretrained(folder)
        write_model_card(folder, repo_id, metrics, card_data, sections)
        return push_folder(folder, repo_id, private=private, api=api, token=token, commit_message=commit_message)


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
