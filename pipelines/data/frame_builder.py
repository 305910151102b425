"""EchoNet-Dynamic -> the frame dataset (Hugging Face ``datasets``, ``save_to_disk``), its card and Hub push.

The builder keeps every ``frame_stride``-th frame (index mod stride == 0, from 0) of every video,
grayscale, resized to ``resolution`` with ``resize_filter``, with the video's metadata and whether the
frame is EchoNet's traced end-diastolic / end-systolic frame, into train / validation / test from
FileList's Split (patient-level: one video never crosses splits). The schema is
:func:`pipelines.data.layout.frame_features`; :class:`pipelines.data.frame_reader.FrameDataset` reads it.

Layout of ``out_dir`` after a build: the ``save_to_disk`` folders (``dataset_dict.json``, one folder per
split), ``build_summary.json`` (options, per-split totals, every skipped video with its reason; counts
add up to FileList's rows) and ``README.md`` (the dataset card). While a build runs, finished
per-video work lives in ``out_dir/_work``: an interrupted build resumes from it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipelines.errors import MissingInputError, OutputExistsError, UserInputError
from pipelines.utils import (
    MODEL_CARDS_DIR,
    atomic_save_npy,
    atomic_write_json,
    atomic_write_text,
    jsonable,
    setting_differences,
)

from .layout import (
    ECHONET_LICENSE,
    FILELIST_COLUMNS,
    SPLIT_NAMES,
    SPLITS,
    SYNTHETIC_DATA_LICENSE,
    SYNTHETIC_MARKER,
    TRACING_COLUMNS,
    frame_features,
    worker_context,
)

_SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}
# PIL's filters scale their support when downsampling (antialiased); "area" is OpenCV's box average.
RESIZE_FILTERS: dict[str, tuple[str, int]] = {
    "lanczos": ("pil", Image.Resampling.LANCZOS),
    "bicubic": ("pil", Image.Resampling.BICUBIC),
    "bilinear": ("pil", Image.Resampling.BILINEAR),
    "box": ("pil", Image.Resampling.BOX),
    "area": ("cv2", cv2.INTER_AREA),
    "nearest": ("pil", Image.Resampling.NEAREST),
}
DEFAULT_RESIZE_FILTER = "lanczos"
ECHONET_TOTAL_FRAMES = 358_259  # paper: all 10,030 videos, frame_stride 5
SUMMARY_FILE = "build_summary.json"
CARD_TEMPLATE = MODEL_CARDS_DIR / "dataset_card.md"
_WORK = "_work"
_FORMAT_VERSION = 1
DATA_SOURCE_ECHONET, DATA_SOURCE_SYNTHETIC = "echonet-dynamic", "synthetic"


# ----------------------------------------------------------------------------------------------
# Input checks


def _find_entry(folder: Path, name: str, kind: str, arg: str) -> Path:
    path = folder / name
    if path.exists():
        return path
    near = [p.name for p in folder.iterdir() if p.name.lower() == name.lower()]
    hint = f"; found {near[0]!r} instead (names are case-sensitive)" if near else ""
    raise MissingInputError(f"{arg}={str(folder)!r} has no {kind} {name!r}{hint}; expected EchoNet-Dynamic's layout: "
                            "Videos/ (the .avi clips), FileList.csv and VolumeTracings.csv")


def _read_csv(path: Path, required: Sequence[str]) -> list[dict]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise UserInputError(f"{path}: missing column(s) {missing}; expected columns {list(required)}, found {header}")
        reader.fieldnames = header
        return list(reader)


def data_source_of(echonet: Path) -> dict:
    """What the folder holds: EchoDiff's synthetic videos (the generator's marker file) or EchoNet-Dynamic."""
    marker = Path(echonet) / SYNTHETIC_MARKER
    if not marker.is_file():
        return {"kind": DATA_SOURCE_ECHONET}
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{marker}: unreadable synthetic-data marker ({e}); expected the JSON that "
                         "make_synthetic_echonet.py writes") from e
    return {"kind": DATA_SOURCE_SYNTHETIC, **{k: info[k] for k in ("generator", "num_videos", "seed",
                                                                     "parametrisation") if k in info}}


def encode_png(gray: np.ndarray) -> bytes:
    """Lossless 8-bit grayscale PNG (OpenCV's encoder: ~3x PIL's speed here)."""
    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(gray))
    if not ok:
        raise RuntimeError(f"PNG encoding failed for an image of shape {gray.shape}")
    return buffer.tobytes()


def _video_id(name: str) -> str:
    name = name.strip()
    return name[:-4] if name.lower().endswith(".avi") else name


def _disk_volume(rows: list[tuple[float, float, float, float]]) -> float:
    """Method-of-disks LV volume (pixel^3) of one EchoNet tracing: long axis row, then chords."""
    (x1, y1, x2, y2), chords = rows[0], rows[1:]
    if not chords:
        return 0.0
    length = math.hypot(x2 - x1, y2 - y1)
    return sum(math.pi / 4 * ((c[2] - c[0]) ** 2 + (c[3] - c[1]) ** 2) for c in chords) * length / len(chords)


def _traced_frames(tracings_path: Path) -> dict[str, dict[int, list]]:
    traced: dict[str, dict[int, list]] = {}
    for row in _read_csv(tracings_path, TRACING_COLUMNS):
        try:
            coords = tuple(float(row[c]) for c in ("X1", "Y1", "X2", "Y2"))
            frame = int(float(row["Frame"]))
        except (TypeError, ValueError):
            continue
        traced.setdefault(_video_id(row["FileName"]), {}).setdefault(frame, []).append(coords)
    return traced


def _ed_es(frames: dict[int, list] | None, num_frames: int) -> tuple[int | None, int | None, str | None]:
    """End-diastolic = the traced frame with the larger LV volume, end-systolic = the smaller one
    (EchoNet's own loader assumes the file lists them small-then-large; the volume decides here)."""
    if not frames:
        return None, None, "no tracings"
    valid = {f: rows for f, rows in frames.items() if 0 <= f < num_frames}
    if len(valid) < 2:
        return None, None, f"{len(valid)} traced frame(s) within the video (expected 2)"
    by_volume = sorted(valid, key=lambda f: _disk_volume(valid[f]))
    return by_volume[-1], by_volume[0], None if len(valid) == 2 else f"{len(valid)} traced frames"


def _normalise_splits(splits: Iterable[str] | None) -> list[str]:
    if splits is None:
        return list(SPLITS)
    if isinstance(splits, str):
        splits = [splits]
    out = []
    for s in splits:
        key = _SPLIT_ALIASES.get(str(s).lower())
        if key is None:
            raise ValueError(f"splits={list(splits)!r}: unknown split {s!r}; expected any of train, validation, test")
        out.append(key)
    return sorted(set(out), key=SPLITS.index)


# ----------------------------------------------------------------------------------------------
# Per-video work (runs in worker processes)


def _resize(gray: np.ndarray, resolution: int, resize_filter: str) -> np.ndarray:
    if gray.shape == (resolution, resolution):
        return gray
    backend, flag = RESIZE_FILTERS[resize_filter]
    if backend == "cv2":
        return cv2.resize(gray, (resolution, resolution), interpolation=flag)
    return np.asarray(Image.fromarray(gray).resize((resolution, resolution), resample=flag))


def _decode(task: dict) -> tuple[np.ndarray | None, str | None, int]:
    """Kept frames (K, R, R) uint8, or None and the reason the video is unusable."""
    path = task["path"]
    if not os.path.isfile(path):
        return None, "file not found", 0
    if os.path.getsize(path) == 0:
        return None, "zero frames: empty file (0 bytes)", 0
    capture = cv2.VideoCapture(path)
    if not capture.isOpened():
        return None, "unreadable: OpenCV cannot open it as a video", 0
    kept, count = [], 0
    try:
        while capture.grab():
            if count % task["frame_stride"] == 0:
                ok, frame = capture.retrieve()
                if not ok or frame is None:
                    return None, f"unreadable: frame {count} does not decode", count
                if frame.shape[:2] != (task["height"], task["width"]):
                    return None, (f"frame size {frame.shape[1]}x{frame.shape[0]} disagrees with FileList "
                                  f"FrameWidth x FrameHeight {task['width']}x{task['height']}"), count
                # OpenCV returns BGR 3-channel even for grayscale clips.
                gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
                kept.append(_resize(gray, task["resolution"], task["resize_filter"]))
            count += 1
    finally:
        capture.release()
    if count == 0:
        return None, "zero frames decoded (empty or truncated file)", 0
    if count != task["num_frames"]:
        return None, (f"decoded {count} frames but FileList NumberOfFrames is {task['num_frames']} "
                      "(truncated or mislabelled video)"), count
    return np.stack(kept), None, count


def process_video(task: dict) -> dict:
    """Decode one video into the work cache; returns its record (also saved as JSON: done marker)."""
    cv2.setNumThreads(1)
    frames, reason, decoded = _decode(task)
    record = {"video_id": task["video_id"], "key": task["key"], "decoded_frames": decoded,
              "status": "bad" if frames is None else "ok", "reason": reason}
    cache = Path(task["cache_dir"])
    if frames is not None:
        record["kept_frames"] = len(frames)
        atomic_save_npy(cache / f"{task['video_id']}.npy", frames)
    atomic_write_json(cache / f"{task['video_id']}.json", record, indent=None)  # last: marks the video done
    return record


def _cached_record(task: dict) -> dict | None:
    marker = Path(task["cache_dir"]) / f"{task['video_id']}.json"
    if not marker.exists():
        return None
    record = json.loads(marker.read_text())
    if record.get("key") != task["key"]:
        return None  # the video file or its FileList row changed since
    if record["status"] == "ok" and not (Path(task["cache_dir"]) / f"{task['video_id']}.npy").exists():
        return None
    return record


def _frame_rows(videos: list[dict], cache_dir: str, frame_stride: int):
    for video in videos:
        frames = np.load(Path(cache_dir) / f"{video['video_id']}.npy", allow_pickle=False)
        for k, image in enumerate(frames):
            index = k * frame_stride
            yield {"image": {"bytes": encode_png(image), "path": None}, "video_id": video["video_id"], "frame_index": index,
                   "split": video["split"], "EF": video["EF"], "ESV": video["ESV"], "EDV": video["EDV"],
                   "FPS": video["FPS"], "num_frames": video["num_frames"],
                   "is_ed_frame": index == video["ed_frame"], "is_es_frame": index == video["es_frame"]}


# ----------------------------------------------------------------------------------------------
# Build


def _prepare_out_dir(out: Path, echonet: Path, overwrite: bool) -> None:
    if out.resolve() == echonet.resolve():
        raise UserInputError(f"out_dir={str(out)!r} is echonet_dir; expected a separate output folder")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"out_dir={str(out)!r} is a file; expected a folder (new or from a previous build)")
    finished = (out / "dataset_dict.json").exists()
    ours = finished or (out / _WORK).exists() or (out / SUMMARY_FILE).exists()
    if any(out.iterdir()) and not ours:
        raise OutputExistsError(f"out_dir={str(out)!r} is not empty and holds no EchoDiff frame dataset; "
                              "expected a new or empty folder")
    if finished and not overwrite:
        raise OutputExistsError(f"out_dir={str(out)!r} already holds a built frame dataset; "
                              "pass overwrite=True (CLI --overwrite) to rebuild it")
    if overwrite:
        shutil.rmtree(out)


