"""Model card rendering and the push path, offline, with an injected fake HfApi."""

from pathlib import Path

import pytest
from huggingface_hub import ModelCard, RepoUrl

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
