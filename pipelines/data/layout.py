"""What the data modules share: EchoNet-Dynamic's folder layout, the frame dataset's schema, worker processes.

EchoNet-Dynamic's folder holds ``Videos/<FileName>.avi``, ``FileList.csv`` (one row per video, with
its patient-level ``Split``) and ``VolumeTracings.csv`` (per traced frame one long-axis row, then the
chords across the left ventricle). The synthetic generator writes that layout and the builder reads it.
"""

from __future__ import annotations

import multiprocessing

FILELIST_COLUMNS = ("FileName", "EF", "ESV", "EDV", "FrameHeight", "FrameWidth", "FPS", "NumberOfFrames", "Split")
TRACING_COLUMNS = ("FileName", "X1", "Y1", "X2", "Y2", "Frame")
# FileList's Split values -> the frame dataset's split names.
SPLIT_NAMES = {"TRAIN": "train", "VAL": "validation", "TEST": "test"}
SPLITS = tuple(SPLIT_NAMES.values())  # the frame dataset's splits, in this order


def frame_features():
    """The frame dataset's columns (``datasets.Features``): ``image`` is raw uint8 (H, W) bytes."""
    import datasets

    return datasets.Features({
        "image": datasets.Value("binary"),
        "video_id": datasets.Value("string"),
        "frame_index": datasets.Value("int32"),
        "split": datasets.Value("string"),
        "EF": datasets.Value("float32"),
        "ESV": datasets.Value("float32"),
        "EDV": datasets.Value("float32"),
        "FPS": datasets.Value("float32"),
        "num_frames": datasets.Value("int32"),
        "is_ed_frame": datasets.Value("bool"),
        "is_es_frame": datasets.Value("bool"),
    })


def worker_context() -> multiprocessing.context.BaseContext:
    """fork where the platform has it: callers' scripts then need no ``__main__`` guard (spawn would);
    the children use only numpy and OpenCV (single-threaded), never the parent's torch threads."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")
