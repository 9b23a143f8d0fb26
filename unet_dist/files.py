"""Small file rules shared by every step: JSON written atomically (a reader never sees half a file)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_json_atomic(path, obj, indent: int = 2) -> None:
    """Write to a temporary sibling (named with our pid, so ranks never collide), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)
