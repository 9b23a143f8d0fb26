"""Small file rules shared by every step: JSON written atomically (a reader never sees half a file),
and the fault points tests use to stop a process at an exact place."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

from unet_dist.errors import writing

FAULT_ENV = "UNET_DIST_FAULT_PAUSE"
_fault_lock = threading.Lock()
_fault_arrivals: dict[str, int] = {}


def write_json_atomic(path, obj, indent: int = 2) -> None:
    """Write to a temporary sibling (named with our pid, so ranks never collide), then rename it.
    A full disk or a read-only folder is one UserError naming `path`, and no temporary file is left."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with writing(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(obj, indent=indent) + "\n")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):  # a read-only folder refuses even this
                tmp.unlink(missing_ok=True)
            raise


def save_atomic(path, save) -> None:
    """`save(tmp)` writes the file, into a temporary sibling (same suffix, for writers that choose the
    format by it) renamed onto `path`: a full disk leaves the old file or none, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    with writing(path):
        try:
            save(tmp)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise


def fault_point(name: str, near: Path) -> None:
    """Fault injection for the tests (`UNET_DIST_FAULT_PAUSE=<name>`, or `<name>@<n>`: the n-th
    arrival): the first thread to get here pauses until the marker `<near>.paused` is removed (at most
    2 minutes), so a signal, a kill or a changed mount lands at this exact point. Costs one
    environment lookup otherwise."""
    wanted = os.environ.get(FAULT_ENV)
    if wanted is None or wanted.partition("@")[0] != name:
        return
    with _fault_lock:
        if os.environ.get(FAULT_ENV) != wanted:  # another thread paused already
            return
        _fault_arrivals[wanted] = arrivals = _fault_arrivals.get(wanted, 0) + 1
        if arrivals < int(wanted.partition("@")[2] or 1):
            return
        del os.environ[FAULT_ENV]
    marker = Path(near).with_name(Path(near).name + ".paused")
    marker.touch()
    deadline = time.monotonic() + 120
    while marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
