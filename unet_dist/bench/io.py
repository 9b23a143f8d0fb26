"""`bench io`: the predictor's read -> (identity model) -> write pipeline against its limits, measured
in the same run: the same chunk files read and decoded in a tight loop with the same codec, a plain
memory copy, and decoding plus encoding (and writing) the outputs in tight loops. Then the codecs and the Zarr back ends that set that limit.

The volume (`--size` GB of uint8 raw, slices of `--width` squared, `unet-dist convert`'s layout:
1 x 1024 x 1024 chunks, Blosc-zstd) is written once. Per core count (`--cores`, default 1 and all
usable cores; each child process is pinned to that many cores, readers and writers from
`predict.io_threads`):

- OURS: the predictor's `BlockPipeline` on every block (default 512^2 blocks with 32 px of mirrored
  context: 576^2 input regions), reading through the decoded-chunk cache, a model that returns its
  input (probability = raw / 255, stored as uint8 = raw; mask = raw > 127), writing both outputs
  with their codecs and the manifest, whole chunks read by data/chunk_io.py and whole shards of
  4 x 4 blocks written by data/shard_io.py (the default `predict.shard_blocks`);
- the same writing a file per block (unsharded, data/chunk_io.py), as it did before shards;
- PEER: the same with every chunk through zarr-python (`array[...]`), as the predictor did before;
  and a row without the cache either (`predict.chunk_cache_mb=0`: each block decodes every chunk
  it touches), as it did before that;
- LIMIT: every chunk file of the input read and Blosc-decoded in a tight loop on as many threads as
  cores, and a plain copy of the same bytes in memory; then what the pipeline cannot avoid beyond
  decoding, in tight loops through data/chunk_io.py: each input chunk decoded and the output chunks
  inside it encoded with the outputs' codecs (`decode + encode`), and the same with the files
  written (`decode + encode + write`, the I/O limit), a file per block and a file per shard.

`input_mb_per_s` counts each input voxel once (what 250 Mvoxel/s of uint8 means), `output_mb_per_s`
the two uint8 outputs, `read_amplification` bytes decoded over bytes delivered to the blocks (below
1 when halos overlap), `fraction_of_decode_limit` OURS' input MB/s over the decode limit at the same
core count (`_cpu`: the same in CPU seconds per byte, robust to other people's load). Top level:
those for the most cores measured; `speedup` OURS over PEER. Not the
target's measure but beside it: `fraction_of_io_limit`, OURS over the I/O limit with the same files
(how much of the unavoidable work's speed the pipeline keeps), and `io_limit_of_decode_limit`, the
shard-file I/O limit over the decode limit: the most `fraction_of_decode_limit` any pipeline writing
these outputs could reach here. Every output stays on disk until the end: ext4 creates files slowly
for minutes after many were deleted, which would charge each row for the previous one's clean-up.

What the crc32c checksum after every chunk (issue 22) costs: at the most cores, the same volume
written again without it (as stores were before) and the decode limit and OURS measured on it and
beside the rows above; `checksum_cost` is the relative slowdown of each with the checksum (`_cpu`:
in CPU seconds per byte). `--skip checksum` leaves it out.

The limits' tight loops: bench/io_limits.py; the codec and back-end tables that set that limit:
bench/io_tables.py.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from unet_dist.bench.io_limits import pin_cores

# the pipeline's variants: (row, chunk cache, chunks through data/chunk_io.py / shard_io.py, blocks per shard)
VARIANTS = {"ours": ("identity pipeline, chunk cache, shard files", True, True, [1, 4, 4]),
            "chunk_files": ("identity pipeline, chunk cache, a file per block (before)", True, True, [1, 1, 1]),
            "zarr": ("identity pipeline, chunk cache, zarr-python I/O (before)", True, False, [1, 1, 1]),
            "no_cache": ("identity pipeline, no cache, zarr-python I/O (before the cache)", False, False, [1, 1, 1])}
TINY = {"shape": (4, 384, 384), "chunks": (1, 128, 128), "block": [1, 64, 64], "halo": [0, 8, 8], "depth": 2}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=float, default=1.0, help="GB (GiB) of uint8 raw (default 1)")
    p.add_argument("--width", type=int, default=2048, help="slice height and width in pixels (default 2048)")
    p.add_argument("--cores", help="comma-separated core counts to pin to (default 1 and all usable cores)")
    p.add_argument("--raw-tif", help="a multi-page uint8 TIFF for the codec table's raw row (default: "
                                     "$UNET_DIST_ISBI_DIR/train-volume.tif if present, else synthetic)")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out: codecs, backends, checksum")


# ----------------------------------------------------------------------------- in child processes

def run_pipeline(store: str, out: str, cores: int, cache: bool, block: list, halo: list, depth: int,
                 chunk_files: bool = True, shard_blocks: list | None = None, checksum: bool = True) -> dict:
    """The predictor's read -> identity -> write pipeline over every block; see the module doc."""
    import numpy as np

    from unet_dist.config import ModelConfig, PredictConfig
    from unet_dist.data.layout import checksums
    from unet_dist.data.store import RAW, open_store
    from unet_dist.runtime import keep_freed_memory
    from unet_dist.predict.block_plan import block_order, make_plan
    from unet_dist.predict.block_pipeline import BlockPipeline, block_crop, io_threads
    from unet_dist.predict.pipeline import _create_output
    from unet_dist.predict.manifest import Manifest
    from unet_dist.predict.output import OutputWriter
    from unet_dist.predict.tilenet import Pending
    from unet_dist.bench.common import measure

    pin_cores(cores)
    keep_freed_memory()  # as predict() does
    raw = open_store(store)[RAW]
    pcfg = PredictConfig(block_size=block, halo=halo, chunk_cache_mb=1024 if cache else 0,
                         shard_blocks=shard_blocks or [1, 1, 1])
    plan = make_plan(ModelConfig(depth=depth), pcfg, raw.shape, (0, raw.shape[0]))
    crop = (slice(None), *block_crop(plan))

    class Identity:  # TileNet's interface; the model returns its input
        def submit(self, tiles):
            # Views, not copies: the model's own work is no part of the pipeline measured (on a GPU
            # it is the device's), so the stand-in does as little as it can on the host.
            kept = tiles[crop]
            return Pending(lambda: (kept, np.greater(kept, 127).view(np.uint8)))

    manifest = Manifest(Path(out), "bench")
    with checksums(checksum):  # the outputs as the input: both with the crc32c codec or neither
        _create_output(Path(out), plan, {}, pcfg, True, manifest, None)
    import zarr

    pipeline = BlockPipeline(plan, Identity(), raw, None, zarr.open_group(out, mode="r+"), manifest, pcfg)
    if not chunk_files:  # every chunk through zarr-python, as the predictor read and wrote them before
        pipeline.chunk_files = lambda array: None
        pipeline.output = OutputWriter(plan, pipeline.output.arrays, files=False)
    todo = block_order(plan, range(plan.n_blocks), raw.chunks)
    readers, writers = io_threads(pcfg, cores)
    pipeline.plan_reads(todo)

    def go() -> dict:
        pipeline.run(todo, readers, writers, lambda: None)
        return {"blocks": len(todo)}

    result = measure(go)
    decoded, delivered = _decoded_and_delivered(plan, raw, todo, pipeline.raw_cache if cache else None)
    files = sum(1 for p in Path(out).rglob("*") if p.is_file() and p.name != "zarr.json" and ".manifest" not in p.parts)
    return {**result, "readers": readers, "writers": writers, "input_bytes": raw.dtype.itemsize * math.prod(plan.shape),
            "output_files": files,
            "decoded_bytes": decoded, "delivered_bytes": delivered,
            "tile": list(plan.model_tile), "block": list(plan.block)}


