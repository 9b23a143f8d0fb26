"""Progress of long work (training, convert, synth, predict, pyramids), with rate and ETA.

A bar redrawn in place on a terminal; plain lines otherwise (batch logs, `sbatch` output files),
at most one per `every_s` seconds plus the last, so a log of a day-long job stays readable. The
one display for all of them: training passes its own text (loss, learning rate) as `detail`.
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
    """`update(done)` with `done` of `total` units (slices, blocks, steps); `unit_bytes` adds MB/s.
    `start`: units already done when this process began (a resumed run), left out of the rate."""

    def __init__(self, label: str, total: int, unit: str, unit_bytes: int = 0, mode: str = "auto",
                 every_s: float = 10.0, stream: TextIO | None = None, start: int = 0):
        self.label, self.total, self.unit, self.unit_bytes = label, max(0, int(total)), unit, unit_bytes
        self.stream = stream or sys.stderr
        self.bar = self.stream.isatty() if mode == "auto" else mode == "bar"
        self.every_s = every_s
        self.started = time.monotonic()
        self.last_line = float("-inf")
        self.start = self.done = start
        self.detail = ""
        self.bar_open = False  # a bar is drawn and its line not yet ended

    def __call__(self, done: int, total: int | None = None) -> None:
        """The (done, total) callback shape that store writers take."""
        if total is not None:
            self.total = total
        self.update(done)

    def update(self, done: int, detail: str = "", keep: bool = False) -> None:
        """`detail`: the caller's own text for this line (training: loss, learning rate). `keep`:
        a line that stays on screen (a validation result): on a terminal the bar's line is ended
        and this one written whole, and in a log it is never skipped."""
        self.done, self.detail = done, detail
        now = time.monotonic()
        finished = done >= self.total
        if not self.bar and not (finished or keep) and now - self.last_line < self.every_s:
            return
        self.last_line = now
        text = self.line(now - self.started)
        if self.bar and not keep:
            width = 24
            filled = int(width * done / max(1, self.total))
            self.stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {text}\x1b[K" + ("\n" if finished else ""))
            self.bar_open = not finished
        else:
            self.end_bar()
            self.stream.write(text + "\n")
        self.stream.flush()

    def end_bar(self) -> None:
        """End the bar's line, so that what is written next starts on a line of its own."""
        if self.bar_open:
            self.stream.write("\n")
            self.stream.flush()
            self.bar_open = False

    def line(self, elapsed: float) -> str:
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.label}: {self.done}/{self.total} {self.unit}", f"{rate:.3g} {self.unit}/s"]
        if self.unit_bytes:
            parts.append(f"{rate * self.unit_bytes / 1e6:.1f} MB/s")
        if self.detail:
            parts.append(self.detail)
        remaining = (self.total - self.done) / rate if rate > 0 else 0.0
        parts.append(f"elapsed {format_eta(elapsed)}" if self.done >= self.total else f"eta {format_eta(remaining)}")
        return "  ".join(parts)