def _video_key(row_values: dict, path: Path) -> list:
    stat = path.stat() if path.is_file() else None
    return [row_values["num_frames"], row_values["height"], row_values["width"],
            stat.st_size if stat else None, stat.st_mtime_ns if stat else None]


def _parse_row(row: dict) -> tuple[dict | None, str | None]:
    try:
        values = {"EF": float(row["EF"]), "ESV": float(row["ESV"]), "EDV": float(row["EDV"]),
                  "FPS": float(row["FPS"]), "num_frames": int(float(row["NumberOfFrames"])),
                  "height": int(float(row["FrameHeight"])), "width": int(float(row["FrameWidth"]))}
    except (TypeError, ValueError) as e:
        return None, f"FileList row has a non-numeric value ({e})"
    if values["num_frames"] <= 0:
        return None, f"FileList NumberOfFrames is {values['num_frames']}; expected > 0"
    if values["height"] <= 0 or values["width"] <= 0:
        return None, "FileList FrameHeight/FrameWidth must be > 0"
    split = SPLIT_NAMES.get(str(row["Split"]).strip().upper())
    if split is None:
        return None, f"FileList Split is {row['Split']!r}; expected one of {sorted(SPLIT_NAMES)}"
    values["split"] = split
    return values, None


def build_frame_dataset(echonet_dir: str | os.PathLike, out_dir: str | os.PathLike, resolution: int = 64,
                        frame_stride: int = 5, resize_filter: str = DEFAULT_RESIZE_FILTER,
                        splits: Iterable[str] | None = None, num_workers: int = 2, max_videos: int | None = None,
                        overwrite: bool = False, max_bad_fraction: float = 0.01, progress: bool = True,
                        verbose: bool = True):
    """Build the frame dataset of an EchoNet-Dynamic folder into ``out_dir``; returns the DatasetDict.

    ``splits``: subset of train / validation / test (default all); ``max_videos``: only the first N
    FileList rows of those splits (quick tries); ``max_bad_fraction``: the build fails when more of the
    considered videos than this are unusable (they are skipped and listed in ``build_summary.json``).
    """
    echonet, out = Path(echonet_dir), Path(out_dir)
    _check_options(echonet, resolution, frame_stride, resize_filter, max_videos, max_bad_fraction)
    wanted = _normalise_splits(splits)
    videos_dir = _find_entry(echonet, "Videos", "folder", "echonet_dir")
    filelist = _read_csv(_find_entry(echonet, "FileList.csv", "file", "echonet_dir"), FILELIST_COLUMNS)
    traced = _traced_frames(_find_entry(echonet, "VolumeTracings.csv", "file", "echonet_dir"))

    _prepare_out_dir(out, echonet, overwrite)
    work = out / _WORK
    cache = work / "videos"
    cache.mkdir(parents=True, exist_ok=True)
    config = {"format_version": _FORMAT_VERSION, "resolution": resolution, "frame_stride": frame_stride,
              "resize_filter": resize_filter}
    _check_unfinished_build(work / "config.json", config, out)

    decode_options = {"cache_dir": str(cache), "frame_stride": frame_stride, "resolution": resolution,
                      "resize_filter": resize_filter}
    rows_status, tasks = _classify_rows(filelist, traced, wanted, max_videos, videos_dir, decode_options)
    records, decode = _decode_videos(tasks, num_workers, progress)
    tally = _tally(rows_status, records, wanted)
    counts = tally["counts"]
    assert sum(counts.values()) == len(filelist)
    bad_fraction = counts["bad"] / max(1, counts["built"] + counts["bad"])
    total_frames = sum(t["frames"] for t in tally["split_totals"].values())
    summary = {
        "status": "building", "echonet_dir": str(echonet), "data_source": data_source_of(echonet),
        "image_format": "png", "options": {**config, "splits": wanted,
                                                                        "max_videos": max_videos,
                                                                        "max_bad_fraction": max_bad_fraction},
        "filelist_rows": len(filelist), "counts": counts, "bad_fraction": bad_fraction,
        "splits": tally["split_totals"], "total_videos": counts["built"], "total_frames": total_frames,
        "paper_total_frames_with_defaults": ECHONET_TOTAL_FRAMES, "decode": decode,
        "bad_videos": tally["bad"], "tracing_notes": tally["tracing_notes"],
    }
    if verbose:
        _print_summary(summary)
    if bad_fraction > max_bad_fraction:
        summary["status"] = "failed"
        atomic_write_json(out / SUMMARY_FILE, summary)
        raise RuntimeError(f"{counts['bad']} of {counts['built'] + counts['bad']} videos are unusable "
                           f"({bad_fraction:.1%} > max_bad_fraction={max_bad_fraction}); see {out / SUMMARY_FILE}. "
                           "Finished videos are kept: rerun (e.g. with a larger max_bad_fraction) to resume")
    if total_frames == 0:
        raise RuntimeError(f"no frames to write from echonet_dir={str(echonet)!r} with splits={wanted}")
    return _write_dataset(out, tally["per_split_videos"], summary, frame_stride)


