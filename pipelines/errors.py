"""The one error type for a user's bad input: every entry point prints it as one ``error:`` line, exit 2."""

import sys
from collections.abc import Callable
from typing import Any


class UserInputError(ValueError):
    """A bad argument, file or Hub id; the message names it and says what was expected."""


class MissingInputError(UserInputError, FileNotFoundError):
    """A file or folder the user named does not exist (still a FileNotFoundError for callers)."""


class OutputExistsError(UserInputError, FileExistsError):
    """An output folder already holds something that would be overwritten without ``--overwrite``."""


class UnknownNameError(UserInputError, KeyError):
    """A split, key or name the user gave is not among those available (still a KeyError for callers)."""

    __str__ = ValueError.__str__  # KeyError's would print the message in quotes


class NonFiniteError(UserInputError):
    """Weights read from a file, or images made from them, hold NaN / inf: scoring them would be silently wrong."""


def run_cli(main: Callable[..., Any], argv: list[str] | None = None) -> Any:
    """Run a script's ``main``; a UserInputError ends as ``error: ...`` on stderr with exit code 2 (argparse's)."""
    try:
        return main(argv)
    except Exception as err:
        # Errors from a saved pipeline's own code (which cannot import this module) carry `user_input = True`.
        if not isinstance(err, UserInputError) and not getattr(err, "user_input", False):
            raise
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