def run_write_without_checksum(**kw) -> dict:
    """big_volume's store, every array without the crc32c codec (as stores were before issue 22)."""
    from unet_dist.bench.big_volume import run_write
    from unet_dist.data.layout import checksums

    with checksums(False):
        return run_write(**kw)


def _decoded_and_delivered(plan, raw, todo, raw_cache) -> tuple[int, int]:
    """(bytes decoded, bytes delivered to the blocks: their regions with context) of a pipeline run."""
    from unet_dist.data.chunk_cache import ChunkCache
    from unet_dist.predict.block_plan import block_core, input_region, mirror_box

    boxes = [mirror_box(input_region(plan, block_core(plan, i)), raw.shape) for i in todo]
    delivered = sum(math.prod(s.stop - s.start for s in b) for b in boxes) * raw.dtype.itemsize
    if raw_cache is not None:
        return raw_cache.decoded_bytes, delivered
    counter = ChunkCache(raw)  # no cache: every chunk a block touches, decoded whole for that block
    decoded = sum(math.prod(s.stop - s.start for s in counter.chunk_box(c))
                  for b in boxes for c in counter.chunks_of(b)) * raw.dtype.itemsize
    return decoded, delivered


def _core_counts(text: str | None) -> list[int]:
    from unet_dist.errors import UserError
    from unet_dist.runtime import usable_cores

    most = usable_cores()
    if text is None:
        return sorted({1, most})
    try:
        counts = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1 or counts[-1] > most:
        raise UserError(f"--cores: '{text}': expected comma-separated counts between 1 and {most} (usable cores)")
    return counts


