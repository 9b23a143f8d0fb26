"""The training loop. It reads like single-process code; `dist` hides the ranks.

Order matters for a distributed job: everything a user can get wrong (config, store, slice ranges,
patch size) is checked on every rank BEFORE the process group exists, so a mistake ends every
rank with the same one-line error instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint, dist
from .config import Config, dump_yaml, to_dict
from .data.patches import PatchSpec, PatchStream, make_loader, patch_z_starts, to_unit_float
from .data.store import RAW, TARGET_PATH, open_store, read_region
from .errors import UserError
from .infer import forward_whole
from .metrics import confusion_counts, scores_from_confusion
from .model import build_model, check_patch_shape, output_shape
from .monitor import Monitor, NullMonitor


class TrainingDiverged(Exception):
    """The loss stayed non-finite: the run stops, its last good checkpoint kept."""


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


@dataclass
class TrainResult:
    step: int
    status: str  # completed | interrupted
    metrics: dict
    checkpoint: str | None
    main: bool = True  # rank 0, the one that reports


def check_inputs(cfg: Config) -> tuple[tuple[int, int, int], tuple[int, ...]]:
    """Every user-fixable problem, before any process group; returns volume shape, label crop."""
    group = open_store(cfg.data.store, arrays=(RAW, TARGET_PATH))
    shape = tuple(group[RAW].shape)
    if tuple(group[TARGET_PATH].shape) != shape:
        raise UserError(f"{cfg.data.store}: raw {shape} and labels {tuple(group[TARGET_PATH].shape)} differ in shape")
    depth = shape[0]
    for key in ("train_slices", "val_slices"):
        lo, hi = getattr(cfg.data, key)
        if hi > depth:
            raise UserError(f"data.{key}: [{lo}, {hi}) is outside the store's {depth} slices ({cfg.data.store})")
    patch = tuple(cfg.data.patch_size)
    check_patch_shape(cfg.model, patch)
    full = (1, *patch) if len(patch) == 2 else patch
    lo, hi = cfg.data.train_slices
    limits = (hi - lo, shape[1], shape[2])
    holdout = tuple(cfg.data.holdout_slices) or None
    if any(p > n for p, n in zip(full, limits)) or not len(patch_z_starts((lo, hi), full[0], holdout)):
        raise UserError(f"data.patch_size: {list(patch)} does not fit in the training volume "
                        f"({limits[0]} slices of {limits[1]} x {limits[2]}"
                        + (f", without slices {list(holdout)})" if holdout else ")"))
    out = output_shape(cfg.model, patch)
    crop = tuple((p - o) // 2 for p, o in zip(patch, out))
    checkpoint.check_writable(Path(cfg.run.dir) / "checkpoints")  # last: nothing is created for a mistake
    return shape, crop


def lr_factor(step: int, cfg) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def loss_fn(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None, kind: str) -> torch.Tensor:
    logits = logits.float()
    loss = F.binary_cross_entropy_with_logits(logits, label, weight=weight)
    if kind == "bce_dice":
        prob = torch.sigmoid(logits)
        dims = tuple(range(1, prob.ndim))
        dice_in = (2 * (prob * label).sum(dims) + 1) / (prob.sum(dims) + label.sum(dims) + 1)
        dice_mem = (2 * ((1 - prob) * (1 - label)).sum(dims) + 1) / ((1 - prob).sum(dims) + (1 - label).sum(dims) + 1)
        loss = loss + 1 - 0.5 * (dice_in + dice_mem).mean()
    return loss


class StopFlag:
    """Signal handlers only set a flag; the loop acts on it at a step boundary (saving inside a
    handler can deadlock with the collectives and the DataLoader)."""

    def __init__(self):
        self.signal_name: str | None = None
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name


def _ignore_stop_signals(worker_id: int) -> None:
    # SLURM signals every process of a step; workers must leave the decision to the main process.
    for name in STOP_SIGNALS + ("SIGINT",):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


def build_training(cfg: Config, device: torch.device):
    model = build_model(cfg.model)
    if cfg.train.sync_batchnorm and dist.world_size() > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last if cfg.model.dims == 2 else torch.channels_last_3d)
    opt_cls = torch.optim.AdamW if cfg.train.optimizer == "adamw" else torch.optim.Adam
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = opt_cls(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.train))
    return model, optimizer, scheduler


def validate(model, cfg: Config, device, autocast_ctx, want_panel: bool):
    """Whole validation slices spread over ranks; confusion counts summed, so N ranks = 1 rank."""
    group = open_store(cfg.data.store, arrays=(RAW, TARGET_PATH))
    lo, hi = cfg.data.val_slices
    counts = np.zeros(4, dtype=np.int64)
    panel = None
    model.eval()
    if cfg.model.dims == 2:
        for z in range(lo + dist.rank(), hi, dist.world_size()):
            raw = to_unit_float(read_region(group[RAW], (slice(z, z + 1),))[0])
            label = read_region(group[TARGET_PATH], (slice(z, z + 1),))[0]
            prob = forward_whole(model, cfg.model, raw[None], device, autocast_ctx)[0]
            counts += confusion_counts(prob, label, cfg.predict.threshold)
            if want_panel and panel is None:
                panel = (raw, label, prob)
    else:
        # 3D: the validation sub-volume cut into bands along y, one per rank, counted on the cores.
        rows = np.array_split(np.arange(group[RAW].shape[1]), dist.world_size())[dist.rank()]
        if len(rows):
            band = (slice(lo, hi), slice(rows[0], rows[-1] + 1))
            raw = to_unit_float(read_region(group[RAW], band))
            label = read_region(group[TARGET_PATH], band)
            prob = forward_whole(model, cfg.model, raw[None], device, autocast_ctx)[0]
            counts += confusion_counts(prob, label, cfg.predict.threshold)
            if want_panel:
                mid = (hi - lo) // 2
                panel = (raw[mid], label[mid], prob[mid])
    model.train()
    scores = scores_from_confusion(dist.all_reduce_sum(counts))
    return {f"val/{k}": float(v) for k, v in scores.items()}, panel


def _state(step, model, optimizer, scheduler, scaler, cfg, batch_index, run_id, best) -> dict:
    return {
        "model": model.state_dict(),
        "model_config": to_dict(cfg.model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        "sampler": {"batch_index": batch_index, "rank_streams": dist.world_size()},
        "rng": {"torch": torch.get_rng_state()},
        "config": to_dict(cfg),
        "wandb_run_id": run_id or "",
        "best": best,
    }


def _resume_state(cfg: Config, resume: str) -> dict | None:
    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    if resume == "never":
        if checkpoint.list_steps(ckpt_dir):
            raise UserError(f"{ckpt_dir}: holds checkpoints of an earlier run; pass --resume auto "
                            "to continue it, or choose another run.dir")
        return None
    if resume == "auto":
        found = checkpoint.load_latest(ckpt_dir)
        return found[0] if found else None
    return checkpoint.load(Path(resume))


def train(cfg: Config, resume: str = "never") -> TrainResult:
    env = dist.detect_env()
    device = dist.choose_device(cfg.train.device, env.local_rank)
    precision = dist.resolve_precision(cfg.train.precision, device)
    if cfg.train.sync_batchnorm and device.type != "cuda" and env.world_size > 1:
        raise UserError("train.sync_batchnorm: SyncBatchNorm runs on GPUs only; set it false on the CPU")
    _, label_crop = check_inputs(cfg)
    state = _resume_state(cfg, resume)
    if state is not None and state["model_config"] != to_dict(cfg.model):
        raise UserError(f"{cfg.run.dir}: checkpoint was trained with another model config; "
                        "use the same model.* settings or another run.dir")
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    with dist.process_group(env, device, cfg.train.dist_timeout_s):
        return _train(cfg, env, device, precision, label_crop, state)


def _train(cfg, env, device, precision, label_crop, state) -> TrainResult:
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.run.dir)
    model, optimizer, scheduler = build_training(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step, best = 0, -1.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        step, best = int(state["step"]), float(state.get("best", -1.0))
    ddp = dist.world_size() > 1
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else model
    if cfg.train.compile:
        net = torch.compile(net)

    main = dist.is_main()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        monitor = Monitor(run_dir, cfg, step, (state or {}).get("wandb_run_id") or None)
        monitor.message(f"training {cfg.train.steps} steps on {dist.world_size()} rank(s), device {device.type}, "
                        f"precision {precision}" + (f", resumed at step {step}" if step else ""))
    else:
        monitor = NullMonitor()

    accumulate = cfg.train.accumulate
    spec = PatchSpec(store=cfg.data.store, z_range=tuple(cfg.data.train_slices), patch_size=tuple(cfg.data.patch_size),
                     label_crop=label_crop, batch_size=cfg.data.batch_size, seed=cfg.train.seed, rank=env.rank,
                     weight_map=cfg.train.weight_map, weight_map_w0=cfg.train.weight_map_w0,
                     weight_map_sigma=cfg.train.weight_map_sigma,
                     holdout=tuple(cfg.data.holdout_slices) or None)
    loader = make_loader(PatchStream(spec, cfg.data.augment, start_batch=step * accumulate),
                         cfg.data.num_workers, cfg.data.start_method, pin_memory=device.type == "cuda",
                         prefetch_factor=cfg.data.prefetch_factor, worker_init_fn=_ignore_stop_signals)
    batches = iter(loader)
    stop = StopFlag()
    autocast_ctx = dist.autocast(device, precision)
    memory_format = torch.channels_last if cfg.train.channels_last and cfg.model.dims == 2 else torch.contiguous_format
    voxels_per_image = int(np.prod(cfg.data.patch_size))
    images_per_step = cfg.data.batch_size * accumulate * dist.world_size()
    window = {"wait": 0.0, "compute": 0.0, "loss": 0.0, "steps": 0}
    skipped_total, nonfinite_run, last_ckpt, val_metrics = 0, 0, None, {}
    status = "completed"

    def save(at_step: int, is_best: bool = False):
        if main:
            path = str(checkpoint.save(run_dir / "checkpoints", _state(
                at_step, model, optimizer, scheduler, scaler, cfg, at_step * accumulate, monitor.run_id, best),
                cfg.train.keep_last, is_best))
            monitor.log_checkpoint(path, at_step, ["latest", f"step-{at_step}"] + (["best"] if is_best else []))
            return path
        return None

    net.train()
    while step < cfg.train.steps:
        if dist.any_rank(stop.signal_name is not None):
            monitor.message(f"stop signal received: checkpointing at step {step} and exiting; "
                            "run again with --resume auto to continue")
            last_ckpt = save(step)
            dist.barrier()
            status = "interrupted"
            break
        t0 = time.perf_counter()
        wait = 0.0
        loss_sum = torch.zeros((), device=device)
        for micro in range(accumulate):
            w0 = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - w0
            if "error" in batch:  # a damaged or invalid store, found by a loader worker
                raise UserError(batch["error"])
            raw = batch["raw"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            label = batch["label"].to(device, non_blocking=True)
            weight = batch["weight"].to(device, non_blocking=True) if "weight" in batch else None
            sync = contextlib.nullcontext() if (not ddp or micro == accumulate - 1) else net.no_sync()
            with sync:  # gradients all-reduce once, on the last micro-batch
                with autocast_ctx:
                    logits = net(raw)
                loss = loss_fn(logits, label, weight, cfg.train.loss) / accumulate
                scaler.scale(loss).backward()
            loss_sum += loss.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            model.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf"))
        # Gradients are identical on every rank after the all-reduce, so all ranks agree here.
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss_sum))
        if precision == "fp16":
            scale_before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            finite = finite and scaler.get_scale() >= scale_before
        elif finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        if finite:
            nonfinite_run = 0
        else:
            skipped_total += 1
            nonfinite_run += 1
            if nonfinite_run >= cfg.train.max_nonfinite_steps:
                raise TrainingDiverged(
                    f"loss was non-finite for {nonfinite_run} consecutive steps (at step {step}); stopping. "
                    f"Last good checkpoint: {last_ckpt or 'none'}. Lower train.lr"
                    + (" or try train.precision=fp32" if precision != "fp32" else ""))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        window["wait"] += wait
        window["compute"] += elapsed - wait
        window["loss"] += float(loss_sum) if finite else 0.0
        window["steps"] += 1

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            monitor.log(step, _train_metrics(window, images_per_step, voxels_per_image, scheduler, skipped_total,
                                             float(grad_norm), device))
            window = {"wait": 0.0, "compute": 0.0, "loss": 0.0, "steps": 0}
        if step % cfg.train.val_every == 0 or step == cfg.train.steps:
            dist.broadcast_buffers(model)
            val_metrics, panel = validate(model, cfg, device, autocast_ctx, want_panel=main and cfg.logging.images)
            val_metrics["val/replica_spread"] = dist.replica_spread(model)
            monitor.log(step, val_metrics)
            if panel is not None:
                monitor.log_images(step, *panel, cfg.predict.threshold)
            is_best = val_metrics["val/dice_membrane"] > best
            best = max(best, val_metrics["val/dice_membrane"])
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
                last_ckpt = save(step, is_best) or last_ckpt
            elif is_best and main:
                path = checkpoint.save_best(run_dir / "checkpoints", _state(
                    step, model, optimizer, scheduler, scaler, cfg, step * accumulate, monitor.run_id, best))
                monitor.log_checkpoint(path, step, ["best", f"step-{step}"])
        elif step % cfg.train.ckpt_every == 0:
            last_ckpt = save(step) or last_ckpt

    result = TrainResult(step=step, status=status, metrics=val_metrics, checkpoint=last_ckpt, main=main)
    if main:
        # Launchers (sbatch scripts, submitit) read this to decide between requeue and done; it is
        # written before W&B closes, which can be slow or fail on a node that is being shut down.
        _write_json_atomic(run_dir / "status.json", {"status": status, "step": step, "total_steps": cfg.train.steps,
                                                      "checkpoint": last_ckpt, "metrics": val_metrics})
    monitor.close()
    return result


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _train_metrics(window, images_per_step, voxels_per_image, scheduler, skipped, grad_norm, device) -> dict:
    steps = max(1, window["steps"])
    total = window["wait"] + window["compute"]
    # Per-rank loader starvation: every rank's wait fraction, gathered as a one-hot sum.
    fractions = np.zeros(dist.world_size())
    fractions[dist.rank()] = window["wait"] / total if total > 0 else 0.0
    fractions = dist.all_reduce_sum(fractions)
    images_per_s = images_per_step * steps / total if total > 0 else 0.0
    values = {
        "train/loss": window["loss"] / steps,
        "train/lr": scheduler.get_last_lr()[0],
        "train/images_per_s": images_per_s,
        "train/voxels_per_s": images_per_s * voxels_per_image,
        "train/data_wait_frac": float(fractions.mean()),
        "train/data_wait_frac_max": float(fractions.max()),
        "train/step_time_s": total / steps,
        "train/skipped_steps": skipped,
        "train/grad_norm": grad_norm,
    }
    if device.type == "cuda":
        values["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return values
