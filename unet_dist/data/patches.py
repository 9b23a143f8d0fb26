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
from unet_dist.data.affinities import affinities, affinity_valid
from unet_dist.data.augment import Augmenter, unet_weight_map
from unet_dist.errors import UserError
from unet_dist.data.damaged_chunks import read_region
from unet_dist.data.training_set import Volume, volumes_of
from unet_dist.data.volumes import open_ids, open_ignore, open_training

IGNORED = 2  # an unlabelled voxel's value in a label patch while it is augmented (nearest-neighbour moves keep it)
IGNORED_ID = -1  # the same in an ID patch (its IDs are renumbered from 1 first: see compact_ids)
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
    # model.target, and for "affinities" the (z, y, x) offsets and data.ids, the IDs they come from
    target: str = "membrane"
    offsets: tuple[tuple[int, int, int], ...] = ()
    ids: str = "neuron_ids"

    @classmethod
    def from_config(cls, cfg: Config, rank: int, label_crop: tuple[int, ...]) -> "PatchSpec":
        """What the trainer draws from: the config's volumes (with their training slices, held-out
        fold and weights), patch, augmentation weights, for `rank`."""
        return cls(volumes=volumes_of(cfg.data), patch_size=tuple(cfg.data.patch_size),
                   label_crop=tuple(label_crop), batch_size=cfg.data.batch_size, seed=cfg.train.seed, rank=rank,
                   weight_map=cfg.train.weight_map, weight_map_w0=cfg.train.weight_map_w0,
                   weight_map_sigma=cfg.train.weight_map_sigma,
                   min_labelled_fraction=cfg.data.min_labelled_fraction, target=cfg.model.target,
                   offsets=cfg.model.affinity_offsets(), ids=cfg.data.ids)

    def volume_probabilities(self) -> np.ndarray:
        weights = np.array([v.weight for v in self.volumes], dtype=np.float64)
        return weights / weights.sum()


def patch_z_starts(z_range: tuple[int, int], depth: int, holdout: tuple[int, int] | None) -> np.ndarray:
    """First slices of the patches of `depth` slices inside `z_range` that avoid `holdout`."""
    starts = np.arange(z_range[0], z_range[1] - depth + 1)
    if holdout:
        starts = starts[(starts + depth <= holdout[0]) | (starts >= holdout[1])]
    return starts


def compact_ids(ids: np.ndarray) -> np.ndarray:
    """int32 IDs 1..K for the K nonzero IDs of a patch, 0 kept: equal IDs stay equal, different ones
    different. Interpolation by nearest neighbour computes in float64, which would merge IDs above 2**53
    (uint64 IDs); small numbers also leave room for IGNORED_ID."""
    _, inverse = np.unique(ids, return_inverse=True)
    out = inverse.reshape(ids.shape).astype(np.int32) + 1
    out[ids == 0] = 0
    return out


@dataclass
class OpenVolume:
    """One volume's arrays, opened in the process that reads them; `labels` holds the instance IDs
    when the target is affinities."""
    volume: Volume
    raw: object
    labels: object
    ignore: object | None = None

    @classmethod
    def open(cls, volume: Volume, ids: str | None = None) -> "OpenVolume":
        if ids is None:
            raw, labels, _, _ = open_training(volume.store, volume.raw_array, volume.labels)
        else:
            raw, _, _, _ = open_training(volume.store, volume.raw_array, None)
            labels, _ = open_ids(volume.store, ids, raw.shape)
        ignore, _ = open_ignore(volume.store, volume.ignore, labels.shape)
        return cls(volume, raw, labels, ignore)


