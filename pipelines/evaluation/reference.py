"""The FID reference: statistics of a fixed, seeded subsample of the real frames, cached with a fingerprint.

The fingerprint (dataset identity, split, resolution, subsample size and seed, detector) travels with
the statistics file; loading it for another setting raises
:class:`pipelines.evaluation.feature_cache.FingerprintMismatchError`.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.evaluation.feature_cache import check_fingerprint, dataset_identity, dataset_statistics
from pipelines.evaluation.fid import DETECTOR_ID, InceptionDetector, feature_statistics
from pipelines.utils import atomic_save_npz, jsonable, seeded_subset

STATS_FORMAT_VERSION = 1


def real_subsample_indices(num_frames: int, size: int | None = 50_000, seed: int = 0) -> np.ndarray:
    """The fixed, seeded real subsample (sorted indices); the whole set when ``size`` >= ``num_frames``."""
    if num_frames < 1:
        raise ValueError(f"the real dataset is empty (num_frames={num_frames})")
    if size is not None and size > num_frames:
        warnings.warn(f"real subsample size {size} exceeds the dataset ({num_frames} frames); using all "
                      f"{num_frames} frames", stacklevel=2)
    elif size is not None and size < num_frames and size < 2:
        raise ValueError(f"the real subsample size must be >= 2, got {size}")
    return seeded_subset(num_frames, size, seed)


@dataclass
class FeatureStatistics:
    """mu, sigma (float64) of n features, with the fingerprint of what they were computed from."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    fingerprint: dict = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: np.ndarray, fingerprint: dict | None = None) -> FeatureStatistics:
        mu, sigma = feature_statistics(features)
        return cls(mu=mu, sigma=sigma, n=int(len(features)), fingerprint=dict(fingerprint or {}))

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            raise ValueError(f"statistics path must end in .npz, got '{path}'")
        return atomic_save_npz(path, mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                               fingerprint=np.array(json.dumps(self.fingerprint, sort_keys=True, default=str)),
                               format_version=np.int64(STATS_FORMAT_VERSION))

    @classmethod
    def load(cls, path: str | os.PathLike, expected_fingerprint: dict | None = None) -> FeatureStatistics:
        """Load cached statistics; raise FingerprintMismatchError if ``expected_fingerprint`` differs."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"statistics file '{path}' does not exist")
        with np.load(path, allow_pickle=False) as data:
            missing = {"mu", "sigma", "n", "fingerprint"} - set(data.files)
            if missing:
                raise ValueError(f"'{path}' is not an EchoDiff statistics file (missing {sorted(missing)})")
            stats = cls(mu=data["mu"].astype(np.float64), sigma=data["sigma"].astype(np.float64),
                        n=int(data["n"]), fingerprint=json.loads(str(data["fingerprint"])))
        if expected_fingerprint is not None:
            check_fingerprint(stats.fingerprint, expected_fingerprint, source=str(path))
        return stats


def reference_fingerprint(dataset: Any, split: str | None, num_real: int | None, seed: int) -> dict:
    identity = dataset_identity(dataset, split)
    num_frames = identity["num_frames"]
    return {**identity, "resolution": identity["image_shape"][-1],
            "subsample_size": None if num_real is None else int(num_real), "subsample_seed": int(seed),
            "num_used": num_frames if num_real is None else min(int(num_real), num_frames),
            "detector": DETECTOR_ID, "format_version": STATS_FORMAT_VERSION}


def reference_statistics(dataset: Any, stats_path: str | os.PathLike | None = None, num_real: int | None = 50_000,
                         seed: int = 0, split: str | None = None, detector: InceptionDetector | None = None,
                         cache_dir: str | os.PathLike | None = None, batch_size: int = 32,
                         progress: bool = False) -> FeatureStatistics:
    """Statistics of the fixed seeded real subsample, loaded from ``stats_path`` when its fingerprint matches.

    A file with another fingerprint (dataset, split, resolution, subsample size/seed, detector) is refused.
    """
    fingerprint = reference_fingerprint(dataset, split, num_real, seed)
    if stats_path is not None and Path(stats_path).exists():
        return FeatureStatistics.load(stats_path, expected_fingerprint=fingerprint)
    indices = real_subsample_indices(len(dataset), num_real, seed)
    mu, sigma, n = dataset_statistics(dataset, indices, detector, cache_dir=cache_dir, batch_size=batch_size,
                                      split=split, progress=progress)
    stats = FeatureStatistics(mu=mu, sigma=sigma, n=n, fingerprint=jsonable(fingerprint))
    if stats_path is not None:
        stats.save(stats_path)
    return stats
