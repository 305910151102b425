"""The scripts' shared parser (one help format) and command-line value types (argparse ``type=``): a bad
value becomes one error line naming the flag. Imports nothing heavy, so ``--help`` stays fast."""

import argparse
import copy
import json
import math
import re
from collections.abc import Iterable

from pipelines.errors import UserInputError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's lines (its examples) as written and shows each option's default once."""

    def _format_action(self, action: argparse.Action) -> str:
        if not (action.help or "").strip() and _shown_default(action) is not None:
            action = copy.copy(action)  # argparse prints nothing after an option without help: say its default
            action.help = f"default: {_shown_default(action)}"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text, shown = action.help or "", _shown_default(action)
        if shown is None or "default" in text.lower():
            return text
        return f"{text} (default: {shown})".lstrip()


def _shown_default(action: argparse.Action) -> str | None:
    """An option's default as its help shows it (%-escaped), or None where there is none worth showing."""
    if action.required or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or not action.option_strings:
        return None
    if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return None
    shown = action.default
    if isinstance(shown, (list, tuple)):
        shown = ",".join(str(v) for v in shown) if shown else "none"
    elif isinstance(shown, dict):
        shown = json.dumps(shown)
    return str(shown).replace("%", "%%")


def make_parser(description: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """A script's parser: the module docstring as description, EchoDiff's help format."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, **kwargs)


def add_subparser(subparsers, name: str, **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser in the same help format (argparse does not pass formatter_class down)."""
    return subparsers.add_parser(name, formatter_class=HelpFormatter, **kwargs)


def finite_float_arg(text: str) -> float:
    """A finite number (inf and nan would overflow durations and counts later, far from the flag)."""
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from err
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def json_object_arg(text: str) -> dict:
    """A JSON object, e.g. '{"model_channels": 64}'."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, e.g. '{{\"model_channels\": 64}}': {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def int_list_arg(text: str) -> list[int]:
    """A comma list of positive integers, e.g. '5,10,18'."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers such as 5,10,18, got {text!r}") from err
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected a comma list of positive integers, got {text!r}")
    return values


def float_list_arg(text: str) -> list[float]:
    """A comma list of finite numbers, e.g. '1.5,2,3'."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers such as 1.5,2,3, got {text!r}") from err
    if not values or any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma list of finite numbers, got {text!r}")
    return values


def _colon_pairs(text: str, expected: str) -> list[tuple[float, float]]:
    """'A:B,C:D' -> [(A, B), (C, D)]; ``expected`` (e.g. 'sigma intervals LO:HI such as 0:inf') in errors."""
    pairs = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            first, second = (float(v) for v in part.split(":"))
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {part!r}") from err
        pairs.append((first, second))
    if not pairs:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return pairs


def interval_list_arg(text: str) -> list[tuple[float, float]]:
    """A comma list of sigma intervals LO:HI, e.g. '0:inf,0.28:5.42' (HI may be inf)."""
    intervals = _colon_pairs(text, "sigma intervals LO:HI such as 0:inf,0.28:5.42")
    for low, high in intervals:
        if not 0 <= low <= high:
            raise argparse.ArgumentTypeError(f"interval {low:g}:{high:g} needs 0 <= LO <= HI")
    return intervals


def weight_pair_list_arg(text: str) -> list[tuple[float, float]]:
    """A comma list of A:B weight pairs, e.g. '2:1,3:2' (autoguidance:DG)."""
    pairs = _colon_pairs(text, "weight pairs A:B such as 2:1,3:2")
    if not all(math.isfinite(v) for pair in pairs for v in pair):
        raise argparse.ArgumentTypeError(f"expected finite weight pairs A:B, got {text!r}")
    return pairs


_SEED_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


def parse_seeds(spec: str | int | Iterable[int]) -> list[int]:
    """EDM-style seed lists: ``"0-49999"``, ``"1,2,5-10"``; ints and iterables pass through."""
    if isinstance(spec, int):
        return [spec]
    if not isinstance(spec, str):
        return [int(s) for s in spec]
    seeds: list[int] = []
    for part in spec.split(","):
        if not part.strip():
            continue
        match = _SEED_RANGE.match(part)
        if match:
            first, last = int(match.group(1)), int(match.group(2))
            if last < first:
                raise UserInputError(f"seed range '{part.strip()}' ends before it starts")
            seeds.extend(range(first, last + 1))
        elif part.strip().isdigit():
            seeds.append(int(part))
        else:
            raise UserInputError(f"seeds must look like '0-49999' or '1,2,5-10' (non-negative ints), got {spec!r}")
    if not seeds:
        raise UserInputError(f"seeds {spec!r} name no seed")
    return seeds