class PatchStream(IterableDataset):
    """Endless batches of (raw, label[, weight][, valid]) patches; each worker opens the stores itself.

    With an ignore mask (`labels/ignore`, data.ignore) a batch also holds `valid` (1 = labelled, 0 =
    unlabelled: no loss there) and `weight` is 0 on unlabelled voxels; their labels are replaced by 0
    before anything else sees them, so whatever the store holds there never changes a batch. A patch
    whose loss region is labelled below `min_labelled_fraction` is drawn again from the same generator.
    With several volumes, `volume` holds each patch's volume index.

    With model.target affinities the patch reads the instance IDs (data.ids) instead of the binary
    labels; they move with the raw through every augmentation (nearest neighbour: IDs stay IDs), and
    the affinities are computed afterwards, so `label` and `valid` are (B, C, ...), one channel per offset.
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
            ids = self.spec.ids if self.spec.target == "affinities" else None
            volumes = [OpenVolume.open(v, ids) if v.weight > 0 else None for v in self.spec.volumes]
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
        item = self._affinity_item if spec.target == "affinities" else self._membrane_item
        # every volume's items carry `valid` once any can: the batch's keys never change
        some_ignore = any(v is not None and v.ignore is not None for v in volumes)
        raws, labs, weights, valids, picked = [], [], [], [], []
        for _ in range(spec.batch_size):
            picked.append(self.pick_volume(rng))
            source = volumes[picked[-1]]
            region, skip = self._draw(rng, source)
            r = to_unit_float(read_region(source.raw, region))
            lab = read_region(source.labels, region)
            self._check(r, lab, region, source.volume)
            r, lab, valid, weight = item(rng, augmenter, r, lab, skip, some_ignore)
            raws.append(r)
            labs.append(lab)
            valids += [] if valid is None else [valid]
            weights += [] if weight is None else [weight]
        channel = (slice(None), None) if spec.target == "membrane" else (slice(None),)  # affinities have theirs
        batch = {
            "raw": torch.from_numpy(np.stack(raws)[:, None].astype(np.float32)),
            "label": torch.from_numpy(np.stack(labs)[channel].astype(np.float32)),
            "index": torch.tensor(index),
        }
        if weights:
            batch["weight"] = torch.from_numpy(np.stack(weights)[channel].astype(np.float32))
        if valids:
            batch["valid"] = torch.from_numpy(np.stack(valids)[channel].astype(np.float32))
        if len(spec.volumes) > 1:
            batch["volume"] = torch.tensor(picked)
        return batch

    def _membrane_item(self, rng, augmenter, r, lab, skip, some_ignore):
        """(raw, label, valid or None, weight or None) of one binary-label patch."""
        if skip is not None:  # unlabelled: whatever the store holds there is gone from here on
            lab = np.where(skip != 0, np.uint8(IGNORED), lab.astype(np.uint8, copy=False))
        if len(self.spec.patch_size) == 2:  # a 2D patch is one slice
            r, lab = r[0], lab[0]
        r, lab = augmenter(rng, r, lab)
        lab = lab[self._crop(lab)]
        valid = None
        if skip is not None:
            valid = lab != IGNORED
            lab = np.where(valid, lab, np.uint8(0))
        elif some_ignore:
            valid = np.ones(lab.shape, dtype=bool)
        weight = None
        if self.spec.weight_map:
            weight = self._weights(lab, valid)
            weight = weight if valid is None else weight * valid
        return r, lab, valid, weight

    def _affinity_item(self, rng, augmenter, r, ids, skip, some_ignore):
        """(raw, affinities (C, ...), valid (C, ...), None) of one ID patch: the IDs (and the unlabelled
        voxels, as IGNORED_ID) move with the raw, then the affinities are computed on the moved IDs, so
        they agree with what the network sees; neighbours beyond the patch are invalid. Then cropped."""
        ids = compact_ids(ids)
        if skip is not None:
            ids[skip != 0] = IGNORED_ID
        if len(self.spec.patch_size) == 2:
            r, ids = r[0], ids[0]
        r, ids = augmenter(rng, r, ids)
        unlabelled = ids == IGNORED_ID
        ids = np.where(unlabelled, 0, ids)
        target = affinities(ids, self.spec.offsets)
        valid = affinity_valid(unlabelled if skip is not None else ids.shape, self.spec.offsets)
        crop = (slice(None), *self._crop(ids))
        return r, target[crop], valid[crop], None

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
        if self.spec.target == "membrane" and lab.max(initial=0) > 1:
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
