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
from .data.store import read_region
from .data.volumes import open_training
from .errors import UserError
from .infer import forward_tiles
from .metrics import confusion_counts, scores_from_confusion
from .model import build_model, check_patch_shape, output_shape
from .monitor import Monitor, NullMonitor
from .predict import as_slices, assign, block_core, input_region, make_plan, read_mirrored


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
    patch = tuple(cfg.data.patch_size)
    raw, _, _, _ = open_training(cfg.data.store, cfg.data.raw_array, cfg.data.labels,
                                 (1, *patch) if len(patch) == 2 else patch, cfg.data.max_files_per_patch)
    shape = tuple(raw.shape)
    depth = shape[0]
    for key in ("train_slices", "val_slices"):
        lo, hi = getattr(cfg.data, key)
        if hi > depth:
            raise UserError(f"data.{key}: [{lo}, {hi}) is outside the store's {depth} slices ({cfg.data.store})")
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


def validate(model, cfg: Config, device, autocast_ctx, want_panel: bool,
             memory_format=torch.contiguous_format):
    """The validation slices through the predictor's tiling: blocks of `predict.block_size` with their
    context (mirrored at the volume's borders), `predict.batch_size` tiles per forward pass, blocks
    spread over ranks and confusion counts summed, so N ranks report what one would and what
    `unet-dist predict` reports. Memory depends on the block, never on the slice or the 3D band.
    The panel (raw | label | prediction) is rank 0's first block (its middle slice in 3D)."""
    raw_arr, label_arr, _, _ = open_training(cfg.data.store, cfg.data.raw_array, cfg.data.labels)
    lo, hi = cfg.data.val_slices
    plan = make_plan(cfg.model, cfg.predict, raw_arr.shape, (lo, hi))
    offset = plan.offset[1:] if plan.dims == 2 else plan.offset
    batch = cfg.predict.batch_size
    counts = np.zeros(4, dtype=np.int64)
    panel = None
    model.eval()
    for index in assign(range(plan.n_blocks), dist.rank(), dist.world_size()):
        core = block_core(plan, index)
        shape = tuple(b - a for a, b in core)
        tiles = to_unit_float(read_mirrored(raw_arr, input_region(plan, core)))
        tiles = tiles if plan.dims == 2 else tiles[None]
        out = np.concatenate([forward_tiles(model, tiles[i:i + batch], device, autocast_ctx, memory_format)
                              for i in range(0, len(tiles), batch)])
        crop = (slice(None),) + tuple(slice(o, o + n) for o, n in zip(offset, shape[3 - len(offset):]))
        prob = out[crop].reshape(shape)
        stored = ((core[0][0] + lo, core[0][1] + lo), *core[1:])  # output slice z is input slice lo + z
        label = read_region(label_arr, as_slices(stored))
        counts += confusion_counts(prob, label, cfg.predict.threshold)
        if want_panel and panel is None:
            raw = to_unit_float(read_region(raw_arr, as_slices(stored)))
            mid = shape[0] // 2
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


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> str | None:
    """Load a checkpoint's loss-scaler state. A run that switches to fp16 on resume comes from a
    checkpoint of a disabled scaler (bf16 or fp32: an empty state), which GradScaler refuses to load:
    it starts a fresh loss scale instead and says so."""
    if scaler.is_enabled() and not saved:
        return ("the checkpoint was not trained in fp16 (no loss-scaler state): fp16 continues with a "
                "fresh loss scale")
    scaler.load_state_dict(saved)
    return None