def _check_options(echonet: Path, resolution: int, frame_stride: int, resize_filter: str, max_videos: int | None,
                   max_bad_fraction: float) -> None:
    if not echonet.is_dir():
        raise MissingInputError(f"echonet_dir={str(echonet)!r} is not a folder; expected EchoNet-Dynamic's folder "
                                "with Videos/, FileList.csv and VolumeTracings.csv")
    if not isinstance(resolution, int) or resolution < 1:
        raise UserInputError(f"resolution={resolution!r}: expected a positive integer (64, or 112 = native)")
    if not isinstance(frame_stride, int) or frame_stride < 1:
        raise UserInputError(f"frame_stride={frame_stride!r}: expected a positive integer")
    if resize_filter not in RESIZE_FILTERS:
        raise UserInputError(f"resize_filter={resize_filter!r}: expected one of {sorted(RESIZE_FILTERS)}")
    if max_videos is not None and (not isinstance(max_videos, int) or max_videos < 1):
        raise UserInputError(f"max_videos={max_videos!r}: expected a positive integer or None")
    if not 0 <= max_bad_fraction <= 1:
        raise UserInputError(f"max_bad_fraction={max_bad_fraction!r}: expected a fraction in [0, 1]")


def _check_unfinished_build(config_path: Path, config: dict, out: Path) -> None:
    """An unfinished build resumes only with the options it was started with."""
    if config_path.exists():
        previous = json.loads(config_path.read_text())
        differ = setting_differences(previous, jsonable(config))
        if differ:
            raise UserInputError(f"out_dir={str(out)!r} holds an unfinished build made with other options "
                             f"({'; '.join(differ)}); rerun with the same options to resume it, or pass "
                             "overwrite=True to start again")
    else:
        atomic_write_json(config_path, config, indent=None)


