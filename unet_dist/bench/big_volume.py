"""`bench load`: training and whole-volume prediction on a synthetic volume of several GB, with peak
memory, from a store of many small chunks against the same chunks packed in shards.

For each layout (`--layouts`, default small-chunks,sharded,default) the suite writes the volume
(raw + labels, `--size` GB of raw, slices of `--width` squared, our codecs) with
`common.make_volume_store`, then runs, each in a fresh child process:

- write: building the store (slab by slab; the generator repeats a few rendered slices);
- train: `unet_dist.train.train` for the profile's steps, patches drawn from the whole depth, with
  its DataLoader workers (validation: one whole slice);
- read: the predictor's reads alone (every block's input with its context, 2 reader threads, no
  network), which isolates what the layout costs;
- predict: `unet_dist.predict.predict` of every slice of the volume with that run's checkpoint.

Memory: `peak_rss_mb` is the child's own peak (VmHWM); `tree_peak_rss_mb` samples the child plus
its loader workers every 20 ms and adds them up (pages shared after fork count once per process,
so this is an upper bound). Bounded memory means both stay far below the volume's size and do not
grow with it (`--size` changes only the depth).

Layouts: small-chunks stores chunks of 1 x C x C (`--chunk`, default 128) each in its own file;
sharded packs the same chunks in shards of `--shard-depth` whole slices (one file per shard, read by
byte ranges); default is what `unet-dist convert` writes (1 x 1024 x 1024 chunks, no shards).
`speedup` is the small-chunk store's read time over the sharded store's (`x_peer_predict`: the same
ratio for the whole prediction).

The model is small (depth 2, 4 base channels on the CPU) on purpose: this suite measures reading,
writing and memory at scale, which a large model's compute would hide (`bench predict` and
`bench train` measure compute).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

PROFILES = {
    "cpu": ["model.depth=2", "model.base_channels=4", "data.patch_size=[128,128]", "data.batch_size=4",
            "data.num_workers=2", "train.steps=200", "train.precision=fp32", "predict.batch_size=1"],
    "cuda": ["model.depth=4", "model.base_channels=16", "data.patch_size=[256,256]", "data.batch_size=8",
             "data.num_workers=8", "train.steps=500", "predict.block_size=[1,1024,1024]", "predict.batch_size=8"],
    "tiny": ["model.depth=2", "model.base_channels=4", "data.patch_size=[32,32]", "data.batch_size=2",
             "data.num_workers=1", "train.steps=6", "predict.block_size=[1,64,64]", "predict.halo=[0,8,8]"],
}
# 1 GiB on GPUs too: the suite is bound by the store, not the device (small chunks write at ~17 MB/s
# and read at ~21 MB/s on a local disk, BENCHMARKS.md), so 8 GiB would take over 15 minutes and about
# 45 GB of disk for the three layouts. Pass --size for more when time and disk allow.
DEFAULT_GB = {"cpu": 4.0, "cuda": 1.0}
TINY_VOLUME = (6, 128, 128)
LAYOUT_NAMES = ("small-chunks", "sharded", "default")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=float, help="GB (GiB) of raw voxels (default 4 on a CPU, 1 on a GPU; labels add "
                                              "as many)")
    p.add_argument("--width", type=int, default=2048, help="slice height and width in pixels (default 2048)")
    p.add_argument("--chunk", type=int, default=128, help="y, x of the small chunks (default 128)")
    p.add_argument("--shard-depth", type=int, default=4, help="slices per shard of the sharded store (default 4)")
    p.add_argument("--layouts", default=",".join(LAYOUT_NAMES),
                   help=f"comma-separated, from {', '.join(LAYOUT_NAMES)} (default all)")


def layouts(names: str, shape, chunk: int, shard_depth: int) -> dict[str, tuple]:
    """name -> (chunks, shard) for make_volume_store."""
    from unet_dist.errors import UserError

    _, height, width = shape
    small = (1, min(chunk, height), min(chunk, width))
    known = {"small-chunks": (small, None), "sharded": (small, (shard_depth, height, width)), "default": ("2d", None)}
    picked = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in picked if n not in known]
    if unknown or not picked:
        raise UserError(f"--layouts: unknown {', '.join(unknown) or '(none)'}; expected some of {', '.join(known)}")
    if "small-chunks" in picked and "sharded" in picked:  # the ratio's two ends first
        picked = ["small-chunks", "sharded"] + [n for n in picked if n not in ("small-chunks", "sharded")]
    return {n: known[n] for n in picked}


def store_files(path: str) -> tuple[int, int]:
    """(files, bytes) under a store."""
    files = size = 0
    for root, _, names in os.walk(path):
        for name in names:
            files += 1
            size += os.stat(os.path.join(root, name)).st_size
    return files, size


# ----------------------------------------------------------------------------- in child processes

def run_write(out: str, shape: list, chunks, shard) -> dict:
    from unet_dist.bench.common import make_volume_store, measure

    def go() -> None:
        make_volume_store(Path(out), shape, chunks=tuple(chunks) if isinstance(chunks, list) else chunks,
                          shard=tuple(shard) if shard else None)

    return measure(go)


def run_train(overrides: list) -> dict:
    from unet_dist.config import load_config
    from unet_dist.train.loop import train
    from unet_dist.bench.common import PeakRSS, measure

    cfg = load_config(None, overrides)

    def go() -> dict:
        with PeakRSS(interval=0.02, children=True) as tree:
            result = train(cfg)
        return {"tree_peak_rss_bytes": tree.peak, "steps": result.step, "status": result.status,
                "checkpoint": result.checkpoint}

    return measure(go)


def run_read(ckpt: str, store: str, readers: int = 2) -> dict:
    """The predictor's reads alone: every block's input region (context included), in `readers`
    threads as the predictor reads them, without the network (which hides I/O on a CPU)."""
    from concurrent.futures import ThreadPoolExecutor

    from unet_dist.data.store import RAW, open_store
    from unet_dist.predict.block_plan import block_core, input_region, make_plan, read_mirrored
    from unet_dist.checkpoint import load_model
    from unet_dist.bench.common import measure

    _, cfg, _ = load_model(ckpt)
    raw = open_store(store)[RAW]
    plan = make_plan(cfg.model, cfg.predict, raw.shape, (0, raw.shape[0]))

    def go() -> dict:
        with ThreadPoolExecutor(readers, "bench-read") as pool:
            read = sum(pool.map(lambda i: read_mirrored(raw, input_region(plan, block_core(plan, i))).nbytes,
                                range(plan.n_blocks)))
        return {"bytes": int(read), "blocks": plan.n_blocks}

    return measure(go)


def run_predict(ckpt: str, store: str, out: str, device: str) -> dict:
    from unet_dist.predict.pipeline import predict
    from unet_dist.bench.common import PeakRSS, measure

    def go() -> dict:
        with PeakRSS(interval=0.02, children=True) as tree:
            result = predict(ckpt, store, out, overwrite=True, device=device)
        return {"tree_peak_rss_bytes": tree.peak, "voxels": result.get("voxels_predicted")}

    return measure(go)


# ------------------------------------------------------------------------------------ the parent

def _mb(value) -> float | None:
    from unet_dist.bench.common import MB

    return None if value is None else value / MB


def run(args) -> dict:
    from unet_dist.config import to_dict
    from unet_dist.bench import common

    device = common.resolve_device(args.device)
    cfg, applied = common.suite_config(args, PROFILES, device)
    shape, chunk = _volume_shape(args, device.type == "cuda")
    chosen = layouts(args.layouts, shape, chunk, args.shard_depth)
    with common.workdir(args.workdir) as work:
        rows = [_measure_layout(name, chunks, shard, shape, work, cfg, applied, device)
                for name, (chunks, shard) in chosen.items()]
    by = {r["layout"]: r for r in rows}
    ours, peer = by.get("sharded", rows[0]), by.get("small-chunks", rows[-1])
    for row in rows:
        row["x_peer"] = peer["read_s"] / row["read_s"]
        row["x_peer_predict"] = peer["predict_s"] / row["predict_s"]
    volume_mb = math.prod(shape) / common.MB
    config = {"device": str(device), "overrides": applied, "model": to_dict(cfg.model), "data": to_dict(cfg.data),
              "predict": to_dict(cfg.predict), "train_steps": cfg.train.steps, "volume": list(shape),
              "raw_mb": volume_mb, "labels_mb": volume_mb, "layouts": {n: {"chunks": c, "shards": s}
                                                                      for n, (c, s) in chosen.items()}}
    report = common.make_report(
        "load", args, device, config, rows, peer["read_s"] / ours["read_s"],
        f"time to read every block's input as the predictor does: {peer['layout']} store / {ours['layout']} "
        "store (x_peer_predict: the same for the whole prediction)", ours, peer,
        notes=["each phase ran in a fresh child process; peak RSS is the child's VmHWM during the call, tree "
               "peak the sampled sum over it and its DataLoader workers",
               "the volume repeats 8 rendered slices (common.synthetic_slices): compression is realistic, "
               "page-cache effects are those of a volume this size"])
    worst = max(max(r["train_tree_peak_rss_mb"], r["predict_tree_peak_rss_mb"], r["write_peak_rss_mb"],
                    r["read_peak_rss_mb"]) for r in rows)
    report["summary"] = {"volume_raw_mb": round(volume_mb), "worst_peak_rss_mb": round(worst),
                         "worst_peak_rss_over_volume": round(worst / volume_mb, 4)}
    return report


def _volume_shape(args, cuda: bool) -> tuple[tuple[int, int, int], int]:
    """(the volume's shape, the chunk edge) from --tiny, --size, --width and --chunk, checked."""
    from unet_dist.errors import UserError

    if args.tiny:
        shape = TINY_VOLUME
    else:
        size_gb = args.size or DEFAULT_GB["cuda" if cuda else "cpu"]
        if size_gb <= 0 or args.width <= 0:
            raise UserError("--size and --width must be positive")
        shape = (max(2, math.ceil(size_gb * (1 << 30) / args.width ** 2)), args.width, args.width)
    if args.chunk <= 0 or args.shard_depth <= 0:
        raise UserError("--chunk and --shard-depth must be positive")
    return shape, min(args.chunk, 32) if args.tiny else args.chunk


def _measure_layout(name: str, chunks, shard, shape, work, cfg, applied, device) -> dict:
    """One layout's row: write the store, train on it, read every block's input, predict (each a child)."""
    import shutil

    from unet_dist.bench import common

    volume_bytes = math.prod(shape)  # uint8 raw
    store, run_dir, out = work / f"{name}.zarr", work / f"{name}-run", work / f"{name}-pred.zarr"
    common.log(f"load: {name}: writing {shape} raw + labels ({2 * volume_bytes / (1 << 30):.2f} GiB of "
               f"voxels), chunks {chunks}, shards {shard}")
    wrote = common.run_child("unet_dist.bench.big_volume:run_write", {
        "out": str(store), "shape": list(shape), "chunks": chunks, "shard": shard})
    files, stored = store_files(str(store))
    common.log(f"load: {name}: {files} files, {stored / common.MB:.0f} MB; training (child process)")
    trained = common.run_child("unet_dist.bench.big_volume:run_train", {"overrides": [
        *applied, f"data.store={store}", f"run.dir={run_dir}", f"data.train_slices=[0,{shape[0]}]",
        "data.val_slices=[0,1]", f"train.val_every={10 ** 9}", f"train.ckpt_every={10 ** 9}",
        f"train.device={device.type}", "logging.wandb=disabled", "logging.progress=plain",
        "logging.images=false"]})
    common.log(f"load: {name}: reading every block's input as the predictor does (child process)")
    scanned = common.run_child("unet_dist.bench.big_volume:run_read", {
        "ckpt": trained["checkpoint"], "store": str(store)})
    common.log(f"load: {name}: predicting all {shape[0]} slices (child process)")
    predicted = common.run_child("unet_dist.bench.big_volume:run_predict", {
        "ckpt": trained["checkpoint"], "store": str(store), "out": str(out), "device": device.type})
    images = trained["steps"] * cfg.data.batch_size
    for path in (store, run_dir, out):  # keep the disk to one layout at a time
        shutil.rmtree(path, ignore_errors=True)
    return {
        "layout": name, "role": {"sharded": "ours", "small-chunks": "peer"}.get(name, name),
        "chunks": list(chunks) if isinstance(chunks, tuple) else chunks,
        "shards": list(shard) if shard else None, "files": files, "stored_mb": stored / common.MB,
        "write_s": wrote["seconds"], "write_mb_per_s": 2 * volume_bytes / common.MB / wrote["seconds"],
        "write_peak_rss_mb": _mb(wrote["peak_rss_bytes"]),
        "train_s": trained["seconds"], "train_steps": trained["steps"],
        "train_images_per_s": images / trained["seconds"],
        "train_peak_rss_mb": _mb(trained["peak_rss_bytes"]),
        "train_tree_peak_rss_mb": _mb(trained["tree_peak_rss_bytes"]),
        "read_s": scanned["seconds"], "read_mb_per_s": scanned["bytes"] / common.MB / scanned["seconds"],
        "read_cpu_s": scanned["cpu_s"], "read_peak_rss_mb": _mb(scanned["peak_rss_bytes"]),
        "predict_s": predicted["seconds"], "predict_voxels": predicted["voxels"],
        "predict_voxels_per_s": (predicted["voxels"] or 0) / predicted["seconds"],
        "predict_peak_rss_mb": _mb(predicted["peak_rss_bytes"]),
        "predict_tree_peak_rss_mb": _mb(predicted["tree_peak_rss_bytes"]),
        "predict_cpu_s": predicted["cpu_s"],
    }

COLUMNS = [("layout", "layout"), ("files", "files"), ("stored_mb", "stored MB"), ("write_mb_per_s", "write MB/s"),
           ("write_peak_rss_mb", "write RSS MB"), ("train_images_per_s", "train img/s"),
           ("train_tree_peak_rss_mb", "train RSS MB*"), ("read_mb_per_s", "read MB/s"), ("read_s", "read s"),
           ("predict_voxels_per_s", "predict vox/s"), ("predict_s", "predict s"),
           ("predict_peak_rss_mb", "predict RSS MB"), ("x_peer", "x small-chunks"),
           ("x_peer_predict", "x small-chunks predict")]
