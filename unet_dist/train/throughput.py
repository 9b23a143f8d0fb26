"""Training throughput and loss, logged once per `train.log_every` steps: the only place the loop's
device values are read back (one host sync per interval)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch

from unet_dist import dist
from unet_dist.train.step import Health


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Window:
    """One logging interval: wall time (less validation and checkpoints), time waiting for data, and
    the loss summed on the device."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.wait, self.excluded, self.steps = device, time.perf_counter(), 0.0, 0.0, 0
        self.loss = torch.zeros((), device=device)

    def seconds(self) -> float:
        synchronize(self.device)  # the steps queued on the GPU belong to this window
        return time.perf_counter() - self.start - self.excluded


class ThroughputLog:
    def __init__(self, cfg, device: torch.device, monitor, health: Health):
        self.cfg, self.device, self.monitor, self.health = cfg, device, monitor, health
        self.images_per_step = cfg.data.batch_size * cfg.train.accumulate * dist.world_size()
        self.voxels_per_image = int(np.prod(cfg.data.patch_size))
        self.window = _Window(device)

    def timed(self, batches: Iterator[dict]) -> Callable[[], dict]:
        """`next(batches)`, with the time spent waiting for the loader counted."""
        def next_batch() -> dict:
            t0 = time.perf_counter()
            batch = next(batches)
            self.window.wait += time.perf_counter() - t0
            return batch
        return next_batch

    @contextlib.contextmanager
    def paused(self):
        """Time spent in here (validation, checkpoints) is not training throughput."""
        synchronize(self.device)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.window.excluded += time.perf_counter() - t0

    def add(self, loss: torch.Tensor, finite: torch.Tensor) -> None:
        self.window.loss += torch.where(finite, loss, torch.zeros_like(loss))
        self.window.steps += 1

    def maybe_log(self, step: int, scheduler, grad_norm: torch.Tensor) -> None:
        if step % self.cfg.train.log_every and step != self.cfg.train.steps:
            return
        skipped = self.health.check(step)
        self.monitor.log(step, self._metrics(scheduler, skipped, float(grad_norm)))
        self.window = _Window(self.device)

    def _metrics(self, scheduler, skipped: int, grad_norm: float) -> dict:
        window = self.window
        steps = max(1, window.steps)
        total = window.seconds()
        # Per-rank loader starvation: every rank's wait fraction, gathered as a one-hot sum.
        fractions = np.zeros(dist.world_size())
        fractions[dist.rank()] = min(1.0, window.wait / total) if total > 0 else 0.0
        fractions = dist.all_reduce_sum(fractions)
        images_per_s = self.images_per_step * steps / total if total > 0 else 0.0
        values = {
            "train/loss": float(window.loss) / steps,
            "train/lr": scheduler.get_last_lr()[0],
            "train/images_per_s": images_per_s,
            "train/voxels_per_s": images_per_s * self.voxels_per_image,
            "train/data_wait_frac": float(fractions.mean()),
            "train/data_wait_frac_max": float(fractions.max()),
            "train/step_time_s": total / steps,
            "train/skipped_steps": skipped,
            "train/grad_norm": grad_norm,
        }
        if self.device.type == "cuda":
            values["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return values
