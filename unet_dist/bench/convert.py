"""`bench convert`: MB/s and peak RSS of converting a large volume to Zarr, from a source of each
format (`--source tiff|hdf5|n5|zarr|precomputed`), against merely reading the same source with its
own library.

The source (uint8, 1024 x 1024 slices, `--size` MB) is written to a temporary folder from a few
EM-like synthetic slices, repeated (see common.synthetic_slices), so writing it takes seconds:
- tiff: a BigTIFF of contiguous pages (tifffile); convert gets `--resolution` (it records none);
- hdf5: one contiguous dataset with a CREMI `resolution` attribute (h5py);
- n5: gzip blocks of 256 x 256 x 32 (x, y, z) with a `resolution` attribute (tensorstore);
- zarr: OME-Zarr 0.5, chunks 32 x 256 x 256, zarr-python's default codec (zstd);
- precomputed: raw-encoded chunks of 256 x 256 x 32 (tensorstore).
OURS is `data.convert.convert` (raw only, default chunks, provenance included: what `unet-dist
convert` does). The PEER reads the source with its library (tifffile, h5py, tensorstore,
zarr-python) in slabs of the converter's depth or the source's chunk depth, whichever is larger
(reading 32-deep chunks one slice at a time would decode each 32 times), discarding the data.
Each runs in a fresh child process, the peer first; both read from the page cache (the source was
just written), so this compares the work on top of reading, not the disk. Peak RSS is the child's
peak (VmHWM) from just before the measured call to its end, "above baseline" that less its RSS
just before the call (after imports).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

DEFAULT_MB = {"cpu": 1024, "tiny": 8}
SOURCES = ("tiff", "hdf5", "n5", "zarr", "precomputed")
PEERS = {"tiff": "tifffile", "hdf5": "h5py", "n5": "tensorstore", "zarr": "zarr-python",
         "precomputed": "tensorstore"}
CHUNK_Z, CHUNK_YX = 32, 256  # the chunked sources' chunks: BigDataViewer-like blocks
RESOLUTION = (50.0, 4.0, 4.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=float, help="source size in MB (default 1024; tiny 8); 'several GB' on a big machine")
    p.add_argument("--width", type=int, default=1024, help="slice width and height in pixels (default 1024)")
    p.add_argument("--source", default="tiff", choices=SOURCES, help="the source's format (default tiff)")
    p.add_argument("--chunks", default="2d", help="convert --chunks: 2d, 3d or Z,Y,X (default 2d)")
    p.add_argument("--shard", help="convert --shard Z,Y,X")
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of each; the median is reported")


# ---------------------------------------------------------------- writing the source


def _slabs(shape, depth):
    from unet_dist.bench.common import synthetic_slices

    read_slab = synthetic_slices(shape, seed=0)
    for z0 in range(0, shape[0], depth):
        z1 = min(z0 + depth, shape[0])
        yield z0, z1, read_slab(z0, z1)["raw"]


def write_tiff(path, shape, seed: int = 0) -> float:
    """A uint8 multi-page TIFF (BigTIFF, contiguous pages), page by page; returns seconds."""
    import tifffile

    from unet_dist.bench.common import synthetic_slices

    t0 = time.perf_counter()
    read_slab = synthetic_slices(shape, seed=seed)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for z in range(shape[0]):
            tw.write(read_slab(z, z + 1)["raw"][0], contiguous=True, photometric="minisblack")
    return time.perf_counter() - t0


def write_source(kind: str, work: Path, shape) -> str:
    """Write the volume as `kind` under `work`, slab by slab; returns the spec convert takes."""
    chunk_yx = min(CHUNK_YX, shape[1])
    if kind == "tiff":
        write_tiff(work / "raw.tif", shape)
        return str(work / "raw.tif")
    if kind == "hdf5":
        import h5py

        with h5py.File(work / "raw.h5", "w") as f:
            ds = f.create_dataset("volumes/raw", shape=shape, dtype="uint8")
            ds.attrs["resolution"] = list(RESOLUTION)
            for z0, z1, slab in _slabs(shape, CHUNK_Z):
                ds[z0:z1] = slab
        return f"{work / 'raw.h5'}:volumes/raw"
    if kind == "zarr":
        import zarr

        group = zarr.open_group(str(work / "raw.zarr"), mode="w", zarr_format=3)
        axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
        group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(RESOLUTION)}]}]}]}
        array = group.create_array("0", shape=shape, dtype="uint8", chunks=(CHUNK_Z, chunk_yx, chunk_yx))
        for z0, z1, slab in _slabs(shape, CHUNK_Z):
            array[z0:z1] = slab
        return str(work / "raw.zarr")
    import tensorstore as ts

    xyz = list(shape[::-1])
    if kind == "n5":
        (work / "raw.n5").mkdir()
        (work / "raw.n5" / "attributes.json").write_text('{"n5": "2.0.0"}')
        spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(work / "raw.n5" / "s0")},
                "metadata": {"dimensions": xyz, "blockSize": [chunk_yx, chunk_yx, CHUNK_Z],
                             "dataType": "uint8", "compression": {"type": "gzip"},
                             "resolution": list(RESOLUTION[::-1])}}
        target = f"{work / 'raw.n5'}:s0"
    else:
        spec = {"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(work / "raw")},
                "multiscale_metadata": {"type": "image", "data_type": "uint8", "num_channels": 1},
                "scale_metadata": {"size": xyz, "resolution": list(RESOLUTION[::-1]), "encoding": "raw",
                                   "chunk_size": [chunk_yx, chunk_yx, CHUNK_Z]}}
        target = str(work / "raw")
    store = ts.open(spec, create=True).result()
    if kind == "precomputed":
        store = store[ts.d["channel"][0]]
    for z0, z1, slab in _slabs(shape, CHUNK_Z):
        store[:, :, z0:z1].write(slab.T).result()
    return target


# ---------------------------------------------------------------- the two measurements


def run_read(kind: str, spec: str, slab: int) -> dict:
    """The peer: the source's own library, slab by slab, discarding the data."""
    from unet_dist.bench.common import measure

    path, _, inner = spec.partition(":")

    def go() -> dict:
        total = 0
        for data in _peer_slabs(kind, path, inner, slab):
            total += data.nbytes
            del data
        return {"bytes": total}

    return measure(go)


