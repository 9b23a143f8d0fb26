"""What every suite shares: the machine and versions (bench/machine.py), the suite's config, timing, peak memory, child
processes, a synthetic volume of any size, the report (table + JSON).

A suite measures OURS and a PEER in one run (interleaved, or one after the other in fresh child
processes), so the ratio between them holds on a machine others are using at the same time.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from unet_dist.bench.machine import machine_info, versions

SCHEMA = 1
MB = 1 << 20

# ----------------------------------------------------------------------------- config and device

def resolve_device(requested: str):
    from unet_dist import dist

    return dist.choose_device(requested, 0)


def suite_config(args, profiles: dict[str, list[str]], device):
    """Config for a suite: defaults + the suite's size profile for this device (cpu | cuda), or
    --config FILE instead of the profile; then the tiny profile with --tiny; then the user's
    dotted overrides. Returns the Config and the overrides applied, in order."""
    from unet_dist.config import load_config

    applied = [] if args.config else list(profiles["cuda" if device.type == "cuda" else "cpu"])
    if args.tiny:
        applied += profiles["tiny"]
    applied += list(getattr(args, "overrides", None) or [])
    return load_config(args.config, applied), applied


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads) so far. On a shared machine CPU time
    per item moves much less than wall time per item when others load the cores."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def finite_or_none(value) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


# --------------------------------------------------------------------------------------- memory

def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def maxrss_bytes() -> int:
    """This process's lifetime peak RSS (ru_maxrss is KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def reset_peak_rss() -> bool:
    """Restart this process's peak-RSS count (VmHWM, and ru_maxrss with it) at its current RSS, so a
    peak read afterwards belongs to what follows (Linux >= 4.0: /proc/self/clear_refs "5")."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last reset_peak_rss() (VmHWM), else over the process's lifetime."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return maxrss_bytes()


class PeakRSS:
    """Samples this process's RSS every few ms in a thread; `.peak` is the largest seen. With
    `children`, the sum over the process and its descendants (DataLoader workers): pages shared
    after fork count once per process, so that sum is an upper bound."""

    def __init__(self, interval: float = 0.005, children: bool = False):
        import psutil

        self.interval, self.peak, self.children = interval, 0, children
        self._proc, self._stop = psutil.Process(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        import psutil

        total = self._proc.memory_info().rss
        if self.children:
            for child in self._proc.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:  # it ended between listing and reading
                    pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def measure(fn: Callable[[], dict | None], device=None) -> dict:
    """Call fn once, as a child's measurement: wall and CPU seconds, RSS just before (peak RSS counted
    from there; run_child adds it), and on a GPU the allocator's peak; fn's dict is merged in."""
    import torch

    cuda = device is not None and device.type == "cuda"
    reset_peak_rss()
    before = rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), cpu_seconds()
    extra = fn() or {}
    if cuda:
        torch.cuda.synchronize(device)
    out = {"seconds": time.perf_counter() - t0, "cpu_s": cpu_seconds() - c0, "rss_before_bytes": before, **extra}
    if cuda:
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


# ------------------------------------------------------------------------------ child processes

def measured_row(measurements: list[dict]) -> dict:
    """A report row's timing and memory from the rounds of one method (`measure` in child
    processes): median seconds and CPU seconds, the last round's peak RSS and its rise above the
    RSS before the measured call."""
    last = measurements[-1]
    return {"seconds": median([m["seconds"] for m in measurements]),
            "seconds_rounds": [m["seconds"] for m in measurements],
            "cpu_s": median([m["cpu_s"] for m in measurements]),
            "peak_rss_mb": last["peak_rss_bytes"] / MB,
            "peak_rss_above_baseline_mb": (last["peak_rss_bytes"] - last["rss_before_bytes"]) / MB}


def run_child(target: str, kwargs: dict, timeout: float = 3600) -> dict:
    """Run `module:function(**kwargs)` in a fresh Python process (`unet_dist.bench.child`) and return
    its JSON result, to which the child adds its peak RSS. A fresh process per measurement keeps one
    measurement's allocations (and allocator caches) out of another's peak memory."""
    spec = json.dumps({"target": target, "kwargs": kwargs})
    proc = subprocess.run([sys.executable, "-m", "unet_dist.bench.child"], input=spec, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "WANDB_MODE": "disabled"})
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-25:])
        raise RuntimeError(f"bench child {target} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])


@contextmanager
def workdir(path: str | None, keep: bool = False) -> Iterator[Path]:
    """A folder for the suite's temporary files, deleted afterwards (unless given and kept)."""
    import shutil

    if path:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="unet_dist_bench_", dir=folder))
    else:
        folder = Path(tempfile.mkdtemp(prefix="unet_dist_bench_"))
    try:
        yield folder
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------ synthetic volume

