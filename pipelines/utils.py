"""Helpers shared across EchoDiff (not carried by saved pipelines: nothing in ``pipelines/components/`` uses them).

One home each: EDM's uint8 image writer, uint8 image validation, atomic file writes, seeded subsets,
image grids, and resetting accelerate's process-wide state between runs in one process.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CARDS_DIR = REPO_ROOT / "model_cards"


# ----- images ---------------------------------------------------------------------------------------


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8, exactly as EDM writes samples for FID (scale, clip, truncate)."""
    return (images.float() * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def to_float(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1], the training-time convention."""
    return images_uint8.to(torch.float32) / 127.5 - 1


def check_uint8_images(images: Any, name: str, channels: Sequence[int] | None = (1, 3), square: bool = False,
                       allow_empty: bool = False) -> Any:
    """``images`` unchanged if it is a uint8 numpy array or tensor (N, C, H, W); else a ValueError naming ``name``.

    ``channels``: the allowed C (None: any); ``square``: require H == W.
    """
    dtype_ok = (isinstance(images, np.ndarray) and images.dtype == np.uint8) or (
        isinstance(images, torch.Tensor) and images.dtype == torch.uint8)
    if not dtype_ok or images.ndim != 4:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} shape {tuple(getattr(images, 'shape', ()))}"
        raise ValueError(f"{name}: expected uint8 images of shape (N, C, H, W), got {got}")
    if channels is not None and images.shape[1] not in channels:
        raise ValueError(f"{name}: expected (N, C, H, W) with C in {tuple(channels)}, got shape {tuple(images.shape)}")
    if square and images.shape[2] != images.shape[3]:
        raise ValueError(f"{name}: expected square images (H == W), got shape {tuple(images.shape)}")
    if not allow_empty and images.shape[0] == 0:
        raise ValueError(f"{name}: no images")
    return images


def image_grid(images_uint8: np.ndarray | torch.Tensor, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """uint8 (N, C, H, W) -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) uint8 grid; ``nrow`` images a row
    (default: as square as possible)."""
    images = images_uint8.cpu().numpy() if isinstance(images_uint8, torch.Tensor) else np.asarray(images_uint8)
    check_uint8_images(images, "images")
    count, channels, height, width = images.shape
    cols = min(nrow, count) if nrow is not None else math.ceil(math.sqrt(count))
    if cols < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    rows = -(-count // cols)
    grid = np.zeros((rows * (height + padding) + padding, cols * (width + padding) + padding, channels), np.uint8)
    for i, image in enumerate(images):
        top = padding + (i // cols) * (height + padding)
        left = padding + (i % cols) * (width + padding)
        grid[top:top + height, left:left + width] = image.transpose(1, 2, 0)
    return grid


def save_image_grid(images_uint8: np.ndarray | torch.Tensor, path: str | os.PathLike, nrow: int | None = None,
                    padding: int = 2) -> Path:
    """Save uint8 (N, C, H, W) images (C = 1 or 3) as one PNG grid (see :func:`image_grid`)."""
    from PIL import Image

    grid = image_grid(images_uint8, nrow, padding)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


# ----- atomic writes: a reader never sees a half-written file ------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(handle)`` on a temporary file next to ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text), mode="w")


def atomic_write_json(path: str | os.PathLike, obj: Any, **dumps_kwargs: Any) -> Path:
    """JSON with numpy scalars/arrays and paths made serialisable; ``dumps_kwargs`` go to ``json.dumps``."""
    dumps_kwargs.setdefault("indent", 2)
    dumps_kwargs.setdefault("default", json_default)
    return atomic_write_text(path, json.dumps(obj, **dumps_kwargs))


def atomic_save_npz(path: str | os.PathLike, **arrays: Any) -> Path:
    return atomic_write(path, lambda handle: np.savez(handle, **arrays))


def atomic_save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    return atomic_write(path, lambda handle: np.save(handle, array, allow_pickle=False))


def jsonable(obj: Any, default: Callable[[Any], Any] = str) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists; other values go through ``default``), to
    compare a requested setting with one saved earlier."""
    return json.loads(json.dumps(obj, sort_keys=True, default=default))


def setting_differences(stored: dict, requested: dict, stored_label: str = "existing") -> list[str]:
    """``key: <stored_label> X != requested Y`` for every key whose value differs (missing on one side too)."""
    return [f"{key}: {stored_label} {stored.get(key)!r} != requested {requested.get(key)!r}"
            for key in sorted(set(stored) | set(requested)) if stored.get(key) != requested.get(key)]


def json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under ``folder`` and the folder itself (before renaming it into place)."""
    folder = Path(folder)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def fsync_dir(folder: str | os.PathLike) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----- seeded subsets ------------------------------------------------------------------------------------


def seeded_subset(total: int, count: int | None, seed: int | Sequence[int]) -> np.ndarray:
    """Sorted indices of ``count`` items out of ``total`` drawn without replacement by
    ``np.random.default_rng(seed)`` (an int or a sequence of ints); all of them when ``count`` is None or
    at least ``total``."""
    if count is None or count >= total:
        return np.arange(total)
    if count < 0:
        raise ValueError(f"a subset size must be >= 0, got {count}")
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))


# ----- paths ---------------------------------------------------------------------------------------------


def looks_like_local_path(text: str) -> bool:
    """Whether a "folder or Hub id" argument can only be a local path (a Hub id is 'name' or 'user/name')."""
    text = str(text)
    return text.startswith(("/", "./", "../", "~")) or text.count("/") > 1 or "\\" in text


# ----- accelerate ------------------------------------------------------------------------------------------


def reset_accelerate_state() -> None:
    """Lets a later ``Accelerator`` in this process pick other settings (e.g. the next run's precision).

    Under a multi-process launch the state stays as the launcher set it.
    """
    from accelerate.state import AcceleratorState, GradientState

    if AcceleratorState._shared_state and AcceleratorState().num_processes > 1:
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
