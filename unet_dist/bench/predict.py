"""`bench predict`: our predictor against MONAI's `sliding_window_inference` on the same volume, with
the same weights, tile size and overlap, each end to end: checkpoint and store in, Zarr store out.

OURS is `unet_dist.predict.predict` (the `unet-dist predict` command) with the config's
`predict.*` settings: blocks of `predict.block_size` read with their context (mirrored at the
volume's borders), `predict.batch_size` tiles per forward pass, reads and writes in threads.
The PEER is what a MONAI user writes: load the checkpoint, read the whole volume into memory,
`sliding_window_inference(volume, roi_size=our tile, sw_batch_size=predict.batch_size, predictor,
overlap=our context / our tile, mode="gaussian")` with the aggregation on the compute device, then
write probability and mask with our layout and codecs. Both run under the same autocast precision.

Each runs in its own fresh child process (`common.run_child`), alternately per round, so neither's
allocations count in the other's peak RSS: peak RSS is the child's peak (VmHWM) from just before
the measured call to its end, "above baseline" that less its RSS just before the call (after
imports and, on a GPU, a warm-up forward pass that both get). Time
is wall time around the whole call in the child. `max_abs_diff` compares the stored probabilities
(uint8 holds round(255 p) unless predict.probability_dtype=float16); `interior` leaves out a band
of the network's halo at the volume's y, x borders, where MONAI sees the network's zero padding and
we see mirrored data; the rest of any difference is MONAI's blending of tile edges.

Weights are random (seeded) with batch-norm statistics calibrated on patches of the volume, so the
network's output is neither constant nor saturated.
"""

from __future__ import annotations

import argparse
import math

PROFILES = {
    # The classic U-Net (depth 4) at a quarter width; blocks of 1 x 512 x 512 (the project default).
    "cpu": ["model.base_channels=16"],
    # The classic U-Net; 1024 x 1024 blocks (less context overhead per block), 8 tiles per pass.
    "cuda": ["model.base_channels=64", "predict.block_size=[1,1024,1024]", "predict.batch_size=8"],
    "tiny": ["model.depth=2", "model.base_channels=4", "predict.block_size=[1,64,64]", "predict.batch_size=2"],
}
VOLUMES = {"cpu": (4, 1024, 1024), "cuda": (64, 4096, 4096), "tiny": (2, 96, 128)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="a store whose raw to predict (default: a synthetic volume in a temp folder)")
    p.add_argument("--volume", help="Z,Y,X of the synthetic volume (default 4,1024,1024 CPU; 64,4096,4096 GPU)")
    p.add_argument("--rounds", type=int, default=1, help="alternating runs of each; the median is reported")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto: bf16 on GPUs that compute it natively, fp32 elsewhere")
    p.add_argument("--monai-device", choices=("compute", "cpu"), default="compute",
                   help="where MONAI aggregates the output (default: the compute device)")


# ----------------------------------------------------------------------------- in child processes

def tile_runner(ckpt: str, device, precision: str, batch: int):
    """The predictor's tile runner for a checkpoint, laid out for its model's dimensions (a 3D model's
    5D weights take channels_last_3d, not channels_last)."""
    from unet_dist.checkpoint import load_model
    from unet_dist.predict.tilenet import TileNet

    model, cfg, _ = load_model(ckpt)
    return TileNet(model, device, precision, batch, tta=False, dims=cfg.model.dims)


def _warmup(ckpt: str, device, precision: str, plan_tile, batch: int) -> None:
    """CUDA context, cuBLAS/cuDNN handles and first-call kernels: paid by both before the clock."""
    import numpy as np

    if device.type != "cuda":
        return
    net = tile_runner(ckpt, device, precision, batch)
    net(np.zeros((batch, *plan_tile), np.float32))
    del net
    import torch

    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()


def run_ours(ckpt: str, store: str, out: str, device: str, precision: str, tile: list, batch: int) -> dict:
    import torch

    from unet_dist.predict.pipeline import predict
    from unet_dist.bench.common import measure

    dev = torch.device(device)
    _warmup(ckpt, dev, precision, tile, batch)
    return measure(lambda: {"result": predict(ckpt, store, out, overwrite=True, device=dev.type,
                                               precision=precision)}, dev)


