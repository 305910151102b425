"""The one error type for a user's bad input: every entry point prints it as one ``error:`` line, exit 2."""

import sys
from collections.abc import Callable
from typing import Any


class UserInputError(ValueError):
    """A bad argument, file or Hub id; the message names it and says what was expected."""


def run_cli(main: Callable[..., Any], argv: list[str] | None = None) -> Any:
    """Run a script's ``main``; a UserInputError ends as ``error: ...`` on stderr with exit code 2 (argparse's)."""
    try:
        return main(argv)
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
