"""The sampling app: its functions directly (loading, argument checks, seeds -> images -> files), then the page
in headless Chromium (Debian's ``chromium``, which install.sh installs), compared pixel for pixel with the
pipeline's own images."""

import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import app
from pipelines.app import (
    CONTROLS,
    Control,
    ModelKey,
    PipelineCache,
    call_arguments,
    control_default,
    evaluations,
    open_pipeline,
    sample,
    sampling_arguments,
    seeds_for,
    write_outputs,
)
from pipelines.components.pipeline_echodiff import EchoDiffPipeline
from pipelines.components.scheduling_edm_heun import EDMHeunScheduler
from pipelines.evaluation.generation import load_images
from pipelines.hub import load_pipeline
from pipelines.networks import build_network, tiny_config
from pipelines.training.discriminator import build_discriminator
from pipelines.utils import image_grid, to_uint8

REPO = Path(__file__).resolve().parent.parent
STEPS = 4  # 7 network evaluations


def tiny_pipeline(with_discriminator: bool) -> EchoDiffPipeline:
    """A tiny ADM pipeline whose output visibly depends on the seed (fresh EDM nets output ~zero)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        unet = build_network("adm", channels=1, **tiny_config("adm")).eval()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in unet.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        disc = build_discriminator("adm", resolution=16, channels=1, unet=unet, tiny=True).eval() \
            if with_discriminator else None
    return EchoDiffPipeline(unet=unet, scheduler=EDMHeunScheduler(s_churn=2.0), discriminator=disc)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("app-models")
    tiny_pipeline(False).save_pretrained(root / "plain")
    tiny_pipeline(True).save_pretrained(root / "dg")
    (root / "not_a_pipeline").mkdir()
    (root / "not_a_pipeline" / "notes.txt").write_text("hello")
    return root


@pytest.fixture(scope="module")
def plain(folders):
    return load_pipeline(folders / "plain")


@pytest.fixture(scope="module")
def guided(folders):
    return load_pipeline(folders / "dg")


def reference(pipe, seeds, **kwargs):
    """The pipeline's own images for ``seeds``, as EDM writes them (uint8 NCHW)."""
    out = pipe(seeds=seeds, num_inference_steps=STEPS, output_type="latent", **kwargs).images
    return to_uint8(out).numpy()


# ----- functions ------------------------------------------------------------------------------------------


def test_default_model_is_the_quick_starts_pipeline():
    from pipelines.demo import DemoConfig

    assert Path(app.DEFAULT_MODEL) == Path(DemoConfig().out_dir) / "pipeline"


