"""Command-line value types shared by the scripts (argparse ``type=``): a bad value becomes one error line
naming the flag. Imports nothing heavy, so ``--help`` stays fast."""

import argparse
import json


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
    """A comma list of numbers, e.g. '0.05,0.1'."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers such as 0.05,0.1, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}")
    return values
