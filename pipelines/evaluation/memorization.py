"""Memorization / privacy audit: do generated frames copy training frames?

For every generated frame we find the most similar training frame in one or more feature spaces:

- ``pixel``: normalised pixel correlation (Pearson correlation of the flattened frames = cosine
  similarity of mean-centred, unit-norm pixel vectors);
- ``inception``: cosine similarity of the 2048-d Inception features used for FID
  (``pipelines.evaluation.fid``).

The threshold of each space is calibrated on real data: the ``percentile`` (95 by default) of the
nearest-train similarity of held-out real frames (validation / test split, other patients), the rule of
the authors' later EchoNet-Synthetic work. A generated frame above it is closer to a training frame
than 95% of unseen real frames are: it is flagged as a possible copy. The memorization rate is the
flagged fraction. With several spaces, ``combine="any"`` (default, conservative for a release) flags a
frame that exceeds any threshold, ``"all"`` only frames that exceed every one.

Similarities are exact nearest neighbours computed as chunked matrix products, so memory stays bounded
whatever the number of frames.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipelines.utils import (
    MODEL_CARDS_DIR,
    atomic_save_npz,
    atomic_write_json,
    atomic_write_text,
    check_uint8_images,
)

FEATURE_SPACES = ("pixel", "inception")
COMBINE_RULES = ("any", "all")
DEFAULT_TEMPLATE = MODEL_CARDS_DIR / "audit_section.md"

FeatureFn = Callable[[str, np.ndarray], np.ndarray]


# --------------------------------------------------------------------------------------------------
# Features and nearest neighbours
# --------------------------------------------------------------------------------------------------
def normalize_rows(features: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (all-zero rows stay zero: similarity 0 to everything)."""
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Mean-centred, unit-norm flattened pixels: their dot product is the Pearson correlation."""
    flat = images.reshape(len(images), -1).astype(np.float32)
    flat -= flat.mean(axis=1, keepdims=True)
    return normalize_rows(flat)


def nearest_neighbours(
    queries: np.ndarray,
    references: np.ndarray,
    featurize: Callable[[np.ndarray], np.ndarray] | None = None,
    query_chunk: int = 2048,
    reference_chunk: int = 8192,
) -> tuple[np.ndarray, np.ndarray]:
    """Highest cosine similarity of each query row to any reference row, and that row's index.

    ``queries`` / ``references`` are unit-norm feature rows, or raw inputs that ``featurize`` turns into
    them chunk by chunk (so pixel features of 100k frames never sit in memory at once). Ties keep
    the lowest reference index.
    """
    if len(queries) == 0 or len(references) == 0:
        raise ValueError(f"need at least one query and one reference, got {len(queries)} and {len(references)}")

    def features(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(featurize(rows) if featurize else rows, dtype=np.float32))

    best_similarity = torch.full((len(queries),), -np.inf)
    best_index = torch.zeros(len(queries), dtype=torch.int64)
    for ref_start in range(0, len(references), reference_chunk):
        reference = features(references[ref_start:ref_start + reference_chunk])
        for query_start in range(0, len(queries), query_chunk):
            query = features(queries[query_start:query_start + query_chunk])
            if query.shape[1] != reference.shape[1]:
                raise ValueError(f"query features have {query.shape[1]} dims, references {reference.shape[1]}")
            similarity, index = (query @ reference.T).max(dim=1)
            window = slice(query_start, query_start + len(query))
            better = similarity > best_similarity[window]
            best_similarity[window] = torch.where(better, similarity, best_similarity[window])
            best_index[window] = torch.where(better, index + ref_start, best_index[window])
    return best_similarity.numpy(), best_index.numpy()


def default_inception_fn(batch_size: int = 64) -> FeatureFn:
    """Inception features (NVlabs FID detector) of uint8 frames; the detector is built once, on first use."""
    detector = None

    def compute(role: str, images: np.ndarray) -> np.ndarray:
        nonlocal detector
        from pipelines.evaluation.fid import InceptionDetector, compute_features

        if detector is None:
            detector = InceptionDetector()
        return compute_features(images, detector, batch_size=batch_size)

    return compute


@dataclass
class FrameSource:
    """Frames ``dataset.images_uint8(indices)`` of a dataset-like object (a FrameDataset split,
    ``pipelines.evaluation.feature_cache.ArrayFrames``)."""

    dataset: object
    indices: np.ndarray
    split: str | None = None


def cached_inception_fn(sources: dict, cache_dir: str | os.PathLike, batch_size: int = 64,
                        progress: bool = False) -> FeatureFn:
    """Inception features per role from ``sources[role]`` (a list of FrameSource, concatenated), through
    the on-disk cache of ``pipelines.evaluation.feature_cache``: an interrupted run keeps finished chunks
    and a rerun (e.g. another generated set against the same training split) reuses them."""
    detector = None

    def compute(role: str, images: np.ndarray) -> np.ndarray:
        nonlocal detector
        from pipelines.evaluation.feature_cache import dataset_features
        from pipelines.evaluation.fid import InceptionDetector

        if detector is None:
            detector = InceptionDetector()
        parts = [dataset_features(source.dataset, source.indices, detector, cache_dir=cache_dir,
                                  batch_size=batch_size, split=source.split, progress=progress)
                 for source in sources[role]]
        features = np.concatenate(parts)
        if len(features) != len(images):
            raise ValueError(f"{role}: sources give {len(features)} frames but {len(images)} images were passed")
        return features

    return compute


# --------------------------------------------------------------------------------------------------
# Thresholds and flags
# --------------------------------------------------------------------------------------------------
def calibrate_threshold(heldout_similarity: np.ndarray, percentile: float = 95.0) -> float:
    """The ``percentile`` of held-out real frames' nearest-train similarity."""
    if not 0.0 < percentile < 100.0:
        raise ValueError(f"percentile must be in (0, 100), got {percentile}")
    if len(heldout_similarity) == 0:
        raise ValueError("no held-out similarities to calibrate the threshold on")
    return float(np.percentile(np.asarray(heldout_similarity, dtype=np.float64), percentile))


