"""Small file rules shared by every step: JSON written atomically (a reader never sees half a file),
and the fault points tests use to stop a process at an exact place."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

FAULT_ENV = "UNET_DIST_FAULT_PAUSE"
_fault_lock = threading.Lock()


def write_json_atomic(path, obj, indent: int = 2) -> None:
    """Write to a temporary sibling (named with our pid, so ranks never collide), then rename it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=indent) + "\n")
    os.replace(tmp, path)


def fault_point(name: str, near: Path) -> None:
    """Fault injection for the tests (`UNET_DIST_FAULT_PAUSE=<name>`): the first thread to get here
    pauses until the marker `<near>.paused` is removed (at most 2 minutes), so a signal or a kill
    lands at this exact point. Costs one environment lookup otherwise."""
    if os.environ.get(FAULT_ENV) != name:
        return
    with _fault_lock:
        if os.environ.get(FAULT_ENV) != name:  # another thread paused already
            return
        del os.environ[FAULT_ENV]
    marker = Path(near).with_name(Path(near).name + ".paused")
    marker.touch()
    deadline = time.monotonic() + 120
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
