"""Progress of long work (convert, synth, predict, pyramids) on stderr, with rate and ETA.

A bar redrawn in place on a terminal; plain lines otherwise (batch logs, `sbatch` output files),
at most one per `every_s` seconds plus the last, so a log of a day-long job stays readable.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """`update(done)` with `done` of `total` units (slices, blocks); `unit_bytes` adds MB/s."""

    def __init__(self, label: str, total: int, unit: str, unit_bytes: int = 0, mode: str = "auto",
                 every_s: float = 10.0, stream: TextIO | None = None):
        self.label, self.total, self.unit, self.unit_bytes = label, max(0, int(total)), unit, unit_bytes
        self.stream = stream or sys.stderr
        self.bar = self.stream.isatty() if mode == "auto" else mode == "bar"
        self.every_s = every_s
        self.started = time.monotonic()
        self.last_line = float("-inf")
        self.done = 0

    def __call__(self, done: int, total: int | None = None) -> None:
        """The (done, total) callback shape that store writers take."""
        if total is not None:
            self.total = total
        self.update(done)

    def update(self, done: int) -> None:
        self.done = done
        now = time.monotonic()
        finished = done >= self.total
        if not self.bar and not finished and now - self.last_line < self.every_s:
            return
        self.last_line = now
        text = self.line(now - self.started)
        if self.bar:
            width = 24
            filled = int(width * done / max(1, self.total))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K" + ("\n" if finished else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def line(self, elapsed: float) -> str:
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit}", f"{rate:.3g} {self.unit}/s"]
        if self.unit_bytes:
            parts.append(f"{rate * self.unit_bytes / 1e6:.1f} MB/s")
        remaining = (self.total - self.done) / rate if rate > 0 else 0.0
        parts.append(f"elapsed {format_eta(elapsed)}" if self.done >= self.total else f"eta {format_eta(remaining)}")
        return "  ".join(parts)
