"""Generated samples out of their ``.npz`` shards, in the forms other code reads and trains on.

- :func:`export_png_folder`: ``<seed>.png`` (lossless, grayscale or RGB) plus ``metadata.csv`` (``file_name``,
  ``seed`` and the shards' per-sample labels): ``load_dataset("imagefolder", data_dir=...)`` reads it with the
  labels, and so do :func:`pipelines.evaluation.generation.load_images` and ``train_discriminator.py --fake``.
- :func:`export_image_dataset`: a ``datasets`` DatasetDict (``save_to_disk``, optionally pushed, privately by
  default) in the frame dataset's schema plus ``seed``: ``image`` is ``Image()`` (PIL through ``datasets``),
  and ``FrameDataset`` / ``train_unconditional.py --dataset`` read it as they read real frames.
- :func:`export_echonet_folder`: EchoNet-Dynamic's layout (``Videos/<name>.avi`` of one lossless frame each,
  ``FileList.csv``, an empty ``VolumeTracings.csv``), so ``build_echonet_frames.py`` (or EchoNet's own code)
  takes generated frames exactly as it takes the real ones.

Labels: every array in a shard other than ``images`` and ``seeds`` with one row per image is a per-sample
label and is written beside its image. :data:`FILELIST_CONDITIONS` is the hook for conditions: a label named
there fills that FileList column (EF, ESV, EDV), which conditional training reads like the real column;
without one the column is NaN, as EchoNet's FileList has no value to give.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np

from pipelines.cli import parse_seeds
from pipelines.data.frame_builder import encode_png, prepare_dataset_repo
from pipelines.data.layout import FILELIST_COLUMNS, TRACING_COLUMNS, frame_features
from pipelines.evaluation.generation import SHARD_GLOB
from pipelines.utils import atomic_write, atomic_write_text

# FileList column -> shard label names that fill it (first present wins). Conditional generation (EF, phase, ...)
# writes its conditions into the shards under one of these names; add a name here when a new one appears.
FILELIST_CONDITIONS: dict[str, tuple[str, ...]] = {"EF": ("EF", "ef"), "ESV": ("ESV", "esv"), "EDV": ("EDV", "edv")}
_FOURCC = "png "  # OpenCV's lossless PNG-in-AVI: the builder decodes the exact generated pixels
_VIDEO_PREFIX = "generated_"


def iter_samples(samples_dir: str | os.PathLike, seeds: Sequence[int] | str | None = None
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]]:
    """(images uint8 NCHW, seeds, labels) per shard, in seed order within each shard; ``seeds`` keeps only
    those (error after the last shard if any is missing)."""
    samples_dir = Path(samples_dir)
    shards = sorted(samples_dir.glob(SHARD_GLOB))
    if not shards:
        raise FileNotFoundError(f"'{samples_dir}' holds no generation shards ({SHARD_GLOB}); expected the output "
                                "folder of generate_images / evaluate.py")
    wanted = None if seeds is None else set(parse_seeds(seeds))
    seen: set[int] = set()
    for shard in shards:
        try:
            with np.load(shard, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except Exception as exc:
            raise ValueError(f"shard '{shard}' cannot be read ({exc}); delete it to regenerate its seeds") from exc
        images, shard_seeds = arrays.pop("images"), arrays.pop("seeds").astype(np.int64)
        labels = {k: v for k, v in arrays.items() if v.ndim >= 1 and len(v) == len(shard_seeds)}
        keep = [i for i, s in enumerate(shard_seeds.tolist()) if (wanted is None or s in wanted) and s not in seen]
        keep.sort(key=lambda i: shard_seeds[i])
        if not keep:
            continue
        seen.update(shard_seeds[keep].tolist())
        yield images[keep], shard_seeds[keep], {k: v[keep] for k, v in labels.items()}
    if wanted is not None and wanted - seen:
        absent = sorted(wanted - seen)
        raise ValueError(f"'{samples_dir}' lacks {len(absent)} of the requested seeds (first: {absent[:5]})")


def _label_value(value: np.ndarray):
    """A label cell: a number, or a JSON-like list for a vector label."""
    return value.item() if value.ndim == 0 else value.tolist()


def _pixels(image: np.ndarray) -> np.ndarray:
    """NCHW image -> what a PNG holds: (H, W) gray or (H, W, 3) BGR for OpenCV."""
    if image.shape[0] == 1:
        return image[0]
    return cv2.cvtColor(np.ascontiguousarray(image.transpose(1, 2, 0)), cv2.COLOR_RGB2BGR)


def export_png_folder(samples_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      seeds: Sequence[int] | str | None = None) -> Path:
    """``out_dir/<seed:09d>.png`` per sample and ``metadata.csv`` (imagefolder's convention) with the labels."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, label_names = [], None
    for images, shard_seeds, labels in iter_samples(samples_dir, seeds):
        label_names = label_names if label_names is not None else sorted(labels)
        for k, (image, seed) in enumerate(zip(images, shard_seeds.tolist())):
            name = f"{seed:09d}.png"
            png = encode_png(_pixels(image))
            atomic_write(out / name, lambda handle, png=png: handle.write(png))
            rows.append({"file_name": name, "seed": seed, **{n: _label_value(labels[n][k]) for n in label_names}})
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=["file_name", "seed", *(label_names or [])])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "metadata.csv", text.getvalue())
    return out