def synthetic_slices(shape: tuple[int, int, int], distinct: int = 8, seed: int = 0
                     ) -> Callable[[int, int], dict[str, np.ndarray]]:
    """read_slab(z0, z1) -> {"raw", "labels"} of an EM-like volume of any depth, made fast.

    `unet_dist.data.synth` renders ~15 Mvoxel/s, too slow for gigavoxel benchmark inputs, so only
    `distinct` slices are rendered and slice z is slice z % distinct of them. Compression is not
    flattered: 2D chunks hold one slice each, and in 3D chunks a repeat is `distinct` slices away,
    farther than one Blosc block (blocks are compressed independently; measured: the same ratio)."""
    from unet_dist.data.synth import SynthVolume

    depth, height, width = shape
    n = max(1, min(distinct, depth))
    volume = SynthVolume((n, height, width), seed)
    pairs = [volume.slice(z) for z in range(n)]

    def read_slab(z0: int, z1: int) -> dict[str, np.ndarray]:
        picks = [pairs[z % n] for z in range(z0, z1)]
        return {"raw": np.stack([p[0] for p in picks]), "labels": np.stack([p[1] for p in picks])}

    return read_slab


def make_volume_store(out: Path, shape, chunks="2d", seed: int = 0, distinct: int = 8, shard=None) -> Path:
    """A volume store (raw + labels, our layout and codecs, optionally sharded) of any size from
    `synthetic_slices`; for volumes of at most `distinct` slices and no shards this is exactly
    `unet-dist synth`'s output."""
    from unet_dist.data import store as st
    from unet_dist.data.atomic_dir import atomic_store_dir
    from unet_dist.data.layout import resolve_layout
    from unet_dist.data.ome import write_em_store
    from unet_dist.data.synth import synthesize

    shape = tuple(int(s) for s in shape)
    if shape[0] <= distinct and shard is None:
        synthesize(out, shape=shape, seed=seed, chunks=chunks, overwrite=True)
        return Path(out)
    layout = resolve_layout(shape, chunks, shard)
    with atomic_store_dir(out, overwrite=True) as tmp:
        attrs = st.provenance({"synthetic": {"generator": "unet_dist.bench.common.synthetic_slices",
                                             "seed": seed, "shape": list(shape), "distinct": distinct}})
        write_em_store(tmp, layout, (50.0, 4.0, 4.0), np.uint8, True, synthetic_slices(shape, distinct, seed), attrs)
    return Path(out)


# ----------------------------------------------------------------------------------- the report

def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as a user would type it: `unet-dist bench SUITE ...` (also under `python -m`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "bench":
        argv = ["bench", *argv]
    return " ".join(["unet-dist", *map(shlex.quote, argv)])


def make_report(suite: str, args, device, config: dict, results: list[dict], speedup: float | None,
                speedup_means: str, ours: dict, peer: dict, notes: Sequence[str] = ()) -> dict:
    return {
        "suite": suite,
        "schema": SCHEMA,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": command_line(),
        "tiny": bool(args.tiny),
        "machine": machine_info(device),
        "versions": versions(),
        "config": config,
        "speedup": finite_or_none(speedup),
        "speedup_means": speedup_means,
        "ours": ours,
        "peer": peer,
        "results": results,
        "notes": list(notes),
    }


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value == 0:
            return "0"
        mag = abs(value)
        if mag >= 1000:
            return f"{value:,.0f}"
        if mag >= 10:
            return f"{value:.1f}"
        if mag >= 0.01:
            return f"{value:.3g}"
        return f"{value:.2e}"
    return str(value)


def format_table(rows: list[dict], columns: Sequence[tuple[str, str]]) -> str:
    """Rows of dicts as an aligned text table; columns are (key, header)."""
    cells = [[header for _, header in columns]] + [[_fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the table."""
    print(f"bench: {message}", file=sys.stderr, flush=True)
