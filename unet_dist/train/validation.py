"""Validation during training: the validation slices (of every volume) through the predictor's tiling, every
`train.val_every` steps and at the last, logged with images, best score kept."""

from __future__ import annotations

import numpy as np
import torch

from unet_dist import dist
from unet_dist.config import Config
from unet_dist.data.patches import to_unit_float
from unet_dist.data.damaged_chunks import read_region
from unet_dist.data.training_set import Volume, volumes_of
from unet_dist.data.volumes import open_ignore, open_training
from unet_dist.predict.infer import block_probability
from unet_dist.metrics import confusion_counts, scores_from_confusion
from unet_dist.predict.block_plan import as_slices, assign, make_plan
from unet_dist.train.state import TrainState
from unet_dist.train.step import Health


def validate(model, cfg: Config, device, autocast_ctx, want_panel: bool,
             memory_format=torch.contiguous_format):
    """The validation slices of every volume through the predictor's tiling: blocks of
    `predict.block_size` with their context (mirrored at the volume's borders), `predict.batch_size`
    tiles per forward pass, the blocks of all volumes spread over ranks and confusion counts summed,
    so N ranks report what one would and what `unet-dist predict` reports. Memory depends on the
    block, never on the slice or the 3D band. With several volumes, each is reported as
    `val/<name>/...` and `val/...` pools their voxels. The panel (raw, label, prediction, labelled voxels
    or None) is rank 0's first block (its middle slice in 3D)."""
    volumes = [_ValidationVolume(v, cfg) for v in volumes_of(cfg.data) if v.val_slices]
    work = [(i, block) for i, vol in enumerate(volumes) for block in range(vol.plan.n_blocks)]
    counts = np.zeros((len(volumes), 4), dtype=np.int64)
    panel = None
    model.eval()
    for i, index in assign(work, dist.rank(), dist.world_size()):
        prob, label, valid, stored = volumes[i].block(model, index, cfg.predict.batch_size, device, autocast_ctx,
                                                      memory_format)
        counts[i] += confusion_counts(prob, label, cfg.predict.threshold, valid)
        if want_panel and panel is None:
            raw = to_unit_float(read_region(volumes[i].raw, as_slices(stored)))
            mid = prob.shape[0] // 2
            panel = (raw[mid], label[mid], prob[mid], None if valid is None else valid[mid])
    model.train()
    counts = dist.all_reduce_sum(counts)
    metrics = {f"val/{k}": float(v) for k, v in scores_from_confusion(counts.sum(axis=0)).items()}
    if cfg.data.volumes:
        for vol, vol_counts in zip(volumes, counts):
            metrics.update({f"val/{vol.volume.name}/{k}": float(v) for k, v in scores_from_confusion(vol_counts).items()})
    return metrics, panel


class _ValidationVolume:
    """One volume's validation slices: its arrays and the predictor's block plan over them."""

    def __init__(self, volume: Volume, cfg: Config):
        self.volume = volume
        self.raw, self.labels, _, _ = open_training(volume.store, volume.raw_array, volume.labels)
        self.ignore, _ = open_ignore(volume.store, volume.ignore, self.labels.shape)  # unlabelled voxels count nowhere
        self.lo = volume.val_slices[0]
        self.plan = make_plan(cfg.model, cfg.predict, self.raw.shape, volume.val_slices)

    def block(self, model, index: int, batch: int, device, autocast_ctx, memory_format):
        """The probability of block `index`, its labels and labelled voxels, and where it lies."""
        prob, core = block_probability(model, self.raw, self.plan, index, batch, device, autocast_ctx, memory_format)
        stored = ((core[0][0] + self.lo, core[0][1] + self.lo), *core[1:])  # output slice z is input slice lo + z
        label = read_region(self.labels, as_slices(stored))
        valid = None if self.ignore is None else read_region(self.ignore, as_slices(stored)) == 0
        return prob, label, valid, stored


class Validator:
    """Decides when to validate, and keeps `state.best` (validation membrane Dice)."""

    def __init__(self, cfg: Config, device, autocast_ctx, memory_format, monitor, health: Health, main: bool):
        self.cfg, self.device, self.autocast, self.memory_format = cfg, device, autocast_ctx, memory_format
        self.monitor, self.health, self.main = monitor, health, main
        self.metrics: dict = {}  # the latest validation's

    def due(self, step: int) -> bool:
        return step % self.cfg.train.val_every == 0 or step == self.cfg.train.steps

    def maybe_run(self, state: TrainState, clock) -> bool | None:
        """Validate if due: returns whether the score is the best so far, None when not due."""
        if not self.due(state.step):
            return None
        with clock.paused():
            self.health.check(state.step)  # every rank: they stop together
            dist.broadcast_buffers(state.model)
            metrics, panel = validate(state.model, self.cfg, self.device, self.autocast,
                                      want_panel=self.main and self.cfg.logging.images,
                                      memory_format=self.memory_format)
            metrics["val/replica_spread"] = dist.replica_spread(state.model)
            self.monitor.log(state.step, metrics)
            if panel is not None:
                raw, label, prob, valid = panel
                self.monitor.log_images(state.step, raw, label, prob, self.cfg.predict.threshold, valid)
            self.metrics = metrics
            is_best = metrics["val/dice_membrane"] > state.best
            state.best = max(state.best, metrics["val/dice_membrane"])
            return is_best
