"""Training patches out of a Zarr store: a deterministic, rank-sharded stream of augmented batches.

Batch number `i` of rank `r` is drawn from `numpy.random.default_rng([seed, r, i])`: every rank sees
its own stream, a rank's stream is the same on every run, and it does not depend on the number of
DataLoader workers (worker `w` of `W` makes batches `i` with `i % W == w`, and the DataLoader
interleaves workers in that order). Resuming therefore needs only the batch index.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import Augmenter, unet_weight_map
from ..errors import UserError
from .store import RAW, TARGET, read_region
from .volumes import open_training


def to_unit_float(raw: np.ndarray) -> np.ndarray:
    """Integer intensities scaled to [0, 1] by their dtype's range; floats are taken as they are."""
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float32) / np.float32(np.iinfo(raw.dtype).max)
    return raw.astype(np.float32, copy=False)


@dataclass(frozen=True)
class PatchSpec:
    store: str
    z_range: tuple[int, int]  # [start, stop) of the slices patches come from
    patch_size: tuple[int, ...]  # (Y, X) for 2D models, (Z, Y, X) for 3D
    label_crop: tuple[int, ...]  # per-side crop of labels to the model's output (valid padding)
    batch_size: int
    seed: int
    rank: int
    weight_map: bool = False
    weight_map_w0: float = 10.0
    weight_map_sigma: float = 5.0
    holdout: tuple[int, int] | None = None  # [start, stop) no patch may touch (a CV fold)
    raw_array: str = RAW  # data.raw_array and data.labels: the arrays inside `store` (data/volumes.py)
    labels: str = TARGET

    @classmethod
    def from_config(cls, cfg, rank: int, label_crop: tuple[int, ...]) -> "PatchSpec":
        """What the trainer draws from: the config's store, training slices, patch, augmentation
        weights and held-out fold, for `rank`."""
        return cls(store=cfg.data.store, z_range=tuple(cfg.data.train_slices), patch_size=tuple(cfg.data.patch_size),
                   label_crop=tuple(label_crop), batch_size=cfg.data.batch_size, seed=cfg.train.seed, rank=rank,
                   weight_map=cfg.train.weight_map, weight_map_w0=cfg.train.weight_map_w0,
                   weight_map_sigma=cfg.train.weight_map_sigma, holdout=tuple(cfg.data.holdout_slices) or None,
                   raw_array=cfg.data.raw_array, labels=cfg.data.labels)


def patch_z_starts(z_range: tuple[int, int], depth: int, holdout: tuple[int, int] | None) -> np.ndarray:
    """First slices of the patches of `depth` slices inside `z_range` that avoid `holdout`."""
    starts = np.arange(z_range[0], z_range[1] - depth + 1)
    if holdout:
        starts = starts[(starts + depth <= holdout[0]) | (starts >= holdout[1])]
    return starts


class PatchStream(IterableDataset):
    """Endless batches of (raw, label[, weight]) patches; each worker opens the store itself."""

    def __init__(self, spec: PatchSpec, augment_cfg, start_batch: int = 0):
        self.spec = spec
        self.augment_cfg = augment_cfg
        self.start_batch = start_batch

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        raw, labels, _, _ = open_training(self.spec.store, self.spec.raw_array, self.spec.labels)
        augmenter = Augmenter(self.augment_cfg)
        index = self.start_batch + worker
        while True:
            try:
                yield self.make_batch(raw, labels, augmenter, index)
            except UserError as exc:
                # Handed to the training loop as data: an exception raised in a worker would reach
                # it wrapped in the worker's traceback instead of as one line.
                yield {"error": str(exc)}
                return
            index += workers

    def make_batch(self, raw, labels, augmenter, index: int) -> dict[str, torch.Tensor]:
        spec = self.spec
        rng = np.random.default_rng([spec.seed, spec.rank, index])
        raws, labs, weights = [], [], []
        for _ in range(spec.batch_size):
            region = self._random_region(rng, raw.shape)
            r = to_unit_float(read_region(raw, region))
            lab = read_region(labels, region)
            self._check(r, lab, region)
            if len(spec.patch_size) == 2:  # a 2D patch is one slice
                r, lab = r[0], lab[0]
            r, lab = augmenter(rng, r, lab)
            lab = lab[tuple(slice(c, lab.shape[i] - c) for i, c in enumerate(spec.label_crop))]
            raws.append(r)
            labs.append(lab)
            if spec.weight_map:
                weights.append(self._weights(lab))
        batch = {
            "raw": torch.from_numpy(np.stack(raws)[:, None].astype(np.float32)),
            "label": torch.from_numpy(np.stack(labs)[:, None].astype(np.float32)),
            "index": torch.tensor(index),
        }
        if weights:
            batch["weight"] = torch.from_numpy(np.stack(weights)[:, None].astype(np.float32))
        return batch

    def _check(self, raw: np.ndarray, lab: np.ndarray, region) -> None:
        where = f"{self.spec.store} at {', '.join(f'{s.start}:{s.stop}' for s in region)}"
        if not np.isfinite(raw).all():
            raise UserError(f"{where}: raw holds NaN or infinite values")
        if lab.max(initial=0) > 1:
            raise UserError(f"{where}: labels hold values other than 0 and 1 (max {lab.max()}); "
                            "convert them with --label-threshold")

    def _random_region(self, rng: np.random.Generator, shape) -> tuple[slice, ...]:
        size = self.spec.patch_size
        if len(size) == 2:
            size = (1, *size)
        z_starts = patch_z_starts(self.spec.z_range, size[0], self.spec.holdout)
        starts = [int(z_starts[rng.integers(0, len(z_starts))])]
        starts += [int(rng.integers(0, shape[a] - size[a] + 1)) for a in (1, 2)]
        return tuple(slice(s, s + n) for s, n in zip(starts, size))

    def _weights(self, lab: np.ndarray) -> np.ndarray:
        slices = lab[None] if lab.ndim == 2 else lab
        w = np.stack([unet_weight_map(s, self.spec.weight_map_w0, self.spec.weight_map_sigma) for s in slices])
        return w[0] if lab.ndim == 2 else w


def make_loader(stream: PatchStream, num_workers: int, start_method: str, pin_memory: bool,
                prefetch_factor: int = 4, worker_init_fn=None) -> DataLoader:
    """A DataLoader over whole batches (the stream batches itself, so batch_size=None)."""
    kwargs = {}
    if num_workers > 0:
        kwargs = dict(
            multiprocessing_context=multiprocessing.get_context(start_method),
            persistent_workers=True,
            prefetch_factor=prefetch_factor,
            worker_init_fn=worker_init_fn,
        )
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)