def _raw_tif(args) -> str | None:
    from unet_dist.errors import UserError

    if args.raw_tif:
        if not Path(args.raw_tif).is_file():
            raise UserError(f"--raw-tif: {args.raw_tif}: no such file")
        return str(args.raw_tif)
    folder = os.environ.get("UNET_DIST_ISBI_DIR")
    found = Path(folder) / "train-volume.tif" if folder else None
    return str(found) if found is not None and found.is_file() else None


def run(args) -> dict:
    from unet_dist.bench import common

    skip = _check_arguments(args)
    cores = _core_counts(args.cores)
    raw_tif = _raw_tif(args)
    if args.tiny:
        shape, chunks, block, halo, depth = TINY["shape"], TINY["chunks"], TINY["block"], TINY["halo"], TINY["depth"]
    else:
        shape = (max(1, math.ceil(args.size * (1 << 30) / args.width ** 2)), args.width, args.width)
        chunks, block, halo, depth = "2d", [1, 512, 512], [0, 32, 32], 2  # 576^2 regions, as bench load
    rows = []
    with common.workdir(args.workdir) as work:
        store = work / "volume.zarr"
        common.log(f"io: writing {shape} uint8 raw (+ labels), chunks {chunks}")
        common.run_child("unet_dist.bench.big_volume:run_write", {"out": str(store), "shape": list(shape),
                                                             "chunks": chunks, "shard": None})
        for n in cores:
            common.log(f"io: {n} core(s): the limits, then the pipeline: ours, a file per block, zarr-python's I/O, "
                       "no cache")
            # Outputs are kept to the end: ext4 creates files slowly for minutes after many were deleted
            # (it skips recently freed inodes), which would charge one row for the last one's clean-up.
            lim = common.run_child("unet_dist.bench.io_limits:run_limit", {
                "store": str(store), "cores": n, "out": str(work / f"limit-{n}"), "block": block,
                "shard_blocks": VARIANTS["ours"][3]})
            limit_rows, io_limits = _limit_rows(n, lim)
            rows += limit_rows
            for variant in VARIANTS:
                got = common.run_child("unet_dist.bench.io:run_pipeline", {
                    "store": str(store), "out": str(work / f"pred-{n}-{variant}.zarr"), "cores": n,
                    "cache": VARIANTS[variant][1], "block": block, "halo": halo, "depth": depth,
                    "chunk_files": VARIANTS[variant][2], "shard_blocks": VARIANTS[variant][3]})
                rows.append(_pipeline_row(variant, got, n, n == cores[-1], lim, io_limits))
        if "checksum" not in skip:
            rows += _without_checksum(work, cores[-1], block, halo, depth, shape, chunks)
        tables = _tables(skip, raw_tif, store, block, halo, depth, args.tiny)
    config = {"volume": list(shape), "chunks": chunks, "block": block, "halo": halo, "model_depth": depth,
              "cores": cores, "input_mb": math.prod(shape) / common.MB, "codec_source": raw_tif and Path(raw_tif).name}
    return _report(args, rows, tables, cores, config)