def _classify_rows(filelist: list[dict], traced: dict, wanted: list[str], max_videos: int | None, videos_dir: Path,
                   decode_options: dict) -> tuple[list[dict], list[dict]]:
    """Every FileList row's entry (bad metadata, excluded by options, or pending) and the decode tasks."""
    rows_status: list[dict] = []
    seen: set[str] = set()
    considered = 0
    tasks: list[dict] = []
    for row in filelist:
        video_id = _video_id(row.get("FileName") or "")
        entry = {"video_id": video_id, "file": f"Videos/{video_id}.avi"}
        values, reason = _parse_row(row)
        if values is not None and values["split"] not in wanted:
            entry["status"] = "excluded_by_split"
        elif max_videos is not None and considered >= max_videos:
            entry["status"] = "excluded_by_max_videos"
        else:
            considered += 1
            if not video_id:
                reason = "FileList row has an empty FileName"
            elif video_id in seen:
                reason = "duplicate FileName in FileList"
            if reason:
                entry.update(status="bad", reason=reason)
            else:
                ed, es, note = _ed_es(traced.get(video_id), values["num_frames"])
                entry.update(status="pending", values=values, ed_frame=ed, es_frame=es, tracing_note=note)
                path = videos_dir / f"{video_id}.avi"
                tasks.append({"video_id": video_id, "path": str(path), **decode_options,
                              "num_frames": values["num_frames"], "height": values["height"],
                              "width": values["width"], "key": _video_key(values, path)})
        if video_id:
            seen.add(video_id)
        rows_status.append(entry)
    return rows_status, tasks


