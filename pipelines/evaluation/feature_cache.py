"""The one on-disk cache of Inception features: real frames of a dataset and generated shards alike.

A :class:`FeatureCache` holds the features of one fingerprinted set of images (a frame dataset split,
one generation shard): a float32 ``.npy`` memmap with a ``done`` mask rewritten atomically after each
chunk, so an interrupted run keeps every chunk it finished and a rerun computes only the rest. Its
folder is named by a hash of the fingerprint (dataset, split, size, image shape, a content hash of
evenly spaced images, detector): other data never lands in it, and a folder whose recorded
fingerprint differs is refused.

- :func:`dataset_features`: features of frames ``indices`` of a dataset (``len`` + ``images_uint8``).
- :func:`shard_features`: features of given seeds of a generation shard folder, cached beside the shards.
- :func:`dataset_statistics`, :func:`shard_statistics`: their mean and covariance, streamed chunk by chunk
  (one chunk of features in memory, not all 50,000: 0.8 GB in float64, plus np.cov's centred copy).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.cli import parse_seeds
from pipelines.errors import UserInputError
from pipelines.evaluation.fid import (
    DETECTOR_ID,
    NUM_FEATURES,
    InceptionDetector,
    StreamingStatistics,
    compute_features,
)
from pipelines.evaluation.generation import SHARD_GLOB, read_shard
from pipelines.utils import (
    atomic_save_npy,
    atomic_write_json,
    check_uint8_images,
    jsonable,
    setting_differences,
)

# A dataset's fingerprint hashes this many evenly spaced images: a rebuilt or changed dataset under the
# same path gets another fingerprint, without reading every frame.
CONTENT_PROBE = 64
CHUNK_SIZE = 1024


class FingerprintMismatchError(UserInputError):
    """Cached statistics or features were computed for a different dataset/split/subsample."""


def fingerprint_key(fingerprint: dict) -> str:
    return hashlib.sha1(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_fingerprint(stored: dict, expected: dict, source: str = "cached statistics",
                      remedy: str = "Use another statistics path or delete the file to recompute.") -> None:
    """Raise FingerprintMismatchError naming every field that differs."""
    diffs = setting_differences(stored, jsonable(expected), stored_label="cached")
    if diffs:
        raise FingerprintMismatchError(
            f"{source} were computed for a different setting ({'; '.join(diffs)}). {remedy}")


class ArrayFrames:
    """A uint8 (N, C, H, W) array seen as a frame dataset (``len``, ``images_uint8``), e.g. to cache the
    features of generated images."""

    def __init__(self, images: np.ndarray, name: str, split: str | None = None):
        self.images = check_uint8_images(images, name, channels=None)
        self.source, self.split = str(name), split
        self.channels, self.resolution = images.shape[1], images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def images_uint8(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        return self.images if indices is None else self.images[np.asarray(indices, dtype=np.int64)]


def dataset_identity(dataset: Any, split: str | None = None) -> dict:
    """Identity of a frame dataset: its source, split, size, shape and a hash of evenly spaced frames."""
    num = len(dataset)
    if num < 1:
        raise ValueError("the frame dataset is empty")
    probe = np.unique(np.linspace(0, num - 1, num=min(num, CONTENT_PROBE)).round().astype(np.int64))
    sample = np.ascontiguousarray(dataset.images_uint8(probe))
    source = getattr(dataset, "source", None)
    hf_dataset = getattr(dataset, "dataset", None)  # FrameDataset keeps its datasets.Dataset here
    version = getattr(dataset, "fingerprint", None) or getattr(hf_dataset, "_fingerprint", None)
    return {
        "dataset": str(source) if source is not None else type(dataset).__name__,
        "split": split if split is not None else getattr(dataset, "split", None),
        "num_frames": int(num),
        "image_shape": [int(s) for s in sample.shape[1:]],
        "content_sha1": hashlib.sha1(sample.tobytes()).hexdigest(),
        "dataset_fingerprint": version,
    }


class FeatureCache:
    """Inception features of the ``identity["num_frames"]`` images of one fingerprinted set, on disk.

    ``features(indices, compute)`` returns float32 (len(indices), 2048) and calls
    ``compute(missing_indices)`` only for what no earlier (or interrupted) run finished.
    """

    def __init__(self, cache_dir: str | os.PathLike, identity: dict):
        self.identity = {**identity, "detector": DETECTOR_ID}
        self.num = int(identity["num_frames"])
        self.dir = Path(cache_dir) / f"features-{fingerprint_key(self.identity)}"
        self.dir.mkdir(parents=True, exist_ok=True)
        identity_file = self.dir / "identity.json"
        if identity_file.exists():
            check_fingerprint(json.loads(identity_file.read_text()), self.identity, source=f"features in {self.dir}",
                              remedy="Delete that folder to recompute them.")
        else:
            atomic_write_json(identity_file, self.identity, indent=1, default=str)
        self.features_path = self.dir / "features.npy"
        self.done_path = self.dir / "done.npy"
        if not self.features_path.exists():
            # A memmap is created by file name, so it gets its own temporary-then-rename.
            tmp = self.features_path.with_suffix(".tmp.npy")
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(self.num, NUM_FEATURES)).flush()
            os.replace(tmp, self.features_path)
        self.done = np.load(self.done_path) if self.done_path.exists() else np.zeros(self.num, dtype=bool)

    def features(self, indices: Sequence[int], compute: Callable[[np.ndarray], np.ndarray],
                 chunk_size: int = CHUNK_SIZE, progress: bool = False) -> np.ndarray:
        indices = self.fill(indices, compute, chunk_size, progress)
        return np.asarray(np.load(self.features_path, mmap_mode="r")[indices])

    def iter_features(self, indices: Sequence[int], compute: Callable[[np.ndarray], np.ndarray],
                      chunk_size: int = CHUNK_SIZE, progress: bool = False):
        """The features of ``indices`` as float64 chunks of at most ``chunk_size`` rows, read from the memmap."""
        indices = self.fill(indices, compute, chunk_size, progress)
        store = np.load(self.features_path, mmap_mode="r")
        for start in range(0, len(indices), chunk_size):
            yield np.asarray(store[indices[start:start + chunk_size]], dtype=np.float64)

    def fill(self, indices: Sequence[int], compute: Callable[[np.ndarray], np.ndarray], chunk_size: int = CHUNK_SIZE,
             progress: bool = False) -> np.ndarray:
        """Compute (and store) what is missing of ``indices``; returns them as an int64 array."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self.num):
            raise IndexError(f"frame indices must be in [0, {self.num}), got [{indices.min()}, {indices.max()}]")
        missing = np.unique(indices[~self.done[indices]])
        store = np.load(self.features_path, mmap_mode="r+")
        from tqdm.auto import tqdm

        with tqdm(total=len(missing), desc="real-frame features", unit="img", disable=not progress or not len(missing)) as bar:
            for start in range(0, len(missing), chunk_size):
                chunk = missing[start:start + chunk_size]
                store[chunk] = np.asarray(compute(chunk), dtype=np.float32)
                store.flush()
                self.done[chunk] = True
                atomic_save_npy(self.done_path, self.done)
                bar.update(len(chunk))
        del store
        return indices


