"""The sampling app (a Gradio page, also a Hugging Face Space): load a saved pipeline, sample seeds, download.

The page is built from ``CONTROLS``, a table of the pipeline's call arguments: each row becomes one widget,
shown only when the loaded pipeline accepts that argument and has what it needs (e.g. a discriminator for
the DG weights), and passed to ``pipe(...)`` under its own name. The functions below the table do not need
Gradio (they are what the tests call); ``build_app`` puts them on a page. ``app.py`` is the command line.

Images are written as EDM writes them for FID (``pipelines.utils.to_uint8`` of the raw samples): the PNGs,
the grid and the NPZ (``images`` uint8 NCHW and ``seeds``, the format ``evaluate.py`` reads) hold the same
uint8 pixels.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.hub import load_pipeline
from pipelines.utils import atomic_save_npz, looks_like_local_path, save_image_grid, to_uint8

logger = logging.getLogger(__name__)

# The Quick start's output (demo.py: DemoConfig.out_dir / "pipeline"), relative to where the app starts.
DEFAULT_MODEL = "results/demo/pipeline"
MAX_IMAGES = 64
MAX_STEPS = 256
KEPT_RUNS = 50  # output folders kept on disk; older ones are deleted
# 64x64 frames are shown enlarged, with sharp pixels (the files keep their own size).
PAGE_CSS = ("#grid img, #gallery img { image-rendering: pixelated; } "
            "#grid img { width: 100%; height: 100%; object-fit: contain; }")


# ----- the controls: one row per pipeline call argument ----------------------------------------------------


@dataclass(frozen=True)
class Needs:
    """What a control needs from the loaded pipeline besides accepting its argument."""

    what: str  # shown when the argument is given to a pipeline without it
    check: Callable[[Any], bool]


def solvers(pipe) -> tuple[str, ...]:
    """The ODE solvers of the loaded pipeline's scheduler (its own code's list)."""
    return tuple(getattr(inspect.getmodule(type(pipe.scheduler)), "SOLVERS", ()))


def samplers(pipe) -> tuple[str, ...]:
    """The sampler names the loaded pipeline's own code accepts (none for code older than ``sampler=``)."""
    names = getattr(pipe, "sampler_names", None)
    return tuple(names()) if callable(names) else ()


ANY_PIPELINE = Needs("", lambda pipe: True)
SEVERAL_SAMPLERS = Needs("a pipeline with several samplers", lambda pipe: len(samplers(pipe)) > 1)
SEVERAL_SOLVERS = Needs("a scheduler with several solvers", lambda pipe: len(solvers(pipe)) > 1)
HAS_DISCRIMINATOR = Needs("a discriminator (train one with train_discriminator.py)",
                          lambda pipe: getattr(pipe, "discriminator", None) is not None)
HAS_GUIDE = Needs("a guide network (guide_unet; attach one with pipelines.hub.attach_guide)",
                  lambda pipe: getattr(pipe, "guide_unet", None) is not None)
HAS_CONDITIONS = Needs("named conditions (train one with train_unconditional.py --condition)",
                       lambda pipe: bool(getattr(pipe, "condition_names", ())))


@dataclass(frozen=True)
class Control:
    """One widget for the call argument ``name``; its default is the pipeline's own (scheduler config or the
    call's signature), so an untouched page samples exactly what ``pipe(seeds=...)`` does."""

    name: str
    label: str
    group: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None  # a slider; None: a number field (empty = the argument's None)
    info: str = ""
    needs: Needs = ANY_PIPELINE
    choices: Callable[[Any], Sequence[str]] | None = None  # a dropdown of these names instead
    text: bool = False  # a text box of ``name=value`` pairs, each its own call argument (named conditions)

    def supported(self, pipe) -> bool:
        return pipe is not None and (self.text or self.name in call_arguments(pipe)) and self.needs.check(pipe)


