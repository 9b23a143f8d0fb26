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
from unet_dist.data.affinities import affinities, affinity_valid, reach
from unet_dist.data.volumes import open_ids, open_ignore, open_training
from unet_dist.predict.infer import block_output
from unet_dist.metrics import confusion_counts, scores_from_confusion
from unet_dist.predict.block_plan import as_slices, assign, make_plan
from unet_dist.segment.volume import SCORES, best_threshold
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
    or None) is rank 0's first block (its middle slice in 3D; for affinities the lowest of the channels).

    Affinities (model.target): the same counts over the valid voxel-channels of all channels (confusion_counts'
    "membrane" class is affinity 0, a boundary): `val/affinity_error` (the share thresholded wrong) and
    `val/affinity_dice` (the Dice of affinity 0, the boundary)."""
    affinity = cfg.model.target == "affinities"
    volumes = [_ValidationVolume(v, cfg) for v in volumes_of(cfg.data) if v.val_slices]
    work = [(i, block) for i, vol in enumerate(volumes) for block in range(vol.plan.n_blocks)]
    counts = np.zeros((len(volumes), 4), dtype=np.int64)
    # affinities are scored as neurons too: the whole validation region is segmented in memory (C floats
    # per voxel on every rank), at the thresholds of segment/volume.py
    regions = [vol.empty_region() for vol in volumes] if affinity else None
    panel = None
    model.eval()
    for i, index in assign(work, dist.rank(), dist.world_size()):
        pred, label, valid, stored = volumes[i].block(model, index, cfg.predict.batch_size, device, autocast_ctx,
                                                      memory_format)
        counts[i] += confusion_counts(pred, label, cfg.predict.threshold, valid)
        if regions is not None:
            regions[i][(slice(None), *volumes[i].in_region(stored))] = pred
        if want_panel and panel is None:
            raw = to_unit_float(read_region(volumes[i].raw, as_slices(stored)))
            panel = _panel(raw, pred, label, valid, affinity)
    model.train()
    counts = dist.all_reduce_sum(counts)
    metrics = {f"val/{k}": float(v) for k, v in _scores(counts.sum(axis=0), affinity).items()}
    if cfg.data.volumes:
        for vol, vol_counts in zip(volumes, counts):
            metrics.update({f"val/{vol.volume.name}/{k}": float(v) for k, v in _scores(vol_counts, affinity).items()})
    if regions is not None:
        metrics.update(_region_scores(volumes, regions, bool(cfg.data.volumes), cfg.segment))
    return metrics, panel


def _scores(counts: np.ndarray, affinity: bool) -> dict:
    scores = scores_from_confusion(counts)
    return {"affinity_error": scores["pixel_error"], "affinity_dice": scores["dice_membrane"]} if affinity else scores


def _panel(raw, pred, label, valid, affinity: bool):
    mid = pred.shape[-3] // 2
    if not affinity:
        return raw[mid], label[mid], pred[mid], None if valid is None else valid[mid]
    # a voxel is drawn as boundary where any of its affinities is (predicted) 0
    return raw[mid], label[:, mid].min(axis=0), pred[:, mid].min(axis=0), valid[:, mid].all(axis=0)


def _region_scores(volumes, regions, several: bool, segment_cfg) -> dict:
    """Segmentation scores of each volume's whole validation region (blocks of all ranks summed: they
    are disjoint, and every rank's region is zero outside its own blocks), on the main rank, then
    shared, so every rank chooses best.pt alike."""
    out = {}
    for vol, region in zip(volumes, regions):
        region = dist.all_reduce_sum(region)
        scores = np.zeros(len(SCORES))
        if dist.is_main():
            ids, unlabelled = vol.region_ids()
            found = best_threshold(region, vol.offsets, ids, unlabelled, segment_cfg)
            scores = np.array([found[key] for key in SCORES])
        scores = dist.all_reduce_sum(scores)
        prefix = f"val/{vol.volume.name}/" if several else "val/"
        out.update({prefix + key: float(v) for key, v in zip(SCORES, scores)})
    if several:  # the pooled region scores: the threshold and VOI of the first volume stand for none
        out.update({f"val/{key}": float(np.mean([out[f"val/{v.volume.name}/{key}"] for v in volumes]))
                    for key in ("voi", "adapted_rand_error")})
    return out


class _ValidationVolume:
    """One volume's validation slices: its arrays and the predictor's block plan over them."""

    def __init__(self, volume: Volume, cfg: Config):
        self.volume = volume
        self.affinity = cfg.model.target == "affinities"
        self.offsets = cfg.model.affinity_offsets()
        labels = None if self.affinity else volume.labels
        self.raw, self.labels, _, _ = open_training(volume.store, volume.raw_array, labels)
        if self.affinity:  # the instance IDs stand in for the labels
            self.labels, _ = open_ids(volume.store, cfg.data.ids, self.raw.shape)
        self.ignore, _ = open_ignore(volume.store, volume.ignore, self.labels.shape)  # unlabelled voxels count nowhere
        self.lo, self.hi = volume.val_slices
        self.plan = make_plan(cfg.model, cfg.predict, self.raw.shape, volume.val_slices)
        self.region = ((self.lo, self.hi), (0, self.raw.shape[1]), (0, self.raw.shape[2]))

    def block(self, model, index: int, batch: int, device, autocast_ctx, memory_format):
        """The output of block `index` ((C, ...) for affinities, else the probability), its labels and
        labelled voxels (for affinities: target and valid voxel-channels), and where it lies."""
        out, core = block_output(model, self.raw, self.plan, index, batch, device, autocast_ctx, memory_format)
        stored = ((core[0][0] + self.lo, core[0][1] + self.lo), *core[1:])  # output slice z is input slice lo + z
        if self.affinity:
            target, valid = self.affinity_truth(stored)
            return out, target, valid, stored
        label = read_region(self.labels, as_slices(stored))
        valid = None if self.ignore is None else read_region(self.ignore, as_slices(stored)) == 0
        return out[0], label, valid, stored

    def affinity_truth(self, stored) -> tuple[np.ndarray, np.ndarray]:
        """Target affinities and their valid voxel-channels in `stored`: computed on the IDs of the block
        grown by the offsets' reach within the validation region, so a block sees its neighbours in other
        blocks (the result does not depend on the block size) and none beyond the region (invalid)."""
        grown = tuple((max(a - m, lo), min(b + m, hi))
                      for (a, b), m, (lo, hi) in zip(stored, reach(self.offsets), self.region))
        ids = read_region(self.labels, as_slices(grown))
        unlabelled = None if self.ignore is None else read_region(self.ignore, as_slices(grown)) != 0
        target = affinities(ids, self.offsets)
        valid = affinity_valid(ids.shape if unlabelled is None else unlabelled, self.offsets)
        inner = (slice(None), *(slice(a - g, b - g) for (a, b), (g, _) in zip(stored, grown)))
        return target[inner], valid[inner]

    def empty_region(self) -> np.ndarray:
        return np.zeros((len(self.offsets), *(hi - lo for lo, hi in self.region)), dtype=np.float32)

    def in_region(self, stored) -> tuple[slice, ...]:
        return tuple(slice(a - lo, b - lo) for (a, b), (lo, _) in zip(stored, self.region))

    def region_ids(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The IDs of the validation region and its unlabelled voxels (or None)."""
        ids = read_region(self.labels, as_slices(self.region))
        return ids, None if self.ignore is None else read_region(self.ignore, as_slices(self.region)) != 0


class Validator:
    """Decides when to validate, and keeps `state.best` (`best_score`: higher is better)."""

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
            score = best_score(metrics, self.cfg.model.target)
            is_best = score > state.best
            if is_best and "val/segment_threshold" in metrics:
                state.segment_threshold = metrics["val/segment_threshold"]
            state.best = max(state.best, score)
            return is_best


def best_score(metrics: dict, target: str) -> float:
    """What best.pt maximises: the validation membrane Dice; for affinities 1 / (1 + VOI) of the
    segmented validation region (1 - the affinity error without it)."""
    if target != "affinities":
        return metrics["val/dice_membrane"]
    return 1.0 / (1.0 + metrics["val/voi"]) if "val/voi" in metrics else 1.0 - metrics["val/affinity_error"]
