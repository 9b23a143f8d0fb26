"""`bench train`'s two steps: ours (the trainer's step, built from its own pieces) and the peer's
(a plain fp32 eager loop), on one fixed batch. The suite and its variants: bench/train.py."""

from __future__ import annotations

import contextlib
import copy
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from unet_dist.bench.train import Variant


class Batch:
    """One fixed batch in host memory (pinned on GPU machines for ours), as the loader hands it over."""

    def __init__(self, cfg, seed: int = 0):
        import torch

        from unet_dist.model import output_shape

        patch = tuple(cfg.data.patch_size)
        out = output_shape(cfg.model, patch)
        g = torch.Generator().manual_seed(seed)
        n = cfg.data.batch_size
        self.raw = torch.rand((n, cfg.model.in_channels, *patch), generator=g)
        self.label = (torch.rand((n, 1, *out), generator=g) > 0.5).float()
        self.weight = torch.ones((n, 1, *out)) if cfg.train.weight_map else None

    def pinned(self) -> "Batch":
        other = copy.copy(self)
        other.raw, other.label = self.raw.pin_memory(), self.label.pin_memory()
        other.weight = None if self.weight is None else self.weight.pin_memory()
        return other


class OurStep:
    """The trainer's step (train._train's loop body, without DDP and without the data loader)."""

    def __init__(self, cfg, device, variant: Variant, batch: Batch):
        import torch

        from unet_dist import runtime
        from unet_dist.train.state import build_training

        cfg = copy.deepcopy(cfg)
        cfg.train.channels_last, cfg.train.compile = variant.channels_last, variant.compile
        self.cfg, self.device, self.precision = cfg, device, variant.precision
        torch.manual_seed(cfg.train.seed)
        self.model, self.optimizer, self.scheduler = build_training(cfg, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=variant.precision == "fp16")
        self.net = torch.compile(self.model) if cfg.train.compile else self.model
        self.autocast = runtime.autocast(device, variant.precision)
        self.memory_format = (torch.channels_last if cfg.train.channels_last and cfg.model.dims == 2
                              else torch.contiguous_format)
        self.batch = batch.pinned() if device.type == "cuda" else batch
        self.nosync, self.autotune, self.last_loss = variant.nosync, variant.autotune, None
        self.net.train()

    def __call__(self) -> float | None:
        import torch

        from unet_dist.compat.torch_amp import step_if_finite
        from unet_dist.train.step import loss_fn

        cfg, device, accumulate = self.cfg, self.device, self.cfg.train.accumulate
        loss_sum = torch.zeros((), device=device)
        for _ in range(accumulate):
            b = self.batch
            raw = b.raw.to(device, non_blocking=True).contiguous(memory_format=self.memory_format)
            label = b.label.to(device, non_blocking=True)
            weight = b.weight.to(device, non_blocking=True) if b.weight is not None else None
            with self.autocast:
                logits = self.net(raw)
            loss = loss_fn(logits, label, weight, cfg.train.loss) / accumulate
            self.scaler.scale(loss).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf"))
        finite = torch.isfinite(grad_norm) & torch.isfinite(loss_sum)
        if not self.nosync:  # what-if: the host waits for the flag, as the trainer once did
            finite = torch.tensor(bool(finite), device=device)
        if self.precision == "fp16":
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            step_if_finite(self.optimizer, finite)
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if self.nosync:
            self.last_loss = loss_sum
            return None
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return float(loss_sum)

    @property
    def images(self) -> int:
        return self.cfg.data.batch_size * self.cfg.train.accumulate

    def tensors(self):
        return _state_tensors(self.model, self.optimizer)


class PeerStep:
    """The notebook's loop: model.train(), Adam, BCEWithLogitsLoss, fp32 eager, loss.item()."""

    def __init__(self, cfg, device, batch: Batch):
        import torch

        from unet_dist.model import build_model

        torch.manual_seed(cfg.train.seed)
        self.device, self.batch = device, batch
        self.model = build_model(cfg.model).to(device)
        self.model.train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr)
        self.criterion = torch.nn.BCEWithLogitsLoss()
        self.images = cfg.data.batch_size

    def __call__(self) -> float:
        x, y = self.batch.raw.to(self.device), self.batch.label.to(self.device)
        self.optimizer.zero_grad()
        loss = self.criterion(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def tensors(self):
        return _state_tensors(self.model, self.optimizer)


def _state_tensors(model, optimizer):
    import torch

    found = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    found += list(model.buffers())
    for state in optimizer.state.values():
        found += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return found


@contextlib.contextmanager
def cudnn_benchmark(on: bool):
    """cuDNN's autotuner (torch.backends.cudnn.benchmark) for one variant's steps only."""
    import torch

    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def build_step(cfg, device, variant: Variant, batch: Batch):
    return PeerStep(cfg, device, batch) if variant.peer else OurStep(cfg, device, variant, batch)


def resident_bytes(step) -> int:
    return sum(t.numel() * t.element_size() for t in step.tensors() if t.device.type == "cuda")
