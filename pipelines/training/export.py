"""What a training run shows and leaves behind: sample grids, the exported EMA pipelines, the model card.

Publishing goes through :mod:`pipelines.hub`: the card is the ``model_cards/`` template plus
:func:`training_card_section`, and ``<output_dir>/run_info.json`` keeps the dict that section is made
from, so the card can be rendered again later without reading README.md.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.training.checkpoints import TMP_PREFIX, replace_folder
from pipelines.utils import atomic_write_json, image_grid, save_image_grid, to_uint8

RUN_INFO_FILE = "run_info.json"
# The settings the card's table shows, in this order (the full run info follows it as JSON).
CARD_FIELDS = ("arch", "precond", "recipe", "resolution", "channels", "num_parameters", "dropout", "dataset", "split",
               "dataset_size", "batch_size", "world_size", "batch_per_round", "accumulation_rounds", "duration_kimg",
               "images_seen", "steps", "lr", "lr_rampup_kimg", "lr_ref_batches", "p_mean", "p_std", "adam_beta1", "adam_beta2", "adam_epsilon",
               "ema_halflife_kimg", "ema_rampup_ratio", "phema", "phema_std", "mixed_precision", "seed", "nonfinite_grad_steps",
               "condition", "label_dropout")


def new_sampling_net(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A fresh network for EMA sampling and export (the trained one stays untouched), built only when
    needed: a resident copy would hold one more model's memory all run (1.2 GB for ADM)."""
    with torch.random.fork_rng(devices=[]):  # its random init must not shift the training RNG stream
        copy = type(net).from_config(net.config)
    return copy.to(device).eval().requires_grad_(False)


def sampling_pipeline(net_for_sampling: torch.nn.Module, scheduler, conditions: dict | None = None):
    """The pipeline of the EMA weights; a conditional run's snapshots sample its null label (unconditional)."""
    from pipelines.components.pipeline_echodiff import EchoDiffPipeline

    pipe = EchoDiffPipeline(unet=net_for_sampling, scheduler=scheduler, conditions=conditions)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_images(pipe, num_images: int, steps: int, device: torch.device) -> torch.Tensor:
    """uint8 images for seeds 0..num_images-1 (the same seeds at every snapshot)."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        latents = pipe(seeds=list(range(num_images)), num_inference_steps=steps, output_type="latent").images
    return to_uint8(torch.as_tensor(latents))


def save_snapshot(accelerator, pipe, num_images: int, steps: int, output_dir: Path, images_seen: int,
                  step: int, save_pipeline: bool) -> None:
    """The snapshot of the main process: a grid PNG under samples/, the trackers' image, optionally the pipeline."""
    images = sample_images(pipe, num_images, steps, accelerator.device)
    name = f"{images_seen / 1000:010.3f}kimg"
    save_image_grid(images, output_dir / "samples" / f"samples-{name}.png", padding=0)
    log_grid(accelerator, image_grid(images, padding=0), step)
    if save_pipeline:
        pipe.save_pretrained(str(output_dir / "snapshots" / f"pipeline-{name}"))


def log_grid(accelerator, grid: np.ndarray, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": grid[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"samples": [grid]}, step=step)


def training_card_section(run_info: dict[str, Any], ema_halflife_kimg: float | None = None) -> str:
    """Markdown for the model card: the run's configuration (table of the main settings + full JSON).

    ``run_info`` is what ``train`` writes to ``run_info.json``; ``ema_halflife_kimg`` is the exported EMA's
    half-life (default: the run's first, the one in ``<output_dir>/pipeline``).
    """
    half_lives = run_info.get("ema_halflife_kimg")
    if ema_halflife_kimg is None and isinstance(half_lives, (list, tuple)):
        ema_halflife_kimg = half_lives[0]
    if ema_halflife_kimg is not None:
        run_info = dict(run_info, ema_halflife_kimg=ema_halflife_kimg)
    rows = "\n".join(f"| {key} | {run_info[key]} |" for key in CARD_FIELDS if key in run_info
                     and (run_info.get("condition") or key not in ("condition", "label_dropout")))
    return (
        "\n## Training configuration\n\n"
        f"Trained with EchoDiff's `train_unconditional.py`; the weights are the EMA with half-life "
        f"{run_info.get('ema_halflife_kimg')} kimg (the raw weights stay in the training checkpoints).\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n\n"
        + conditioning_card_section(run_info.get("conditions")) +
        "<details><summary>full run configuration</summary>\n\n```json\n"
        f"{json.dumps(run_info, indent=2, sort_keys=True, default=str)}\n```\n\n</details>\n"
    )


def conditioning_card_section(conditions: dict | None) -> str:
    """The card's paragraph on a conditional model's named conditions (empty for an unconditional one)."""
    if not conditions:
        return ""
    from pipelines.components.conditioning import describe

    names = ", ".join(f"{c['name']}=..." for c in conditions["conditions"])
    return (f"**Conditional model.** Conditions: {describe(conditions)}; label dropout "
            f"{conditions['label_dropout']:g} (the null label: `pipe(seeds=...)` with no condition samples "
            f"unconditionally). Sample with `pipe(seeds=[0, 1], {names}, guidance_scale=1.0)` "
            "(docs/conditioning.md).\n\n")


def export_pipelines(cfg, ema, sampling_net, scheduler, output_dir: Path, run_info: dict[str, Any],
                     conditions: dict | None = None) -> list[Path]:
    """save_pretrained of one pipeline per EMA half-life (EMA weights), each with its model card; the run
    info goes to ``<output_dir>/run_info.json``. Returns the folders, ``<output_dir>/pipeline`` first."""

    atomic_write_json(output_dir / RUN_INFO_FILE, run_info, sort_keys=True)
    dirs = []
    for index, half_life in enumerate(cfg.ema_halflife_kimg):
        target = output_dir / ("pipeline" if index == 0 else f"pipeline_ema{half_life:g}kimg")
        ema.copy_to(sampling_net, index)
        # Written aside and renamed into place, as checkpoints are: a kill never leaves a half-written pipeline.
        tmp = output_dir / f"{TMP_PREFIX}{target.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe = sampling_pipeline(sampling_net, scheduler, conditions)
        pipe.save_pretrained(str(tmp))
        write_pipeline_card(cfg, pipe, tmp, run_info, half_life, location=target)
        replace_folder(tmp, target)
        dirs.append(target)
    return dirs


def write_pipeline_card(cfg, pipe, target: Path, run_info: dict[str, Any], half_life: float,
                        location: Path | None = None) -> Path:
    """The exported pipeline's card: its training data as the dataset's build records it, a grid of this
    pipeline's own samples, the training section; the usage id is the Hub repo only when one is named."""
    from pipelines import hub

    grid = None
    if cfg.num_sample_images > 0:
        grid = sample_images(pipe, cfg.num_sample_images, cfg.sample_steps, next(pipe.unet.parameters()).device)
    return hub.write_model_card(target, cfg.hub_model_id, training_dataset=cfg.dataset, sample_grid=grid,
                                sections=[training_card_section(run_info, half_life)], location=location)

