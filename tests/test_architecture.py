"""ARCHITECTURE.md's module tables list exactly the modules that exist: a module added, moved or
removed without its row (or a row left for a module that is gone) fails here, as README's
walk-through is checked by running it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("unet_dist", "jobs")


def modules_on_disk() -> set[str]:
    """Every module and package under the project's packages, as a path relative to the package's
    parent folder ('unet_dist/train/loop.py', 'unet_dist/data/sources/'), without `__init__`/`__main__`."""
    found = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            if path.name in ("__init__.py", "__main__.py"):
                continue
            found.add(rel.as_posix())
    return found


def modules_in_tables() -> set[str]:
    """The first cell of every row of ARCHITECTURE.md's module tables (the sections whose heading
    names modules or launchers), expanded: a cell may name several modules, written relative to the
    section's package (`train/loop.py`) or in full, and `a.py`, `b.py` lists."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    listed = set()
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        match = re.search(r"\(`([\w/]+)/`\)", heading)
        if not match:
            continue
        base = match.group(1)
        for line in body.splitlines():
            if not line.startswith("| `"):
                continue
            first_cell = line.split("|")[1]
            for name in re.findall(r"`([\w/.]+\.py)`", first_cell):
                listed.add(name if name.startswith(PACKAGES) else f"{base}/{name}")
    return listed


def test_architecture_lists_exactly_the_modules_that_exist():
    on_disk, listed = modules_on_disk(), modules_in_tables()
    assert listed, "no module table found in ARCHITECTURE.md"
    assert not on_disk - listed, f"modules missing from ARCHITECTURE.md's tables: {sorted(on_disk - listed)}"
    assert not listed - on_disk, f"ARCHITECTURE.md lists modules that do not exist: {sorted(listed - on_disk)}"
