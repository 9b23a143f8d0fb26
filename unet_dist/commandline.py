"""What the console script (`cli.py`) and the launchers (`jobs/`) share: argument types, and a user's
mistake turned into one line on stderr and exit code 2 instead of a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

from .errors import UserError

EXIT_USER_ERROR = 2


def slice_range(text: str | None) -> tuple[int, int] | None:
    """`--slices`: '25:30' -> (25, 30); '25' -> (25, 26); None -> None (every slice)."""
    if text is None:
        return None
    lo, sep, hi = text.partition(":")
    try:
        start = int(lo)
        stop = int(hi) if sep else start + 1
    except ValueError:
        raise UserError(f"--slices '{text}': expected START:STOP, e.g. 25:30") from None
    if start < 0 or stop <= start:
        raise UserError(f"--slices '{text}': expected 0 <= START < STOP")
    return start, stop


def run_command(command: Callable[[], int]) -> int:
    """Run `command`; a UserError becomes `error: ...` on stderr and exit code 2."""
    try:
        return command()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