def _decode_videos(tasks: list[dict], num_workers: int, progress: bool) -> tuple[dict, dict]:
    """Records of every task (decoding, in parallel, only what no earlier run finished) and decode timings."""
    records = {}
    todo = []
    for task in tasks:
        cached = _cached_record(task)
        if cached is None:
            todo.append(task)
        else:
            records[task["video_id"]] = cached
    from tqdm.auto import tqdm

    start = time.perf_counter()
    bar = tqdm(total=len(todo), desc="decoding videos", unit="video", disable=not progress or not todo)
    if num_workers <= 1 or len(todo) <= 1:
        for task in todo:
            records[task["video_id"]] = process_video(task)
            bar.update()
    else:
        with worker_context().Pool(min(num_workers, len(todo))) as pool:
            for record in pool.imap_unordered(process_video, todo, chunksize=4):
                records[record["video_id"]] = record
                bar.update()
    bar.close()
    seconds = time.perf_counter() - start
    decoded_frames = sum(records[t["video_id"]]["decoded_frames"] for t in todo)
    return records, {"videos": len(todo), "decoded_frames": decoded_frames, "seconds": round(seconds, 3),
                     "decoded_frames_per_second": round(decoded_frames / seconds, 1) if seconds else None,
                     "workers": num_workers}