def exceedance(similarity: np.ndarray, threshold: float) -> np.ndarray:
    """(similarity - threshold) / (1 - threshold): > 0 above the threshold, 1 for an exact copy.

    A scale-free score, so that spaces with different similarity ranges can be ranked together.
    """
    return (np.asarray(similarity, np.float64) - threshold) / max(1.0 - threshold, 1e-6)


def _combine(scores: Sequence[np.ndarray], rule: str) -> np.ndarray:
    stacked = np.stack(scores)
    return stacked.max(axis=0) if rule == "any" else stacked.min(axis=0)


@dataclass
class SpaceAudit:
    """Nearest-train results in one feature space."""

    space: str
    threshold: float
    heldout_similarity: np.ndarray
    generated_similarity: np.ndarray
    generated_neighbour: np.ndarray

    @property
    def flagged(self) -> np.ndarray:
        return self.generated_similarity > self.threshold


@dataclass
class MemorizationAudit:
    """All spaces plus the combined score: flagged = score > 0; neighbour = the training frame behind it."""

    spaces: dict
    percentile: float
    combine: str
    score: np.ndarray
    neighbour: np.ndarray
    heldout_flag_rate: dict

    @property
    def flagged(self) -> np.ndarray:
        return self.score > 0

    @property
    def memorization_rate(self) -> float:
        return float(self.flagged.mean())


