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


def positive_ints(text: str, name: str, count: int = 3) -> tuple[int, ...]:
    """'32,512,512' -> (32, 512, 512): `count` comma-separated positive integers."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{name} '{text}': expected {count} comma-separated integers") from None
    if len(values) != count or any(v <= 0 for v in values):
        raise UserError(f"{name} '{text}': expected {count} comma-separated positive integers")
    return values


def voxel_size(text: str, name: str) -> tuple[float, ...]:
    """'50,4,4' -> (50.0, 4.0, 4.0): a voxel size Z,Y,X in nm."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{name} '{text}': expected 3 comma-separated numbers (Z,Y,X in nm)") from None
    if len(values) != 3 or any(v <= 0 for v in values):
        raise UserError(f"{name} '{text}': expected 3 comma-separated positive numbers (Z,Y,X in nm)")
    return values


def chunk_shape(text: str):
    """`--chunks`: '2d' or '3d' as given, else Z,Y,X."""
    return text if text in ("2d", "3d") else positive_ints(text, "--chunks")