def _peer_slabs(kind, path, inner, slab):
    if kind == "tiff":
        import tifffile

        with tifffile.TiffFile(path) as tif:
            depth = len(tif.pages) if not tif.is_imagej else tif.series[0].shape[0]
            for z0 in range(0, depth, slab):
                yield tif.asarray(key=range(z0, min(z0 + slab, depth)), series=0)
    elif kind == "hdf5":
        import h5py

        with h5py.File(path, "r") as f:
            ds = f[inner]
            for z0 in range(0, ds.shape[0], slab):
                yield ds[z0:z0 + slab]
    elif kind == "zarr":
        import zarr

        array = zarr.open_group(path, mode="r")["0"]
        for z0 in range(0, array.shape[0], slab):
            yield array[z0:z0 + slab]
    else:
        import tensorstore as ts

        if kind == "n5":
            store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": f"{path}/{inner}"}}).result().T
        else:
            store = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": path}}
                            ).result()[ts.d["channel"][0]].T
        for z0 in range(0, store.shape[0], slab):
            yield store[z0:z0 + slab].read().result()


def run_convert(spec: str, out: str, chunks, shard, resolution=None) -> dict:
    from unet_dist.data.convert import convert
    from unet_dist.bench.common import measure

    return measure(lambda: {"summary": convert(spec, out, chunks=chunks, shard=shard, overwrite=True,
                                               resolution=resolution)})


# ---------------------------------------------------------------- the suite