def test_loading_errors_say_what_is_wrong(folders, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a saved pipeline"):
        open_pipeline(ModelKey(str(folders / "not_a_pipeline")))
    with pytest.raises(ValueError, match="neither a saved pipeline folder"):
        open_pipeline(ModelKey(str(tmp_path / "missing" / "x")))
    with pytest.raises(ValueError, match="enter a saved pipeline folder"):
        open_pipeline(ModelKey("  "))
    monkeypatch.chdir(tmp_path)  # no results/demo here
    with pytest.raises(ValueError, match=r"python3 demo.py"):
        open_pipeline(ModelKey(app.DEFAULT_MODEL))
    with pytest.raises(ValueError, match="runs the repository's code"):
        open_pipeline(ModelKey("someone/echodiff-model"))
    # HF_HUB_OFFLINE=1 (conftest): a Hub id cannot be reached, as without a network.
    with pytest.raises(ValueError, match="could not be loaded"):
        open_pipeline(ModelKey("someone/echodiff-model", revision="0123abc", trust_remote_code=True))


def test_revision_goes_to_hub_ids_only(folders):
    seen = []

    def loader(model, **kwargs):
        seen.append(kwargs)
        return load_pipeline(folders / "plain")

    open_pipeline(ModelKey("someone/echodiff-model", revision="v1.0", trust_remote_code=True), loader)
    open_pipeline(ModelKey(str(folders / "plain"), revision="v1.0"), loader)
    assert seen[0]["revision"] == "v1.0" and seen[0]["trust_remote_code"] is True
    assert "revision" not in seen[1] and seen[1]["trust_remote_code"] is True  # a local folder is trusted


def test_cache_loads_once_and_keeps_the_last_ones(folders):
    loads = []
    cache = PipelineCache(size=1, loader=lambda model, **kw: loads.append(model) or load_pipeline(model))
    first = cache.get(ModelKey(str(folders / "plain")))
    assert cache.get(ModelKey(str(folders / "plain"))) is first and len(loads) == 1
    cache.get(ModelKey(str(folders / "dg")))
    cache.get(ModelKey(str(folders / "plain")))
    assert len(loads) == 3  # size 1: the plain pipeline was dropped and loaded again


def test_a_loaded_dg_pipeline_survives_loading_another(folders):
    """The app keeps several pipelines in one process; loading a folder re-executes its remote-code files,
    which must not break the pipelines loaded before (the discriminator's blocks once did)."""
    first = load_pipeline(folders / "dg")
    before = reference(first, [1, 2], dg_weight_first_order=5.0)
    load_pipeline(folders / "dg")
    load_pipeline(folders / "plain")
    assert np.array_equal(reference(first, [1, 2], dg_weight_first_order=5.0), before)


def test_seed_ranges():
    assert seeds_for(7, 3) == [7, 8, 9]
    assert seeds_for(7.0, 2.0) == [7, 8]  # Gradio's number fields send floats
    for seed, count, match in [(-1, 1, "seed must be in"), (1.5, 1, "whole number"), (0, 0, "number of images"),
                               (0, 65, "number of images"), (None, 1, "whole number"), (2**32, 1, "seed must be in")]:
        with pytest.raises(ValueError, match=match):
            seeds_for(seed, count, max_images=64)


def test_controls_follow_the_pipeline(plain, guided):
    dg_controls = [c for c in CONTROLS if c.name.startswith("dg_")]
    assert dg_controls and all(c.supported(guided) and not c.supported(plain) for c in dg_controls)
    churn = next(c for c in CONTROLS if c.name == "s_churn")
    assert churn.supported(plain) and control_default(plain, churn) == 2.0  # the saved scheduler's value
    assert control_default(guided, next(c for c in CONTROLS if c.name == "dg_boost")) == 1.0
    # An argument the loaded pipeline's code does not take (a later feature on an older saved pipeline) is hidden.
    assert not Control("some_future_argument", "later", "Later", 0.0, 5.0, 0.1).supported(guided)
    assert {"seeds", "num_inference_steps", "s_churn", "dg_weight_first_order"} <= call_arguments(guided)
    solver = next(c for c in CONTROLS if c.name == "solver")
    assert solver.supported(plain) and control_default(plain, solver) == "heun"
    assert list(solver.choices(plain)) == ["heun", "euler"]  # the loaded scheduler's own list


def test_autoguidance_controls_need_a_guide_and_give_the_pipelines_images(plain):
    ag_controls = [c for c in CONTROLS if c.name.startswith("ag_")]
    assert {c.name for c in ag_controls} == {"ag_weight", "ag_sigma_min", "ag_sigma_max"}
    assert not any(c.supported(plain) for c in ag_controls)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        guide = build_network("adm", channels=1, **tiny_config("adm")).eval()
        with torch.no_grad():
            for parameter in guide.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    with_guide = EchoDiffPipeline(unet=plain.unet, scheduler=plain.scheduler, guide_unet=guide)
    assert all(c.supported(with_guide) for c in ag_controls)
    assert control_default(with_guide, ag_controls[0]) == 1.0  # the call's own default: unguided
    values = {"s_churn": 2.0, "ag_weight": 2.0, "ag_sigma_min": 0.0, "ag_sigma_max": None}
    with pytest.raises(ValueError, match="needs a guide network"):
        sampling_arguments(plain, 4, values)
    arguments = sampling_arguments(with_guide, STEPS, values)
    images = sample(with_guide, [1, 2], arguments, lambda done, total: None)
    assert np.array_equal(images, reference(with_guide, [1, 2], ag_weight=2.0, s_churn=2.0))
    assert not np.array_equal(images, reference(with_guide, [1, 2]))  # the guide acted


def test_condition_controls_need_a_conditional_model_and_give_the_pipelines_images(plain):
    from pipelines.app import describe, named_conditions
    from pipelines.components.conditioning import label_dim

    spec = {"label_dropout": 0.2, "conditions": [
        {"name": "ef", "kind": "scalar", "column": "EF", "range": [20.0, 80.0]},
        {"name": "phase", "kind": "categorical", "column": "phase", "classes": ["ED", "ES", "other"]}]}
    with torch.random.fork_rng():
        torch.manual_seed(2)
        unet = build_network("adm", channels=1, **tiny_config("adm"), label_dim=label_dim(spec)).eval()
        with torch.no_grad():
            for parameter in unet.parameters():
                parameter.add_(0.05 * torch.randn_like(parameter))
    conditional = EchoDiffPipeline(unet=unet, scheduler=plain.scheduler, conditions=spec)
    conditional.set_progress_bar_config(disable=True)
    rows = [c for c in CONTROLS if c.group == "Conditions"]
    assert {c.name for c in rows} == {"conditions", "guidance_scale"}
    assert all(c.supported(conditional) and not c.supported(plain) for c in rows)
    assert "ef in [20, 80]" in describe(conditional, ModelKey("m")) and "phase one of ED, ES, other" in \
        describe(conditional, ModelKey("m"))
    assert named_conditions(" ef=35 , phase=ES ") == {"ef": 35.0, "phase": "ES"} and named_conditions("") == {}
    with pytest.raises(ValueError, match="expected name=value pairs"):
        named_conditions("ef 35")
    values = {"s_churn": 2.0, "conditions": "ef=35, phase=ES", "guidance_scale": 2.0}
    with pytest.raises(ValueError, match="needs named conditions"):
        sampling_arguments(plain, STEPS, values)
    arguments = sampling_arguments(conditional, STEPS, values)
    assert arguments == {"num_inference_steps": STEPS, "s_churn": 2.0, "ef": 35.0, "phase": "ES",
                         "guidance_scale": 2.0}
    images = sample(conditional, [1, 2], arguments)
    assert np.array_equal(images, reference(conditional, [1, 2], s_churn=2.0, ef=35.0, phase="ES",
                                            guidance_scale=2.0))
    assert not np.array_equal(images, reference(conditional, [1, 2], s_churn=2.0))  # not the null label
    with pytest.raises(ValueError, match="ef=95 is outside the range"):  # the model's own check, one message
        sample(conditional, [1], sampling_arguments(conditional, STEPS, {"conditions": "ef=95, phase=ES"}))
    assert evaluations(conditional, STEPS, {"guidance_scale": 2.0}) == 2 * STEPS - 1


def test_sampler_control_lists_the_pipelines_own_samplers_and_counts_their_nfe(plain):
    control = next(c for c in CONTROLS if c.name == "sampler")
    assert control.supported(plain) and tuple(control.choices(plain)) == plain.sampler_names()
    assert {"heun", "dpmpp2m"} <= set(control.choices(plain))
    assert evaluations(plain, 6, {"sampler": "dpmpp2m"}) == 6 and evaluations(plain, 6, {"sampler": "heun"}) == 11
    arguments = sampling_arguments(plain, STEPS, {"sampler": "dpmpp2m", "s_churn": 2.0})
    assert arguments == {"num_inference_steps": STEPS, "sampler": "dpmpp2m"}  # EDM's churn is not dpmpp2m's
    assert sampling_arguments(plain, STEPS, {"sampler": "heun", "s_churn": 2.0})["s_churn"] == 2.0
    progress = []
    images = sample(plain, [1, 2], arguments, lambda done, total: progress.append((done, total)))
    assert np.array_equal(images, reference(plain, [1, 2], sampler="dpmpp2m"))
    assert progress == [(i, STEPS) for i in range(1, STEPS + 1)]  # one evaluation per step


def test_widgets_come_from_the_table(guided, folders, monkeypatch):
    """A new row is one line: a slider, a number field (empty = None) or a dropdown, with the pipeline's default."""
    import gradio as gr

    extra = Control("dg_sigma_max", "DG up to sigma", "Discriminator Guidance", 0.0, 80.0, None,
                    needs=app.HAS_DISCRIMINATOR)
    monkeypatch.setattr(app, "CONTROLS", (*CONTROLS, extra))
    blocks = app.build_app(str(folders / "dg"), device="cpu")
    widgets = {name: widget for name, (_, widget) in blocks.echodiff_controls.items()}
    assert isinstance(widgets["dg_sigma_max"], gr.Number) and widgets["dg_sigma_max"].value is None
    assert isinstance(widgets["solver"], gr.Dropdown) and widgets["solver"].value == "heun"
    assert isinstance(widgets["dg_boost"], gr.Slider) and widgets["dg_boost"].value == 1.0
    assert widgets["dg_sigma_max"].visible and widgets["dg_weight_first_order"].visible
    assert sampling_arguments(guided, 4, {"dg_sigma_max": None})["dg_sigma_max"] is None


def test_argument_checks(plain, guided):
    values = {"s_churn": 2.0, "dg_weight_first_order": 0.0, "dg_weight_second_order": 0.0, "dg_boost": 1.0}
    assert sampling_arguments(plain, 4, values) == {"num_inference_steps": 4, "s_churn": 2.0}
    assert sampling_arguments(guided, 4, values) == {"num_inference_steps": 4, **values}
    for steps in (1, 0, 257, 2.5, None):
        with pytest.raises(ValueError, match="steps"):
            sampling_arguments(plain, steps, values)
    with pytest.raises(ValueError, match="needs a discriminator"):
        sampling_arguments(plain, 4, {**values, "dg_weight_first_order": 5.0})
    assert evaluations(plain, 6) == 11 and evaluations(plain, 2) == 3  # Heun: 2N - 1
    assert evaluations(plain, 6, {"solver": "euler", "seeds": [1]}) == 6


def test_images_and_files_are_the_pipelines(guided, tmp_path):
    seeds = [3, 4, 5]
    progress = []
    images = sample(guided, seeds, {"num_inference_steps": STEPS, "dg_weight_first_order": 5.0, "dg_boost": 2.0},
                    lambda done, total: progress.append((done, total)))
    expected = reference(guided, seeds, dg_weight_first_order=5.0, dg_boost=2.0)
    assert images.dtype == np.uint8 and images.shape == (3, 1, 16, 16) and np.array_equal(images, expected)
    assert not np.array_equal(images, reference(guided, seeds))  # DG acted
    assert progress == [(i, 2 * STEPS - 1) for i in range(1, 2 * STEPS)]

    outputs = write_outputs(images, seeds, tmp_path / "out", keep=2)
    for path, image in zip(outputs.images, images):
        assert np.array_equal(np.asarray(Image.open(path))[None], image)
    assert np.array_equal(np.asarray(Image.open(outputs.grid)), image_grid(images)[..., 0])
    npz_images, npz_seeds = load_images(outputs.npz, return_seeds=True)  # the FID tools' reader
    assert np.array_equal(npz_images, images) and list(npz_seeds) == seeds
    for _ in range(3):
        write_outputs(images, seeds, tmp_path / "out", keep=2)
    assert len(list((tmp_path / "out").glob("run-*"))) == 2


def test_space_card_configures_a_gradio_space():
    import gradio
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(REPO / "model_cards" / "space_card.md")
    assert card.data.sdk == "gradio" and (REPO / card.data.app_file).is_file()
    assert card.data.sdk_version.split(".")[0] == gradio.__version__.split(".")[0]  # the API app.py is written for


def test_locked_app_refuses_other_models_even_through_the_api(folders, tmp_path):
    from gradio_client import Client

    blocks = app.build_app(str(folders / "plain"), lock_model=True, out_root=tmp_path, device="cpu")
    port = free_port()
    app.launch_app(blocks, port=port, block=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        result = client.predict(str(folders / "dg"), "", True, STEPS, api_name="/load")
        assert "serves one model only" in str(result)
    finally:
        blocks.close()


def test_requests_answer_with_a_message(folders, tmp_path):
    cache = PipelineCache()
    key = ModelKey(str(folders / "plain"))
    values = {"s_churn": 2.0, "dg_weight_first_order": 0.0}
    message, grid, gallery, files = app.run_request(cache, key, 3, 2, STEPS, values, tmp_path)
    assert "seeds 3-4" in message and f"{STEPS} steps ({2 * STEPS - 1} NFE each)" in message
    assert Path(grid).is_file() and [caption for _, caption in gallery] == ["seed 3", "seed 4"] and len(files) == 4
    for request, expected in [((key, 3, 2, 1), "steps must be in 2"), ((None, 3, 2, STEPS), "no pipeline loaded"),
                              ((key, -1, 2, STEPS), "seed must be"), ((key, 3, 0, STEPS), "number of images")]:
        message, *outputs = app.run_request(cache, *request, values, tmp_path)
        assert message.startswith("**Error:**") and expected in message and outputs == [None, None, None]
    message, *_ = app.run_request(cache, key, 3, 1, STEPS, {**values, "dg_weight_first_order": 5.0}, tmp_path)
    assert "needs a discriminator" in message


# ----- the page in a real browser -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "the browser test needs Debian's chromium: `bash install.sh` installs it (apt-get, as root)"
    return path


def set_number(page, elem_id: str, value) -> None:
    field = page.locator(f"#{elem_id} input[type=number]")
    field.fill(str(value))
    field.press("Enter")


GALLERY_SOURCES = "() => [...document.querySelectorAll('#gallery .grid-container img')].map(i => i.src)"


def gallery_sources(page) -> list[str]:
    return page.evaluate(GALLERY_SOURCES)


def shown_images(page) -> np.ndarray:
    """The gallery's images as the browser received them, decoded (uint8 NCHW)."""
    import io

    decoded = []
    for source in gallery_sources(page):
        response = page.request.get(source)
        assert response.ok, source
        image = Image.open(io.BytesIO(response.body()))
        assert image.format == "PNG" and image.mode == "L"
        decoded.append(np.asarray(image)[None])
    return np.stack(decoded)


def generate(page, seed: int, count: int) -> list[str]:
    """Ask for seeds seed .. seed + count - 1; returns the gallery's image sources from before."""
    before = gallery_sources(page)
    set_number(page, "seed", seed)
    set_number(page, "count", count)
    page.locator("#generate").click()
    return before


def wait_for_images(page, seeds, before: list[str]) -> np.ndarray:
    """The new gallery once this request's images have replaced ``before``."""
    page.locator("#message").get_by_text(f"seeds {seeds[0]}-{seeds[-1]}").wait_for(timeout=60_000)
    page.wait_for_function(f"([n, before]) => {{ const s = ({GALLERY_SOURCES})(); "
                           "return s.length == n && s.join() != before.join(); }", arg=[len(seeds), before],
                           timeout=60_000)
    return shown_images(page)


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1200, "height": 1400})
    page.goto(url, wait_until="domcontentloaded")
    page.locator("#generate").wait_for(timeout=60_000)
    set_number(page, "steps", STEPS)
    page.locator("#nfe").get_by_text(f"{STEPS} steps = {2 * STEPS - 1} network evaluations").wait_for()
    return page