def deterministic_problem(cfg: Config, device_type: str) -> str | None:
    """train.deterministic on a GPU needs a deterministic backward for every layer; torch raises at the
    first step for those CUDA lacks (torch.use_deterministic_algorithms lists them): interpolation
    (model.upsample=interp) and 3D max pooling (every 3D model)."""
    if not (cfg.train.deterministic and device_type == "cuda"):
        return None
    if cfg.model.upsample == "interp":
        return ("train.deterministic: model.upsample=interp has no deterministic CUDA backward; use "
                "model.upsample=transpose, or train.deterministic=false")
    if cfg.model.dims == 3:
        return ("train.deterministic: 3D max pooling (model.dims=3) has no deterministic CUDA backward; "
                "set train.deterministic=false")
    return None


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """optimizer.step() only where `finite` (a 0-d bool tensor) holds.

    A fused optimizer (Adam on GPUs) takes the decision on the device, through the `found_inf` input
    GradScaler feeds it: the host never waits for the GPU to learn the answer. Others read the flag
    (on a CPU that costs nothing)."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = (~finite).to(torch.float32)
        optimizer.grad_scale = None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif bool(finite):
        optimizer.step()


class Health:
    """Non-finite steps counted on the device; read (one host sync) only at logging, validation and
    checkpoints, where a run of `limit` consecutive non-finite steps stops training."""

    def __init__(self, device: torch.device, limit: int):
        self.limit = limit
        self.run = torch.zeros((), dtype=torch.int64, device=device)  # consecutive non-finite steps now
        self.worst = torch.zeros((), dtype=torch.int64, device=device)  # longest run since the last check
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)

    def update(self, finite: torch.Tensor) -> None:
        bad = (~finite).to(torch.int64)
        self.run = (self.run + 1) * bad
        self.worst = torch.maximum(self.worst, self.run)
        self.skipped = self.skipped + bad

    def check(self, step: int, last_ckpt, precision: str) -> int:
        """Raise TrainingDiverged after a long enough run; returns the skipped steps so far."""
        worst, skipped = (int(v) for v in torch.stack([self.worst, self.skipped]).cpu())
        self.worst = self.run.clone()
        if worst >= self.limit:
            raise TrainingDiverged(
                f"loss was non-finite for {worst} consecutive steps (seen at step {step}); stopping. "
                f"Last good checkpoint: {last_ckpt or 'none'}. Lower train.lr"
                + (" or try train.precision=fp32" if precision != "fp32" else ""))
        return skipped


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
    if cfg.train.deterministic:
        dist.make_deterministic()  # before CUDA is first used (cuBLAS reads its setting then)
    device = dist.choose_device(cfg.train.device, env.local_rank, env.local_world_size)
    precision = dist.resolve_precision(cfg.train.precision, device)
    if cfg.train.sync_batchnorm and device.type != "cuda" and env.world_size > 1:
        raise UserError("train.sync_batchnorm: SyncBatchNorm runs on GPUs only; set it false on the CPU")
    if problem := deterministic_problem(cfg, device.type):
        raise UserError(problem)
    dist.tune_for_fixed_shapes(device)
    _, label_crop = check_inputs(cfg)
    state = _resume_state(cfg, resume)
    if state is not None and state["model_config"] != to_dict(cfg.model):
        raise UserError(f"{cfg.run.dir}: checkpoint was trained with another model config; "
                        "use the same model.* settings or another run.dir")
    with dist.process_group(env, device, cfg.train.dist_timeout_s):
        return _train(cfg, env, device, precision, label_crop, state)


def _train(cfg, env, device, precision, label_crop, state) -> TrainResult:
    torch.manual_seed(cfg.train.seed)
    run_dir = Path(cfg.run.dir)
    model, optimizer, scheduler = build_training(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step, best, notes = 0, -1.0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        notes.append(restore_scaler(scaler, state.get("scaler") or {}))
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
        for note in filter(None, notes):
            monitor.message(f"note: {note}")
    else:
        monitor = NullMonitor()

    accumulate = cfg.train.accumulate
    spec = PatchSpec(store=cfg.data.store, z_range=tuple(cfg.data.train_slices), patch_size=tuple(cfg.data.patch_size),
                     label_crop=label_crop, batch_size=cfg.data.batch_size, seed=cfg.train.seed, rank=env.rank,
                     weight_map=cfg.train.weight_map, weight_map_w0=cfg.train.weight_map_w0,
                     weight_map_sigma=cfg.train.weight_map_sigma,
                     holdout=tuple(cfg.data.holdout_slices) or None, raw_array=cfg.data.raw_array,
                     labels=cfg.data.labels)
    loader = make_loader(PatchStream(spec, cfg.data.augment, start_batch=step * accumulate),
                         dist.loader_workers(cfg.data.num_workers, env), cfg.data.start_method, pin_memory=device.type == "cuda",
                         prefetch_factor=cfg.data.prefetch_factor, worker_init_fn=_ignore_stop_signals)
    batches = iter(loader)
    stop = StopFlag()
    autocast_ctx = dist.autocast(device, precision)
    memory_format = ((torch.channels_last if cfg.model.dims == 2 else torch.channels_last_3d)
                     if cfg.train.channels_last else torch.contiguous_format)
    voxels_per_image = int(np.prod(cfg.data.patch_size))
    images_per_step = cfg.data.batch_size * accumulate * dist.world_size()
    # The step never waits for the GPU: loss, finiteness and skipped steps stay on the device and
    # are read once per logging interval (and before validating or checkpointing).
    health = Health(device, cfg.train.max_nonfinite_steps)
    window = _Window(device)
    last_ckpt, val_metrics = None, {}
    status = "completed"

    def save(at_step: int, is_best: bool = False):
        health.check(at_step, last_ckpt, precision)  # never checkpoint past a divergence
        if main:
            path = str(checkpoint.save(run_dir / "checkpoints", _state(
                at_step, model, optimizer, scheduler, scaler, cfg, at_step * accumulate, monitor.run_id, best),
                cfg.train.keep_last, is_best))
            monitor.log_checkpoint(path, at_step, ["latest", f"step-{at_step}"] + (["best"] if is_best else []))
            return path
        return None

    net.train()
    while step < cfg.train.steps:
        if dist.any_rank(stop.signal_name is not None):  # host values only: no wait for the GPU
            monitor.message(f"stop signal received: checkpointing at step {step} and exiting; "
                            "run again with --resume auto to continue")
            last_ckpt = save(step)
            dist.barrier()
            status = "interrupted"
            break
        loss_sum = torch.zeros((), device=device)
        for micro in range(accumulate):
            w0 = time.perf_counter()
            batch = next(batches)
            window.wait += time.perf_counter() - w0
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
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss_sum)
        if precision == "fp16":
            scaler.step(optimizer)  # skips the step itself when the unscaled gradients are not finite
            scaler.update()
        else:
            step_if_finite(optimizer, finite)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        health.update(finite)
        window.add(torch.where(finite, loss_sum, torch.zeros_like(loss_sum)))

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            skipped = health.check(step, last_ckpt, precision)
            monitor.log(step, _train_metrics(window, images_per_step, voxels_per_image, scheduler, skipped,
                                             float(grad_norm), device))
            window = _Window(device)
        if step % cfg.train.val_every == 0 or step == cfg.train.steps:
            with window.paused():
                health.check(step, last_ckpt, precision)  # every rank: they stop together
                dist.broadcast_buffers(model)
                val_metrics, panel = validate(model, cfg, device, autocast_ctx, want_panel=main and cfg.logging.images,
                                              memory_format=memory_format)
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
            with window.paused():
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


class _Window:
    """One logging interval: wall time (less validation and checkpoints), time waiting for data, and
    the loss summed on the device."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.wait, self.excluded, self.steps = device, time.perf_counter(), 0.0, 0.0, 0
        self.loss = torch.zeros((), device=device)

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    @contextlib.contextmanager
    def paused(self):
        """Time spent in here (validation, checkpoints) is not training throughput."""
        _synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0

    def seconds(self) -> float:
        _synchronize(self.device)  # the steps queued on the GPU belong to this window
        return time.perf_counter() - self.start - self.excluded


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_metrics(window: _Window, images_per_step, voxels_per_image, scheduler, skipped, grad_norm,
                   device) -> dict:
    steps = max(1, window.steps)
    total = window.seconds()
    # Per-rank loader starvation: every rank's wait fraction, gathered as a one-hot sum.
    fractions = np.zeros(dist.world_size())
    fractions[dist.rank()] = min(1.0, window.wait / total) if total > 0 else 0.0
    fractions = dist.all_reduce_sum(fractions)
    images_per_s = images_per_step * steps / total if total > 0 else 0.0
    values = {
        "train/loss": float(window.loss) / steps,
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
