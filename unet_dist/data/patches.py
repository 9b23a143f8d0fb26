"""Training patches out of a Zarr store: a deterministic, rank-sharded stream of augmented batches.

Batch number `i` of rank `r` is drawn from `numpy.random.default_rng([seed, r, i])` (each patch's
volume too, when there are several: data/training_set.py): every rank sees
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

from unet_dist.config import AugmentConfig, Config
from unet_dist.data.augment import Augmenter, unet_weight_map
from unet_dist.errors import UserError
from unet_dist.data.damaged_chunks import read_region
from unet_dist.data.training_set import Volume, volumes_of
from unet_dist.data.volumes import open_ignore, open_training

IGNORED = 2  # an unlabelled voxel's value in a label patch while it is augmented (nearest-neighbour moves keep it)
MAX_DRAWS = 1000  # patches drawn for one batch item before a store that is hardly labelled is refused


def to_unit_float(raw: np.ndarray) -> np.ndarray:
    """Integer intensities scaled to [0, 1] by their dtype's range; floats are taken as they are."""
    if np.issubdtype(raw.dtype, np.integer):
        return raw.astype(np.float32) / np.float32(np.iinfo(raw.dtype).max)
    return raw.astype(np.float32, copy=False)


@dataclass(frozen=True)
class PatchSpec:
    volumes: tuple[Volume, ...]  # where patches come from (data/training_set.py)
    patch_size: tuple[int, ...]  # (Y, X) for 2D models, (Z, Y, X) for 3D
    label_crop: tuple[int, ...]  # per-side crop of labels to the model's output (valid padding)
    batch_size: int
    seed: int
    rank: int
    # the rest as train.weight_map* and data.min_labelled_fraction (their defaults: config/sections.py)
    weight_map: bool
    weight_map_w0: float
    weight_map_sigma: float
    min_labelled_fraction: float  # redraw patches with less of their loss region labelled

    @classmethod
    def from_config(cls, cfg: Config, rank: int, label_crop: tuple[int, ...]) -> "PatchSpec":
        """What the trainer draws from: the config's volumes (with their training slices, held-out
        fold and weights), patch, augmentation weights, for `rank`."""
        return cls(volumes=volumes_of(cfg.data), patch_size=tuple(cfg.data.patch_size),
                   label_crop=tuple(label_crop), batch_size=cfg.data.batch_size, seed=cfg.train.seed, rank=rank,
                   weight_map=cfg.train.weight_map, weight_map_w0=cfg.train.weight_map_w0,
                   weight_map_sigma=cfg.train.weight_map_sigma,
                   min_labelled_fraction=cfg.data.min_labelled_fraction)

    def volume_probabilities(self) -> np.ndarray:
        weights = np.array([v.weight for v in self.volumes], dtype=np.float64)
        return weights / weights.sum()


def patch_z_starts(z_range: tuple[int, int], depth: int, holdout: tuple[int, int] | None) -> np.ndarray:
    """First slices of the patches of `depth` slices inside `z_range` that avoid `holdout`."""
    starts = np.arange(z_range[0], z_range[1] - depth + 1)
    if holdout:
        starts = starts[(starts + depth <= holdout[0]) | (starts >= holdout[1])]
    return starts


@dataclass
class OpenVolume:
    """One volume's arrays, opened in the process that reads them."""
    volume: Volume
    raw: object
    labels: object
    ignore: object | None = None

    @classmethod
    def open(cls, volume: Volume) -> "OpenVolume":
        raw, labels, _, _ = open_training(volume.store, volume.raw_array, volume.labels)
        ignore, _ = open_ignore(volume.store, volume.ignore, labels.shape)
        return cls(volume, raw, labels, ignore)


