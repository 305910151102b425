"""FID / KID over a grid of guidance weights and intervals, every setting on one protocol.

Every setting samples the same seeds with the same number of sampler steps and is scored against the same
real subsample, so the rows differ only in the guidance. Rows: the unguided baseline, autoguidance
(``ag_weight`` per weight and interval), DG (``dg_weight_first_order`` per weight and interval) and,
optionally, both composed. Each setting's samples go to their own shard folder (resumable); the wall time
per image and the network evaluations per image are recorded beside them, so cost is visible.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipelines.cli import parse_seeds
from pipelines.evaluation.generation import finished_seeds, generate_images
from pipelines.evaluation.protocol import fid_of_samples
from pipelines.utils import atomic_write_json, atomic_write_text

TIMING_FILE = "timing.json"
FULL_RANGE = (0.0, math.inf)


@dataclass(frozen=True)
class GuidanceSetting:
    """One row: which guidance, its weight(s) and the sigma interval it acts in."""

    guidance: str  # "unguided", "ag", "dg" or "ag+dg"
    ag_weight: float = 1.0
    dg_weight: float = 0.0
    sigma_min: float = 0.0
    sigma_max: float = math.inf

    def sampler_kwargs(self, dg_options: dict | None = None) -> dict[str, Any]:
        """The pipeline arguments of this setting (``dg_options``: further DG arguments, e.g. dg_boost)."""
        sigma_max = None if math.isinf(self.sigma_max) else self.sigma_max
        kwargs: dict[str, Any] = {}
        if "ag" in self.guidance:
            kwargs.update(ag_weight=self.ag_weight, ag_sigma_min=self.sigma_min, ag_sigma_max=sigma_max)
        if "dg" in self.guidance:
            kwargs.update(dg_options or {})
            kwargs.update(dg_weight_first_order=self.dg_weight, dg_sigma_min=self.sigma_min, dg_sigma_max=sigma_max)
        return kwargs

    @property
    def interval(self) -> str:
        return f"[{self.sigma_min:g}, {self.sigma_max:g}]"

    @property
    def folder(self) -> str:
        if self.guidance == "unguided":
            return "unguided"
        weights = {"ag": f"ag{self.ag_weight:g}", "dg": f"dg{self.dg_weight:g}",
                   "ag+dg": f"ag{self.ag_weight:g}-dg{self.dg_weight:g}"}[self.guidance]
        return f"{weights}-sigma{self.sigma_min:g}-{self.sigma_max:g}"


def guidance_grid(ag_weights: Sequence[float] = (), dg_weights: Sequence[float] = (),
                  intervals: Sequence[tuple[float, float]] = (FULL_RANGE,),
                  composed: Sequence[tuple[float, float]] = ()) -> list[GuidanceSetting]:
    """The baseline, then every (weight, interval) of each guidance, then composed (ag, dg) pairs over the
    first interval. Weights equal to "off" (ag 1, dg 0) are the baseline and are not repeated."""
    if not intervals:
        raise ValueError("intervals must name at least one sigma interval (0:inf is every noise level)")
    for low, high in intervals:
        if not 0 <= low <= high:
            raise ValueError(f"each interval needs 0 <= sigma_min <= sigma_max, got ({low}, {high})")
    settings = [GuidanceSetting("unguided")]
    for low, high in intervals:
        settings += [GuidanceSetting("ag", ag_weight=float(w), sigma_min=low, sigma_max=high) for w in ag_weights
                     if w != 1]
        settings += [GuidanceSetting("dg", dg_weight=float(w), sigma_min=low, sigma_max=high) for w in dg_weights
                     if w != 0]
    low, high = intervals[0]
    settings += [GuidanceSetting("ag+dg", ag_weight=float(a), dg_weight=float(d), sigma_min=low, sigma_max=high)
                 for a, d in composed]
    return settings


def timed_generation(pipeline: Any, samples_dir: Path, seeds: list[int], num_inference_steps: int,
                     gen_batch_size: int, accelerator: Any, run_info: dict, progress: bool,
                     sampler_kwargs: dict) -> dict:
    """Generate ``seeds`` (resumable) and accumulate the wall time per generated image in ``timing.json``."""
    timing_path = samples_dir / TIMING_FILE
    timing = json.loads(timing_path.read_text()) if timing_path.exists() else {"seconds": 0.0, "images": 0}
    before = len(finished_seeds(samples_dir) & set(seeds)) if samples_dir.exists() else 0
    start = time.perf_counter()
    generate_images(pipeline, samples_dir, seeds, batch_size=gen_batch_size, num_inference_steps=num_inference_steps,
                    accelerator=accelerator, run_info=run_info, progress=progress, **sampler_kwargs)
    generated = len(seeds) - before
    if generated and (accelerator is None or accelerator.is_main_process):
        timing["seconds"] += time.perf_counter() - start
        timing["images"] += generated
        timing["network_evaluations_per_batch"] = getattr(pipeline, "network_evaluations", None)
        timing["batch_size"] = gen_batch_size
        atomic_write_json(timing_path, timing)
    return timing


def guidance_sweep(pipeline: Any, frames: Any, out_dir: str | os.PathLike, settings: Sequence[GuidanceSetting],
                   seeds: str | Sequence[int] = "0-49999", num_inference_steps: int = 30, dg_options: dict | None = None,
                   samples_root: str | os.PathLike | None = None, sampler_kwargs: dict | None = None,
                   gen_batch_size: int = 32, accelerator: Any = None, run_info: dict | None = None,
                   progress: bool = True, **score_options: Any) -> list[dict] | None:
    """Score every setting (same seeds, steps and real subsample); writes ``guidance_sweep.md`` / ``.png``.

    ``sampler_kwargs`` (e.g. sampler, precision) apply to every row. Samples go to ``samples_root/<setting>``
    (default ``out_dir/samples``). ``score_options`` go to :func:`pipelines.evaluation.protocol.fid_of_samples` (detector, num_real,
    cache_dir, kid, ...). Returns the rows on the main process, None on the others.
    """
    seeds = parse_seeds(seeds)
    out_dir = Path(out_dir)
    rows = []
    for setting in settings:
        samples_dir = Path(samples_root or out_dir / "samples") / setting.folder
        kwargs = {**(sampler_kwargs or {}), **setting.sampler_kwargs(dg_options)}
        timing = timed_generation(pipeline, samples_dir, seeds, num_inference_steps, gen_batch_size, accelerator,
                                  dict(run_info or {}), progress, kwargs)
        result = fid_of_samples(pipeline, samples_dir, seeds, frames, num_inference_steps=num_inference_steps,
                                gen_batch_size=gen_batch_size, accelerator=accelerator, run_info=dict(run_info or {}),
                                progress=progress, **score_options, **kwargs)
        if result is None:
            continue
        rows.append({**asdict(setting), "interval": setting.interval, "fid": result["fid"], "kid": result.get("kid"),
                     "kid_std": result.get("kid_std"), "num_generated": result["num_generated"],
                     "num_real": result["num_real"], "num_inference_steps": num_inference_steps,
                     "nfe": result["nfe"], "network_evaluations_per_batch": timing.get("network_evaluations_per_batch"),
                     "seconds_per_image": timing["seconds"] / timing["images"] if timing["images"] else None,
                     "samples_dir": str(samples_dir)})
    if accelerator is not None and not accelerator.is_main_process:
        return None
    write_guidance_table(rows, out_dir)
    plot_guidance_sweep(rows, out_dir / "guidance_sweep.png")
    return rows


def write_guidance_table(rows: list[dict], out_dir: Path) -> Path:
    lines = ["| guidance | ag w | dg w | sigma interval | FID | KID (+- subset std) | NFE | networks per evaluation batch "
             "| s / image |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        kid = "-" if row["kid"] is None else f"{row['kid']:.4f} +- {row['kid_std']:.4f}"
        cost = row["network_evaluations_per_batch"] or {}
        networks = ", ".join(f"{name} {count}" for name, count in cost.items()) or "-"
        seconds = "-" if row["seconds_per_image"] is None else f"{row['seconds_per_image']:.3f}"
        lines.append(f"| {row['guidance']} | {row['ag_weight']:g} | {row['dg_weight']:g} | {row['interval']} "
                     f"| {row['fid']:.2f} | {kid} | {row['nfe']} | {networks} | {seconds} |")
    if rows:
        lines.append(f"\n{rows[0]['num_generated']} generated images per row (the same seeds), against "
                     f"{rows[0]['num_real']} real frames; {rows[0]['num_inference_steps']} sampler steps.")
    path = out_dir / "guidance_sweep.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def plot_guidance_sweep(rows: list[dict], path: Path) -> Path:
    """FID against the weight: one panel per guidance (AG: the weight w, 1 = unguided; DG: w, 0 = unguided),
    one line per interval, the unguided FID as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baseline = next((r["fid"] for r in rows if r["guidance"] == "unguided"), None)
    panels = [("ag", "ag_weight", 1.0), ("dg", "dg_weight", 0.0)]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, (guidance, weight_key, off) in zip(axes, panels):
        for interval in dict.fromkeys(r["interval"] for r in rows if r["guidance"] == guidance):
            line = sorted((r[weight_key], r["fid"]) for r in rows if r["guidance"] == guidance
                          and r["interval"] == interval)
            if baseline is not None:
                line = sorted([(off, baseline), *line])
            ax.plot(*zip(*line), marker="o", label=f"sigma in {interval}")
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="unguided")
        ax.set_xlabel(f"{guidance} weight w")
        ax.set_title({"ag": "autoguidance", "dg": "discriminator guidance"}[guidance])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("FID")
    count = rows[0]["num_generated"] if rows else 0
    fig.suptitle(f"FID vs guidance weight ({count} samples per point, same seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