def _tally(rows_status: list[dict], records: dict, wanted: list[str]) -> dict:
    """Every FileList row lands in exactly one count; the built videos per split, the bad ones with reasons."""
    split_totals = {s: {"videos": 0, "frames": 0} for s in wanted}
    per_split_videos: dict[str, list[dict]] = {s: [] for s in wanted}
    bad, tracing_notes = [], []
    for entry in rows_status:
        if entry["status"] == "pending":
            record = records[entry["video_id"]]
            if record["status"] == "bad":
                entry.update(status="bad", reason=record["reason"])
            else:
                entry["status"] = "built"
                v = entry["values"]
                per_split_videos[v["split"]].append({
                    "video_id": entry["video_id"], "split": v["split"], "EF": v["EF"], "ESV": v["ESV"],
                    "EDV": v["EDV"], "FPS": v["FPS"], "num_frames": v["num_frames"],
                    "ed_frame": entry["ed_frame"], "es_frame": entry["es_frame"]})
                split_totals[v["split"]]["videos"] += 1
                split_totals[v["split"]]["frames"] += record["kept_frames"]
                if entry["tracing_note"]:
                    tracing_notes.append({"file": entry["file"], "note": entry["tracing_note"]})
        if entry["status"] == "bad":
            bad.append({"file": entry["file"], "reason": entry["reason"]})
    counts = {k: sum(e["status"] == k for e in rows_status)
              for k in ("built", "bad", "excluded_by_split", "excluded_by_max_videos")}
    return {"split_totals": split_totals, "per_split_videos": per_split_videos, "bad": bad,
            "tracing_notes": tracing_notes, "counts": counts}


def _write_dataset(out: Path, per_split_videos: dict[str, list[dict]], summary: dict, frame_stride: int):
    """Assemble with datasets (Arrow files in the work folder), save, then move into place."""
    import datasets

    work = out / _WORK
    features = frame_features()
    splits_ds = {}
    for split, videos in per_split_videos.items():
        if videos:
            splits_ds[split] = datasets.Dataset.from_generator(
                _frame_rows, features=features, cache_dir=str(work / "hf_cache"), split=datasets.NamedSplit(split),
                gen_kwargs={"videos": videos, "cache_dir": str(work / "videos"), "frame_stride": frame_stride})
    staging = work / "final"
    if staging.exists():
        shutil.rmtree(staging)
    datasets.DatasetDict(splits_ds).save_to_disk(str(staging))
    for split in splits_ds:
        if (out / split).exists():
            shutil.rmtree(out / split)
        os.replace(staging / split, out / split)
    summary["status"] = "complete"
    atomic_write_json(out / SUMMARY_FILE, summary)
    atomic_write_text(out / "README.md", render_dataset_card(summary))
    os.replace(staging / "dataset_dict.json", out / "dataset_dict.json")  # last: marks the build finished
    shutil.rmtree(work)
    return datasets.load_from_disk(str(out))


def _print_summary(summary: dict) -> None:
    print(f"{'split':<12}{'videos':>8}{'frames':>10}")
    for split, t in summary["splits"].items():
        print(f"{split:<12}{t['videos']:>8}{t['frames']:>10}")
    print(f"{'total':<12}{summary['total_videos']:>8}{summary['total_frames']:>10}")
    c = summary["counts"]
    print(f"FileList rows {summary['filelist_rows']}: built {c['built']}, bad {c['bad']}, "
          f"excluded by split {c['excluded_by_split']}, excluded by max_videos {c['excluded_by_max_videos']}")
    for b in summary["bad_videos"][:20]:
        print(f"  skipped {b['file']}: {b['reason']}")
    if len(summary["bad_videos"]) > 20:
        print(f"  ... {len(summary['bad_videos']) - 20} more in {SUMMARY_FILE}")


