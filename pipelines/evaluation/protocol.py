"""The paper's evaluation protocol as library functions (``evaluate.py`` is the CLI over them).

- ``fid_of_images`` / ``fid_of_samples``: FID (+ KID) of generated images against the fixed, seeded
  real subsample's cached statistics.
- ``optimal_fid``: FID between two seeded halves of the real frames, patient-level (one video's
  frames stay on one side) and frame-level.
- ``fid_vs_nfe``: FID (+ KID) over sampler step counts, per sampler (Heun, DPM-Solver++, UniPC, ...):
  CSV, one PNG with a line per sampler, and a Markdown table of the NFE each needs to match Heun at 59 NFE.
- ``variance_study``: the paper's two experiments (real subsample varied / generation varied).

Inception features go through one cache (``pipelines.evaluation.feature_cache``): per real frame and
per generation shard, so every experiment reuses what earlier ones computed and an interrupted run
loses little.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.cli import parse_seeds
from pipelines.evaluation.feature_cache import (
    CHUNK_SIZE,
    dataset_features,
    dataset_statistics,
    shard_features,
    shard_statistics,
)
from pipelines.evaluation.fid import (
    InceptionDetector,
    StreamingStatistics,
    compute_features,
    frechet_distance,
    kernel_inception_distance,
)
from pipelines.evaluation.generation import SHARD_GLOB, generate_images, read_shard
from pipelines.evaluation.reference import (
    FeatureStatistics,
    real_subsample_indices,
    reference_fingerprint,
    reference_statistics,
)
from pipelines.utils import seeded_subset

DEFAULT_CACHE_DIR = Path(os.environ.get("ECHODIFF_CACHE", Path.home() / ".cache" / "echodiff"))
DEFAULT_NUM_REAL = 50_000
DEFAULT_NUM_GEN = 50_000
HEUN_REFERENCE_NFE = 59  # the paper's headline setting (30 Heun steps)
MATCH_TOLERANCE = 0.05  # "within 5% of Heun's FID at 59 NFE"
# KID draws its subsets (1,000 each) from at most this many features per side, a seeded subsample: FID's
# statistics stream, so this pool is what bounds the features held in memory (2 x 164 MB in float64).
KID_MAX_FEATURES = 10_000


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------
# Reference statistics and features
# --------------------------------------------------------------------------------------------------
def default_stats_path(cache_dir: str | os.PathLike, fingerprint: dict) -> Path:
    name = (f"reference-{fingerprint['split']}-{fingerprint['resolution']}px-n{fingerprint['num_used']}"
            f"-seed{fingerprint['subsample_seed']}-{fingerprint['content_sha1'][:10]}.npz")
    return Path(cache_dir) / name


def reference_for(frames: Any, num_real: int | None = DEFAULT_NUM_REAL, seed: int = 0,
                  stats_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                  detector: InceptionDetector | None = None, batch_size: int = 32,
                  progress: bool = True) -> FeatureStatistics:
    """Cached statistics of the fixed real subsample (computed once, refused if the fingerprint differs)."""
    split = getattr(frames, "split", None)
    if stats_path is None:
        stats_path = default_stats_path(cache_dir, reference_fingerprint(frames, split, num_real, seed))
    return reference_statistics(frames, stats_path=stats_path, num_real=num_real, seed=seed, split=split,
                                detector=detector, cache_dir=cache_dir, batch_size=batch_size, progress=progress)


def real_features(frames: Any, indices: Sequence[int], detector: InceptionDetector | None,
                  cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR, batch_size: int = 32,
                  progress: bool = True) -> np.ndarray:
    """Features of real frames ``indices``, through the per-frame cache in ``cache_dir``."""
    return dataset_features(frames, indices, detector, cache_dir=cache_dir, batch_size=batch_size,
                            split=getattr(frames, "split", None), progress=progress)


def kid_pool(count: int, seed: int = 0) -> np.ndarray:
    """Positions (sorted) of the features KID uses out of ``count``: all up to KID_MAX_FEATURES, else a seeded subset."""
    return seeded_subset(count, KID_MAX_FEATURES, seed)


def scores(gen: FeatureStatistics, reference: FeatureStatistics, kid_real: np.ndarray | None = None,
           kid_gen: np.ndarray | None = None, kid_subset_size: int = 1000, kid_subsets: int = 100,
           seed: int = 0) -> dict:
    """FID of the generated statistics against ``reference`` (+ KID when both feature pools are given)."""
    result = {"fid": frechet_distance(gen.mu, gen.sigma, reference.mu, reference.sigma),
              "num_generated": int(gen.n), "num_real": int(reference.n)}
    if kid_real is not None and kid_gen is not None:
        result.update(kernel_inception_distance(kid_real, kid_gen, kid_subset_size, kid_subsets, seed))
        result.update(kid_pool_real=int(len(kid_real)), kid_pool_generated=int(len(kid_gen)))
    if gen.n < 50_000:
        result["note"] = (f"FID on {gen.n} generated images is biased upwards against FID-50k; "
                          "compare only scores computed on equal sample sizes (KID is unbiased)")
    return result


def _image_statistics(images: np.ndarray, detector: InceptionDetector, batch_size: int, keep: np.ndarray | None,
                      progress: bool) -> tuple[FeatureStatistics, np.ndarray | None]:
    """Statistics of in-memory images' features, chunk by chunk, and the features of rows ``keep`` (KID)."""
    stats, kept = StreamingStatistics(), []
    keep_set = None if keep is None else set(keep.tolist())
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(images), CHUNK_SIZE), desc="generated features", disable=not progress):
        feats = compute_features(images[start:start + CHUNK_SIZE], detector, batch_size=batch_size)
        stats.update(feats)
        if keep_set is not None:
            kept.extend(feats[k - start] for k in range(start, start + len(feats)) if k in keep_set)
    mu, sigma = stats.statistics()
    return FeatureStatistics(mu, sigma, stats.n), (np.stack(kept) if kept else None)


