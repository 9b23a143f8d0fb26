#!/usr/bin/env python
"""Peak memory of `convert` against the volume size: evidence that conversion streams.

Writes a synthetic multi-page TIFF (raw) and its labels TIFF, page by page, several times larger
than one slab, then converts them in this process with a few chunk layouts. For each it reports
the peak RSS above the baseline (sampled every few ms while convert runs) next to the volume size,
and the process's lifetime peak (ru_maxrss) after it. Prints one JSON object on stdout.

    .venv/bin/python scripts/convert_memory.py                  # 400 x 1024 x 1024 uint8
    .venv/bin/python scripts/convert_memory.py --shape 100,512,512 --workdir /scratch/me
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import tifffile

from unet_dist.bench.common import PeakRSS
from unet_dist.data.convert import convert
from unet_dist.data.synth import SynthVolume

MB = 1 << 20
# In order of growing slab size, so ru_maxrss after each run is attributable to it as well.
VARIANTS = {
    "2d": dict(chunks="2d"),
    "3d": dict(chunks="3d"),
    "3d+shard64": dict(chunks="3d", shard=(64, 1024, 1024)),
}


def write_tiffs(folder: Path, shape, seed: int = 0) -> tuple[Path, Path]:
    """raw.tif and labels.tif (labels 0/255), generated and written one slice at a time."""
    volume = SynthVolume(shape, seed)
    raw, labels = folder / "raw.tif", folder / "labels.tif"
    # Interleave the two writers page by page so each slice is generated only once.
    with tifffile.TiffWriter(raw, bigtiff=True) as tw_raw, tifffile.TiffWriter(labels, bigtiff=True) as tw_lab:
        for z in range(shape[0]):
            r, lab = volume.slice(z)
            tw_raw.write(r, contiguous=True, photometric="minisblack")
            tw_lab.write(lab * 255, contiguous=True, photometric="minisblack")
            if z % 50 == 0:
                print(f"tiff: {z}/{shape[0]}", file=sys.stderr, flush=True)
    return raw, labels


def rss() -> int:
    return psutil.Process().memory_info().rss


def ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="400,1024,1024", help="Z,Y,X of the uint8 volume")
    parser.add_argument("--workdir", help="where to write the TIFFs and stores (default: a temp dir)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {list(VARIANTS)}")
    parser.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = parser.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        started = time.perf_counter()
        raw, labels = write_tiffs(work, shape)
        volume_bytes = int(np.prod(shape))  # uint8, per array
        result = {
            "shape": list(shape),
            "raw_tiff_bytes": raw.stat().st_size,
            "volume_mb_per_array": round(volume_bytes / MB, 1),
            "volume_mb_raw_plus_labels": round(2 * volume_bytes / MB, 1),
            "tiff_write_seconds": round(time.perf_counter() - started, 1),
            "ru_maxrss_mb_before_convert": round(ru_maxrss_bytes() / MB, 1),
            "runs": {},
        }
        for name in args.variants.split(","):
            out = work / f"{name}.zarr"
            baseline = rss()
            t0 = time.perf_counter()
            with PeakRSS() as peak:
                summary = convert(raw, out, labels=labels, overwrite=True, resolution=(50, 4, 4), **VARIANTS[name])
            seconds = time.perf_counter() - t0
            slab = (summary["shards"] or summary["chunks"])[0] * shape[1] * shape[2]
            result["runs"][name] = {
                "chunks": summary["chunks"],
                "shards": summary["shards"],
                "slab_mb_per_array": round(slab / MB, 1),
                "baseline_rss_mb": round(baseline / MB, 1),
                "peak_rss_mb": round(peak.peak / MB, 1),
                "peak_above_baseline_mb": round((peak.peak - baseline) / MB, 1),
                "peak_above_baseline_per_volume": round((peak.peak - baseline) / (2 * volume_bytes), 3),
                "ru_maxrss_mb_so_far": round(ru_maxrss_bytes() / MB, 1),
                "seconds": round(seconds, 2),
                "mb_per_s_raw_plus_labels": round(2 * volume_bytes / MB / seconds, 1),
                "stored_mb": round(summary["stored_bytes"] / MB, 1),
            }
            print(f"{name}: {result['runs'][name]}", file=sys.stderr, flush=True)
            shutil.rmtree(out)
        print(json.dumps(result, indent=2))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
