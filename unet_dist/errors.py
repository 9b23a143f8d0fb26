"""The one exception type for a user's mistake, and how a command turns it into one line.

A `UserError` becomes one line on stderr and exit code 2 (`run_command`, used by the console
script and the launchers); anything else is a fault and keeps its traceback. The message names the
file or key and the problem.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2
_warned: set[str] = set()


class UserError(Exception):
    """A mistake in the user's input (file, config key, argument), not a bug."""


def run_command(command: Callable[[], int]) -> int:
    """Run `command`; a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        return command()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


def warn_once(message: str) -> None:
    """`warning: ...` on stderr, once per process for each distinct message."""
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)
