"""What training state is: the model, optimizer, scheduler, loss scaler, step and best validation
score, built from the config, saved as one checkpoint dict and loaded back from one."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from unet_dist import dist
from unet_dist.config import Config, to_dict
from unet_dist.data.intensity import NORMALISATION
from unet_dist.model import build_model


def lr_factor(step: int, cfg) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio`."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def build_training(cfg: Config, device: torch.device):
    """(model, optimizer, scheduler) as the config says, on `device`."""
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


def restore_scaler(scaler: torch.amp.GradScaler, saved: dict) -> str | None:
    """Load a checkpoint's loss-scaler state. A run that switches to fp16 on resume comes from a
    checkpoint of a disabled scaler (bf16 or fp32: an empty state), which GradScaler refuses to load:
    it starts a fresh loss scale instead and says so."""
    if scaler.is_enabled() and not saved:
        return ("the checkpoint was not trained in fp16 (no loss-scaler state): fp16 continues with a "
                "fresh loss scale")
    scaler.load_state_dict(saved)
    return None


@dataclass
class TrainState:
    cfg: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    step: int = 0
    best: float = -1.0  # best validation score so far (validation.best_score)
    # affinities: the merge threshold of lowest VOI on the validation split at the best validation
    # (-1: none); predict passes it on to the prediction store, where `segment` takes it
    segment_threshold: float = -1.0
    run_id: str | None = None  # the W&B run a resumed run continues

    @classmethod
    def build(cls, cfg: Config, device: torch.device, precision: str) -> "TrainState":
        torch.manual_seed(cfg.train.seed)
        model, optimizer, scheduler = build_training(cfg, device)
        return cls(cfg, model, optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=precision == "fp16"))

    def state_dict(self) -> dict:
        """The checkpoint: everything needed to continue exactly (the sampler position is the step)."""
        return {
            "model": self.model.state_dict(),
            "model_config": to_dict(self.cfg.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "sampler": {"batch_index": self.step * self.cfg.train.accumulate, "rank_streams": dist.world_size()},
            "rng": {"torch": torch.get_rng_state()},
            "config": to_dict(self.cfg),
            "wandb_run_id": self.run_id or "",
            "best": self.best,
            "segment_threshold": self.segment_threshold,
            "normalisation": NORMALISATION,  # what the inputs were scaled to (data/intensity.py)
        }

    def load_state_dict(self, saved: dict) -> list[str]:
        """Continue from a checkpoint; returns notes for the log."""
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        notes = [restore_scaler(self.scaler, saved.get("scaler") or {})]
        torch.set_rng_state(saved["rng"]["torch"])
        self.step, self.best = int(saved["step"]), float(saved.get("best", -1.0))
        self.segment_threshold = float(saved.get("segment_threshold", -1.0))
        self.run_id = saved.get("wandb_run_id") or None
        return [n for n in notes if n]