# --------------------------------------------------------------------------------------------------
# Experiments
# --------------------------------------------------------------------------------------------------
def fid_of_images(images: np.ndarray, frames: Any, num_real: int | None = DEFAULT_NUM_REAL, subsample_seed: int = 0,
                  stats_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                  detector: InceptionDetector | None = None, batch_size: int = 32, kid: bool = True,
                  progress: bool = True) -> dict:
    """FID (+ KID) of uint8 NCHW ``images`` against the real frames' cached reference."""
    detector = detector if detector is not None else InceptionDetector()
    _check_compatible(images.shape[1:], frames)
    reference = reference_for(frames, num_real, subsample_seed, stats_path, cache_dir, detector, batch_size, progress)
    gen, kid_gen = _image_statistics(images, detector, batch_size, kid_pool(len(images)) if kid else None, progress)
    real = _kid_real_features(frames, num_real, subsample_seed, detector, cache_dir, batch_size, progress) if kid else None
    return {**scores(gen, reference, real, kid_gen), "reference": reference.fingerprint}


def fid_of_samples(pipeline: Any, samples_dir: str | os.PathLike, seeds: str | Sequence[int], frames: Any,
                   num_inference_steps: int = 30, num_real: int | None = DEFAULT_NUM_REAL, subsample_seed: int = 0,
                   stats_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                   detector: InceptionDetector | None = None, batch_size: int = 32, gen_batch_size: int = 32,
                   accelerator: Any = None, kid: bool = True, run_info: dict | None = None, progress: bool = True,
                   **sampler_kwargs: Any) -> dict | None:
    """Generate ``seeds`` into ``samples_dir`` (resumable, split over accelerate processes), then score them.

    Returns the scores on the main process, None on the others.
    """
    seeds = parse_seeds(seeds)
    generate_images(pipeline, samples_dir, seeds, batch_size=gen_batch_size, num_inference_steps=num_inference_steps,
                    accelerator=accelerator, run_info=run_info, progress=progress, **sampler_kwargs)
    if accelerator is not None and not accelerator.is_main_process:
        return None
    detector = detector if detector is not None else InceptionDetector()
    first_shard = next(iter(sorted(Path(samples_dir).glob(SHARD_GLOB))))
    _check_compatible(read_shard(first_shard, "images").shape[1:], frames)
    reference = reference_for(frames, num_real, subsample_seed, stats_path, cache_dir, detector, batch_size, progress)
    mu, sigma, n = shard_statistics(samples_dir, seeds, detector, batch_size, progress)
    gen = FeatureStatistics(mu, sigma, n)
    real = kid_gen = None
    if kid:
        real = _kid_real_features(frames, num_real, subsample_seed, detector, cache_dir, batch_size, progress)
        kid_gen = shard_features(samples_dir, [seeds[k] for k in kid_pool(len(seeds))], detector, batch_size, progress)
    return {**scores(gen, reference, real, kid_gen), **sampling_record(pipeline, num_inference_steps, sampler_kwargs),
            "seeds": _seed_summary(seeds), "samples_dir": str(samples_dir), "reference": reference.fingerprint}