def run_monai(ckpt: str, store: str, out: str, device: str, precision: str, tile: list, batch: int,
              overlap: list, aggregate_on: str) -> dict:
    import numpy as np
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    from unet_dist import runtime
    from unet_dist.data.patches import to_unit_float
    from unet_dist.predict.prediction_store import MASK, PROBABILITY, build_pyramids, create_prediction, quantize
    from unet_dist.data.store import RAW, open_store, voxel_size
    from unet_dist.checkpoint import load_model
    from unet_dist.bench.common import measure

    dev = torch.device(device)
    _warmup(ckpt, dev, precision, tile, batch)

    def go():
        model, cfg, _ = load_model(ckpt)
        model = model.to(dev)
        autocast = runtime.autocast(dev, precision)
        source = open_store(store)
        volume = to_unit_float(np.asarray(source[RAW][:]))  # the whole volume in memory
        x = torch.from_numpy(volume)
        x = x[:, None] if cfg.model.dims == 2 else x[None, None]  # 2D: slices are the batch

        def predictor(t):
            with autocast:
                return torch.sigmoid(model(t).float())

        with torch.inference_mode():
            prob = sliding_window_inference(x, tuple(tile[-cfg.model.dims:]), batch, predictor,
                                            overlap=overlap, mode="gaussian", sw_device=dev,
                                            device=dev if aggregate_on == "compute" else torch.device("cpu"))
        prob = (prob[:, 0] if cfg.model.dims == 2 else prob[0, 0]).cpu().numpy()
        del x, volume
        # the same store format as ours, pyramid included, so both do the same work after the network
        group = zarr.open_group(out, mode="w", zarr_format=3)
        block = tuple(min(b, n) for b, n in zip(cfg.predict.block_size, prob.shape))
        create_prediction(group, prob.shape, block, cfg.predict.probability_dtype, voxel_size(source), 0)
        group[PROBABILITY][:] = quantize(prob, cfg.predict.probability_dtype)
        group[MASK][:] = (prob > cfg.predict.threshold).astype(np.uint8)
        build_pyramids(group)
        return {"voxels": int(prob.size)}

    return measure(go, dev)


# ------------------------------------------------------------------------------------ the parent

def _checkpoint(folder, cfg, store: str, device, seed: int = 0) -> str:
    """Seeded random weights, batch-norm statistics calibrated on patches of the volume."""
    import numpy as np
    import torch

    from unet_dist import checkpoint
    from unet_dist.config import to_dict
    from unet_dist.data.patches import to_unit_float
    from unet_dist.data.store import RAW, open_store
    from unet_dist.model import build_model, valid_input_shape

    torch.manual_seed(seed)
    model = build_model(cfg.model).to(device)
    raw = open_store(store)[RAW]
    dims = cfg.model.dims
    size = valid_input_shape(cfg.model, tuple(min(n, 128) for n in raw.shape[-dims:]))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the calibration batches
    rng = np.random.default_rng(seed)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            tiles = []
            for _ in range(4):
                z = int(rng.integers(0, raw.shape[0] - (size[0] if dims == 3 else 1) + 1))
                ys = [int(rng.integers(0, max(1, n - s) + 1)) for n, s in zip(raw.shape[-2:], size[-2:])]
                zs = slice(z, z + (size[0] if dims == 3 else 1))
                t = to_unit_float(np.asarray(raw[zs, ys[0]:ys[0] + size[-2], ys[1]:ys[1] + size[-1]]))
                t = t if dims == 3 else t[0]
                pad = [(0, s - n) for s, n in zip(size, t.shape)]
                tiles.append(np.pad(t, pad, mode="symmetric"))
            model(torch.from_numpy(np.stack(tiles)[:, None]).to(device))
    for m in norms:
        m.momentum = 0.1
    state = {"model": {k: v.cpu() for k, v in model.state_dict().items()}, "model_config": to_dict(cfg.model),
             "step": 0, "config": to_dict(cfg)}
    return str(checkpoint.save(folder / "ckpt", state, keep_last=1))