class PatchStream(IterableDataset):
    """Endless batches of (raw, label[, weight][, valid]) patches; each worker opens the stores itself.

    With an ignore mask (`labels/ignore`, data.ignore) a batch also holds `valid` (1 = labelled, 0 =
    unlabelled: no loss there) and `weight` is 0 on unlabelled voxels; their labels are replaced by 0
    before anything else sees them, so whatever the store holds there never changes a batch. A patch
    whose loss region is labelled below `min_labelled_fraction` is drawn again from the same generator.
    With several volumes, `volume` holds each patch's volume index.
    """

    def __init__(self, spec: PatchSpec, augment_cfg: AugmentConfig, start_batch: int = 0):
        self.spec = spec
        self.augmenter = Augmenter(augment_cfg)  # checked here, in the process that configures the run
        self.start_batch = start_batch
        self.probabilities = spec.volume_probabilities()

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        augmenter = self.augmenter
        index = self.start_batch + worker
        try:
            volumes = [OpenVolume.open(v) if v.weight > 0 else None for v in self.spec.volumes]
        except UserError as exc:
            yield {"error": str(exc)}
            return
        while True:
            try:
                yield self.make_batch(volumes, augmenter, index)
            except UserError as exc:
                # Handed to the training loop as data: an exception raised in a worker would reach
                # it wrapped in the worker's traceback instead of as one line.
                yield {"error": str(exc)}
                return
            index += workers

    def pick_volume(self, rng: np.random.Generator) -> int:
        """The volume of the next patch; one volume draws nothing (a single-store run's stream)."""
        if len(self.spec.volumes) == 1:
            return 0
        return int(rng.choice(len(self.probabilities), p=self.probabilities))

    def make_batch(self, volumes: list[OpenVolume], augmenter, index: int) -> dict[str, torch.Tensor]:
        spec = self.spec
        rng = np.random.default_rng([spec.seed, spec.rank, index])
        raws, labs, weights, valids, picked = [], [], [], [], []
        for _ in range(spec.batch_size):
            picked.append(self.pick_volume(rng))
            source = volumes[picked[-1]]
            region, skip = self._draw(rng, source)
            r = to_unit_float(read_region(source.raw, region))
            lab = read_region(source.labels, region)
            self._check(r, lab, region, source.volume)
            if skip is not None:  # unlabelled: whatever the store holds there is gone from here on
                lab = np.where(skip != 0, np.uint8(IGNORED), lab.astype(np.uint8, copy=False))
            if len(spec.patch_size) == 2:  # a 2D patch is one slice
                r, lab = r[0], lab[0]
            r, lab = augmenter(rng, r, lab)
            lab = lab[self._crop(lab)]
            valid = None
            if skip is not None:
                valid = lab != IGNORED
                lab = np.where(valid, lab, np.uint8(0))
            elif any(v is not None and v.ignore is not None for v in volumes):
                valid = np.ones(lab.shape, dtype=bool)  # another volume has unlabelled voxels: same keys
            if valid is not None:
                valids.append(valid)
            raws.append(r)
            labs.append(lab)
            if spec.weight_map:
                weight = self._weights(lab, valid)
                weights.append(weight if valid is None else weight * valid)
        batch = {
            "raw": torch.from_numpy(np.stack(raws)[:, None].astype(np.float32)),
            "label": torch.from_numpy(np.stack(labs)[:, None].astype(np.float32)),
            "index": torch.tensor(index),
        }
        if weights:
            batch["weight"] = torch.from_numpy(np.stack(weights)[:, None].astype(np.float32))
        if valids:
            batch["valid"] = torch.from_numpy(np.stack(valids)[:, None].astype(np.float32))
        if len(spec.volumes) > 1:
            batch["volume"] = torch.tensor(picked)
        return batch

    def _crop(self, lab: np.ndarray) -> tuple[slice, ...]:
        """The part of a (2D or 3D) label patch that reaches the loss (valid padding crops the border)."""
        return tuple(slice(c, lab.shape[i] - c) for i, c in enumerate(self.spec.label_crop))

    def labelled_fraction(self, skip: np.ndarray) -> float:
        """The labelled share of a patch's loss region, from its (Z, Y, X) ignore mask."""
        part = skip[0] if len(self.spec.patch_size) == 2 else skip
        part = part[self._crop(part)]
        return 1.0 - np.count_nonzero(part) / max(1, part.size)

    def _draw(self, rng: np.random.Generator, source: OpenVolume) -> tuple[tuple[slice, ...], np.ndarray | None]:
        """A patch region (and its ignore mask): drawn again, from the same generator, while its loss
        region is labelled below min_labelled_fraction, so the stream stays a function of (seed, rank, i)."""
        spec, volume = self.spec, source.volume
        for _ in range(MAX_DRAWS):
            region = self._random_region(rng, source.raw.shape, volume)
            if source.ignore is None:
                return region, None
            skip = read_region(source.ignore, region)
            if self.labelled_fraction(skip) >= spec.min_labelled_fraction:
                return region, skip
        lo, hi = volume.train_range(source.raw.shape[0])
        raise UserError(f"{volume.store}: no {'x'.join(map(str, spec.patch_size))} patch in slices "
                        f"{lo}:{hi} had at least {spec.min_labelled_fraction:g} of its "
                        f"voxels labelled in {MAX_DRAWS} draws (its ignore mask '{volume.ignore}' covers most of "
                        "them); lower data.min_labelled_fraction or train on better labelled slices")

    def _check(self, raw: np.ndarray, lab: np.ndarray, region, volume: Volume) -> None:
        where = f"{volume.store} at {', '.join(f'{s.start}:{s.stop}' for s in region)}"
        if not np.isfinite(raw).all():
            raise UserError(f"{where}: raw holds NaN or infinite values")
        if lab.max(initial=0) > 1:
            raise UserError(f"{where}: labels hold values other than 0 and 1 (max {lab.max()}); "
                            "convert them with --label-threshold")

    def _random_region(self, rng: np.random.Generator, shape, volume: Volume) -> tuple[slice, ...]:
        size = self.spec.patch_size
        if len(size) == 2:
            size = (1, *size)
        z_starts = patch_z_starts(volume.train_range(shape[0]), size[0], volume.exclude)
        starts = [int(z_starts[rng.integers(0, len(z_starts))])]
        starts += [int(rng.integers(0, shape[a] - size[a] + 1)) for a in (1, 2)]
        return tuple(slice(s, s + n) for s, n in zip(starts, size))

    def _weights(self, lab: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
        slices = lab[None] if lab.ndim == 2 else lab
        valid = None if valid is None else (valid[None] if lab.ndim == 2 else valid)
        w = np.stack([unet_weight_map(s, self.spec.weight_map_w0, self.spec.weight_map_sigma,
                                      None if valid is None else valid[z]) for z, s in enumerate(slices)])
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