def run(args) -> dict:
    from unet_dist.data.layout import resolve_layout
    from unet_dist.errors import UserError
    from unet_dist.bench import common

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
    kind = args.source
    peer_slab = max(layout.slab_depth, 1 if kind in ("tiff", "hdf5") else CHUNK_Z)
    peer = f"{PEERS[kind]} read"
    runs, source_bytes, source_s = _measure(args, kind, shape, chunks, shard, peer, peer_slab)
    rows = []
    data_mb = math.prod(shape) / common.MB
    for name, what, role in (("convert", f"unet_dist convert ({kind})", "ours"), ("read", peer, "peer")):
        row = {"what": what, "role": role, **common.measured_row(runs[name])}
        rows.append(row | {"mb_per_s": data_mb / row["seconds"]})
    summary = runs["convert"][-1]["summary"]
    stored = summary["stored_bytes"]
    level0 = stored - summary.get("pyramid_stored_bytes", 0)  # the ratio is the codec's, on level 0
    ratio = math.prod(shape) / level0 if level0 else None
    rows[0]["compression_ratio"] = ratio
    for row in rows:
        row["x_peer"] = rows[1]["seconds"] / row["seconds"]
    config = {"source": kind, "shape": list(shape), "dtype": "uint8", "size_mb": data_mb,
              "source_bytes": source_bytes, "source_write_s": source_s, "voxel_size": summary["voxel_size"],
              "chunks": list(layout.chunks), "shards": list(layout.shards) if layout.shards else None,
              "slab_depth": layout.slab_depth, "peer_slab_depth": peer_slab, "rounds": args.rounds,
              "labels": False}
    report = common.make_report(
        "convert", args, device, config, rows, rows[1]["seconds"] / rows[0]["seconds"],
        f"{peer} time / our convert time (1.0 = converting costs no more than reading)", rows[0], rows[1],
        notes=["MB = MiB of uint8 voxels; the source was in the page cache for both",
               "convert includes provenance (the sha256 of single-file sources) and the temporary-sibling rename"])
    made = summary
    report["summary"] = {"compression_ratio": round(ratio, 3) if ratio else None,
                         "stored_mb": round(stored / common.MB, 1),
                         # what the coarser levels (for viewers) cost within our convert
                         "levels": len(made["levels"]),
                         "pyramid_time_frac": round(made["pyramid_seconds"] / rows[0]["seconds"], 4),
                         "pyramid_bytes_frac": round(made["pyramid_stored_bytes"] / stored, 4) if stored else None}
    return report


def _measure(args, kind: str, shape, chunks, shard, peer: str, peer_slab: int) -> tuple[dict, int, float]:
    """The source written, then `--rounds` rounds of the peer's read and our convert, each in a child:
    ({"read": [...], "convert": [...]}, the source's bytes on disk, seconds it took to write)."""
    from unet_dist.data.store import stored_bytes
    from unet_dist.bench import common

    with common.workdir(args.workdir) as work:
        common.log(f"convert: writing a {shape} uint8 {kind} source ({math.prod(shape) / common.MB:.0f} MB)")
        t0 = time.perf_counter()
        spec = write_source(kind, work, shape)
        source_s = time.perf_counter() - t0
        on_disk = Path(spec.partition(":")[0])
        source_bytes = on_disk.stat().st_size if on_disk.is_file() else stored_bytes(on_disk)
        runs = {"read": [], "convert": []}
        for r in range(args.rounds):
            common.log(f"convert: round {r + 1}/{args.rounds}: {peer} (child process)")
            runs["read"].append(common.run_child("unet_dist.bench.convert:run_read",
                                                 {"kind": kind, "spec": spec, "slab": peer_slab}))
            common.log(f"convert: round {r + 1}/{args.rounds}: unet_dist convert (child process)")
            runs["convert"].append(common.run_child("unet_dist.bench.convert:run_convert", {
                "spec": spec, "out": str(work / "out.zarr"), "chunks": chunks, "shard": shard,
                "resolution": list(RESOLUTION) if kind == "tiff" else None}))
    return runs, source_bytes, source_s


COLUMNS = [("what", "what"), ("mb_per_s", "MB/s"), ("seconds", "seconds"), ("peak_rss_mb", "peak RSS MB"),
           ("peak_rss_above_baseline_mb", "above base MB"), ("compression_ratio", "ratio"),
           ("cpu_s", "CPU s"), ("x_peer", "x peer")]
