"""One optimizer step, and the guard against non-finite losses, kept on the device.

The step never waits for the GPU: the loss, its finiteness and the count of skipped steps stay
device tensors, read once per logging interval (and before validating or checkpointing).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from unet_dist.compat.torch_amp import step_if_finite
from unet_dist.errors import UserError
from unet_dist.train.state import TrainState


class TrainingDiverged(Exception):
    """The loss stayed non-finite: the run stops, its last good checkpoint kept."""


def loss_fn(logits: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None, kind: str,
            valid: torch.Tensor | None = None) -> torch.Tensor:
    """BCE (weighted by `weight`), plus the soft Dice of both classes for "bce_dice".

    Tensors are (B, C, ...): one channel for the membrane target, one per offset for affinities (then
    `valid` is per voxel-channel, 0 where a neighbour lies outside the patch or is unlabelled, and the
    BCE is the mean over valid voxel-channels). The Dice terms are per sample and channel, then averaged.

    `valid` (1 = labelled, 0 = unlabelled; the patch stream's `valid`): unlabelled voxels are in
    neither term. Their BCE is multiplied by 0 and the mean taken over the labelled voxels; the Dice
    sums see prob * valid and label * valid. So neither the loss nor any gradient depends on the
    label of an unlabelled voxel (its logit gets a gradient of exactly 0 from the loss)."""
    logits = logits.float()
    if valid is None:
        loss = F.binary_cross_entropy_with_logits(logits, label, weight=weight)
    else:
        per_voxel = F.binary_cross_entropy_with_logits(logits, label, reduction="none")
        per_voxel = per_voxel * (valid if weight is None else weight * valid)
        loss = per_voxel.sum() / valid.sum().clamp(min=1)
    if kind == "bce_dice":
        prob = torch.sigmoid(logits)
        dims = tuple(range(2, prob.ndim))
        # masked: p, t are 0 on unlabelled voxels and (one - x) is 1 - x on labelled ones, 0 elsewhere
        p, t, one = (prob, label, 1) if valid is None else (prob * valid, label * valid, valid)
        dice_in = (2 * (p * t).sum(dims) + 1) / (p.sum(dims) + t.sum(dims) + 1)
        dice_mem = (2 * ((one - p) * (one - t)).sum(dims) + 1) / ((one - p).sum(dims) + (one - t).sum(dims) + 1)
        loss = loss + 1 - 0.5 * (dice_in + dice_mem).mean()
    return loss


class Health:
    """Non-finite steps counted on the device; read (one host sync) only at logging, validation and
    checkpoints, where a run of `limit` consecutive non-finite steps stops training."""

    def __init__(self, device: torch.device, limit: int, precision: str):
        self.limit, self.precision = limit, precision
        self.run = torch.zeros((), dtype=torch.int64, device=device)  # consecutive non-finite steps now
        self.worst = torch.zeros((), dtype=torch.int64, device=device)  # longest run since the last check
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.last_checkpoint: str | None = None  # named when the run stops

    def update(self, finite: torch.Tensor) -> None:
        bad = (~finite).to(torch.int64)
        self.run = (self.run + 1) * bad
        self.worst = torch.maximum(self.worst, self.run)
        self.skipped = self.skipped + bad

    def check(self, step: int) -> int:
        """Raise TrainingDiverged after a long enough run; returns the skipped steps so far."""
        worst, skipped = (int(v) for v in torch.stack([self.worst, self.skipped]).cpu())
        self.worst = self.run.clone()
        if worst >= self.limit:
            raise TrainingDiverged(
                f"loss was non-finite for {worst} consecutive steps (seen at step {step}); stopping. "
                f"Last good checkpoint: {self.last_checkpoint or 'none'}. Lower train.lr"
                + (" or try train.precision=fp32" if self.precision != "fp32" else ""))
        return skipped


class TrainStep:
    """`train_step(next_batch)`: `accumulate` micro-batches, gradients all-reduced once (on the last),
    clipped, and an optimizer step unless they are not finite. Returns (finite, loss, grad norm) as
    device tensors."""

    def __init__(self, state: TrainState, net: torch.nn.Module, ddp: bool, device: torch.device, precision: str,
                 autocast_ctx, memory_format):
        self.state, self.net, self.ddp, self.device, self.precision = state, net, ddp, device, precision
        self.autocast, self.memory_format = autocast_ctx, memory_format

    def __call__(self, next_batch: Callable[[], dict]):
        state, cfg = self.state, self.state.cfg.train
        accumulate = cfg.accumulate
        loss_sum = torch.zeros((), device=self.device)
        # Every micro-batch is in hand before the first forward, so a batch wait that ends the run
        # (train/batch_wait.py) leaves the model, BatchNorm statistics included, as the last step did.
        batches = []
        for _ in range(accumulate):
            batches.append(next_batch())
            if "error" in batches[-1]:  # a damaged or invalid store, found by a loader worker
                raise UserError(batches[-1]["error"])
        for micro, batch in enumerate(batches):
            raw = batch["raw"].to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            label = batch["label"].to(self.device, non_blocking=True)
            weight = batch["weight"].to(self.device, non_blocking=True) if "weight" in batch else None
            valid = batch["valid"].to(self.device, non_blocking=True) if "valid" in batch else None
            last = micro == accumulate - 1
            sync = contextlib.nullcontext() if (not self.ddp or last) else self.net.no_sync()
            with sync:
                with self.autocast:
                    logits = self.net(raw)
                loss = loss_fn(logits, label, weight, cfg.loss, valid) / accumulate
                state.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        state.scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            state.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        # Gradients are identical on every rank after the all-reduce, so all ranks agree here.
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss_sum)
        if self.precision == "fp16":
            state.scaler.step(state.optimizer)  # skips the step itself when the unscaled gradients are not finite
            state.scaler.update()
        else:
            step_if_finite(state.optimizer, finite)
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        state.step += 1
        return finite, loss_sum, grad_norm