def _overlap(tile, block) -> list[float]:
    """MONAI's overlap that gives a scan interval of exactly our block: int(t * (1 - o)) == b."""
    overlaps = []
    for t, b in zip(tile, block):
        o = max(0.0, (t - b) / t - 1e-9)
        assert int(t * (1 - o)) == b or t <= b, (t, b, o)
        overlaps.append(o)
    return overlaps


def level_bytes(pred: str) -> dict[str, int]:
    """Stored bytes of each level of probability and mask, keyed by array path."""
    from pathlib import Path

    from unet_dist.data.store import stored_bytes
    root = Path(pred)
    return {str(p.parent.relative_to(root)): stored_bytes(p.parent) for p in root.rglob("zarr.json")
            if p.parent != root and (p.parent / "c").exists()}


def pyramid_bytes_frac(sizes: dict[str, int]) -> float:
    """Bytes of levels above 0 over all stored bytes."""
    coarse = sum(n for path, n in sizes.items() if not path.endswith("0"))
    return coarse / max(1, sum(sizes.values()))


def compare(ours: str, peer: str, border: tuple[int, ...], slab: int = 8) -> dict:
    """Max and mean |difference| of the stored probabilities, everywhere and away from y, x borders;
    the fraction of mask voxels that differ. Streams slabs of slices."""
    import numpy as np
    import zarr

    from unet_dist.predict.prediction_store import MASK, PROBABILITY, probability_float

    a, b = (zarr.open_group(p, mode="r") for p in (ours, peer))
    shape = a[PROBABILITY].shape
    by, bx = border[-2:]
    inner = (slice(None), slice(by, max(by, shape[1] - by)), slice(bx, max(bx, shape[2] - bx)))
    worst = worst_in = total = 0.0
    masks = 0
    for z0 in range(0, shape[0], slab):
        z = slice(z0, min(z0 + slab, shape[0]))
        d = np.abs(probability_float(a[PROBABILITY][z]) - probability_float(b[PROBABILITY][z]))
        worst = max(worst, float(d.max()))
        if d[inner].size:
            worst_in = max(worst_in, float(d[inner].max()))
        total += float(d.sum(dtype=np.float64))
        masks += int(np.count_nonzero(a[MASK][z] != b[MASK][z]))
    n = math.prod(shape)
    return {"max_abs_diff": worst, "max_abs_diff_interior": worst_in, "mean_abs_diff": total / n,
            "mask_differs_frac": masks / n, "interior_border_px": [by, bx]}


