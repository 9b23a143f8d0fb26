"""Argument types shared by the subcommands' parsers and the launchers (`jobs/`)."""

from __future__ import annotations

from unet_dist.errors import UserError


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