def _condition_values(labels: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The FileList condition columns (EF, ESV, EDV) from the labels named in FILELIST_CONDITIONS, else NaN."""
    values = {}
    for column, names in FILELIST_CONDITIONS.items():
        name = next((n for n in names if n in labels and labels[n].ndim == 1), None)
        values[column] = labels[name].astype(np.float64) if name else np.full(count, math.nan)
    return values


def _dataset_rows(samples_dir, seeds, split: str):
    for images, shard_seeds, labels in iter_samples(samples_dir, seeds):
        conditions = _condition_values(labels, len(shard_seeds))
        for k, (image, seed) in enumerate(zip(images, shard_seeds.tolist())):
            yield {"image": {"bytes": encode_png(_pixels(image)), "path": None},
                   "video_id": f"{_VIDEO_PREFIX}{seed:09d}", "frame_index": 0, "split": split,
                   "EF": conditions["EF"][k], "ESV": conditions["ESV"][k], "EDV": conditions["EDV"][k],
                   "FPS": math.nan, "num_frames": 1, "is_ed_frame": False, "is_es_frame": False, "seed": seed}


def export_image_dataset(samples_dir: str | os.PathLike, out_dir: str | os.PathLike,
                         seeds: Sequence[int] | str | None = None, split: str = "train",
                         push_to_hub: str | None = None, private: bool = True, api=None, token: str | None = None):
    """A DatasetDict ``{split: samples}`` in the frame dataset's schema (+ ``seed``), saved to ``out_dir``;
    ``push_to_hub`` (a repo id) also pushes it, private unless ``private=False``. Returns the DatasetDict.

    Samples of a model trained on EchoNet-Dynamic are treated as EchoNet-derived: a public push is refused
    (a model can reproduce its training frames; audit it first and publish by hand if the agreement allows).
    """
    import datasets

    features = frame_features()
    features["seed"] = datasets.Value("int64")
    out = Path(out_dir)
    dataset = datasets.Dataset.from_generator(_dataset_rows, features=features, cache_dir=str(out / "_hf_cache"),
                                              gen_kwargs={"samples_dir": str(samples_dir), "seeds": seeds,
                                                          "split": split})
    dd = datasets.DatasetDict({split: dataset})
    dd.save_to_disk(str(out / "dataset"))
    if push_to_hub:
        from huggingface_hub import HfApi

        api = api or HfApi(token=token)
        prepare_dataset_repo(api, push_to_hub, private, True, f"generated samples from {str(samples_dir)!r}")
        dd.push_to_hub(push_to_hub, private=private, token=token)
    return datasets.load_from_disk(str(out / "dataset"))


def _write_video(path: Path, image: np.ndarray) -> None:
    gray = image[0] if image.shape[0] == 1 else cv2.cvtColor(image.transpose(1, 2, 0), cv2.COLOR_RGB2GRAY)
    height, width = gray.shape
    tmp = path.with_name(path.stem + ".tmp.avi")
    writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*_FOURCC), 1.0, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write '{tmp}' with the lossless '{_FOURCC}' codec")
    writer.write(cv2.cvtColor(np.ascontiguousarray(gray), cv2.COLOR_GRAY2BGR))
    writer.release()
    os.replace(tmp, path)


def export_echonet_folder(samples_dir: str | os.PathLike, out_dir: str | os.PathLike,
                          seeds: Sequence[int] | str | None = None, split: str = "TRAIN") -> Path:
    """EchoNet-Dynamic's layout: one single-frame lossless video per sample, FileList.csv (the conditions from
    FILELIST_CONDITIONS, every other label as an extra column), VolumeTracings.csv with its header only."""
    if split not in ("TRAIN", "VAL", "TEST"):
        raise ValueError(f"split={split!r}: expected a FileList Split value, TRAIN, VAL or TEST")
    out = Path(out_dir)
    (out / "Videos").mkdir(parents=True, exist_ok=True)
    rows, extra = [], None
    for images, shard_seeds, labels in iter_samples(samples_dir, seeds):
        conditions = _condition_values(labels, len(shard_seeds))
        used = {n for names in FILELIST_CONDITIONS.values() for n in names}
        extra = extra if extra is not None else sorted(n for n in labels if n not in used)
        for k, (image, seed) in enumerate(zip(images, shard_seeds.tolist())):
            name = f"{_VIDEO_PREFIX}{seed:09d}"
            _write_video(out / "Videos" / f"{name}.avi", image)
            rows.append([name, conditions["EF"][k], conditions["ESV"][k], conditions["EDV"][k], image.shape[1],
                         image.shape[2], 1, 1, split, *(_label_value(labels[n][k]) for n in extra)])
    for name, header, body in (("VolumeTracings.csv", TRACING_COLUMNS, []),
                               ("FileList.csv", [*FILELIST_COLUMNS, *(extra or [])], rows)):
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(header)
        writer.writerows(body)
        atomic_write_text(out / name, text.getvalue())  # FileList last: its presence marks a complete folder
    return out


EXPORTERS = {"png": export_png_folder, "dataset": export_image_dataset, "echonet": export_echonet_folder}