def heldout_flag_rates(heldout: dict, percentile: float, combine: str, seed: int = 0) -> dict:
    """Out-of-sample false-flag rate on real frames: calibrate on one half of the held-out frames,
    count flags on the other half, both ways, average. Near (100 - percentile)% when calibration holds."""
    count = len(next(iter(heldout.values())))
    if count < 4:
        return {space: float("nan") for space in [*heldout, "combined"]}
    order = np.random.default_rng(seed).permutation(count)
    halves = (order[: count // 2], order[count // 2:])
    rates: dict = {space: [] for space in [*heldout, "combined"]}
    for fit, test in (halves, halves[::-1]):
        scores = []
        for space, similarity in heldout.items():
            threshold = calibrate_threshold(similarity[fit], percentile)
            rates[space].append(float((similarity[test] > threshold).mean()))
            scores.append(exceedance(similarity[test], threshold))
        rates["combined"].append(float((_combine(scores, combine) > 0).mean()))
    return {space: float(np.mean(values)) for space, values in rates.items()}


def audit_memorization(
    train_images: np.ndarray,
    heldout_images: np.ndarray,
    generated_images: np.ndarray,
    feature_spaces: Sequence[str] = ("pixel",),
    percentile: float = 95.0,
    combine: str = "any",
    inception_fn: FeatureFn | None = None,
    query_chunk: int = 2048,
    reference_chunk: int = 8192,
    log: Callable[[str], None] = print,
) -> MemorizationAudit:
    """Nearest training frame of every held-out and generated frame, thresholds, flags.

    ``inception_fn(role, images) -> (N, 2048)`` computes Inception features for role "train", "heldout"
    or "generated" (default: :func:`default_inception_fn`; pass a cached one for large sets).
    """
    for images, name in ((train_images, "train images"), (heldout_images, "held-out images"),
                         (generated_images, "generated images")):
        if not isinstance(images, np.ndarray):  # the pixel space reshapes numpy arrays
            raise ValueError(f"{name}: expected a uint8 numpy array of shape (N, C, H, W), got {type(images).__name__}")
        check_uint8_images(images, name, channels=None)
    shapes = {train_images.shape[1:], heldout_images.shape[1:], generated_images.shape[1:]}
    if len(shapes) != 1:
        raise ValueError(f"train, held-out and generated images must share (C, H, W), got {sorted(shapes)}")
    if not feature_spaces or any(space not in FEATURE_SPACES for space in feature_spaces):
        raise ValueError(f"feature_spaces must be a non-empty subset of {FEATURE_SPACES}, got {list(feature_spaces)}")
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
    calibrate_threshold(np.zeros(1), percentile)  # validates percentile before any long computation
    chunks = {"query_chunk": query_chunk, "reference_chunk": reference_chunk}
    spaces: dict = {}
    for space in dict.fromkeys(feature_spaces):
        if space == "pixel":
            log(f"pixel correlation: {len(heldout_images)} held-out and {len(generated_images)} generated vs "
                f"{len(train_images)} training frames")
            heldout_sim, _ = nearest_neighbours(heldout_images, train_images, pixel_features, **chunks)
            generated_sim, generated_idx = nearest_neighbours(generated_images, train_images, pixel_features,
                                                              **chunks)
        else:
            inception_fn = inception_fn or default_inception_fn()
            log("inception features: train, held-out, generated")
            train = normalize_rows(inception_fn("train", train_images))
            heldout = normalize_rows(inception_fn("heldout", heldout_images))
            generated = normalize_rows(inception_fn("generated", generated_images))
            heldout_sim, _ = nearest_neighbours(heldout, train, **chunks)
            generated_sim, generated_idx = nearest_neighbours(generated, train, **chunks)
        spaces[space] = SpaceAudit(space, calibrate_threshold(heldout_sim, percentile), heldout_sim,
                                   generated_sim, generated_idx)
    return combine_spaces(spaces, percentile, combine)


def combine_spaces(spaces: dict, percentile: float, combine: str) -> MemorizationAudit:
    """Combined score (max / min exceedance over spaces for "any" / "all") and its deciding neighbour."""
    if combine not in COMBINE_RULES:
        raise ValueError(f"combine must be one of {COMBINE_RULES}, got {combine!r}")
    scores = np.stack([exceedance(s.generated_similarity, s.threshold) for s in spaces.values()])
    neighbours = np.stack([s.generated_neighbour for s in spaces.values()])
    # The neighbour shown for a frame comes from the space that decides its combined score.
    deciding = scores.argmax(axis=0) if combine == "any" else scores.argmin(axis=0)
    return MemorizationAudit(
        spaces=spaces, percentile=percentile, combine=combine,
        score=_combine(list(scores), combine), neighbour=neighbours[deciding, np.arange(scores.shape[1])],
        heldout_flag_rate=heldout_flag_rates({k: s.heldout_similarity for k, s in spaces.items()}, percentile,
                                             combine),
    )


# --------------------------------------------------------------------------------------------------
# Report, grid, filter, model-card section
# --------------------------------------------------------------------------------------------------
def _quantiles(values: np.ndarray) -> dict:
    values = np.asarray(values, np.float64)
    return {"p50": float(np.median(values)), "p95": float(np.percentile(values, 95)),
            "p99": float(np.percentile(values, 99)), "max": float(values.max())}


def summarize_audit(audit: MemorizationAudit, train_video_ids: Sequence[str] | None = None,
                    num_pairs: int = 16, num_videos: int = 10) -> dict:
    """JSON-ready summary: rates, thresholds, quantiles, most-matched training videos, closest pairs."""
    def video_of(index: int) -> str:
        return str(train_video_ids[index]) if train_video_ids is not None else f"frame {index}"

    flagged = audit.flagged
    all_counts = Counter(video_of(i) for i in audit.neighbour.tolist())
    flagged_counts = Counter(video_of(i) for i in audit.neighbour[flagged].tolist())
    videos = sorted(all_counts, key=lambda v: (-flagged_counts.get(v, 0), -all_counts[v], v))[:num_videos]
    order = np.argsort(-audit.score, kind="stable")[:num_pairs]
    return {
        "feature_spaces": list(audit.spaces),
        "percentile": audit.percentile,
        "combine": audit.combine,
        "num_generated": int(len(audit.score)),
        "num_heldout": int(len(next(iter(audit.spaces.values())).heldout_similarity)),
        "num_flagged": int(flagged.sum()),
        "memorization_rate": audit.memorization_rate,
        "memorization_rate_by_space": {k: float(s.flagged.mean()) for k, s in audit.spaces.items()},
        "thresholds": {k: s.threshold for k, s in audit.spaces.items()},
        "heldout_flag_rate": audit.heldout_flag_rate,
        "similarity_quantiles": {
            k: {"generated": _quantiles(s.generated_similarity), "heldout": _quantiles(s.heldout_similarity)}
            for k, s in audit.spaces.items()
        },
        "top_training_videos": [
            {"video": v, "flagged_matches": flagged_counts.get(v, 0), "matches": all_counts[v]} for v in videos
        ],
        "closest_pairs": [
            {
                "generated_index": int(i), "train_index": int(audit.neighbour[i]),
                "video": video_of(int(audit.neighbour[i])), "score": float(audit.score[i]),
                "flagged": bool(flagged[i]),
                "similarity": {k: float(s.generated_similarity[i]) for k, s in audit.spaces.items()},
            }
            for i in order
        ],
        "note": (
            f"A generated frame is flagged when its nearest-train similarity exceeds the {audit.percentile:g}th "
            "percentile of held-out real frames' nearest-train similarity (combine rule "
            f"'{audit.combine}' across spaces). Unseen real frames are flagged at about "
            f"{100 - audit.percentile:g}% by construction (see heldout_flag_rate): a memorization rate near "
            "that level shows no excess copying; exact copies score 1."
        ),
    }


def save_pair_grid(pairs: Sequence[dict], generated_images: np.ndarray,
                   train_lookup: Callable[[np.ndarray], np.ndarray], path: str | os.PathLike,
                   pairs_per_row: int = 4) -> Path:
    """PNG grid: each pair is the generated frame next to its nearest training frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not pairs:
        raise ValueError("no pairs to draw")
    train = train_lookup(np.array([p["train_index"] for p in pairs], dtype=np.int64))
    rows = -(-len(pairs) // pairs_per_row)
    fig, axes = plt.subplots(rows, 2 * pairs_per_row, figsize=(2.0 * 2 * pairs_per_row, 2.4 * rows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, pair in enumerate(pairs):
        row, col = divmod(k, pairs_per_row)
        similarity = ", ".join(f"{name} {value:.3f}" for name, value in pair["similarity"].items())
        for offset, image, title in (
            (0, generated_images[pair["generated_index"]], f"gen {pair['generated_index']}\nscore {pair['score']:.2f}"
             + (" FLAG" if pair["flagged"] else "")),
            (1, train[k], f"{pair['video']} (train {pair['train_index']})\n{similarity}"),
        ):
            ax = axes[row, 2 * col + offset]
            if image.shape[0] == 1:
                ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(image.transpose(1, 2, 0))
            ax.set_title(title, fontsize=7)
    fig.suptitle("Generated frames (left) and their nearest training frames (right), most similar first",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_filtered(generated_images: np.ndarray, keep: np.ndarray, path: str | os.PathLike,
                   seeds: np.ndarray | None = None) -> Path:
    """Write the kept generated frames as ``.npz``: ``images`` uint8 NCHW, ``indices`` into the input and,
    when known, their generation ``seeds`` (``pipelines.evaluation.generation.load_images`` reads it back)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"filtered output must end in .npz, got '{path}'")
    indices = np.flatnonzero(keep)
    arrays = {"images": generated_images[indices], "indices": indices}
    if seeds is not None:
        arrays["seeds"] = np.asarray(seeds)[indices]
    return atomic_save_npz(path, **arrays)


def render_audit_section(summary: dict, template_path: str | os.PathLike | None = None) -> str:
    """Model-card Markdown for the audit, from ``model_cards/audit_section.md`` (jinja2, as ModelCard uses)."""
    import jinja2

    path = Path(template_path) if template_path is not None else DEFAULT_TEMPLATE
    if not path.is_file():
        raise FileNotFoundError(f"audit section template '{path}' does not exist")
    template = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True).from_string(
        path.read_text())
    return template.render(**summary)


