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
# The synthetic generator leaves this file in its EchoNet-layout folder; the builder records from it what the
# frames are (synthetic or EchoNet-Dynamic), and model cards read that record, never guess.
SYNTHETIC_MARKER = "echodiff_synthetic.json"
# EchoNet-Dynamic's terms (Stanford, access through Stanford AIMI): research use only, no redistribution.
ECHONET_LICENSE = {"license": "other", "license_name": "echonet-dynamic-research-use-agreement",
                   "license_link": "https://echonet.github.io/dynamic/"}
# Synthetic data carries EchoDiff's own terms; the repository declares no licence yet (no LICENSE file), so the
# Hub's "unknown" until it does: claiming one here would be untrue.
SYNTHETIC_DATA_LICENSE = {"license": "unknown"}


def frame_features():
    """The frame dataset's columns (``datasets.Features``): ``image`` is a lossless grayscale PNG (``Image()``:
    the Hub viewer, ``load_dataset`` and diffusers' scripts read it as a PIL image). Datasets built before
    used raw (H, W) bytes (``Value("binary")``); the reader takes both."""
    import datasets

    return datasets.Features({
        "image": datasets.Image(),
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
