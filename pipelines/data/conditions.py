"""Conditions from a frame dataset's columns: ``--condition ef,phase`` -> the condition spec and per-frame labels.

A name is a column of the dataset (case-insensitive: ``ef`` is ``EF``) or a derived one:

* ``phase``: ``"ED"`` (EchoNet's traced end-diastolic frame), ``"ES"`` (end-systolic) or ``"other"`` (every
  other kept frame), from ``is_ed_frame`` / ``is_es_frame``. A third class rather than dropping the untraced
  frames: only the traced frames have a known phase, and with 1 frame in 5 kept they are a few percent of
  the dataset, so dropping the rest would leave the EF condition almost no data.

A float column is a scalar condition (its range: the training split's min and max); a string, bool or integer
column is categorical (its classes: the values seen, sorted; at most ``MAX_CLASSES``). The spec and the label
encoding are :mod:`pipelines.components.conditioning`'s, which the saved pipeline carries.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipelines.components.conditioning import check_spec, encode

PHASE_CLASSES = ("ED", "ES", "other")
PHASE_COLUMN = "is_ed_frame/is_es_frame"  # the derived phase's source columns, as the spec records it
MAX_CLASSES = 64  # a one-hot wider than this is an identifier column (video_id), not a condition


def parse_condition_names(text: str | Sequence[str] | None) -> list[str]:
    """``"ef,phase"`` -> ["ef", "phase"] (None or "" -> [])."""
    if text is None:
        return []
    parts = text.split(",") if isinstance(text, str) else list(text)
    names = [p.strip() for p in parts if p.strip()]
    if len(set(names)) != len(names):
        raise ValueError(f"--condition {text!r} names a condition twice")
    return names


def _column_of(dataset, name: str) -> str | None:
    by_lower = {c.lower(): c for c in dataset.dataset.column_names if c != "image"}
    return by_lower.get(name.lower())


def condition_column(dataset, condition: dict) -> list:
    """The raw per-frame values of one condition of the spec (``dataset``: anything with ``column(name)``)."""
    if condition["column"] == PHASE_COLUMN:
        ed, es = dataset.column("is_ed_frame"), dataset.column("is_es_frame")
        return [PHASE_CLASSES[0] if e else PHASE_CLASSES[1] if s else PHASE_CLASSES[2] for e, s in zip(ed, es)]
    values = dataset.column(condition["column"])
    return values.astype(np.float64).tolist() if condition["kind"] == "scalar" else [str(v) for v in values]


def condition_spec(dataset, names: Sequence[str], label_dropout: float) -> dict:
    """The spec of conditions ``names`` on ``dataset`` (a FrameDataset: the training split)."""
    conditions = []
    for name in names:
        column = _column_of(dataset, name)
        if column is None and name.lower() == "phase":
            conditions.append({"name": "phase", "kind": "categorical", "column": PHASE_COLUMN,
                               "classes": list(PHASE_CLASSES)})
            continue
        if column is None:
            choices = sorted({c for c in dataset.dataset.column_names if c != "image"} | {"phase"})
            raise ValueError(f"--condition {name!r}: not a column of {dataset.source!r} (split {dataset.split!r}); "
                             f"expected one of {choices}")
        values = dataset.column(column)
        key = name.lower() if name.isidentifier() else column.lower()
        if values.dtype.kind == "f":
            low, high = float(values.min()), float(values.max())
            if not low < high:
                raise ValueError(f"--condition {name!r}: column {column!r} is constant ({low:g}); nothing to condition on")
            conditions.append({"name": key, "kind": "scalar", "column": column, "range": [low, high]})
        else:
            classes = sorted({str(v) for v in values})
            if not 2 <= len(classes) <= MAX_CLASSES:
                raise ValueError(f"--condition {name!r}: column {column!r} has {len(classes)} distinct values; a "
                                 f"categorical condition needs 2 to {MAX_CLASSES}")
            conditions.append({"name": key, "kind": "categorical", "column": column, "classes": classes})
    return check_spec({"label_dropout": label_dropout, "conditions": conditions})


def dataset_labels(dataset, spec: dict) -> torch.Tensor:
    """(len(dataset), label_dim) float32 labels of every frame (no dropout)."""
    values = {c["name"]: condition_column(dataset, c) for c in spec["conditions"]}
    return encode(spec, values, len(dataset))


class LabelledFrames(torch.utils.data.Dataset):
    """A FrameDataset whose items also carry ``label`` (the frame's encoded condition row)."""

    def __init__(self, frames, labels: torch.Tensor):
        self.frames, self.labels = frames, labels

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> dict:
        return dict(self.frames[index], label=self.labels[int(index)])

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        return [dict(item, label=self.labels[int(i)]) for item, i in zip(self.frames.__getitems__(indices), indices)]


def collate_labelled(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (B, C, H, W), labels (B, label_dim))."""
    images = torch.stack([torch.as_tensor(np.asarray(item["image"])) for item in items])
    return images, torch.stack([item["label"] for item in items])