def sampling_record(pipeline: Any, num_inference_steps: int, sampler_kwargs: dict) -> dict:
    """Sampler name, steps, exact NFE and precision of a call with these arguments (EchoDiffPipeline's own
    count; other pipelines: steps only, the NFE is not known)."""
    describe = getattr(pipeline, "sampler_description", None)
    if describe is None:
        return {"num_inference_steps": int(num_inference_steps), "nfe": None}
    return describe(num_inference_steps, **sampler_kwargs)


def _kid_real_features(frames: Any, num_real: int | None, seed: int, detector: InceptionDetector,
                       cache_dir: str | os.PathLike | None, batch_size: int, progress: bool) -> np.ndarray:
    indices = real_subsample_indices(len(frames), num_real, seed)
    return real_features(frames, indices[kid_pool(len(indices))], detector, cache_dir, batch_size, progress)


def real_statistics(frames: Any, indices: Sequence[int], detector: InceptionDetector | None,
                    cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR, batch_size: int = 32,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of real frames ``indices``' features, streamed through the per-frame cache."""
    mu, sigma, _ = dataset_statistics(frames, indices, detector, cache_dir=cache_dir, batch_size=batch_size,
                                      split=getattr(frames, "split", None), progress=progress)
    return mu, sigma


def _check_compatible(image_shape: Sequence[int], frames: Any) -> None:
    expected = (frames.channels, frames.resolution, frames.resolution)
    if tuple(image_shape)[1:] != expected[1:]:
        raise ValueError(f"generated images are {tuple(image_shape)} (C, H, W) but the real frames are {expected}: "
                         "FID compares images of one resolution")


def _seed_summary(seeds: Sequence[int]) -> str:
    seeds = list(seeds)
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(str(s) for s in seeds[:20]) + (",..." if len(seeds) > 20 else "")


def patient_level_halves(video_ids: Sequence[str], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frame indices of two halves with each video entirely on one side, frame counts as equal as possible.

    Videos are shuffled (seeded) and dealt to the half that currently has fewer frames.
    """
    video_ids = np.asarray(video_ids)
    unique, inverse, counts = np.unique(video_ids, return_inverse=True, return_counts=True)
    if len(unique) < 2:
        raise ValueError(f"a patient-level split needs at least 2 videos, the frames come from {len(unique)}")
    side = np.zeros(len(unique), dtype=np.int64)
    totals = [0, 0]
    for v in np.random.default_rng(seed).permutation(len(unique)):
        side[v] = 0 if totals[0] <= totals[1] else 1
        totals[side[v]] += counts[v]
    frame_side = side[inverse]
    return np.flatnonzero(frame_side == 0), np.flatnonzero(frame_side == 1)


def frame_level_halves(num_frames: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    if num_frames < 4:
        raise ValueError(f"splitting in halves needs at least 4 frames, got {num_frames}")
    perm = np.random.default_rng(seed).permutation(num_frames)
    half = num_frames // 2
    return np.sort(perm[:half]), np.sort(perm[half:2 * half])


def _cap(half: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """A seeded subset of at most ``cap`` of the (sorted) frame indices ``half``."""
    return half[seeded_subset(len(half), cap, seed)]


def optimal_fid(frames: Any, seed: int = 0, max_per_half: int | None = None,
                detector: InceptionDetector | None = None, cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR,
                batch_size: int = 32, progress: bool = True) -> dict:
    """The paper's Optimal FID: FID between two seeded halves of the real frames.

    Patient-level (each video on one side) and frame-level (frames shuffled) splits; ``max_per_half``
    caps each half to a seeded subset (the paper uses all frames).
    """
    detector = detector if detector is not None else InceptionDetector()
    video_ids = frames.column("video_id")
    splits = {"patient_level": patient_level_halves(video_ids, seed),
              "frame_level": frame_level_halves(len(frames), seed)}
    result: dict[str, Any] = {"num_frames": int(len(frames)), "num_videos": int(len(np.unique(video_ids))),
                              "seed": seed, "max_per_half": max_per_half, "split": getattr(frames, "split", None),
                              "resolution": int(frames.resolution)}
    for name, (half_a, half_b) in splits.items():
        half_a, half_b = _cap(half_a, max_per_half, seed + 1), _cap(half_b, max_per_half, seed + 2)
        mu_a, sigma_a = real_statistics(frames, half_a, detector, cache_dir, batch_size, progress)
        mu_b, sigma_b = real_statistics(frames, half_b, detector, cache_dir, batch_size, progress)
        result[name] = {"fid": frechet_distance(mu_a, sigma_a, mu_b, sigma_b), "num_a": int(len(half_a)),
                        "num_b": int(len(half_b)),
                        "videos_a": int(len(np.unique(video_ids[half_a]))),
                        "videos_b": int(len(np.unique(video_ids[half_b])))}
    return result


def fid_vs_nfe(pipeline: Any, steps_list: Sequence[int], frames: Any, out_dir: str | os.PathLike,
               seeds: str | Sequence[int] = "0-49999", samplers: Sequence[str] | None = None,
               **kwargs: Any) -> list[dict] | None:
    """FID (+ KID) per sampler and step count (the paper's Figure 1, extended to other samplers).

    ``samplers``: names of ``pipeline.sampler_names()`` (None: the pipeline's own scheduler). Samples go to
    ``samples-steps<N>`` (own scheduler) or ``samples-<sampler>-steps<N>``; writes ``fid_vs_nfe.csv``,
    ``fid_vs_nfe.png`` (FID and KID against the exact NFE, a line per sampler) and ``fid_vs_nfe.md``.
    """
    if not steps_list or any(int(n) < 1 for n in steps_list):
        raise ValueError(f"steps_list must be positive step counts, got {list(steps_list)}")
    known = getattr(pipeline, "sampler_names", lambda: ())()
    unknown = [name for name in samplers or () if name not in known]
    if unknown:
        raise ValueError(f"--samplers: unknown sampler(s) {unknown}; this pipeline has {list(known)}")
    out_dir = Path(out_dir)
    rows = []
    accelerator = kwargs.get("accelerator")
    for sampler in samplers or [None]:
        for steps in steps_list:
            folder = out_dir / (f"samples-steps{int(steps)}" if sampler is None else f"samples-{sampler}-steps{int(steps)}")
            options = dict(kwargs) if sampler is None else {**kwargs, "sampler": sampler}
            result = fid_of_samples(pipeline, folder, seeds, frames, num_inference_steps=int(steps), **options)
            if result is not None:
                rows.append({"sampler": result.get("sampler", sampler), "steps": int(steps), "nfe": result["nfe"],
                             "fid": result["fid"], "kid": result.get("kid"), "kid_std": result.get("kid_std"),
                             "num_generated": result["num_generated"]})
    if accelerator is not None and not accelerator.is_main_process:
        return None
    write_nfe_table(rows, out_dir)
    return rows


def nfe_to_match_heun(rows: list[dict], reference_nfe: int = HEUN_REFERENCE_NFE,
                      tolerance: float = MATCH_TOLERANCE) -> tuple[float | None, dict[str, int | None]]:
    """(Heun's FID at ``reference_nfe``, per sampler the lowest NFE whose FID is within ``tolerance`` of it);
    None where Heun has no such row or the sampler never gets there."""
    heun = [r["fid"] for r in rows if r["sampler"] == "heun" and r["nfe"] == reference_nfe]
    target = heun[0] if heun else None
    lowest = {}
    for row in rows:
        lowest.setdefault(row["sampler"], None)
        if target is not None and row["fid"] <= target * (1 + tolerance):
            current = lowest[row["sampler"]]
            lowest[row["sampler"]] = row["nfe"] if current is None else min(current, row["nfe"])
    return target, lowest


def nfe_markdown(rows: list[dict]) -> str:
    """The per-sampler table: lowest NFE within 5% of Heun's FID at 59 NFE, and each sampler's best point."""
    target, lowest = nfe_to_match_heun(rows)
    size = rows[0]["num_generated"] if rows else 0
    reference = (f"Heun's FID at {HEUN_REFERENCE_NFE} NFE: {target:.3f}" if target is not None else
                 f"no Heun row at {HEUN_REFERENCE_NFE} NFE (add sampler heun with 30 steps)")
    lines = [f"FID vs NFE on {size} generated images per point; {reference}.", "",
             f"| sampler | lowest NFE with FID within {MATCH_TOLERANCE:.0%} of Heun at {HEUN_REFERENCE_NFE} NFE "
             "| best FID (at NFE) | points |", "|---|---|---|---|"]
    for sampler, nfe in lowest.items():
        mine = [r for r in rows if r["sampler"] == sampler]
        best = min(mine, key=lambda r: r["fid"])
        shown = "-" if nfe is None else str(nfe)
        lines.append(f"| {sampler} | {shown} | {best['fid']:.3f} ({best['nfe']}) | "
                     + ", ".join(f"{r['nfe']}: {r['fid']:.2f}" for r in sorted(mine, key=lambda r: r["nfe"])) + " |")
    return "\n".join(lines) + "\n"


def write_nfe_table(rows: list[dict], out_dir: str | os.PathLike) -> tuple[Path, Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, png_path, md_path = out_dir / "fid_vs_nfe.csv", out_dir / "fid_vs_nfe.png", out_dir / "fid_vs_nfe.md"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["sampler", "steps", "nfe", "fid", "kid", "kid_std", "num_generated"])
        writer.writeheader()
        writer.writerows(rows)
    metrics = ["fid"] + (["kid"] if any(r.get("kid") is not None for r in rows) else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            mine = sorted((r for r in rows if r["sampler"] == sampler), key=lambda r: r["nfe"])
            ax.plot([r["nfe"] for r in mine], [r[metric] for r in mine], marker="o", label=sampler)
        ax.set_xscale("log")
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel(metric.upper())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{' and '.join(m.upper() for m in metrics)} per NFE ({rows[0]['num_generated'] if rows else 0} "
                 "samples per point)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    md_path.write_text(nfe_markdown(rows), encoding="utf-8")
    return csv_path, png_path, md_path


def _mean_std(values: Sequence[float]) -> dict:
    values = np.asarray(values, dtype=np.float64)
    return {"values": values.tolist(), "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


def variance_study(pipeline: Any, frames: Any, out_dir: str | os.PathLike, repeats: int = 10,
                   num_gen: int = DEFAULT_NUM_GEN, num_real: int | None = DEFAULT_NUM_REAL, subsample_seed: int = 0,
                   num_inference_steps: int = 18, detector: InceptionDetector | None = None,
                   cache_dir: str | os.PathLike | None = DEFAULT_CACHE_DIR, batch_size: int = 32,
                   gen_batch_size: int = 32, accelerator: Any = None, run_info: dict | None = None,
                   progress: bool = True, **sampler_kwargs: Any) -> dict | None:
    """The paper's two experiments, mean +- std (sample std, ddof 1) over ``repeats``.

    A: generated images fixed (seeds 0..num_gen-1), real subsample redrawn with seeds
    ``subsample_seed + r``. B: real subsample fixed (``subsample_seed``), fresh generations with
    seeds ``r*num_gen .. (r+1)*num_gen - 1``.
    """
    if repeats < 2:
        raise ValueError(f"repeats must be >= 2 to estimate a spread, got {repeats}")
    samples_dir = Path(out_dir) / f"samples-steps{num_inference_steps}"
    all_seeds = list(range(repeats * num_gen))
    generate_images(pipeline, samples_dir, all_seeds, batch_size=gen_batch_size, num_inference_steps=num_inference_steps,
                    accelerator=accelerator, run_info=run_info, progress=progress, **sampler_kwargs)
    if accelerator is not None and not accelerator.is_main_process:
        return None
    detector = detector if detector is not None else InceptionDetector()
    if num_real is None or num_real >= len(frames):
        warnings.warn(f"the real subsample ({num_real}) covers all {len(frames)} frames: experiment A's redraws are "
                      "identical, so its spread is 0", stacklevel=2)
    mu_g, sigma_g, _ = shard_statistics(samples_dir, all_seeds[:num_gen], detector, batch_size, progress)
    fids_a = []
    for r in range(repeats):
        idx = real_subsample_indices(len(frames), num_real, subsample_seed + r)
        mu_r, sigma_r = real_statistics(frames, idx, detector, cache_dir, batch_size, progress)
        fids_a.append(frechet_distance(mu_g, sigma_g, mu_r, sigma_r))
    idx = real_subsample_indices(len(frames), num_real, subsample_seed)
    mu_r, sigma_r = real_statistics(frames, idx, detector, cache_dir, batch_size, progress)
    fids_b = []
    for r in range(repeats):
        mu_g, sigma_g, _ = shard_statistics(samples_dir, all_seeds[r * num_gen:(r + 1) * num_gen], detector,
                                            batch_size, progress)
        fids_b.append(frechet_distance(mu_g, sigma_g, mu_r, sigma_r))
    return {**sampling_record(pipeline, num_inference_steps, sampler_kwargs), "repeats": repeats,
            "num_generated": num_gen, "num_real": int(len(idx)), "subsample_seed": subsample_seed,
            "generated_fixed_real_varied": _mean_std(fids_a), "real_fixed_generation_varied": _mean_std(fids_b),
            "std": "sample standard deviation (ddof=1)", "paper_18_steps": {"generated_fixed_real_varied": "4.02 +- 0.045",
                                                                             "real_fixed_generation_varied": "4.05 +- 0.001"}}


def dg_epoch_fid_scorer(pipeline, out_dir: str | os.PathLike, frames, seeds: Sequence[int],
                     num_inference_steps: int = 30, gen_batch_size: int = 64, accelerator=None,
                     fid_options: dict | None = None, progress: bool = True,
                     **dg_kwargs) -> Callable[[int], float]:
    """``score(epoch)`` = FID of DG samples (``seeds``) with that epoch's discriminator, as the paper
    selects epochs. Samples go to ``out_dir/selection/epoch-NNN`` (resumable, features cached)."""
    import torch

    from pipelines.training.discriminator import attach_discriminator, load_epoch_discriminator

    out_dir = Path(out_dir)

    def score(epoch: int) -> float:
        attach_discriminator(pipeline, load_epoch_discriminator(out_dir, epoch, unet=pipeline.unet))
        result = fid_of_samples(pipeline, out_dir / "selection" / f"epoch-{epoch:03d}", list(seeds), frames,
                                num_inference_steps=num_inference_steps, gen_batch_size=gen_batch_size,
                                accelerator=accelerator, kid=False, progress=progress,
                                run_info={"discriminator_epoch": epoch}, **(fid_options or {}), **dg_kwargs)
        if accelerator is not None:
            # every process needs the score to pick the same best epoch
            value = torch.tensor([result["fid"] if result is not None else 0.0], device=accelerator.device)
            return float(accelerator.reduce(value, reduction="sum").item())
        return float(result["fid"])

    return score
