"""Reading a built frame dataset: ``FrameDataset`` (a torch ``Dataset``) and ``load_frames`` (several splits).

A frame dataset is what :func:`pipelines.data.frame_builder.build_frame_dataset` writes (a
``save_to_disk`` folder, or the same pushed to the Hub): one row per frame, ``image`` one grayscale
(H, W) frame as a lossless PNG in an ``Image()`` column (so ``load_dataset`` and the Hub viewer give PIL
images). Batched reads decode the PNG bytes straight from the Arrow buffers with OpenCV, with no PIL
objects (about 2x PIL's rate; numbers in benchmarks/bench_data.py). Datasets built before stored raw
uint8 bytes (``Value("binary")``); they are still read, through the same batched path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from pipelines.errors import MissingInputError, UnknownNameError
from pipelines.utils import looks_like_local_path

from .layout import SPLITS, frame_features


def _merged_chunks(column, max_bytes: int):
    """A take over many rows yields one Arrow chunk per row: merge runs of small chunks (Arrow concat,
    in C) into pieces of at most about ``max_bytes`` (int32 binary offsets: a piece must stay < 2 GiB)."""
    import pyarrow as pa

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    group, size = [], 0
    for chunk in chunks:
        if len(chunk) >= 64:  # large enough to convert on its own
            if group:
                yield pa.concat_arrays(group)
                group, size = [], 0
            yield chunk
            continue
        group.append(chunk)
        size += chunk.nbytes
        if size >= max_bytes:
            yield pa.concat_arrays(group)
            group, size = [], 0
    if group:
        yield pa.concat_arrays(group)


def _binary_column_to_uint8(column, frame_bytes: int) -> np.ndarray:
    """Fixed-size binary Arrow column -> (N, frame_bytes) uint8 without per-row Python objects."""
    import pyarrow as pa

    out = np.empty((len(column), frame_bytes), np.uint8)
    pos = 0
    for chunk in _merged_chunks(column, max_bytes=1 << 26):
        n = len(chunk)
        if n == 0:
            continue
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        _, offsets_buf, data_buf = chunk.buffers()
        offsets = np.frombuffer(offsets_buf, offset_type)[chunk.offset:chunk.offset + n + 1]
        if not np.all(np.diff(offsets) == frame_bytes):
            raise ValueError(f"image column holds items of other sizes than {frame_bytes} bytes")
        out[pos:pos + n] = np.frombuffer(data_buf, np.uint8)[offsets[0]:offsets[-1]].reshape(n, frame_bytes)
        pos += n
    return out


def _png_column_to_uint8(column, resolution: int, source: str) -> np.ndarray:
    """``Image()`` Arrow column (struct of PNG bytes and path) -> (N, R*R) uint8, decoded with OpenCV."""
    import pyarrow as pa
    import pyarrow.compute as pc

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = np.empty((len(column), resolution * resolution), np.uint8)
    pos = 0
    for chunk in chunks:
        for blob in pc.struct_field(chunk, "bytes").to_pylist():
            if blob is None:
                raise ValueError(f"{source}: an image row holds a file path, not PNG bytes; expected a dataset "
                                 "written by build_frame_dataset (rebuild it)")
            image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_UNCHANGED)
            if image is None or image.shape != (resolution, resolution):
                shape = None if image is None else image.shape
                raise ValueError(f"{source}: row {pos} is not a {resolution}x{resolution} grayscale PNG (got "
                                 f"{shape}); expected the frames of build_frame_dataset")
            out[pos] = image.reshape(-1)
            pos += 1
    return out


def image_storage(dataset) -> str:
    """"png" (``Image()``, what the builder writes) or "raw" (``Value("binary")``, datasets built before)."""
    import datasets

    feature = dataset.features.get("image")
    if isinstance(feature, datasets.Image):
        return "png"
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        return "raw"
    raise ValueError(f"the dataset's image column is {feature!r}; expected Image() or raw bytes as "
                     "build_frame_dataset writes (rebuild the dataset with build_echonet_frames.py)")


def _load_split(path_or_hub_id: str | os.PathLike, split: str):
    import datasets

    text = str(path_or_hub_id)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "dataset_dict.json").exists() and not (path / "dataset_info.json").exists():
            raise MissingInputError(f"path_or_hub_id={text!r} is a folder but not a saved dataset (no dataset_dict.json); "
                                    "expected the out_dir of build_frame_dataset")
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise UnknownNameError(f"split={split!r} is not in {text!r}; available splits: {sorted(loaded)}")
            return loaded[split]
        return loaded
    if looks_like_local_path(text):
        raise MissingInputError(f"path_or_hub_id={text!r} does not exist; expected a folder written by "
                                "build_frame_dataset or a Hub dataset id like 'user/echonet-frames'")
    try:
        return datasets.load_dataset(text, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise UnknownNameError(f"split={split!r} is not in Hub dataset {text!r}: {e}") from e
        raise
    except Exception as e:
        raise MissingInputError(f"path_or_hub_id={text!r}: no local folder of that name, and loading it from the "
                                f"Hub failed ({type(e).__name__}: {e})") from e


class FrameDataset(torch.utils.data.Dataset):
    """torch Dataset over a built frame dataset (``load_from_disk`` folder or Hub id).

    ``ds[i]`` -> {"image": uint8 tensor (C, H, W), "video_id", "frame_index", "split", "EF", "ESV",
    "EDV", "FPS", "num_frames", "is_ed_frame", "is_es_frame"}. ``channels=3`` repeats the gray channel.
    Batched reads (``__getitems__``, used by DataLoader) avoid per-row overhead.
    """

    def __init__(self, path_or_hub_id: str | os.PathLike, split: str = "train", channels: int | None = None):
        self.dataset = _load_split(path_or_hub_id, split)
        self.source = str(path_or_hub_id)
        self.split = split
        missing = [c for c in frame_features() if c not in self.dataset.column_names]
        if missing:
            raise ValueError(f"{path_or_hub_id!r} split {split!r} lacks column(s) {missing}; expected a dataset made "
                             "by build_frame_dataset")
        if len(self.dataset) == 0:
            raise ValueError(f"{path_or_hub_id!r} split {split!r} is empty")
        self.storage = image_storage(self.dataset)
        self._arrow = self.dataset.with_format("arrow")
        first = self._arrow[0:1].column("image")
        if self.storage == "png":
            import pyarrow.compute as pc

            blob = pc.struct_field(first.combine_chunks(), "bytes")[0].as_py()
            decoded = cv2.imdecode(np.frombuffer(blob or b"", np.uint8), cv2.IMREAD_UNCHANGED)
            if decoded is None or decoded.ndim != 2 or decoded.shape[0] != decoded.shape[1]:
                raise ValueError(f"{path_or_hub_id!r}: the first image is not a square grayscale PNG")
            self.resolution = decoded.shape[0]
        else:
            frame_bytes = len(first[0].as_py())
            self.resolution = math.isqrt(frame_bytes)
            if self.resolution**2 != frame_bytes:
                raise ValueError(f"{path_or_hub_id!r}: image items of {frame_bytes} bytes are not square grayscale frames")
        if channels not in (None, 1, 3):
            raise ValueError(f"channels={channels!r}: expected 1 or 3 (gray repeated)")
        self.channels = channels or 1
        self._metadata_columns = [c for c in self.dataset.column_names if c != "image"]

    def __len__(self) -> int:
        return len(self.dataset)

    def _pixels(self, column) -> np.ndarray:
        """(N, R*R) uint8 from an Arrow image column of either storage."""
        if self.storage == "png":
            return _png_column_to_uint8(column, self.resolution, self.source)
        return _binary_column_to_uint8(column, self.resolution**2)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        # One Arrow take for the batch; pixels straight from the Arrow buffer, no PIL or per-row dicts.
        table = self._arrow[[int(i) for i in indices]].combine_chunks()
        images = torch.from_numpy(self._pixels(table.column("image")))
        images = images.view(len(indices), 1, self.resolution, self.resolution)
        if self.channels != 1:
            images = images.expand(-1, self.channels, -1, -1)
        keys = ["image", *self._metadata_columns]
        columns = [images, *(table.column(c).to_pylist() for c in self._metadata_columns)]
        return [dict(zip(keys, values)) for values in zip(*columns)]

    def images_uint8(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """All (or the given) images as one uint8 array (N, C, H, W)."""
        table = self._arrow
        table = table[:] if indices is None else table[[int(i) for i in np.asarray(indices).ravel()]]
        flat = self._pixels(table.column("image"))
        images = flat.reshape(-1, 1, self.resolution, self.resolution)
        return np.repeat(images, self.channels, axis=1) if self.channels != 1 else images

    def column(self, name: str) -> np.ndarray:
        """One metadata column as a numpy array (e.g. "EF", "video_id")."""
        return np.asarray(self.dataset.with_format("numpy")[name])


class _ConcatFrames:
    """Several splits of a frame dataset read as one (the paper's reference uses all frames)."""

    def __init__(self, parts: Sequence[FrameDataset], split: str):
        self.parts, self.split = list(parts), split
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.resolution, self.channels = self.parts[0].resolution, self.parts[0].channels

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def images_uint8(self, indices: Sequence[int] | None = None) -> np.ndarray:
        indices = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        which = np.searchsorted(self.offsets, indices, side="right") - 1
        out = np.empty((len(indices), self.channels, self.resolution, self.resolution), np.uint8)
        for k, part in enumerate(self.parts):
            mask = which == k
            if mask.any():
                out[mask] = part.images_uint8(indices[mask] - self.offsets[k])
        return out

    def column(self, name: str) -> np.ndarray:
        return np.concatenate([p.column(name) for p in self.parts])


def recorded_data_source(path_or_hub_id: str | os.PathLike) -> dict:
    """What a frame dataset says it holds, from the builder's ``build_summary.json``: ``{"kind": "synthetic" |
    "echonet-dynamic", ...}``; ``{"kind": None}`` when nothing is recorded (a Hub id, an older build)."""
    import json

    summary = Path(str(path_or_hub_id)).expanduser() / "build_summary.json"
    if not summary.is_file():
        return {"kind": None}
    try:
        recorded = json.loads(summary.read_text()).get("data_source")
    except (OSError, ValueError) as e:
        raise ValueError(f"{summary}: unreadable build summary ({e}); rebuild the dataset") from e
    return dict(recorded) if isinstance(recorded, dict) and recorded.get("kind") else {"kind": None}


def load_frames(path_or_hub_id: str | os.PathLike, split: str = "train") -> FrameDataset | _ConcatFrames:
    """A ``FrameDataset``; ``split`` may also be ``"all"`` or a comma list (``"train,validation"``), read as one.

    ``.source`` is the resolved folder (or the Hub id): the FID fingerprints record it.
    """
    names = list(SPLITS) if split == "all" else [s.strip() for s in split.split(",") if s.strip()]
    if not names:
        raise ValueError(f"split must name a split, 'all' or a comma list, got {split!r}")
    parts = [FrameDataset(path_or_hub_id, split=name) for name in names]
    frames = parts[0] if len(parts) == 1 else _ConcatFrames(parts, split)
    local = Path(path_or_hub_id).expanduser()
    frames.source = str(local.resolve()) if local.exists() else str(path_or_hub_id)
    return frames
