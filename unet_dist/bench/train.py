"""`bench train`: our training step against a plain fp32 eager loop of the same model, batch and patch.

OURS is the trainer's step, built from the trainer's own pieces (`train.build_training`, the
precision from `dist.resolve_precision`, `dist.autocast`, `train.loss_fn`, the GradScaler, gradient
clipping, the non-finite check kept on the device (`train.step_if_finite`: no host synchronisation per
step), the scheduler, channels_last / torch.compile as `train.*` options, cuDNN's autotuner on GPUs as
`dist.tune_for_fixed_shapes` turns it on), in the order `train._train` runs them. The PEER is the seed notebook's loop: `model.train()`, Adam,
BCEWithLogitsLoss, fp32, eager, `loss.item()` each step, nothing else. Both start from the same
weights and see the same batch, copied to the device each step as the trainer does (ours from
pinned memory, non-blocking; the peer's a plain `.to(device)`); the data loader is left out (the
`loader` suite measures it).

Variants run interleaved in rounds (each round: every variant for `--steps` steps), and each
variant's throughput is the median over rounds, so load from other processes hits all alike.
`+sync` and `+noautotune` variants are what-ifs that undo one of the trainer's choices (a host
synchronisation per step: the finite check, `synchronize`, `float(loss)`; cuDNN's autotuner off), to
show what each is worth; they are reported as such, never as "ours". On GPUs the peer's fp32 runs its
convolutions in TF32 (torch's default, `torch.backends.cudnn.allow_tf32`): the report says so.
Peak memory: on a GPU, the CUDA allocator's peak during a variant's steps, less what the other
variants hold; on the CPU, the peak RSS of a fresh child process that builds the variant and runs
two steps, above its RSS before the model was built.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

from unet_dist.bench.train_steps import Batch, build_step, cudnn_benchmark, resident_bytes

PROFILES = {
    # ~1 minute on 2 CPU cores: the classic U-Net (depth 4) at a quarter of its width, 256 x 256.
    "cpu": ["model.base_channels=16", "data.patch_size=[256,256]", "data.batch_size=4"],
    # The classic U-Net (64 base channels, depth 4) at 512 x 512: ~1.15 TFLOP per training image.
    "cuda": ["model.base_channels=64", "data.patch_size=[512,512]", "data.batch_size=16"],
    "tiny": ["model.depth=2", "model.base_channels=4", "data.patch_size=[64,64]", "data.batch_size=2"],
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help="timed steps per variant and round (default: 3 CPU, 20 GPU, 2 tiny)")
    p.add_argument("--rounds", type=int, help="interleaved rounds; the median is reported (default: 3, 1 tiny)")
    p.add_argument("--warmup", type=int, help="untimed steps per variant first (default: 1; +2 for compile)")
    p.add_argument("--variants",
                   help="our variants, comma-separated, each PRECISION[+cl][+compile][+sync][+noautotune], e.g. "
                        "bf16,bf16+cl+compile (default: CPU fp32,fp32+cl; GPU bf16,bf16+cl,bf16+compile,"
                        "bf16+cl+compile; GPU tiny bf16,bf16+cl+compile). sync (a host sync per step) and "
                        "noautotune (cuDNN benchmark mode off) are what-ifs that undo a trainer choice")


@dataclass(frozen=True)
class Variant:
    name: str
    peer: bool = False
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    # What the trainer does; a what-if variant turns one off to show what it is worth:
    autotune: bool = True  # torch.backends.cudnn.benchmark on during this variant's steps (GPUs)
    nosync: bool = True  # no host synchronisation per step (finite check, synchronize, float(loss))


FLAGS = {"cl": ("channels_last", True), "compile": ("compile", True), "sync": ("nosync", False),
         "noautotune": ("autotune", False)}


def parse_variants(text: str | None, device, precision: str, tiny: bool = False) -> list[Variant]:
    from unet_dist.errors import UserError

    p = precision
    if text is None and device.type == "cuda":  # tiny: one compile, so CI still covers it
        text = f"{p},{p}+cl+compile" if tiny else f"{p},{p}+cl,{p}+compile,{p}+cl+compile"
    elif text is None:
        text = f"{p},{p}+cl"
    variants = [Variant("peer fp32 eager", peer=True, autotune=False, nosync=False)]
    for item in filter(None, (t.strip() for t in text.split(","))):
        parts = item.split("+")
        prec, flags = parts[0], set(parts[1:])
        if prec not in ("fp32", "bf16", "fp16") or not flags <= set(FLAGS):
            raise UserError(f"--variants: '{item}' is not PRECISION[+cl][+compile][+sync][+noautotune] "
                            "with PRECISION fp32, bf16 or fp16")
        if prec == "fp16" and device.type != "cuda":
            raise UserError("--variants: fp16 needs a GPU")
        variants.append(Variant(f"ours {item}", precision=prec, **dict(FLAGS[f] for f in flags)))
    return variants


# --------------------------------------------------------------------------- memory on the CPU

def memory_probe(config: dict, variant: dict, device: str, steps: int = 2) -> dict:
    """In a child process: the peak RSS of building the variant and running `steps` steps, above the
    RSS just before. A throwaway tiny model runs one step first, so torch's one-off costs (code pages
    of the kernels, allocator and thread-pool set-up: ~150 MB) are in the baseline, not the peak."""
    import torch

    from unet_dist.config import from_dict, load_config
    from unet_dist.bench.common import peak_rss_bytes, reset_peak_rss, rss_bytes

    cfg = from_dict(config, "bench")
    dev = torch.device(device)
    v = Variant(**variant)
    tiny = load_config(None, PROFILES["tiny"])
    tiny.model.dims, tiny.train = cfg.model.dims, cfg.train
    tiny.data.patch_size = [16] * cfg.model.dims if cfg.model.dims == 3 else [64, 64]
    build_step(tiny, dev, Variant("warm-up", v.peer, v.precision, v.channels_last), Batch(tiny))()
    batch = Batch(cfg)
    reset_peak_rss()
    before = rss_bytes()
    step = build_step(cfg, dev, v, batch)
    for _ in range(steps):
        step()
    return {"rss_before_bytes": before, "peak_bytes": peak_rss_bytes()}


# ------------------------------------------------------------------------------------ the suite

def run(args) -> dict:
    import torch

    from unet_dist import runtime
    from unet_dist.model import flops_per_forward
    from unet_dist.bench.machine import peak_bf16_flops
    from unet_dist.bench import common

    device = common.resolve_device(args.device)
    cfg, applied = common.suite_config(args, PROFILES, device)
    precision = runtime.resolve_precision(cfg.train.precision, device)
    variants = parse_variants(args.variants, device, precision, args.tiny)
    cuda = device.type == "cuda"
    steps = args.steps or (2 if args.tiny else 20 if cuda else 3)
    rounds = args.rounds or (1 if args.tiny else 3)
    warmup = 1 if args.warmup is None else args.warmup
    patch = tuple(cfg.data.patch_size)
    flops_per_image = 3 * flops_per_forward(cfg.model, patch)  # forward + backward (~2x forward)
    peak = peak_bf16_flops(torch.cuda.get_device_name(device) if cuda else None)
    times, cpu, peaks, losses = _measure(cfg, device, variants, steps, rounds, warmup)
    rows = [_row(cfg, v, steps, times[v.name], cpu[v.name], peaks[v.name], losses[v.name], flops_per_image, peak,
                 cuda) for v in variants]
    peer = rows[0]
    for row in rows:
        row["x_peer"] = row["images_per_s"] / peer["images_per_s"]
        row["x_peer_cpu_time"] = peer["cpu_s_per_image"] / row["cpu_s_per_image"] if row["cpu_s_per_image"] else None
    ours = [r for r in rows if r["role"] == "ours"] or rows[1:] or [peer]  # what-ifs only if nothing else
    best = max(ours, key=lambda r: r["images_per_s"])
    config = _report_config(cfg, device, precision, applied, steps, rounds, warmup, flops_per_image, peak)
    return common.make_report(
        "train", args, device, config, rows, best["images_per_s"] / peer["images_per_s"],
        f"images/s of our best variant ({best['variant']}) / the peer's", best, peer, notes=_notes(cuda))


def _measure(cfg, device, variants, steps: int, rounds: int, warmup: int) -> tuple[dict, dict, dict, dict]:
    """Every variant built and warmed up, then timed in `rounds` interleaved rounds of `steps` steps:
    (wall seconds per round, CPU seconds per round, peak memory bytes, final loss), by variant name."""
    import torch

    from unet_dist.bench import common

    cuda = device.type == "cuda"
    batch = Batch(cfg)
    built = {}
    for v in variants:
        common.log(f"train: building {v.name}")
        step = build_step(cfg, device, v, batch)
        with cudnn_benchmark(v.autotune):
            for _ in range(warmup + (2 if v.compile else 0)):
                step()
        built[v.name] = step
    times, cpu = {v.name: [] for v in variants}, {v.name: [] for v in variants}
    peaks, losses = {v.name: 0 for v in variants}, {}
    for r in range(rounds):
        for v in variants:
            step = built[v.name]
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                others = torch.cuda.memory_allocated(device) - resident_bytes(step)
            t0, c0 = time.perf_counter(), common.cpu_seconds()
            with cudnn_benchmark(v.autotune):
                for _ in range(steps):
                    losses[v.name] = step()
                common.sync(device)
            times[v.name].append(time.perf_counter() - t0)
            cpu[v.name].append(common.cpu_seconds() - c0)
            if cuda:
                peaks[v.name] = max(peaks[v.name], torch.cuda.max_memory_allocated(device) - others)
        common.log(f"train: round {r + 1}/{rounds}: " + ", ".join(
            f"{v.name} {built[v.name].images * steps / times[v.name][-1]:.2f} img/s" for v in variants))
    for v in variants:
        if losses[v.name] is None:  # nosync: read once, after the clock
            losses[v.name] = float(built[v.name].last_loss)
    del built
    if not cuda:
        peaks |= _cpu_peaks(cfg, variants)
    return times, cpu, peaks, losses


def _cpu_peaks(cfg, variants) -> dict:
    """Peak RSS of each variant, each in a child process of its own (bytes above its RSS before the model)."""
    from unet_dist.config import to_dict
    from unet_dist.bench import common

    peaks = {}
    for v in variants:
        common.log(f"train: peak memory of {v.name} (child process)")
        probe = common.run_child("unet_dist.bench.train:memory_probe", {
            "config": to_dict(cfg), "variant": vars(v), "device": "cpu"})
        peaks[v.name] = probe["peak_bytes"] - probe["rss_before_bytes"]
    return peaks


def _row(cfg, v, steps: int, times: list, cpu: list, peak_bytes: int, loss, flops_per_image, peak, cuda: bool) -> dict:
    from unet_dist.bench import common

    images = (cfg.data.batch_size * (1 if v.peer else cfg.train.accumulate)) * steps
    step_s = common.median(times) / steps
    ips = images / steps / step_s
    achieved = ips * flops_per_image
    return {
        "variant": v.name, "role": "peer" if v.peer else "what-if" if not (v.autotune and v.nosync) else "ours",
        "precision": v.precision, "channels_last": v.channels_last, "compile": v.compile,
        "autotune": v.autotune, "nosync": v.nosync,
        "images_per_s": ips, "voxels_per_s": ips * math.prod(cfg.data.patch_size), "step_s": step_s,
        "step_s_rounds": [t / steps for t in times],
        "cpu_s_per_image": common.median(cpu) / images,
        "tflops": achieved / 1e12, "mfu": achieved / peak if peak else None,
        "peak_mem_mb": peak_bytes / common.MB, "peak_mem_kind": "cuda_allocated" if cuda else "rss_child",
        "final_loss": loss,
    }


def _report_config(cfg, device, precision, applied, steps, rounds, warmup, flops_per_image, peak) -> dict:
    import torch

    from unet_dist.config import to_dict

    cuda = device.type == "cuda"
    return {
        "device": str(device), "precision_auto": precision, "overrides": applied,
        "model": to_dict(cfg.model), "patch_size": list(cfg.data.patch_size), "batch_size": cfg.data.batch_size,
        "accumulate": cfg.train.accumulate, "loss": cfg.train.loss, "grad_clip": cfg.train.grad_clip,
        "optimizer": cfg.train.optimizer, "steps": steps, "rounds": rounds, "warmup": warmup,
        "flops_per_image": flops_per_image, "flops_counted": "3 x conv FLOPs of one forward (model.flops_per_forward)",
        "peak_bf16_dense_flops": peak,
        # fp32 on a GPU is not IEEE fp32 for convolutions: torch runs them in TF32 on Ampere+ by default.
        "tf32_convolutions": bool(torch.backends.cudnn.allow_tf32) if cuda else None,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32) if cuda else None,
    }


def _notes(cuda: bool) -> list[str]:
    import torch

    notes = ["voxels/s = images/s x patch voxels; MFU = achieved FLOP/s / the device's bf16 dense peak (null on CPUs)",
             "peak memory: " + ("CUDA allocator peak during the variant's steps, less the other variants' resident "
                                "tensors" if cuda else "peak RSS of a child process building the variant and running "
                                "2 steps, above its RSS before the model was built")]
    if cuda and torch.backends.cudnn.allow_tf32:
        notes.append("fp32 rows (the peer's included) ran their convolutions in TF32 (torch's default, "
                     "torch.backends.cudnn.allow_tf32=True): 10-bit mantissa products, not IEEE fp32")
    return notes

COLUMNS = [("variant", "variant"), ("images_per_s", "images/s"), ("voxels_per_s", "voxels/s"),
           ("step_s", "step s"), ("tflops", "TFLOP/s"), ("mfu", "MFU"), ("peak_mem_mb", "peak MB"),
           ("cpu_s_per_image", "CPU s/img"), ("x_peer", "x peer"), ("x_peer_cpu_time", "x peer CPU")]