def test_page_in_headless_chromium(folders, plain, guided, tmp_path):
    from playwright.sync_api import sync_playwright

    blocks = app.build_app(str(folders / "dg"), out_root=tmp_path / "outputs", device="cpu")
    port = free_port()
    app.launch_app(blocks, port=port, block=False)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
            user_a = open_page(browser, url)
            assert user_a.locator("#control-dg_weight_first_order").is_visible()  # the pipeline has a discriminator
            before = generate(user_a, 7, 2)
            assert np.array_equal(wait_for_images(user_a, [7, 8], before), reference(guided, [7, 8]))
            assert "NFE" in user_a.locator("#message").inner_text()
            user_a.screenshot(path=str(tmp_path / "after_sampling.png"), full_page=True)

            # Two users at once (separate browser contexts = separate sessions): each gets its own images.
            user_b = browser.new_context().new_page()
            user_b.set_viewport_size({"width": 1200, "height": 1400})
            user_b.goto(url, wait_until="domcontentloaded")
            user_b.locator("#generate").wait_for(timeout=60_000)
            set_number(user_b, "steps", STEPS)
            set_number(user_b, "seed", 20)
            set_number(user_b, "count", 2)
            set_number(user_a, "seed", 30)
            before_a, before_b = gallery_sources(user_a), gallery_sources(user_b)
            user_b.locator("#generate").click()  # back to back: both requests wait in the queue together
            user_a.locator("#generate").click()
            assert np.array_equal(wait_for_images(user_b, [20, 21], before_b), reference(guided, [20, 21]))
            assert np.array_equal(wait_for_images(user_a, [30, 31], before_a), reference(guided, [30, 31]))
            before = generate(user_b, 7, 2)  # the same seeds as user A's first request: the same images
            assert np.array_equal(wait_for_images(user_b, [7, 8], before), reference(guided, [7, 8]))

            # Bad input: a folder that is not a pipeline. The page says so and keeps the session's model.
            user_a.locator("#model textarea, #model input").first.fill(str(folders / "not_a_pipeline"))
            user_a.locator("#load").click()
            user_a.locator("#model-status").get_by_text("not a saved pipeline").wait_for(timeout=30_000)
            assert "Traceback" not in user_a.content()
            user_a.screenshot(path=str(tmp_path / "bad_input.png"), full_page=True)
            before = generate(user_a, 40, 1)
            assert np.array_equal(wait_for_images(user_a, [40], before), reference(guided, [40]))

            # Loading the pipeline without a discriminator hides the DG controls; the plain images follow.
            user_a.locator("#model textarea, #model input").first.fill(str(folders / "plain"))
            user_a.locator("#load").click()
            user_a.locator("#model-status").get_by_text("no discriminator").wait_for(timeout=30_000)
            user_a.locator("#control-dg_weight_first_order").wait_for(state="hidden")
            before = generate(user_a, 5, 2)
            assert np.array_equal(wait_for_images(user_a, [5, 6], before), reference(plain, [5, 6]))

            # A dropdown row of the table: Euler's N evaluations instead of Heun's 2N - 1.
            user_a.locator("#control-solver input").click()
            user_a.get_by_role("option", name="euler").click()
            user_a.locator("#nfe").get_by_text(f"{STEPS} steps = {STEPS} network evaluations").wait_for()
            before = generate(user_a, 9, 1)
            assert np.array_equal(wait_for_images(user_a, [9], before), reference(plain, [9], solver="euler"))
            assert f"({STEPS} NFE each)" in user_a.locator("#message").inner_text()
            browser.close()
    finally:
        blocks.close()
    assert (tmp_path / "after_sampling.png").stat().st_size > 10_000