# New call arguments get one row each (their group becomes a section of the page).
CONTROLS: tuple[Control, ...] = (
    Control("sampler", "Sampler", "Sampler", info="heun: EDM's own (2N - 1 evaluations); the others: diffusers' "
            "solvers on EDM's grid (N); empty = the pipeline's scheduler", needs=SEVERAL_SAMPLERS, choices=samplers),
    Control("solver", "ODE solver", "Sampler", info="heun: EDM's 2nd order, 2N - 1 evaluations; euler: N",
            needs=SEVERAL_SOLVERS, choices=solvers),
    Control("s_churn", "S_churn (stochasticity)", "Sampler", 0.0, 100.0, 0.5,
            "EDM's churn: noise added back each step; 0 = the deterministic sampler (EDM's own sampler only)"),
    Control("dg_weight_first_order", "DG weight on Euler steps", "Discriminator Guidance", 0.0, 20.0, 0.5,
            "D + w sigma^2 grad log r; paper: 5 (0 = no guidance)", HAS_DISCRIMINATOR),
    Control("dg_weight_second_order", "DG weight on Heun corrections", "Discriminator Guidance", 0.0, 20.0, 0.5,
            "paper: 0", HAS_DISCRIMINATOR),
    Control("dg_boost", "DG boost", "Discriminator Guidance", 1.0, 4.0, 0.5,
            "scales the DG vector of samples the discriminator calls fake; paper: 2 (1 = off)", HAS_DISCRIMINATOR),
    Control("ag_weight", "Autoguidance weight", "Autoguidance", 0.0, 5.0, 0.05,
            "D_0 + w (D_1 - D_0) with the guide D_0; 1 = no guidance", HAS_GUIDE),
    Control("ag_sigma_min", "Autoguidance from sigma", "Autoguidance", 0.0, 80.0, None,
            "guide only for sigma >= this", HAS_GUIDE),
    Control("ag_sigma_max", "Autoguidance up to sigma", "Autoguidance", 0.0, 80.0, None,
            "empty = no limit", HAS_GUIDE),
    Control("conditions", "Conditions", "Conditions", info="name=value pairs, e.g. ef=35, phase=ES (the loaded "
            "model's names and ranges are in its status line); empty = the null label", needs=HAS_CONDITIONS,
            text=True),
    Control("guidance_scale", "Classifier-free guidance scale", "Conditions", 0.0, 8.0, 0.25,
            "D_u + s (D_c - D_u) on the conditions; 1 = no guidance", HAS_CONDITIONS),
)


def control_groups() -> dict[str, list[Control]]:
    """CONTROLS by group, in order of first appearance (a section of the page each)."""
    groups: dict[str, list[Control]] = {}
    for control in CONTROLS:
        groups.setdefault(control.group, []).append(control)
    return groups


def call_arguments(pipe) -> set[str]:
    """The arguments ``pipe(...)`` takes by name: its signature's and the scheduler overrides it accepts."""
    names = set(inspect.signature(pipe.__call__).parameters)
    if hasattr(pipe, "sampler_settings"):
        names |= set(pipe.sampler_settings())
    return names


def control_default(pipe, control: Control) -> Any:
    """The value the pipeline uses when the argument is not given (None when no pipeline is loaded)."""
    if pipe is None:
        return control.minimum
    if control.text:
        return ""
    if hasattr(pipe, "sampler_settings") and control.name in pipe.sampler_settings():
        return pipe.scheduler.config[control.name]
    parameter = inspect.signature(pipe.__call__).parameters.get(control.name)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


# ----- loading: one process-wide cache, so sessions share a loaded model --------------------------------------


@dataclass(frozen=True)
class ModelKey:
    model: str
    revision: str | None = None
    trust_remote_code: bool = False
    device: str = "cpu"


class PipelineCache:
    """The last ``size`` loaded pipelines by (model, revision, trust, device); loads run one at a time."""

    def __init__(self, size: int = 2, loader: Callable[..., Any] = load_pipeline):
        self.size, self.loader = size, loader
        self._pipes: OrderedDict[ModelKey, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: ModelKey):
        with self._lock:
            if key in self._pipes:
                self._pipes.move_to_end(key)
                return self._pipes[key]
            pipe = open_pipeline(key, self.loader)
            self._pipes[key] = pipe
            while len(self._pipes) > self.size:
                self._pipes.popitem(last=False)
            return pipe