def render_dataset_card(summary: dict, template_path: str | os.PathLike | None = None) -> str:
    """The dataset card (README.md) for a build, from ``model_cards/dataset_card.md``."""
    from huggingface_hub import DatasetCard, DatasetCardData

    total = summary["total_frames"]
    synthetic = summary.get("data_source", {}).get("kind") == DATA_SOURCE_SYNTHETIC
    terms = SYNTHETIC_DATA_LICENSE if synthetic else ECHONET_LICENSE
    card_data = DatasetCardData(
        **terms, pretty_name="EchoDiff synthetic EchoNet-layout frames" if synthetic else "EchoNet-Dynamic frames",
        task_categories=["unconditional-image-generation"],
        tags=["medical", "echocardiography", "ultrasound"] + (["synthetic"] if synthetic else []),
        size_categories=["n<1K" if total < 1_000 else "1K<n<10K" if total < 10_000 else "10K<n<100K" if total < 100_000 else "100K<n<1M"])
    card = DatasetCard.from_template(card_data, template_path=str(template_path or CARD_TEMPLATE),
                                     summary=summary, options=summary["options"], synthetic=synthetic,
                                     expected_total=ECHONET_TOTAL_FRAMES)
    return str(card)


def prepare_dataset_repo(api, repo_id: str, private: bool, echonet_derived: bool, what: str) -> None:
    """Create the Hub dataset repo if it is new; refuse EchoNet-derived data for a public one, existing or not
    (``private`` applies only when the Hub creates the repo, so its actual visibility is read back)."""
    from huggingface_hub.errors import RepositoryNotFoundError

    if echonet_derived and not private:
        raise PermissionError(f"{what} may be pushed only to a private repository (drop --public / --hub_public)")
    try:
        existing = api.repo_info(repo_id, repo_type="dataset")
    except RepositoryNotFoundError:
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        existing = api.repo_info(repo_id, repo_type="dataset")
    if echonet_derived and not existing.private:
        raise PermissionError(f"Hub dataset {repo_id!r} is public: {what} may go only into a private repository "
                              "(make it private on the Hub, or push to a new name)")


def push_frame_dataset(dataset_dir: str | os.PathLike, repo_id: str, *, agree_to_research_use_agreement: bool = False,
                       private: bool = True, token: str | None = None, api=None) -> str:
    """Push a built frame dataset to the Hub (private by default) with its card and build summary.

    EchoNet-Dynamic's research-use agreement forbids redistribution: the push needs
    ``agree_to_research_use_agreement=True``, a statement that the target repository stays within it, and
    EchoNet-derived frames go only into a private repository. ``private`` applies only when the Hub creates the
    repository, so an existing repository's own visibility is checked before anything is uploaded.
    """
    if not agree_to_research_use_agreement:
        raise PermissionError("EchoNet-Dynamic's research-use agreement forbids redistributing the data; pushing "
                              "needs agree_to_research_use_agreement=True (CLI --agree_to_research_use_agreement), "
                              "for a private repository only you (and others under the agreement) can read")
    import datasets
    from huggingface_hub import HfApi

    folder = Path(dataset_dir)
    if not (folder / "dataset_dict.json").exists():
        raise FileNotFoundError(f"dataset_dir={str(folder)!r} holds no finished build (no dataset_dict.json)")
    summary = json.loads((folder / SUMMARY_FILE).read_text()) if (folder / SUMMARY_FILE).is_file() else {}
    # A build that recorded no source is treated as EchoNet-Dynamic: the safe side.
    echonet_derived = summary.get("data_source", {}).get("kind") != DATA_SOURCE_SYNTHETIC
    api = api or HfApi(token=token)
    prepare_dataset_repo(api, repo_id, private, echonet_derived, f"EchoNet-Dynamic frames from {str(folder)!r}")
    # Card first: push_to_hub keeps an existing card's text and adds its dataset_info metadata to it.
    for name in ("README.md", SUMMARY_FILE):
        api.upload_file(path_or_fileobj=str(folder / name), path_in_repo=name, repo_id=repo_id, repo_type="dataset")
    datasets.load_from_disk(str(folder)).push_to_hub(repo_id, private=private, token=token)
    return repo_id
