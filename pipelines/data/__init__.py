"""EchoNet-Dynamic data: the frame dataset's reader and builder, the synthetic generator, shared layout.

- ``frame_reader``: ``FrameDataset`` (torch ``Dataset``) and ``load_frames`` (several splits as one);
- ``frame_builder``: ``build_frame_dataset`` (resumable), its dataset card, ``push_frame_dataset``;
- ``synthetic_echonet``: ``write_synthetic_echonet`` (an EchoNet-layout folder), ``synthetic_frames``;
- ``layout``: EchoNet's CSV columns and split names, the frame dataset's schema, worker processes.

The names are also importable from ``pipelines.data``; each module is imported on first use (the
builder and the generator pull in OpenCV, the reader torch).
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "FrameDataset": "frame_reader",
    "load_frames": "frame_reader",
    "build_frame_dataset": "frame_builder",
    "push_frame_dataset": "frame_builder",
    "write_synthetic_echonet": "synthetic_echonet",
    "synthetic_frames": "synthetic_echonet",
}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