def open_pipeline(key: ModelKey, loader: Callable[..., Any] = load_pipeline):
    """Load ``key.model`` (a saved pipeline folder, or a Hub id at ``key.revision``); ValueError says why not."""
    model = key.model.strip()
    if not model:
        raise ValueError("model: enter a saved pipeline folder or a Hub id (user/name)")
    local = Path(model).expanduser().is_dir() or looks_like_local_path(model)
    if local and model == DEFAULT_MODEL and not Path(model).is_dir():
        raise ValueError(f"no pipeline at {DEFAULT_MODEL}: run `python3 demo.py` (the Quick start) to train one, "
                         "or enter a saved pipeline folder or a Hub id")
    if not local and not key.trust_remote_code:
        raise ValueError(f"'{model}' is a Hub id: loading it runs the repository's code on this server, so tick "
                         "'trust the Hub repository's code' (app.py --trust_remote_code) once you have read that code")
    options = {} if local or not key.revision else {"revision": key.revision}
    try:
        pipe = loader(model, device=key.device, trust_remote_code=True if local else key.trust_remote_code, **options)
    except OSError as exc:  # the Hub unreachable, a file unreadable
        raise ValueError(f"'{model}' could not be loaded ({type(exc).__name__}: {exc})") from exc
    if not callable(pipe) or not hasattr(pipe, "unet"):
        raise ValueError(f"'{model}' loaded as {type(pipe).__name__}, not an EchoDiff pipeline")
    return pipe


def describe(pipe, key: ModelKey) -> str:
    """One line about the loaded model for the page."""
    config = pipe.unet.config
    size = config.sample_size
    resolution = f"{size}x{size}" if isinstance(size, int) else "x".join(map(str, size))
    revision = f" @ {key.revision}" if key.revision and not looks_like_local_path(key.model) else ""
    parts = [f"{type(pipe.unet).__name__}", f"{resolution}, {config.in_channels} channel(s)",
             f"{pipe.scheduler.config.get('preconditioning', 'edm')} preconditioning",
             "with a DG discriminator" if getattr(pipe, "discriminator", None) is not None else "no discriminator"]
    spec = pipe.config.get("conditions") if HAS_CONDITIONS.check(pipe) else None
    if spec:
        parts.append("conditions: " + ", ".join(
            f"{c['name']} in [{c['range'][0]:g}, {c['range'][1]:g}]" if c["kind"] == "scalar"
            else f"{c['name']} one of {', '.join(map(str, c['classes']))}" for c in spec["conditions"]))
    return f"Loaded `{key.model}`{revision} on {key.device}: " + ", ".join(parts) + "."


# ----- one sampling request ------------------------------------------------------------------------------------


def seeds_for(first_seed: Any, count: Any, max_images: int = MAX_IMAGES) -> list[int]:
    """The seed range first_seed .. first_seed + count - 1 (one image each)."""
    first, number = _whole(first_seed, "seed"), _whole(count, "number of images")
    if first < 0 or first >= 1 << 32:
        raise ValueError(f"seed must be in 0 .. {(1 << 32) - 1}, got {first}")
    if not 1 <= number <= max_images:
        raise ValueError(f"number of images must be in 1 .. {max_images}, got {number}")
    return list(range(first, first + number))


def _whole(value: Any, name: str) -> int:
    if isinstance(value, bool) or value is None or isinstance(value, str) or float(value) != int(float(value)):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(float(value))


def named_conditions(text: Any) -> dict[str, Any]:
    """``"ef=35, phase=ES"`` -> ``{"ef": 35.0, "phase": "ES"}`` (numbers where they parse); the pipeline checks
    the names and values against its own condition spec."""
    conditions = {}
    for pair in (part.strip() for part in str(text or "").split(",")):
        if not pair:
            continue
        name, equals, value = (item.strip() for item in pair.partition("="))
        if not equals or not name or not value:
            raise ValueError(f"conditions: expected name=value pairs such as ef=35, phase=ES, got {pair!r}")
        try:
            conditions[name] = float(value)
        except ValueError:
            conditions[name] = value
    return conditions


def sampling_arguments(pipe, steps: Any, values: dict[str, Any], max_steps: int = MAX_STEPS) -> dict[str, Any]:
    """Checked keyword arguments for ``pipe(...)``: the steps and each control's value.

    A control the pipeline does not support may only hold its default (hidden widgets do); any other value
    is refused with what it needs.
    """
    steps = _whole(steps, "steps")
    if not 2 <= steps <= max_steps:
        raise ValueError(f"steps must be in 2 .. {max_steps} (EDM's sampler needs at least 2), got {steps}")
    arguments = {"num_inference_steps": steps}
    for control in CONTROLS:
        if control.name not in values:
            continue
        value = values[control.name]
        if control.supported(pipe) and control.text:
            arguments.update(named_conditions(value))
        elif control.supported(pipe):
            arguments[control.name] = value
        elif value not in (None, control.minimum, control_default(pipe, control)):
            need = control.needs.what or f"a pipeline that takes {control.name}"
            raise ValueError(f"{control.label} ({control.name}={value}) needs {need}; this pipeline has none")
    return without_foreign_sampler_settings(pipe, arguments)


