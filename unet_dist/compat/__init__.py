"""Shims over the private internals of dependencies, one module per dependency.

Each shim names the versions it was tested with (`TESTED`: at least the first, below the second,
the same bounds as pyproject.toml's; tests/test_compat.py checks both agree) and checks at first use
that the installed version is inside that range and the internal is where it expects it. Outside,
it says so in one line naming the package, its version and the tested range, and then either takes
the public, slower path (where the internal only buys speed and a silent wrong result is possible
otherwise) or refuses (where there is no other path). tests/test_compat.py fails when an internal
moves on the installed version.
"""

from __future__ import annotations

import importlib.metadata
import re

Range = tuple[str, str]  # (lowest tested, first untested): ">=lo,<hi"

# The one list of tested ranges; each shim names its own as `TESTED`. wandb has no shim (the monitor
# uses its public API) but its offline run files are read back by tests, so its range is tested too.
TESTED_RANGES: dict[str, Range] = {
    "torch": ("2.4", "2.14"),
    "zarr": ("3.1", "3.2"),
    "neuroglancer": ("2.40", "2.42"),
    "wandb": ("0.18", "0.32"),
}


def installed_version(distribution: str) -> str | None:
    """The installed version of `distribution` ("torch", "zarr", ...); None if it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version string: "2.13.0+cpu" -> (2, 13, 0)."""
    found = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(n) for n in found.group(0).split(".")) if found else ()


def out_of_range(distribution: str, tested: Range) -> str | None:
    """None when the installed `distribution` is inside `tested`; else the one-line reason."""
    version = installed_version(distribution)
    lo, hi = tested
    if version is None:
        return f"{distribution} is not installed (tested: >={lo},<{hi})"
    if not _release(lo) <= _release(version) < _release(hi):
        return f"{distribution} {version} is outside the tested range >={lo},<{hi}"
    return None


def requirement(distribution: str, tested: Range) -> str:
    """The pyproject.toml requirement that `tested` amounts to: "torch>=2.4,<2.14"."""
    return f"{distribution}>={tested[0]},<{tested[1]}"