def run_memorization_audit(
    train_images: np.ndarray,
    heldout_images: np.ndarray,
    generated_images: np.ndarray,
    out_dir: str | os.PathLike,
    train_video_ids: Sequence[str] | None = None,
    feature_spaces: Sequence[str] = ("pixel",),
    percentile: float = 95.0,
    combine: str = "any",
    filter_output: bool = False,
    generated_seeds: np.ndarray | None = None,
    num_pairs: int = 16,
    inception_fn: FeatureFn | None = None,
    metadata: dict | None = None,
    log: Callable[[str], None] = print,
    **chunks: int,
) -> dict:
    """Audit and write ``summary.json``, ``neighbours.npz``, ``closest_pairs.png``, ``audit_section.md``
    and, with ``filter_output``, ``filtered.npz`` (the generated frames that are not flagged)."""
    if generated_seeds is not None and len(generated_seeds) != len(generated_images):
        raise ValueError(f"generated_seeds has {len(generated_seeds)} entries for {len(generated_images)} images")
    if train_video_ids is not None and len(train_video_ids) != len(train_images):
        raise ValueError(f"train_video_ids has {len(train_video_ids)} entries for {len(train_images)} train images")
    audit = audit_memorization(train_images, heldout_images, generated_images, feature_spaces, percentile,
                               combine, inception_fn=inception_fn, log=log, **chunks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize_audit(audit, train_video_ids, num_pairs=num_pairs)
    summary["num_train"] = int(len(train_images))
    summary["metadata"] = dict(metadata or {})
    arrays = {"score": audit.score, "flagged": audit.flagged, "neighbour": audit.neighbour}
    for space, result in audit.spaces.items():
        arrays.update({f"{space}_similarity": result.generated_similarity,
                       f"{space}_neighbour": result.generated_neighbour,
                       f"{space}_heldout_similarity": result.heldout_similarity})
    atomic_save_npz(out_dir / "neighbours.npz", **arrays)
    files = {"neighbours": "neighbours.npz", "grid": "closest_pairs.png"}
    save_pair_grid(summary["closest_pairs"], generated_images, lambda idx: train_images[idx],
                   out_dir / "closest_pairs.png")
    if filter_output:
        write_filtered(generated_images, ~audit.flagged, out_dir / "filtered.npz", seeds=generated_seeds)
        files["filtered"] = "filtered.npz"
        summary["num_kept"] = int((~audit.flagged).sum())
    summary["files"] = files
    atomic_write_json(out_dir / "summary.json", summary)
    if DEFAULT_TEMPLATE.is_file():
        atomic_write_text(out_dir / "audit_section.md", render_audit_section(summary))
    log(f"memorization rate {100 * audit.memorization_rate:.2f}% ({summary['num_flagged']} of "
        f"{summary['num_generated']}); thresholds {summary['thresholds']}")
    return summary