def without_foreign_sampler_settings(pipe, arguments: dict[str, Any]) -> dict[str, Any]:
    """A sampler chosen by name keeps only the scheduler settings it has: EDM's churn and solver do not apply
    to diffusers' solvers, so their widgets' values are left out (their info says so)."""
    sampler = arguments.get("sampler")
    if not sampler or not hasattr(pipe, "scheduler_for_call"):
        return arguments
    keep = set(inspect.signature(pipe.__call__).parameters) | set(pipe.sampler_settings(pipe.scheduler_for_call(sampler)))
    return {name: value for name, value in arguments.items() if name in keep}


def evaluations(pipe, steps: int, arguments: dict[str, Any] | None = None) -> int:
    """Network evaluations (NFE) of ``steps`` sampler steps with the pipeline's scheduler and the sampler
    settings among ``arguments`` (Heun: 2N - 1, Euler: N)."""
    arguments = {k: v for k, v in (arguments or {}).items() if k not in ("seeds", "num_inference_steps")}
    if hasattr(pipe, "count_nfe"):  # the pipeline's own count, whatever the sampler
        return pipe.count_nfe(int(steps), **arguments)
    settings = set(pipe.sampler_settings()) if hasattr(pipe, "sampler_settings") else set()
    overrides = {k: v for k, v in arguments.items() if k in settings}
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)
    scheduler.set_timesteps(int(steps))
    return len(scheduler.timesteps)