def _without_checksum(work: Path, n: int, block, halo, depth, shape, chunks) -> list[dict]:
    """The decode limit and OURS at `n` cores on the volume written again without crc32c (the
    outputs without it too): the rows that `checksum_cost` compares with."""
    from unet_dist.bench import common

    store = work / "volume-no-crc32c.zarr"
    common.log(f"io: {n} core(s): the same without the crc32c checksum (stores before issue 22)")
    common.run_child("unet_dist.bench.io:run_write_without_checksum", {"out": str(store), "shape": list(shape),
                                                                  "chunks": chunks, "shard": None})
    lim = common.run_child("unet_dist.bench.io_limits:run_limit", {"store": str(store), "cores": n})
    decode = _limit_rows(n, lim)[0][0]
    got = common.run_child("unet_dist.bench.io:run_pipeline", {
        "store": str(store), "out": str(work / f"pred-{n}-no-crc32c.zarr"), "cores": n, "cache": True,
        "block": block, "halo": halo, "depth": depth, "shard_blocks": VARIANTS["ours"][3], "checksum": False})
    row = _pipeline_row("ours", got, n, False, lim, {})
    row.pop("variant")
    return [{**decode, "what": "decode limit, no crc32c (stores before)", "role": "no checksum"},
            {**row, "what": VARIANTS["ours"][0] + ", no crc32c (stores before)", "role": "no checksum"}]


def _checksum_cost(rows: list[dict], ours: dict) -> dict | None:
    """How much slower the decode limit and OURS are with the crc32c checksum than without (0.02: 2%)."""
    plain = [r for r in rows if r["role"] == "no checksum"]
    if not plain:
        return None
    decode = next(r for r in rows if r["role"] == "limit" and r["cores"] == ours["cores"]
                  and r["what"].startswith("decode limit"))
    cost = {}
    for name, with_crc, without in (("decode_limit", decode, plain[0]), ("pipeline", ours, plain[1])):
        cost[name] = without["input_mb_per_s"] / with_crc["input_mb_per_s"] - 1
        cost[f"{name}_cpu"] = with_crc["cpu_s"] / with_crc["seconds"] / with_crc["input_mb_per_s"] / (
            without["cpu_s"] / without["seconds"] / without["input_mb_per_s"]) - 1
    return cost


def _check_arguments(args) -> set[str]:
    """The sections to skip, once --size, --width and --skip are checked."""
    from unet_dist.errors import UserError

    if args.size <= 0 or args.width < 64:
        raise UserError("--size must be positive and --width at least 64")
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    sections = {"codecs", "backends", "checksum"}
    if skip - sections:
        raise UserError(f"--skip: unknown {', '.join(sorted(skip - sections))}; "
                        "expected some of codecs, backends, checksum")
    return skip


def _limit_cpu_per_mb(lim: dict) -> float:
    from unet_dist.bench.common import MB

    return lim["decode_cpu_s"] / (lim["decode_bytes"] / MB)


