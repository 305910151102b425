"""Sharded, resumable, per-seed image generation, and loading of generated/real image sets.

Each image has its own seed (the pipeline's ``seeds=`` argument), so the images depend on the seed
only: not on the batch size, the shard layout or how many processes share the work. Finished shards
(``shard-<first seed>-n<count>.npz`` holding ``images`` uint8 NCHW and ``seeds``) are written
atomically, so an interrupted run resumes by generating only the seeds no shard holds yet.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipelines.cli import parse_seeds
from pipelines.errors import NonFiniteError, UserInputError
from pipelines.utils import atomic_save_npz, atomic_write_json, jsonable, setting_differences, to_uint8

SHARD_GLOB = "shard-*.npz"
RUN_FILE = "generation.json"


def read_shard(path: Path, key: str | None = None) -> Any:
    try:
        with np.load(path, allow_pickle=False) as data:
            if key is not None:
                return data[key]
            return data["images"], data["seeds"]
    except Exception as exc:  # a truncated or foreign file: say which one
        raise UserInputError(f"shard '{path}' cannot be read ({exc}); delete it to regenerate its seeds") from exc


def finished_seeds(out_dir: str | os.PathLike) -> set[int]:
    """Seeds already held by the shards in ``out_dir``."""
    done: set[int] = set()
    for shard in sorted(Path(out_dir).glob(SHARD_GLOB)):
        done.update(int(s) for s in read_shard(shard, "seeds"))
    return done


def _write_shard(out_dir: Path, images: np.ndarray, seeds: Sequence[int],
                 labels: dict[str, np.ndarray] | None = None) -> Path:
    # atomic_write's temporary ".shard-*.tmp-<pid>" is what generate_images clears after a kill.
    return atomic_save_npz(out_dir / f"shard-{seeds[0]:09d}-n{len(seeds)}.npz", images=images,
                           seeds=np.asarray(seeds, dtype=np.int64), **(labels or {}))


def _check_run_file(out_dir: Path, run: dict) -> None:
    run_file = out_dir / RUN_FILE
    if run_file.exists():
        stored = json.loads(run_file.read_text())
        diffs = setting_differences(stored, run)
        if diffs:
            raise ValueError(f"'{out_dir}' holds images generated with other settings ({'; '.join(diffs)}); "
                             "use another output folder")
    else:
        atomic_write_json(run_file, run, indent=1, sort_keys=True)


def generate_images(pipeline: Any, out_dir: str | os.PathLike, seeds: str | Iterable[int], batch_size: int = 32,
                    num_inference_steps: int = 30, accelerator: Any = None, shard_size: int | None = None,
                    run_info: dict | None = None, progress: bool = True, **sampler_kwargs: Any) -> Path:
    """Generate exactly ``seeds`` (one image per seed) into shards under ``out_dir``; resumes.

    ``pipeline(seeds=[...], num_inference_steps=..., output_type="latent", **sampler_kwargs).images``
    must return float NCHW in [-1, 1]; images are stored as uint8 with EDM's rule (``to_uint8``).
    With an ``accelerate.Accelerator``, chunks of ``shard_size`` seeds are dealt round-robin to its processes.
    ``run_info`` (e.g. the pipeline path) and the sampler settings are recorded in
    ``generation.json``; resuming with different ones is refused.
    """
    seeds = parse_seeds(seeds)
    if len(set(seeds)) != len(seeds):
        raise ValueError("seeds contains duplicates: each image needs its own seed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard_size = shard_size if shard_size is not None else 4 * batch_size
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    is_main = rank == 0

    run = jsonable({"num_inference_steps": num_inference_steps, "sampler_kwargs": sampler_kwargs,
                    **(run_info or {})}, default=repr)
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".shard-*.tmp-*"):  # left by a killed run; its seeds are regenerated
            stale.unlink(missing_ok=True)
        _check_run_file(out_dir, run)
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if hasattr(pipeline, "to"):
            pipeline.to(accelerator.device)

    # Chunks of the requested seeds are dealt to processes independently of what is finished, so
    # processes never race over the same seeds; each generates the missing seeds of its own chunks.
    ordered = sorted(seeds)
    chunks = [ordered[i:i + shard_size] for i in range(0, len(ordered), shard_size)][rank::world]
    done = finished_seeds(out_dir)
    mine = [todo for todo in ([s for s in chunk if s not in done] for chunk in chunks) if todo]
    from tqdm.auto import tqdm

    with tqdm(total=sum(len(s) for s in mine), desc=f"generating ({num_inference_steps} steps)", unit="img",
              disable=not (progress and is_main)) as bar:
        for shard_seeds in mine:
            parts = []
            for start in range(0, len(shard_seeds), batch_size):
                batch_seeds = shard_seeds[start:start + batch_size]
                with torch.no_grad():
                    out = pipeline(seeds=batch_seeds, num_inference_steps=num_inference_steps,
                                   output_type="latent", **sampler_kwargs)
                latents = torch.as_tensor(out.images if hasattr(out, "images") else out[0])
                if latents.ndim != 4 or latents.shape[0] != len(batch_seeds):
                    raise ValueError(f"the pipeline returned images of shape {tuple(latents.shape)} for "
                                     f"{len(batch_seeds)} seeds; expected (B, C, H, W)")
                if not bool(torch.isfinite(latents).all()):  # uint8 would turn NaN into black and score it
                    raise NonFiniteError(f"the pipeline made NaN/inf images for seeds {batch_seeds[0]}..."
                                         f"{batch_seeds[-1]}; its weights or sampler settings are broken, "
                                         "nothing is scored")
                parts.append(to_uint8(latents).cpu().numpy())
                bar.update(len(batch_seeds))
            # A pipeline that picks each seed's conditions (ConditionedPipeline) says which, for the exports.
            labels = pipeline.shard_labels(shard_seeds) if hasattr(pipeline, "shard_labels") else None
            _write_shard(out_dir, np.concatenate(parts), shard_seeds, labels)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return out_dir


def load_images(path: str | os.PathLike, return_seeds: bool = False, seeds: Iterable[int] | str | None = None) -> Any:
    """uint8 (N, C, H, W) from a shard folder (sorted by seed), an ``.npz`` or a folder of PNGs.

    An ``.npz`` needs an ``images`` array (or a single array), NCHW or NHWC with 1 or 3 channels.
    ``return_seeds=True`` also returns the seeds (None where the source has none); ``seeds`` keeps
    exactly those seeds of a shard folder (error if any is missing).
    """
    path = Path(path)
    load_seeds = None
    if path.is_dir() and any(path.glob(SHARD_GLOB)):
        parts = [read_shard(p) for p in sorted(path.glob(SHARD_GLOB))]
        images = np.concatenate([p[0] for p in parts])
        load_seeds = np.concatenate([p[1] for p in parts])
        order = np.argsort(load_seeds, kind="stable")
        images, load_seeds = images[order], load_seeds[order]
    elif path.is_file() and path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            key = "images" if "images" in data.files else (data.files[0] if len(data.files) == 1 else None)
            if key is None:
                raise UserInputError(f"'{path}' must hold an 'images' array (or exactly one array), has {data.files}")
            images = data[key]
            load_seeds = data["seeds"] if "seeds" in data.files else None
        images = _to_nchw(images, str(path))
    elif path.is_dir() and any(path.glob("*.png")):
        from PIL import Image

        arrays = []
        for png in sorted(path.glob("*.png")):
            with Image.open(png) as image:
                if image.mode not in ("L", "RGB"):
                    raise UserInputError(f"'{png}' has mode {image.mode}; expected grayscale (L) or RGB")
                array = np.asarray(image)
            arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
        if len({a.shape for a in arrays}) != 1:
            raise UserInputError(f"the PNGs in '{path}' differ in size or channels: {sorted({a.shape for a in arrays})}")
        images = np.stack(arrays)
    else:
        raise UserInputError(f"'{path}' is not a folder of generation shards ({SHARD_GLOB}), an .npz file or a "
                         "folder of PNG images")
    if images.dtype != np.uint8:
        raise UserInputError(f"images in '{path}' must be uint8, got {images.dtype}")
    if seeds is not None:
        wanted = np.asarray(parse_seeds(seeds), dtype=np.int64)
        if load_seeds is None:
            raise UserInputError(f"'{path}' records no seeds, so seeds={seeds!r} cannot be selected")
        position = {int(s): i for i, s in enumerate(load_seeds)}
        absent = [int(s) for s in wanted if int(s) not in position]
        if absent:
            raise UserInputError(f"'{path}' lacks {len(absent)} requested seeds (first: {absent[:5]}); generate them first")
        index = np.asarray([position[int(s)] for s in wanted], dtype=np.int64)
        images, load_seeds = images[index], load_seeds[index]
    return (images, load_seeds) if return_seeds else images


def _to_nchw(images: np.ndarray, name: str) -> np.ndarray:
    if images.ndim != 4:
        raise UserInputError(f"images in '{name}' must be 4-D (N, C, H, W) or (N, H, W, C), got shape {images.shape}")
    if images.shape[1] in (1, 3):
        return images
    if images.shape[-1] in (1, 3):
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise UserInputError(f"images in '{name}' must have 1 or 3 channels, got shape {images.shape}")


def load_or_generate_images(source: str | os.PathLike | None = None, pipeline=None, out_dir: str | os.PathLike | None = None,
                     num: int | None = 50_000, num_inference_steps: int = 30, batch_size: int = 64,
                     accelerator=None, seed_offset: int = 0, progress: bool = True) -> np.ndarray:
    """Images loaded from ``source`` (.npz, shard or PNG folder), or generated from ``pipeline`` (unguided)
    into ``out_dir`` (per-seed, resumable shards; seeds ``seed_offset .. seed_offset + num - 1``)."""
    if source is not None:
        images = load_images(source)
        return images if num is None else images[:num]
    if pipeline is None or out_dir is None or num is None:
        raise ValueError("generated images need either a source (.npz / shard / PNG folder) or a pipeline, "
                         "an output folder and a count")
    seeds = list(range(seed_offset, seed_offset + num))
    generate_images(pipeline, out_dir, seeds, batch_size=batch_size, num_inference_steps=num_inference_steps,
                    accelerator=accelerator, run_info={"purpose": "unguided samples"},
                    progress=progress)
    return load_images(out_dir, seeds=seeds)
