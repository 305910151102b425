"""``evaluate.py phema-sweep``: choose the EMA length after training (EDM2's post-hoc EMA).

For each relative std, the run's power-function EMA snapshots (``<run>/phema``, written by ``--phema``) are
combined by least squares into that EMA length at the last snapshot's time (:mod:`pipelines.phema`), the
run's exported pipeline gets those weights and is scored with FID / KID on the usual protocol (the same
seeds and real subsample for every std). Writes ``phema_sweep.csv``, ``phema_sweep.png`` (FID vs EMA length)
and exports the best as ``<output_dir>/pipeline_phema_best`` with a model card that names its std.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from pipelines.phema import SNAPSHOT_DIR, check_std, list_snapshots, load_weights, reconstruct

FIELDS = ("ema_std", "fid", "kid", "num_generated", "snapshots", "images_seen", "residual")


def phema_sweep(run_dir: str | os.PathLike, stds: list[float], frames: Any, out_dir: str | os.PathLike,
                seeds: str = "0-49999", num_inference_steps: int = 30, pipeline: Any = None,
                export: bool = True, **fid_kwargs: Any) -> dict | None:
    """Scores each reconstructed EMA length; returns {"rows", "best", ...} on the main process (None elsewhere).

    ``pipeline``: the run's pipeline (default: loaded from ``<run_dir>/pipeline``); ``fid_kwargs`` go to
    :func:`pipelines.evaluation.protocol.fid_of_samples` (detector, accelerator, num_real, cache_dir, ...).
    """
    from pipelines.evaluation.protocol import fid_of_samples

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    stds = sorted({check_std(float(s), "--ema_std") for s in stds})
    if not stds:
        raise ValueError("--ema_std: expected one or more relative stds")
    snapshots = list_snapshots(run_dir / SNAPSHOT_DIR)
    if not snapshots:
        raise FileNotFoundError(f"{run_dir / SNAPSHOT_DIR}: no post-hoc EMA snapshots (train with --phema)")
    if pipeline is None:
        pipeline = _load_run_pipeline(run_dir)
    accelerator = fid_kwargs.get("accelerator")
    rows = []
    for std in stds:
        tensors, info = reconstruct(snapshots, std)
        load_weights(pipeline.unet, tensors)
        run_info = {"model": str(run_dir), "phema_std": std, "phema_images_seen": info["images_seen"],
                    "phema_snapshots": info["snapshots"]}
        result = fid_of_samples(pipeline, out_dir / f"samples-std{std:.3f}", seeds, frames,
                                num_inference_steps=num_inference_steps, run_info=run_info, **fid_kwargs)
        if result is not None:
            rows.append({"ema_std": std, "fid": result["fid"], "kid": result.get("kid"),
                         "num_generated": result["num_generated"], "snapshots": info["snapshots"],
                         "images_seen": info["images_seen"], "residual": info["residual"]})
    if accelerator is not None and not accelerator.is_main_process:
        return None
    csv_path, png_path = write_sweep_table(rows, out_dir)
    best = min(rows, key=lambda row: row["fid"])
    result = {"rows": rows, "best": best, "csv": str(csv_path), "plot": str(png_path), "run": str(run_dir),
              "num_inference_steps": num_inference_steps, "seeds": seeds}
    if export:
        result["pipeline"] = str(export_best(pipeline, snapshots, best, rows, run_dir, out_dir / "pipeline_phema_best"))
    return result


def _load_run_pipeline(run_dir: Path):
    from pipelines.hub import load_pipeline

    folder = run_dir / "pipeline"
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: the run has no exported pipeline yet (it is written when training ends); "
                                f"pass a finished --run")
    return load_pipeline(folder)


def write_sweep_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out_dir / "phema_sweep.csv", out_dir / "phema_sweep.png"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["ema_std"] for r in rows], [r["fid"] for r in rows], marker="o")
    ax.set_xlabel("EMA length (relative std of the power-function profile)")
    ax.set_ylabel("FID")
    ax.set_title(f"Post-hoc EMA sweep ({rows[0]['num_generated'] if rows else 0} samples)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path


def phema_card_section(best: dict, rows: list[dict]) -> str:
    tried = ", ".join(f"{r['ema_std']:g} (FID {r['fid']:.2f})" for r in rows)
    return (
        "\n## Post-hoc EMA\n\n"
        f"The weights are EDM2's post-hoc EMA reconstruction with relative std **{best['ema_std']:g}** (a "
        f"power-function EMA profile), made by least squares from {best['snapshots']} stored snapshots up to "
        f"{best['images_seen'] / 1000:g} kimg (L2 residual of the profile {best['residual']:.3g}). It had the "
        f"lowest FID ({best['fid']:.3f}, {best['num_generated']} samples) of the lengths tried: {tried}.\n"
    )


def export_best(pipeline, snapshots, best: dict, rows: list[dict], run_dir: Path, target: Path) -> Path:
    """The best reconstruction saved as a pipeline, with a card: the run's training section and which EMA."""
    from pipelines import hub
    from pipelines.training.export import RUN_INFO_FILE, training_card_section

    tensors, _ = reconstruct(snapshots, best["ema_std"])
    load_weights(pipeline.unet, tensors)
    pipeline.save_pretrained(str(target))
    sections = [phema_card_section(best, rows)]
    run_info_path = run_dir / RUN_INFO_FILE
    run_info = json.loads(run_info_path.read_text()) if run_info_path.is_file() else {}
    if run_info:
        sections.append(training_card_section(run_info))
    metrics = {"FID": best["fid"]} if best.get("kid") is None else {"FID": best["fid"], "KID": best["kid"]}
    hub.write_model_card(target, None, metrics=metrics, sections=sections, training_dataset=run_info.get("dataset"),
                         evaluation={"num_generated": best["num_generated"]})
    return target