def _limit_rows(n: int, lim: dict) -> tuple[list[dict], dict]:
    """The limits' rows at `n` cores, and {files: (input MB/s, CPU s per MB)} of decode + encode + write."""
    from unet_dist.bench.common import MB

    decode_limit = lim["decode_bytes"] / MB / lim["decode_s"]
    rows = [{"what": "decode limit (chunk files, tight loop)", "role": "limit", "cores": n,
             "input_mb_per_s": decode_limit, "seconds": lim["decode_s"], "cpu_s": lim["decode_cpu_s"],
             "read_amplification": 1.0}]
    limit_cpu_per_mb = _limit_cpu_per_mb(lim)
    if "io_limit_no_write_s" in lim:
        coded = lim["io_limit_no_write_bytes"] / MB / lim["io_limit_no_write_s"]
        rows.append({"what": "decode + encode limit (no files written)", "role": "limit", "cores": n,
                     "input_mb_per_s": coded, "seconds": lim["io_limit_no_write_s"],
                     "cpu_s": lim["io_limit_no_write_cpu_s"], "read_amplification": 1.0,
                     "fraction_of_decode_limit": coded / decode_limit,
                     "fraction_of_decode_limit_cpu": limit_cpu_per_mb / (
                         lim["io_limit_no_write_cpu_s"] / (lim["io_limit_no_write_bytes"] / MB))})
    io_limits = {}
    for files, key, what in (("chunks", "io_limit", "decode + encode + write limit, a file per block"),
                             ("shards", "io_limit_shards", "decode + encode + write limit, shard files")):
        if f"{key}_s" not in lim:
            continue
        io_mb = lim[f"{key}_bytes"] / MB
        io_limits[files] = (io_mb / lim[f"{key}_s"], lim[f"{key}_cpu_s"] / io_mb)
        rows.append({"what": f"{what} (tight loop)", "role": "limit", "cores": n,
                     "input_mb_per_s": io_limits[files][0], "output_mb_per_s": 2 * io_limits[files][0],
                     "seconds": lim[f"{key}_s"], "cpu_s": lim[f"{key}_cpu_s"], "read_amplification": 1.0,
                     "fraction_of_decode_limit": io_limits[files][0] / decode_limit,
                     "fraction_of_decode_limit_cpu": limit_cpu_per_mb / io_limits[files][1]})
    rows.append({"what": "memory copy", "role": "limit", "cores": 1,
                 "input_mb_per_s": lim["copy_bytes"] / MB / lim["copy_s"], "seconds": lim["copy_s"]})
    return rows, io_limits


def _pipeline_row(variant: str, got: dict, n: int, most_cores: bool, lim: dict, io_limits: dict) -> dict:
    """One pipeline variant's row at `n` cores, against the limits measured beside it."""
    from unet_dist.bench.common import MB

    what, _, _, shard_blocks = VARIANTS[variant]
    bound = io_limits.get("shards" if shard_blocks != [1, 1, 1] else "chunks")
    mb_in = got["input_bytes"] / MB / got["seconds"]
    cpu_per_mb = got["cpu_s"] / (got["input_bytes"] / MB)
    return {"what": what, "variant": variant,
            "role": {"ours": "ours", "zarr": "peer"}.get(variant, "before") if most_cores else "scaling", "cores": n,
            "readers": got["readers"], "writers": got["writers"], "input_mb_per_s": mb_in,
            "output_mb_per_s": 2 * mb_in, "seconds": got["seconds"], "cpu_s": got["cpu_s"],
            "read_amplification": got["decoded_bytes"] / got["delivered_bytes"],
            "fraction_of_decode_limit": mb_in / (lim["decode_bytes"] / MB / lim["decode_s"]),
            # the same in CPU time: robust to other people's load on the cores
            "fraction_of_decode_limit_cpu": _limit_cpu_per_mb(lim) / cpu_per_mb,
            # against what decoding, encoding and writing the files cost alone
            "fraction_of_io_limit": mb_in / bound[0] if bound else None,
            "fraction_of_io_limit_cpu": bound[1] / cpu_per_mb if bound else None,
            "peak_rss_mb": got["peak_rss_bytes"] / MB, "output_files": got["output_files"]}


def _tables(skip: set[str], raw_tif, store: Path, block, halo, depth, tiny: bool) -> dict:
    from unet_dist.bench import common

    tables = {}
    if "codecs" not in skip:
        common.log("io: codecs (" + ("the TIFF given" if raw_tif else "synthetic data") + ")")
        tables["codecs"] = common.run_child("unet_dist.bench.io_tables:run_codecs", {"raw_tif": raw_tif, "tiny": tiny})
    if "backends" not in skip:
        common.log("io: zarr back ends on the same store and reads")
        tables["backends"] = common.run_child("unet_dist.bench.io_tables:run_backends", {
            "store": str(store), "block": block, "halo": halo, "depth": depth, "tiny": tiny})
    return tables


