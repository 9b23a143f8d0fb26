"""`bench convert`: MB/s and peak RSS of converting a large multi-page TIFF to Zarr, against merely
reading the same TIFF with tifffile, slab by slab as the converter reads it.

The TIFF (uint8, one 1024 x 1024 page per slice, `--size` MB) is written to a temporary folder
from a few EM-like synthetic slices, repeated (see common.synthetic_slices), so writing it takes
seconds. OURS is `data.convert.convert` (raw only, default
chunks, sha256 provenance included: it is what `unet-dist convert` does). The PEER opens the TIFF
with `tifffile.TiffFile` and reads it in the converter's slabs (`TiffFile.asarray(key=range(...))`),
discarding the data. Each runs in a fresh child process, the peer first; both read the file from
the page cache (it was just written), so this compares the work on top of reading, not the disk.
Peak RSS is the child's peak (VmHWM) from just before the measured call to its end, "above
baseline" that less its RSS just before the call (after imports).
"""

from __future__ import annotations

import argparse
import math
import time

DEFAULT_MB = {"cpu": 1024, "tiny": 8}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=float, help="TIFF size in MB (default 1024; tiny 8); 'several GB' on a big machine")
    p.add_argument("--width", type=int, default=1024, help="page width and height in pixels (default 1024)")
    p.add_argument("--chunks", default="2d", help="convert --chunks: 2d, 3d or Z,Y,X (default 2d)")
    p.add_argument("--shard", help="convert --shard Z,Y,X")
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of each; the median is reported")


def write_tiff(path, shape, seed: int = 0) -> float:
    """A uint8 multi-page TIFF (BigTIFF, contiguous pages), page by page; returns seconds."""
    import tifffile

    from .common import synthetic_slices

    t0 = time.perf_counter()
    read_slab = synthetic_slices(shape, seed=seed)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for z in range(shape[0]):
            tw.write(read_slab(z, z + 1)["raw"][0], contiguous=True, photometric="minisblack")
    return time.perf_counter() - t0


def run_read(tiff: str, slab: int) -> dict:
    import tifffile

    from .common import measure

    def go() -> dict:
        total = 0
        with tifffile.TiffFile(tiff) as tif:
            depth = len(tif.pages) if not tif.is_imagej else tif.series[0].shape[0]
            for z0 in range(0, depth, slab):
                data = tif.asarray(key=range(z0, min(z0 + slab, depth)), series=0)
                total += data.nbytes
                del data
        return {"bytes": total}

    return measure(go)


def run_convert(tiff: str, out: str, chunks, shard) -> dict:
    from ..data.convert import convert
    from .common import measure

    return measure(lambda: {"summary": convert(tiff, out, chunks=chunks, shard=shard, overwrite=True)})


def run(args) -> dict:
    from ..data.store import resolve_layout
    from ..errors import UserError
    from . import common

    device = common.resolve_device("cpu")
    size_mb = args.size or DEFAULT_MB["tiny" if args.tiny else "cpu"]
    width = 256 if args.tiny and args.width == 1024 else args.width
    if size_mb <= 0 or width <= 0:
        raise UserError("--size and --width must be positive")
    depth = max(1, math.ceil(size_mb * common.MB / (width * width)))
    shape = (depth, width, width)
    chunks = args.chunks if args.chunks in ("2d", "3d") else tuple(int(v) for v in args.chunks.split(","))
    shard = tuple(int(v) for v in args.shard.split(",")) if args.shard else None
    layout = resolve_layout(shape, chunks, shard)
    rows = []
    with common.workdir(args.workdir) as work:
        tiff = work / "raw.tif"
        common.log(f"convert: writing a {shape} uint8 TIFF ({math.prod(shape) / common.MB:.0f} MB)")
        tiff_s = write_tiff(tiff, shape)
        tiff_bytes = tiff.stat().st_size
        runs = {"read": [], "convert": []}
        for r in range(args.rounds):
            common.log(f"convert: round {r + 1}/{args.rounds}: tifffile read (child process)")
            runs["read"].append(common.run_child("unet_dist.bench.convert:run_read",
                                                 {"tiff": str(tiff), "slab": layout.slab_depth}))
            common.log(f"convert: round {r + 1}/{args.rounds}: unet_dist convert (child process)")
            runs["convert"].append(common.run_child("unet_dist.bench.convert:run_convert", {
                "tiff": str(tiff), "out": str(work / "raw.zarr"), "chunks": chunks, "shard": shard}))
    data_mb = math.prod(shape) / common.MB
    for name, what, role in (("convert", "unet_dist convert", "ours"), ("read", "tifffile read", "peer")):
        seconds = common.median([m["seconds"] for m in runs[name]])
        last = runs[name][-1]
        rows.append({"what": what, "role": role, "seconds": seconds,
                     "seconds_rounds": [m["seconds"] for m in runs[name]],
                     "mb_per_s": data_mb / seconds, "cpu_s": common.median([m["cpu_s"] for m in runs[name]]),
                     "peak_rss_mb": last["peak_rss_bytes"] / common.MB,
                     "peak_rss_above_baseline_mb": (last["peak_rss_bytes"] - last["rss_before_bytes"]) / common.MB})
    stored = runs["convert"][-1]["summary"]["stored_bytes"]
    ratio = math.prod(shape) / stored if stored else None
    rows[0]["compression_ratio"] = ratio
    for row in rows:
        row["x_peer"] = rows[1]["seconds"] / row["seconds"]
    config = {"shape": list(shape), "dtype": "uint8", "size_mb": data_mb, "tiff_bytes": tiff_bytes,
              "tiff_write_s": tiff_s, "chunks": list(layout.chunks), "shards": list(layout.shards) if layout.shards
              else None, "slab_depth": layout.slab_depth, "rounds": args.rounds, "labels": False}
    report = common.make_report(
        "convert", args, device, config, rows, rows[1]["seconds"] / rows[0]["seconds"],
        "tifffile's read time / our convert time (1.0 = converting costs no more than reading)", rows[0], rows[1],
        notes=["MB = MiB of uint8 voxels; the TIFF was in the page cache for both",
               "convert includes the sha256 of the source (provenance) and the temporary-sibling rename"])
    made = runs["convert"][-1]["summary"]
    report["summary"] = {"compression_ratio": round(ratio, 3) if ratio else None,
                         "stored_mb": round(stored / common.MB, 1),
                         # what the coarser levels (for viewers) cost within our convert
                         "levels": len(made["levels"]),
                         "pyramid_time_frac": round(made["pyramid_seconds"] / rows[0]["seconds"], 4),
                         "pyramid_bytes_frac": round(made["pyramid_stored_bytes"] / stored, 4) if stored else None}
    return report


COLUMNS = [("what", "what"), ("mb_per_s", "MB/s"), ("seconds", "seconds"), ("peak_rss_mb", "peak RSS MB"),
           ("peak_rss_above_baseline_mb", "above base MB"), ("compression_ratio", "ratio"),
           ("cpu_s", "CPU s"), ("x_peer", "x peer")]