def sample(pipe, seeds: Sequence[int], arguments: dict[str, Any],
           progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """uint8 (N, C, H, W) images of ``seeds``, EDM's uint8 rule; ``progress(done, total)`` after each evaluation."""

    def report(pipeline, i, t, tensors):
        if progress is not None:
            progress(i + 1, pipeline.num_timesteps)
        return {}

    out = pipe(seeds=list(seeds), output_type="latent", callback_on_step_end=report, **arguments)
    return to_uint8(torch.as_tensor(out.images)).cpu().numpy()


@dataclass(frozen=True)
class Outputs:
    folder: Path
    images: list[Path]  # one PNG per seed
    grid: Path
    npz: Path


def write_outputs(images: np.ndarray, seeds: Sequence[int], out_root: str | Path, keep: int = KEPT_RUNS) -> Outputs:
    """The PNGs, the grid and the NPZ of one request in a fresh folder under ``out_root`` (the oldest of more
    than ``keep`` such folders are deleted)."""
    from PIL import Image

    out_root = Path(out_root)
    folder = out_root / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    paths = []
    for image, seed in zip(images, seeds):
        path = folder / f"seed-{seed:09d}.png"
        Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(path)
        paths.append(path)
    grid = save_image_grid(images, folder / "grid.png")
    npz = atomic_save_npz(folder / "images.npz", images=images, seeds=np.asarray(seeds, dtype=np.int64))
    runs = sorted(out_root.glob("run-*"), key=lambda p: p.stat().st_mtime)
    for old in runs[:max(0, len(runs) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    return Outputs(folder, paths, grid, npz)


# ----- the page ----------------------------------------------------------------------------------------------


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_app(model: str = DEFAULT_MODEL, revision: str | None = None, trust_remote_code: bool = False,
              device: str | None = None, lock_model: bool = False, out_root: str | Path | None = None,
              max_images: int = MAX_IMAGES, max_steps: int = MAX_STEPS, cache: PipelineCache | None = None):
    """The Gradio Blocks of the app; ``launch_app`` (or ``app.py``) serves it. ``lock_model`` hides the model
    box (a public Space: visitors must not make the server run another repository's code)."""
    import gradio as gr

    cache = cache or PipelineCache()
    device = device or default_device()
    out_root = Path(out_root) if out_root else Path(tempfile.mkdtemp(prefix="echodiff-app-"))
    start = ModelKey(str(model), revision or None, trust_remote_code, device)
    start_pipe, start_status = _try_load(cache, start)
    controls = {c.name: c for c in CONTROLS}

    with gr.Blocks(title="EchoDiff sampler", analytics_enabled=False, delete_cache=(3600, 3600)) as blocks:
        gr.Markdown("# EchoDiff: sample echocardiogram frames\nEDM's sampler on a saved EchoDiff pipeline. "
                    "The same seed always gives the same image.")
        key_state = gr.State(start if start_pipe is not None else None)
        with gr.Row(visible=not lock_model):
            model_box = gr.Textbox(str(model), label="model: a saved pipeline folder or a Hub id (user/name)",
                                   elem_id="model", scale=4)
            revision_box = gr.Textbox(revision or "", label="revision (Hub ids: a commit, tag or branch)",
                                      elem_id="revision", scale=2)
            trust_box = gr.Checkbox(trust_remote_code, label="trust the Hub repository's code",
                                    elem_id="trust", scale=2)
            load_button = gr.Button("Load", elem_id="load", scale=1)
        status = gr.Markdown(start_status, elem_id="model-status")
        with gr.Row():
            seed_box = gr.Number(0, label="first seed", precision=0, minimum=0, elem_id="seed")
            count_box = gr.Slider(1, max_images, 4, step=1, label="number of images (seeds first .. first + n - 1)",
                                  elem_id="count")
            steps_box = gr.Slider(2, max_steps, 30, step=1, label="steps", elem_id="steps")
        nfe_text = gr.Markdown(_nfe_line(start_pipe, 30), elem_id="nfe")
        widgets, groups = _control_widgets(gr, start_pipe)
        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
        message = gr.Markdown(elem_id="message")
        with gr.Row():
            grid = gr.Image(label="grid", type="filepath", format="png", elem_id="grid", interactive=False,
                            height=320)
            gallery = gr.Gallery(label="images (one per seed)", format="png", columns=4, elem_id="gallery",
                                 height=320)
        files = gr.File(label="downloads: PNGs, grid, uint8 NPZ (images NCHW, seeds)", file_count="multiple",
                        elem_id="files")

        def load(model_text, revision_text, trust, current, steps):
            if lock_model:  # the box is hidden, but the event is still reachable through the API
                return [current, "**Could not load the model:** this server serves one model only.", gr.update()] + \
                    [gr.update() for _ in (*widgets, *groups)]
            key = ModelKey(model_text.strip(), revision_text.strip() or None, bool(trust), device)
            pipe, text = _try_load(cache, key)
            if pipe is None:  # keep serving the model this session had
                kept = f" Still using `{current.model}`." if current is not None else ""
                return [current, text.rstrip(".") + "." + kept, gr.update()] + [gr.update() for _ in (*widgets, *groups)]
            return [key, text, _nfe_line(pipe, steps)] + _control_updates(gr, pipe)

        def show_nfe(data):
            current = data[key_state]
            pipe = cache.get(current) if current is not None else None
            return _nfe_line(pipe, data[steps_box], {n: data[w] for n, w in widgets.items()})

        def generate(data, progress=gr.Progress()):
            return run_request(cache, data[key_state], data[seed_box], data[count_box], data[steps_box],
                               {n: data[w] for n, w in widgets.items()}, out_root,
                               lambda done, total: progress((done, total), unit="NFE"), max_images, max_steps)

        # One pipeline call at a time: a pipeline's scheduler keeps the state of the call in progress. The
        # queue serves each user's request in turn, each with its own seeds and outputs.
        load_button.click(load, [model_box, revision_box, trust_box, key_state, steps_box],
                          [key_state, status, nfe_text, *widgets.values(), *groups.values()], concurrency_id="pipeline",
                          api_name="load")
        for changed in (steps_box, *widgets.values()):
            changed.change(show_nfe, {key_state, steps_box, *widgets.values()}, nfe_text, show_progress="hidden")
        generate_button.click(generate, {key_state, seed_box, count_box, steps_box, *widgets.values()},
                              [message, grid, gallery, files], concurrency_id="pipeline", concurrency_limit=1,
                              api_name="generate")
    blocks.queue(default_concurrency_limit=1)
    blocks.echodiff_controls = {name: (controls[name], widget) for name, widget in widgets.items()}
    return blocks


def run_request(cache: PipelineCache, key: ModelKey | None, first_seed, count, steps, values: dict[str, Any],
                out_root: Path, progress: Callable[[int, int], None] | None = None, max_images: int = MAX_IMAGES,
                max_steps: int = MAX_STEPS):
    """One press of Generate: (message, grid PNG, gallery items, download files); a bad request gets its
    message and no images, never a traceback."""
    try:
        if key is None:
            raise ValueError("no pipeline loaded: enter a saved pipeline folder or a Hub id and press Load "
                             f"(`python3 demo.py` writes {DEFAULT_MODEL})")
        pipe = cache.get(key)
        seeds = seeds_for(first_seed, count, max_images)
        arguments = sampling_arguments(pipe, steps, values, max_steps)
        began = time.perf_counter()
        images = sample(pipe, seeds, arguments, progress)
        seconds = time.perf_counter() - began
        outputs = write_outputs(images, seeds, out_root)
    except (ValueError, TypeError) as exc:
        return f"**Error:** {exc}", None, None, None
    except Exception:  # noqa: BLE001 - the page shows a line, the server log keeps the traceback
        logger.exception("sampling failed")
        return "**Error:** sampling failed on the server (see its log).", None, None, None
    line = (f"{len(seeds)} image(s), seeds {seeds[0]}-{seeds[-1]}, {arguments['num_inference_steps']} steps "
            f"({pipe.num_timesteps} NFE each): sampled in {seconds:.2f} s.")
    gallery = [(str(path), f"seed {seed}") for path, seed in zip(outputs.images, seeds)]
    return line, str(outputs.grid), gallery, [str(outputs.grid), str(outputs.npz), *map(str, outputs.images)]


def _try_load(cache: PipelineCache, key: ModelKey):
    """(pipeline, status line) or (None, the reason it did not load)."""
    try:
        pipe = cache.get(key)
    except ValueError as exc:
        return None, f"**Could not load the model:** {exc}"
    except Exception as exc:  # noqa: BLE001 - a broken folder's own code may raise anything
        logger.exception("loading %s failed", key.model)
        return None, f"**Could not load the model:** '{key.model}' failed to load ({type(exc).__name__}: {exc})"
    return pipe, describe(pipe, key)


def _nfe_line(pipe, steps, values: dict[str, Any] | None = None) -> str:
    if pipe is None:
        return ""
    try:
        arguments = {c.name: values[c.name] for c in CONTROLS
                     if values and c.name in values and c.supported(pipe) and not c.text}
        return f"{int(steps)} steps = {evaluations(pipe, steps, arguments)} network evaluations (NFE) per image"
    except (ValueError, TypeError) as exc:
        return f"**Error:** {exc}"


def _control_widgets(gr, pipe) -> tuple[dict[str, Any], dict[str, Any]]:
    """(widget per row of CONTROLS, accordion per group), visible where the pipeline supports them."""
    widgets, groups = {}, {}
    for group, rows in control_groups().items():
        with gr.Accordion(group, open=True, visible=any(c.supported(pipe) for c in rows)) as groups[group]:
            for control in rows:
                widgets[control.name] = _widget(gr, control, pipe)
    return widgets, groups


def _widget(gr, control: Control, pipe):
    visible = control.supported(pipe)
    value = control_default(pipe, control) if visible else control.minimum
    common = dict(label=control.label, info=control.info, visible=visible, elem_id=f"control-{control.name}")
    if control.choices is not None:
        return gr.Dropdown(list(control.choices(pipe)) if visible else [], value=value, **common)
    if control.text:
        return gr.Textbox(value or "", placeholder="ef=35, phase=ES", **common)
    if control.step is None:
        return gr.Number(value, minimum=control.minimum, maximum=control.maximum, **common)
    return gr.Slider(control.minimum, control.maximum, value, step=control.step, **common)


def _control_updates(gr, pipe) -> list:
    """Visibility and the pipeline's defaults for every control widget, then every group, after a load."""
    updates = []
    for control in (c for rows in control_groups().values() for c in rows):  # the widgets' order
        visible = control.supported(pipe)
        update = {"visible": visible, "value": control_default(pipe, control) if visible else control.minimum}
        if control.text:
            update["value"] = update["value"] or ""
        if control.choices is not None:
            update["choices"] = list(control.choices(pipe)) if visible else []
        updates.append(gr.update(**update))
    for rows in control_groups().values():
        updates.append(gr.update(visible=any(c.supported(pipe) for c in rows)))
    return updates


def launch_app(blocks, host: str = "127.0.0.1", port: int | None = None, block: bool = True):
    """Serve the app (``block=False`` returns at once, e.g. in tests; ``blocks.close()`` stops it)."""
    return blocks.launch(server_name=host, server_port=port, prevent_thread_lock=not block, quiet=not block,
                         footer_links=["api"], css=PAGE_CSS)