def _report(args, rows: list[dict], tables: dict, cores: list[int], config: dict) -> dict:
    from unet_dist.bench import common, io_tables

    ours = next(r for r in rows if r["role"] == "ours")
    peer = next(r for r in rows if r["role"] == "peer")
    for r in rows:
        if "variant" in r:
            r["x_peer"] = r["input_mb_per_s"] / next(
                p["input_mb_per_s"] for p in rows if p.get("variant") == "zarr" and p["cores"] == r["cores"])
    scaling = {n: next(r["input_mb_per_s"] for r in rows if r["cores"] == n and r.get("variant") == "ours")
               for n in cores}
    report = common.make_report(
        "io", args, "cpu", config, rows, ours["input_mb_per_s"] / peer["input_mb_per_s"],
        "input MB/s of the identity pipeline with our chunk files / with zarr-python's I/O (the predictor before)",
        ours, peer,
        notes=["each measurement ran in a fresh child process pinned to `cores` cores",
               "input MB/s counts every input voxel once; read_amplification is bytes decoded / bytes delivered "
               "to the blocks (regions with their context)"])
    for key in ("read_amplification", "fraction_of_decode_limit", "fraction_of_decode_limit_cpu"):
        report[key] = ours[key]
    # Not the target's measure: how close the pipeline comes to the work it cannot avoid, and where
    # that work alone would put fraction_of_decode_limit (its ceiling on this machine).
    bound = next((r for r in rows if r["what"].startswith("decode + encode + write limit, shard") and
                  r["cores"] == ours["cores"]), None)
    report["fraction_of_io_limit"] = ours.get("fraction_of_io_limit")
    report["fraction_of_io_limit_cpu"] = ours.get("fraction_of_io_limit_cpu")
    report["io_limit_of_decode_limit"] = bound and bound["fraction_of_decode_limit"]
    report["io_limit_of_decode_limit_cpu"] = bound and bound["fraction_of_decode_limit_cpu"]
    report["checksum_cost"] = _checksum_cost(rows, ours)
    report["scaling"] = {"input_mb_per_s_by_cores": scaling,
                         "x_first": {n: v / scaling[cores[0]] for n, v in scaling.items()}}
    for name, table in tables.items():
        report[name] = table
    report["tables"] = {name: (table["rows"], io_tables.COLUMNS[name]) for name, table in tables.items()}
    report["summary"] = {"read_amplification": round(ours["read_amplification"], 3),
                         "fraction_of_decode_limit": round(ours["fraction_of_decode_limit"], 3),
                         "fraction_of_decode_limit_cpu": round(ours["fraction_of_decode_limit_cpu"], 3),
                         **{k: round(report[k], 3) for k in ("fraction_of_io_limit", "io_limit_of_decode_limit")
                            if report[k] is not None},
                         **({f"crc32c_cost_{k}": round(v, 3) for k, v in report["checksum_cost"].items()}
                            if report["checksum_cost"] else {}),
                         "scaling": ", ".join(f"{n} core(s) {v:.0f} MB/s" for n, v in scaling.items())}
    return report

COLUMNS = [("what", "what"), ("cores", "cores"), ("readers", "readers"), ("writers", "writers"),
           ("input_mb_per_s", "input MB/s"), ("output_mb_per_s", "output MB/s"),
           ("read_amplification", "read ampl."), ("fraction_of_decode_limit", "of decode limit"),
           ("fraction_of_decode_limit_cpu", "of limit (CPU s)"), ("fraction_of_io_limit", "of I/O limit"),
           ("fraction_of_io_limit_cpu", "of I/O limit (CPU s)"),
           ("seconds", "seconds"), ("cpu_s", "CPU s"), ("peak_rss_mb", "peak RSS MB"), ("x_peer", "x peer")]
