"""Named conditions of a conditional pipeline (e.g. ``ef=35.0, phase="ES"``) <-> the network's label vector.

A pipeline's ``config.conditions`` (saved in model_index.json) is the spec a training run wrote::

    {"label_dropout": 0.1,
     "conditions": [{"name": "ef", "kind": "scalar", "column": "EF", "range": [20.0, 80.0]},
                    {"name": "phase", "kind": "categorical", "column": "phase", "classes": ["ED", "ES", "other"]}]}

The label vector is ``[1, scalars scaled to [-1, 1] over their range..., one-hot of each categorical...]``.
Its first entry flags "labelled": the all-zero vector is the null label, what label dropout trains and what
classifier-free guidance's unconditional branch uses (without the flag a scalar at the middle of its range
would read as "no label").

Carried by saved pipelines: imports only torch and the standard library.
"""

import math
from collections.abc import Sequence

import torch

KINDS = ("scalar", "categorical")


class ConditionError(ValueError):
    """A condition value or name the pipeline's condition spec does not accept (the message names it)."""

    user_input = True  # a saved pipeline's code cannot import pipelines.errors: run_cli recognises this mark


def check_spec(spec: dict) -> dict:
    """``spec`` validated and normalised (a plain dict of lists, as model_index.json stores it)."""
    if not isinstance(spec, dict) or not isinstance(spec.get("conditions"), (list, tuple)) or not spec["conditions"]:
        raise ConditionError(f"conditions must be a dict with a non-empty 'conditions' list, got {spec!r}")
    dropout = float(spec.get("label_dropout", 0.0))
    if not 0 <= dropout < 1:
        raise ConditionError(f"conditions: label_dropout must be in [0, 1), got {dropout}")
    out, names = [], set()
    for entry in spec["conditions"]:
        name, kind = entry.get("name"), entry.get("kind")
        if not isinstance(name, str) or not name.isidentifier() or name in names:
            raise ConditionError(f"conditions: each needs a unique identifier 'name', got {name!r}")
        if kind not in KINDS:
            raise ConditionError(f"condition {name!r}: kind must be one of {KINDS}, got {kind!r}")
        item = {"name": name, "kind": kind, "column": entry.get("column", name)}
        if kind == "scalar":
            low, high = (float(v) for v in entry["range"])
            if not (math.isfinite(low) and math.isfinite(high) and low < high):
                raise ConditionError(f"condition {name!r}: range must be two finite numbers low < high, got "
                                     f"{entry['range']!r}")
            item["range"] = [low, high]
        else:
            classes = [str(c) for c in entry["classes"]]
            if len(classes) < 2 or len(set(classes)) != len(classes):
                raise ConditionError(f"condition {name!r}: classes must be two or more distinct values, got {classes}")
            item["classes"] = classes
        names.add(name)
        out.append(item)
    return {"label_dropout": dropout, "conditions": out}


def label_dim(spec: dict) -> int:
    """Width of the label vector: the "labelled" flag, one per scalar, one per class of each categorical."""
    return 1 + sum(1 if c["kind"] == "scalar" else len(c["classes"]) for c in spec["conditions"])


def describe(spec: dict) -> str:
    """``ef (scalar in [20, 80]), phase (one of ['ED', 'ES', 'other'])`` for messages and cards."""
    return ", ".join(f"{c['name']} (scalar in [{c['range'][0]:g}, {c['range'][1]:g}])" if c["kind"] == "scalar"
                     else f"{c['name']} (one of {c['classes']})" for c in spec["conditions"])


def _per_image(name: str, value, count: int) -> list:
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return [value] * count
    if len(value) != count:
        raise ConditionError(f"{name}= gives {len(value)} values for {count} images; expected one value or "
                             f"one per image")
    return list(value)


def _encode_one(condition: dict, value) -> list[float]:
    name = condition["name"]
    if condition["kind"] == "scalar":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConditionError(f"{name}={value!r}: expected a number in {condition['range']}") from None
        low, high = condition["range"]
        if not low <= number <= high:
            raise ConditionError(f"{name}={number:g} is outside the range the model was trained on "
                                 f"[{low:g}, {high:g}]")
        return [2 * (number - low) / (high - low) - 1]
    text = str(value.item() if isinstance(value, torch.Tensor) else value)
    if text not in condition["classes"]:
        raise ConditionError(f"{name}={value!r}: expected one of {condition['classes']}")
    return [1.0 if text == c else 0.0 for c in condition["classes"]]


def encode(spec: dict, values: dict, count: int) -> torch.Tensor:
    """(count, label_dim) float32 labels for ``values`` {name: one value or one per image}; every condition of
    the spec must be given (an empty ``values`` is the null label: zeros)."""
    names = [c["name"] for c in spec["conditions"]]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConditionError(f"unknown condition(s) {unknown}; this model takes {describe(spec)}")
    if not values:
        return null_labels(spec, count)
    missing = [n for n in names if n not in values]
    if missing:
        raise ConditionError(f"missing condition(s) {missing}: give all of {names} (or none, for unconditional "
                             "samples)")
    rows = []
    columns = [_per_image(c["name"], values[c["name"]], count) for c in spec["conditions"]]
    for i in range(count):
        row = [1.0]
        for condition, column in zip(spec["conditions"], columns):
            row += _encode_one(condition, column[i])
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def null_labels(spec: dict, count: int) -> torch.Tensor:
    """The null label (no condition) for ``count`` images."""
    return torch.zeros(count, label_dim(spec), dtype=torch.float32)


def decode(spec: dict, labels: torch.Tensor) -> dict:
    """{name: list per image} from labelled rows (the inverse of :func:`encode`; for tests and reports)."""
    out, start = {}, 1
    for condition in spec["conditions"]:
        if condition["kind"] == "scalar":
            low, high = condition["range"]
            out[condition["name"]] = ((labels[:, start] + 1) / 2 * (high - low) + low).tolist()
            start += 1
        else:
            width = len(condition["classes"])
            out[condition["name"]] = [condition["classes"][i] for i in labels[:, start:start + width].argmax(1).tolist()]
            start += width
    return out