def run(args) -> dict:
    from unet_dist import runtime
    from unet_dist.config import to_dict
    from unet_dist.data.store import RAW, open_store
    from unet_dist.model import halo
    from unet_dist.predict.block_plan import make_plan
    from unet_dist.bench import common

    device = common.resolve_device(args.device)
    cuda = device.type == "cuda"
    cfg, applied = common.suite_config(args, PROFILES, device)
    precision = runtime.resolve_precision(args.precision, device)
    profile = "tiny" if args.tiny else "cuda" if cuda else "cpu"
    with common.workdir(args.workdir) as work:
        if args.store:
            store = args.store
        else:
            from unet_dist.data.layout import parse_zyx
            shape = parse_zyx(args.volume, "--volume") if args.volume else VOLUMES[profile]
            common.log(f"predict: writing a synthetic volume {shape}")
            store = str(common.make_volume_store(work / "volume.zarr", shape))
        raw_shape = tuple(open_store(store)[RAW].shape)
        plan = make_plan(cfg.model, cfg.predict, raw_shape, (0, raw_shape[0]))
        tile = list(plan.model_tile)
        block = list(plan.block[1:] if cfg.model.dims == 2 else plan.block)
        overlap = _overlap(tile, block)
        common.log(f"predict: checkpoint (random weights, calibrated batch norm); tile {tile}, block {block}")
        ckpt = _checkpoint(work, cfg, store, device)
        outs = {"ours": str(work / "ours.zarr"), "monai": str(work / "monai.zarr")}
        common_kw = dict(ckpt=ckpt, store=store, device=str(device), precision=precision, tile=tile,
                         batch=cfg.predict.batch_size)
        runs = _rounds(args, common_kw, outs, overlap)
        common.log("predict: comparing the outputs")
        border = (0, *halo(cfg.model)) if cfg.model.dims == 2 else tuple(halo(cfg.model))
        diff = compare(outs["ours"], outs["monai"], border)
        outs_bytes = level_bytes(outs["ours"])
    rows = [_row(name, role, runs[name], math.prod(plan.shape)) for name, role in (("ours", "ours"), ("monai", "peer"))]
    for row in rows:
        row["x_peer"] = row["voxels_per_s"] / rows[1]["voxels_per_s"]
        row["x_peer_cpu_time"] = rows[1]["cpu_s"] / row["cpu_s"] if row["cpu_s"] else None
    config = {"device": str(device), "precision": precision, "overrides": applied, "model": to_dict(cfg.model),
              "predict": to_dict(cfg.predict), "volume": list(raw_shape),
              "store": "synthetic" if not args.store else args.store, "tile": tile, "block": block,
              "context": list(plan.context), "monai_overlap": overlap, "monai_mode": "gaussian",
              "monai_aggregation": args.monai_device, "rounds": args.rounds}
    report = common.make_report(
        "predict", args, device, config, rows, rows[0]["voxels_per_s"] / rows[1]["voxels_per_s"],
        "voxels/s of unet_dist predict / MONAI sliding_window_inference's, end to end", rows[0], rows[1],
        notes=["each method ran in a fresh child process; peak RSS is that process's peak during the measured "
               "call, baseline its RSS just before it (after imports and the GPU warm-up)",
               "differences: at the volume's borders (mirrored context vs the network's zero padding) and "
               "MONAI's gaussian blending of tile edges; uint8 storage rounds to 1/255"])
    report["comparison"] = diff
    report["summary"] = {k: round(v, 5) if isinstance(v, float) else v for k, v in diff.items()}
    # what the coarser levels cost: their share of our time and of the output's bytes
    report["summary"]["pyramid_time_frac"] = round(rows[0]["pyramid_s"] / rows[0]["seconds"], 4) \
        if rows[0].get("pyramid_s") is not None else None
    report["summary"]["pyramid_bytes_frac"] = round(pyramid_bytes_frac(outs_bytes), 4) if outs_bytes else None
    return report


def _rounds(args, common_kw: dict, outs: dict, overlap: list[float]) -> dict:
    """`--rounds` rounds of ours then MONAI's, each in a child process: their measurements by name."""
    from unet_dist.bench import common

    runs = {"ours": [], "monai": []}
    for r in range(args.rounds):
        for name in ("ours", "monai"):
            common.log(f"predict: round {r + 1}/{args.rounds}: {name} (child process)")
            if name == "ours":
                runs[name].append(common.run_child("unet_dist.bench.predict:run_ours",
                                                   dict(common_kw, out=outs[name])))
            else:
                runs[name].append(common.run_child("unet_dist.bench.predict:run_monai", dict(
                    common_kw, out=outs[name], overlap=overlap, aggregate_on=args.monai_device)))
    return runs


def _row(name: str, role: str, runs: list[dict], voxels: int) -> dict:
    from unet_dist.bench import common

    last = runs[-1]
    row = {"method": "unet_dist predict" if name == "ours" else "MONAI sliding_window_inference",
           "role": role, **common.measured_row(runs), "voxels": voxels,
           "cuda_peak_mb": last["cuda_peak_bytes"] / common.MB if "cuda_peak_bytes" in last else None}
    row["voxels_per_s"] = voxels / row["seconds"]
    if name == "ours":
        row["pipeline_voxels_per_s"] = last["result"].get("voxels_per_s")
        row["pyramid_s"] = last["result"].get("pyramid_seconds")
    return row


COLUMNS = [("method", "method"), ("voxels_per_s", "voxels/s"), ("seconds", "seconds"),
           ("pipeline_voxels_per_s", "pipeline vox/s"), ("pyramid_s", "pyramid s"), ("peak_rss_mb", "peak RSS MB"),
           ("peak_rss_above_baseline_mb", "above base MB"), ("cuda_peak_mb", "GPU peak MB"),
           ("cpu_s", "CPU s"), ("x_peer", "x peer"), ("x_peer_cpu_time", "x peer CPU")]
