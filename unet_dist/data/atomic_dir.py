"""Stores appear whole or not at all: a store is written into a hidden temporary sibling and renamed
onto its name only when complete, so a crash, a user's mistake or Ctrl-C never leaves a half-written
store where a store is expected; `--overwrite` never deletes something that is not a store."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from unet_dist.errors import UserError, writing


def check_out(out, overwrite: bool) -> Path:
    """Refuse an existing `out` unless overwrite, and never replace something that is not a store."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
        if not (out / "zarr.json").is_file():
            # --overwrite on a typo'd path must not delete someone's data folder.
            raise UserError(f"{out}: exists and is not a Zarr store; refusing to replace it")
    return out


@contextlib.contextmanager
def atomic_store_dir(out, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `out`; rename it onto `out` on success, delete it on failure.

    With overwrite the old store is moved aside, the new one renamed in, then the old deleted, so
    a failure at any point leaves either the old store or the new one at `out`.
    """
    out = check_out(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create its folder ({exc.strerror})") from None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process with our pid, killed -9
    try:
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"{out}: cannot write there ({exc.strerror})") from None
    try:
        # a full disk met by a write that knows no path (zarr's, a file descriptor's) names the store
        with _sigterm_raises(), writing(out):
            yield tmp
            _replace(tmp, out, overwrite)
    except BaseException:
        _remove_settled(tmp)
        raise


def _remove_settled(path: Path, quiet: float = 0.2, patience: float = 10.0) -> None:
    """Delete a store whose writes may still be finishing.

    An interrupted `array[...] = data` returns at once, but zarr's I/O thread completes the chunk
    writes already in flight, and recreates the folders it needs: remove, wait a moment, and
    repeat until the folder stays gone.
    """
    deadline = time.monotonic() + patience
    while True:
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(quiet)
        if not path.exists() or time.monotonic() > deadline:
            return


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    check_out(out, overwrite)  # someone may have created it while we were writing
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_raises():
    """While writing, let SIGTERM (the default `kill`, SLURM's cancel) unwind like Ctrl-C does,
    so the cleanup runs. Only where nobody installed a handler already, and only in the main thread."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
