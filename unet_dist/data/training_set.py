"""The volumes a run trains and validates on: one (`data.store` with `data.train_slices` and
`data.val_slices`) or several (`data.volumes`, e.g. CREMI's samples A, B and C), each with its own
store, arrays, slice ranges and sampling weight.

A training patch first picks its volume (with probability weight / sum of weights, from the same
random generator as the rest of the patch, so the stream stays a function of (seed, rank, batch)),
then its place inside that volume's training slices. A run with one volume draws no volume at all:
its patches are those of a single-store run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from unet_dist.errors import UserError


@dataclass(frozen=True)
class Volume:
    store: str
    name: str  # in metric names: val/<name>/dice_membrane
    raw_array: str
    labels: str
    ignore: str
    train_slices: tuple[int, int] | None  # [start, stop) of the slices patches come from; None: all
    val_slices: tuple[int, int] | None  # None: not validated
    exclude: tuple[int, int] | None = None  # slices no training patch touches (a CV fold, validation)
    weight: float = 1.0

    def train_range(self, depth: int) -> tuple[int, int]:
        return self.train_slices or (0, depth)


def default_name(store: str) -> str:
    """`runs/sample_A.zarr` -> `sample_A`: the store's folder name without its suffix."""
    path = Path(str(store).rstrip("/"))
    return path.stem if path.suffix in (".zarr", ".n5", ".zarr2", ".ome") else path.name


def volumes_of(data) -> tuple[Volume, ...]:
    """The run's volumes from the config's data section (DataConfig), names unique."""
    if not data.volumes:
        return (Volume(store=data.store, name=default_name(data.store), raw_array=data.raw_array,
                       labels=data.labels, ignore=data.ignore, train_slices=tuple(data.train_slices),
                       val_slices=tuple(data.val_slices), exclude=tuple(data.holdout_slices) or None),)
    out = []
    for vol in data.volumes:
        val = tuple(vol.val_slices) or None
        out.append(Volume(store=vol.store, name=vol.name or default_name(vol.store),
                          raw_array=vol.raw_array or data.raw_array, labels=vol.labels or data.labels,
                          ignore=vol.ignore or data.ignore, train_slices=tuple(vol.train_slices) or None,
                          val_slices=val, exclude=None if vol.train_slices else val, weight=vol.weight))
    names = [v.name for v in out]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise UserError(f"data.volumes: more than one volume is named {', '.join(map(repr, twice))}; "
                        "give each a `name` (it appears in the metric names)")
    return tuple(out)
