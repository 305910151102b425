"""Model card rendering and the push path, offline, with an injected fake HfApi."""

from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import ModelCard, RepoUrl
from PIL import Image

from pipelines.components.pipeline_echodiff import EchoDiffPipeline
from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
from pipelines.hub import push_pipeline, render_model_card, write_model_card
from pipelines.networks import build_network, tiny_config

SAVED_FILES = {
    "conditioning.py",
    "guidance.py",
    "model_index.json",
    "pipeline_echodiff.py",
    "preconditioning.py",
    "samplers.py",
    "scheduling_edm_heun.py",
    "scheduler/preconditioning.py",
    "scheduler/scheduler_config.json",
    "scheduler/scheduling_edm_heun.py",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "unet/layers.py",
    "unet/unet_song.py",
}


class FakeHfApi:
    """Records what would reach the Hub: the repo creation and every file of each uploaded folder."""

    def __init__(self):
        self.created, self.uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))
        full_id = repo_id if "/" in repo_id else f"token-owner/{repo_id}"  # the Hub adds the caller's namespace
        return RepoUrl(f"https://huggingface.co/{full_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        self.uploads.append((repo_id, files, kwargs))
        return f"https://huggingface.co/{repo_id}/commit/fake"


@pytest.fixture(scope="module")
def pipe():
    pipeline = EchoDiffPipeline(unet=build_network("ddpmpp", **tiny_config("ddpmpp")), scheduler=EDMHeunScheduler())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_push_uploads_exactly_the_saved_folder_and_its_card(pipe):
    api = FakeHfApi()
    push_pipeline(pipe, "someone/echodiff-tiny", metrics={"FID-50k": 3.75}, api=api)

    (repo_id, create_kwargs), = api.created
    assert repo_id == "someone/echodiff-tiny"
    assert create_kwargs["private"] is True and create_kwargs["exist_ok"] is True and create_kwargs["repo_type"] == "model"
    (upload_repo, files, upload_kwargs), = api.uploads
    assert upload_repo == "someone/echodiff-tiny" and upload_kwargs["repo_type"] == "model"
    assert set(files) == SAVED_FILES | {"README.md"}

    card = ModelCard(files["README.md"].decode())
    result, = card.data.eval_results
    assert (result.metric_type, result.metric_name, result.metric_value) == ("fid", "FID-50k", 3.75)
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "unconditional-image-generation"
    assert 'from_pretrained("someone/echodiff-tiny", trust_remote_code=True)' in card.text
    assert "SongUNet2DModel" in card.text and f"{sum(p.numel() for p in pipe.unet.parameters()):,}" in card.text


def test_card_sections_are_composed_after_the_template(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    training = "## Training configuration\n\n| setting | value |\n|---|---|\n| arch | ddpmpp |\n"
    audit = "## Memorization audit\n\nNo copies found.\n"
    write_model_card(tmp_path, "someone/echodiff-tiny", metrics={"KID": 0.002}, sections=[training, audit])
    text = (tmp_path / "README.md").read_text()
    assert text.index("## Limitations and risks") < text.index("## Training configuration") < text.index(
        "## Memorization audit")
    assert ModelCard(text).data.eval_results[0].metric_value == 0.002
    # Re-rendering with other metrics keeps what the sections say, from the sections themselves.
    write_model_card(tmp_path, "someone/echodiff-tiny", metrics={"KID": 0.001}, sections=[training])
    text = (tmp_path / "README.md").read_text()
    assert text.count("## Training configuration") == 1 and "Memorization audit" not in text
    assert ModelCard(text).data.eval_results[0].metric_value == 0.001


def test_push_from_a_saved_folder_writes_its_card(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    api = FakeHfApi()
    push_pipeline(tmp_path, "echodiff-tiny", private=False, api=api, card_data={"license": "other"})
    (upload_repo, files, _), = api.uploads
    assert upload_repo == "token-owner/echodiff-tiny" and set(files) == SAVED_FILES | {"README.md"}
    card = ModelCard((tmp_path / "README.md").read_text())
    assert card.data.license == "other" and card.data.eval_results is None
    assert "No metrics reported" in card.text
    # The usage example names the repo the Hub made (namespace added), not the bare name nothing loads.
    assert 'from_pretrained("token-owner/echodiff-tiny"' in card.text and '"echodiff-tiny"' not in card.text
    assert api.created[0][1]["private"] is False


def test_card_reports_the_preconditioning_and_sampler(tmp_path):
    pipeline = EchoDiffPipeline(unet=build_network("adm", **tiny_config("adm")),
                                scheduler=EDMHeunScheduler(preconditioning="ve", solver="euler"))
    pipeline.save_pretrained(tmp_path)
    text = render_model_card(tmp_path, "someone/echo-ve").text
    assert "VE preconditioning" in text and "`ADMUNet2DModel`" in text
    assert "| sampler | euler, edm time steps (N steps = N network evaluations) |" in text


def test_bad_inputs_are_named(pipe, tmp_path):
    with pytest.raises(ValueError, match="repo_id"):
        push_pipeline(pipe, "a/b/c", api=FakeHfApi())
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        push_pipeline(tmp_path, "someone/empty", api=FakeHfApi())
    with pytest.raises(ValueError, match="FID"):
        push_pipeline(pipe, "someone/x", metrics={"FID": "low"}, api=FakeHfApi())


# ---------------------------------------------------------------- loading: what a saved folder may make us run


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pipeline"
    pipe.save_pretrained(folder)
    return folder


def _copy(folder, tmp_path, name="copy"):
    import shutil

    return Path(shutil.copytree(folder, tmp_path / name))


def _set_component(folder, name, entry):
    import json

    index = json.loads((folder / "model_index.json").read_text())
    index[name] = entry
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("component", ["unet", "discriminator"])
def test_index_naming_an_installed_module_is_refused_before_anything_is_imported(saved, tmp_path, component,
                                                                                capsys, monkeypatch):
    """A crafted model_index.json must not pick a module to import: `this` prints the Zen of Python."""
    import sys

    from pipelines.errors import UserInputError
    from pipelines.hub import load_pipeline

    assert "this" not in sys.modules
    folder = _copy(saved, tmp_path)
    _set_component(folder, component, ["this", "X"])
    with pytest.raises(UserInputError, match=rf"model_index.json: component '{component}' names library 'this'"):
        load_pipeline(folder)
    assert "this" not in sys.modules and "Beautiful is better" not in capsys.readouterr().out

    marker = tmp_path / "imported"  # any module on sys.path, e.g. one dropped next to the user's scripts
    (tmp_path / "planted_module.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass X: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _set_component(folder, component, ["planted_module", "X"])
    with pytest.raises(UserInputError, match="planted_module"):
        load_pipeline(folder)
    assert not marker.exists()
    _set_component(folder, "_class_name", ["planted_module", "X"])
    with pytest.raises(UserInputError, match="_class_name names module 'planted_module'"):
        load_pipeline(folder)
    assert not marker.exists()


def test_malformed_index_and_truncated_weights_are_named(saved, tmp_path):
    from pipelines.errors import UserInputError
    from pipelines.hub import load_pipeline

    folder = _copy(saved, tmp_path, "malformed")
    (folder / "model_index.json").write_text('{"_class_name": ')
    with pytest.raises(UserInputError, match="model_index.json: not a readable pipeline index"):
        load_pipeline(folder)
    folder = _copy(saved, tmp_path, "truncated")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserInputError, match="truncated"):
        load_pipeline(folder)


def _nan_copy(module, name):
    import copy

    import torch

    broken = copy.deepcopy(module)
    with torch.no_grad():
        dict(broken.named_parameters())[name].view(-1)[0] = float("nan")
    return broken


def test_non_finite_weights_are_refused_on_load(pipe, saved, tmp_path):
    import numpy as np
    import torch

    from pipelines.errors import NonFiniteError
    from pipelines.hub import load_pipeline
    from pipelines.training.discriminator import build_discriminator

    name = next(iter(dict(pipe.unet.named_parameters())))
    nan_unet = EchoDiffPipeline(unet=_nan_copy(pipe.unet, name), scheduler=EDMHeunScheduler())
    nan_unet.save_pretrained(tmp_path / "nan-unet")
    with pytest.raises(NonFiniteError, match=rf"unet weight '{name}' holds 1 NaN/inf"):
        load_pipeline(tmp_path / "nan-unet")

    torch.manual_seed(0)
    disc = build_discriminator("adm", resolution=pipe.unet.config.sample_size, channels=1, tiny=True)
    disc_name = next(iter(dict(disc.named_parameters())))
    EchoDiffPipeline(unet=pipe.unet, scheduler=EDMHeunScheduler(), discriminator=_nan_copy(disc, disc_name)
                     ).save_pretrained(tmp_path / "nan-disc")
    with pytest.raises(NonFiniteError, match=rf"discriminator weight '{disc_name}'"):
        load_pipeline(tmp_path / "nan-disc")

    # an intact safetensors header over a garbage body: loads, but its values are not weights
    folder = _copy(saved, tmp_path, "garbage")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    raw = weights.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    garbage = np.random.default_rng(0).integers(0, 256, len(raw) - header_end, dtype=np.uint8).tobytes()
    weights.write_bytes(raw[:header_end] + garbage)
    with pytest.raises(NonFiniteError, match="unet weight"):
        load_pipeline(folder)


def test_non_finite_samples_are_refused_before_scoring(pipe, tmp_path):
    from pipelines.errors import NonFiniteError
    from pipelines.evaluation.generation import generate_images

    name = next(iter(dict(pipe.unet.named_parameters())))
    broken = EchoDiffPipeline(unet=_nan_copy(pipe.unet, name), scheduler=EDMHeunScheduler())
    broken.set_progress_bar_config(disable=True)
    with pytest.raises(NonFiniteError, match="NaN/inf images for seeds 0...1"):
        generate_images(broken, tmp_path / "samples", "0-1", num_inference_steps=2, progress=False)
    assert not list((tmp_path / "samples").glob("shard-*.npz"))


def test_dg_export_refuses_a_non_finite_discriminator(saved, tmp_path, capsys, fresh_accelerate_state):
    import json

    import torch

    import train_discriminator
    from pipelines.errors import run_cli
    from pipelines.training.discriminator import build_discriminator

    torch.manual_seed(0)
    disc = build_discriminator("adm", resolution=16, channels=1, tiny=True)
    name = next(iter(dict(disc.named_parameters())))
    epoch = tmp_path / "dg" / "checkpoints" / "epoch-001"
    _nan_copy(disc, name).save_pretrained(epoch / "discriminator")
    (epoch / "state.json").write_text(json.dumps({"epoch": 1}))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train_discriminator.main, ["--model", str(saved), "--dataset", str(tmp_path / "unused"),
                                           "--output_dir", str(tmp_path / "dg"), "--stages", "export"])
    assert exit_info.value.code == 2
    assert f"discriminator of epoch 1 under {tmp_path / 'dg' / 'checkpoints'} weight '{name}'" in capsys.readouterr().err
    assert not (tmp_path / "dg" / "pipeline").exists()


# ---------------------------------------------------------------- the other readers of user files (docs/security.md)


class _Payload:
    """Unpickling this would create ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('ran')",)


def test_accelerate_checkpoint_reads_are_weights_only(tmp_path):
    """Resuming reads optimizer / RNG files with accelerate's ``load``: it must refuse a pickled payload, and
    EchoDiff must register no custom checkpoint objects (those accelerate reads with weights_only=False)."""
    import pickle

    import torch
    from accelerate.utils import load

    marker = tmp_path / "ran"
    crafted = tmp_path / "random_states_0.pkl"
    torch.save({"random_state": _Payload(marker)}, crafted)
    with pytest.raises(pickle.UnpicklingError):
        load(crafted)
    assert not marker.exists()
    sources = [p for p in (Path(__file__).parents[1] / "pipelines").rglob("*.py")]
    assert sources and not [p for p in sources if "register_for_checkpointing" in p.read_text()]


def test_npz_readers_refuse_pickled_object_arrays(tmp_path):
    import numpy as np

    from pipelines.evaluation.generation import load_images
    from pipelines.evaluation.reference import FeatureStatistics

    marker = tmp_path / "ran"
    crafted = tmp_path / "samples.npz"
    np.savez(crafted, images=np.array([_Payload(marker)], dtype=object), mu=np.array([_Payload(marker)], dtype=object),
             sigma=np.zeros(1), n=np.array(1), fingerprint=np.array("{}"))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_images(crafted)
    with pytest.raises(ValueError, match="allow_pickle"):
        FeatureStatistics.load(crafted)
    assert not marker.exists()


def test_inception_weights_are_checked_before_torchscript_loads_them(tmp_path):
    from pipelines.evaluation.fid import InceptionDetector

    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the Inception file")
    with pytest.raises(ValueError, match="SHA-1"):
        InceptionDetector(weights_path=fake)


def test_sweep_config_yaml_builds_data_only(tmp_path):
    from pipelines.evaluation.sweep import load_sweep_config
    from pipelines.training import ConfigError

    marker = tmp_path / "ran"
    config = tmp_path / "sweep.yaml"
    config.write_text(f"dataset: !!python/object/apply:os.system ['touch {marker}']\nruns: []\n")
    with pytest.raises(ConfigError, match="sweep.yaml: cannot parse"):
        load_sweep_config(config)
    assert not marker.exists()


@pytest.fixture(scope="module")
def frame_datasets(tmp_path_factory):
    """The same tiny frames built twice: from the synthetic generator's folder, and with its marker removed
    (what a build of EchoNet-Dynamic records)."""
    from pipelines.data.frame_builder import build_frame_dataset
    from pipelines.data.synthetic_echonet import write_synthetic_echonet

    root = tmp_path_factory.mktemp("frames")
    source = write_synthetic_echonet(root / "synthetic", num_videos=2, seed=3, num_workers=1, num_frames=(5, 6))
    build_frame_dataset(source, root / "synthetic_frames", resolution=8, num_workers=0, progress=False, verbose=False)
    (source / "echodiff_synthetic.json").unlink()
    build_frame_dataset(source, root / "echonet_frames", resolution=8, num_workers=0, progress=False, verbose=False)
    return {"synthetic": root / "synthetic_frames", "echonet": root / "echonet_frames"}


def _header(folder):
    import yaml

    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---")[1]), ModelCard(text)


def test_card_header_states_the_runs_training_data_and_fid_size(pipe, frame_datasets, tmp_path):
    for kind, dataset in frame_datasets.items():
        folder = tmp_path / kind
        pipe.save_pretrained(folder)
        grid = np.full((4, 1, 8, 8), 200, np.uint8)
        write_model_card(folder, None, metrics={"FID": 91.7}, training_dataset=str(dataset), sample_grid=grid,
                         evaluation={"num_generated": 256, "reference": "584 real frames (train split)"})
        header, card = _header(folder)
        result = header["model-index"][0]["results"][0]
        if kind == "synthetic":
            assert header["license"] == "unknown" and "license_name" not in header
            assert result["dataset"]["type"] == "echodiff-synthetic-echonet"
            training = card.text.split("## Training data")[1].split("##")[0]
            assert training.startswith("\n\nEchoDiff synthetic") and "no patient data" in training
        else:
            assert (header["license"], header["license_name"]) == ("other", "echonet-dynamic-research-use-agreement")
            assert header["license_link"].startswith("https://echonet.github.io/dynamic")
            assert result["dataset"]["type"] == "echonet-dynamic"
            assert "research use agreement" in card.text
        assert result["dataset"]["name"] == "584 real frames (train split)"
        assert "over 256 generated" in card.text and "50,000 generated" not in card.text
        assert "datasets" not in header  # a local folder has no Hub id to link
        # Not pushed: the usage example loads the folder itself.
        assert f'from_pretrained("{folder}", trust_remote_code=True)' in card.text
        assert "![Samples" in card.text and "(samples.png)" in card.text
        assert np.asarray(Image.open(folder / "samples.png")).min() == 200
        assert "## Intended use" in card.text and "Not for clinical use" in card.text


def test_card_from_a_hub_dataset_lists_it_and_unrecorded_data_gets_echonet_terms(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    write_model_card(tmp_path, "someone/model", metrics={"FID": 3.0}, training_dataset="someone/echonet-frames")
    header, card = _header(tmp_path)
    assert header["datasets"] == ["someone/echonet-frames"] and header["license"] == "other"
    assert header["model-index"][0]["results"][0]["dataset"]["type"] == "echonet-layout-frames"
    assert "is not recorded" in card.text.split("## Training data")[1]
    assert "not recorded" in card.text  # no evaluation given: the card does not invent a sample size