def _features_of(dataset: Any, detector: InceptionDetector, batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
    def compute(chunk: np.ndarray) -> np.ndarray:
        return compute_features(dataset.images_uint8(chunk), detector, batch_size=batch_size)

    return compute


def dataset_features(dataset: Any, indices: Sequence[int], detector: InceptionDetector | None = None,
                     cache_dir: str | os.PathLike | None = None, batch_size: int = 32, split: str | None = None,
                     progress: bool = False) -> np.ndarray:
    """Inception features (float64) of ``dataset.images_uint8(indices)``, through a FeatureCache if
    ``cache_dir`` is given."""
    detector = detector if detector is not None else InceptionDetector()
    compute = _features_of(dataset, detector, batch_size)
    indices = np.asarray(indices, dtype=np.int64)
    if cache_dir is None:
        return np.concatenate([compute(indices[s:s + CHUNK_SIZE]) for s in range(0, len(indices), CHUNK_SIZE)])
    cache = FeatureCache(cache_dir, dataset_identity(dataset, split))
    return cache.features(indices, compute, progress=progress).astype(np.float64)


def dataset_feature_chunks(dataset: Any, indices: Sequence[int], detector: InceptionDetector | None = None,
                           cache_dir: str | os.PathLike | None = None, batch_size: int = 32, split: str | None = None,
                           progress: bool = False):
    """:func:`dataset_features` as float64 chunks of at most CHUNK_SIZE rows, in ``indices`` order."""
    detector = detector if detector is not None else InceptionDetector()
    compute = _features_of(dataset, detector, batch_size)
    indices = np.asarray(indices, dtype=np.int64)
    if cache_dir is None:
        for start in range(0, len(indices), CHUNK_SIZE):
            yield compute(indices[start:start + CHUNK_SIZE]).astype(np.float64)
        return
    cache = FeatureCache(cache_dir, dataset_identity(dataset, split))
    yield from cache.iter_features(indices, compute, progress=progress)


def dataset_statistics(dataset: Any, indices: Sequence[int], detector: InceptionDetector | None = None,
                       cache_dir: str | os.PathLike | None = None, batch_size: int = 32, split: str | None = None,
                       progress: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of the features of frames ``indices``, streamed (see StreamingStatistics)."""
    stats = StreamingStatistics()
    for chunk in dataset_feature_chunks(dataset, indices, detector, cache_dir, batch_size, split, progress):
        stats.update(chunk)
    return (*stats.statistics(), stats.n)


def shard_feature_chunks(samples_dir: str | os.PathLike, seeds: Sequence[int] | str,
                         detector: InceptionDetector | None = None, batch_size: int = 32, progress: bool = True):
    """The features (float64) of ``seeds`` of a shard folder, one chunk per shard (shard order, each seed
    once); raises after the last shard if any seed is missing."""
    samples_dir = Path(samples_dir)
    wanted = set(parse_seeds(seeds))
    detector = detector if detector is not None else InceptionDetector()
    seen: set[int] = set()
    from tqdm.auto import tqdm

    for shard in tqdm(sorted(samples_dir.glob(SHARD_GLOB)), desc="generated features (per shard)",
                      disable=not progress):
        seeds_in = read_shard(shard, "seeds").tolist()
        rows = [k for k, seed in enumerate(seeds_in) if seed in wanted and seed not in seen]
        if not rows:
            continue
        frames = ArrayFrames(read_shard(shard, "images"), shard.name, split="generated")
        # One chunk per shard: its images go through Inception in the batches they always did.
        cache = FeatureCache(samples_dir / "features", dataset_identity(frames))
        cache.fill(np.arange(len(frames)), _features_of(frames, detector, batch_size), chunk_size=len(frames))
        seen.update(seeds_in[k] for k in rows)
        yield np.asarray(np.load(cache.features_path, mmap_mode="r")[rows], dtype=np.float64)
    absent = sorted(wanted - seen)
    if absent:
        raise ValueError(f"'{samples_dir}' lacks {len(absent)} of the requested seeds (first: {absent[:5]})")


def shard_statistics(samples_dir: str | os.PathLike, seeds: Sequence[int] | str,
                     detector: InceptionDetector | None = None, batch_size: int = 32,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, n) of the features of ``seeds`` of a shard folder, streamed shard by shard."""
    stats = StreamingStatistics()
    for chunk in shard_feature_chunks(samples_dir, seeds, detector, batch_size, progress):
        stats.update(chunk)
    return (*stats.statistics(), stats.n)


def shard_features(samples_dir: str | os.PathLike, seeds: Sequence[int] | str,
                   detector: InceptionDetector | None = None, batch_size: int = 32,
                   progress: bool = True) -> np.ndarray:
    """Features (float64) of ``seeds`` of a generation shard folder, in that order; each shard's are
    cached in ``samples_dir/features`` (a FeatureCache per shard, fingerprinted by its content)."""
    samples_dir = Path(samples_dir)
    wanted = np.asarray(parse_seeds(seeds), dtype=np.int64)
    wanted_set = set(wanted.tolist())
    detector = detector if detector is not None else InceptionDetector()
    by_seed: dict[int, np.ndarray] = {}
    from tqdm.auto import tqdm

    for shard in tqdm(sorted(samples_dir.glob(SHARD_GLOB)), desc="generated features (per shard)",
                      disable=not progress):
        seeds_in = read_shard(shard, "seeds")
        if not wanted_set.intersection(seeds_in.tolist()):
            continue
        frames = ArrayFrames(read_shard(shard, "images"), shard.name, split="generated")
        # One chunk per shard: its images go through Inception in the batches they always did.
        feats = FeatureCache(samples_dir / "features", dataset_identity(frames)).features(
            np.arange(len(frames)), _features_of(frames, detector, batch_size), chunk_size=len(frames))
        by_seed.update(zip(seeds_in.tolist(), feats))
    absent = [int(s) for s in wanted if int(s) not in by_seed]
    if absent:
        raise ValueError(f"'{samples_dir}' lacks {len(absent)} of the requested seeds (first: {absent[:5]})")
    return np.stack([by_seed[int(s)] for s in wanted]).astype(np.float64)
