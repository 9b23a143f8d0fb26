"""Reading OME-Zarr multiscale metadata (0.4 and 0.5): the one place that parses `multiscales`.

A group's attributes hold its multiscales under `ome` (0.5, Zarr v3) or at the top (0.4, Zarr v2).
Each level's scale and translation are composed here as the specification orders them (the
level's own transformations first, then the multiscale's), so every reader, ours and foreign
stores', sees the same voxel size. Writing the metadata is `ome.py`'s job; this module imports
nothing of the project, so `store.py` and the source readers can use it without a cycle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

SPACE = ("z", "y", "x")

# Length units as OME-Zarr (UDUNITS names), OME-TIFF, ImageJ and N5 write them, in nanometres.
NM_PER_UNIT = {
    "angstrom": 0.1, "å": 0.1, "picometer": 1e-3, "pm": 1e-3,
    "nanometer": 1.0, "nanometre": 1.0, "nm": 1.0,
    "micrometer": 1e3, "micrometre": 1e3, "micron": 1e3, "microns": 1e3, "um": 1e3,
    "µm": 1e3, "μm": 1e3, "\\u00b5m": 1e3,  # ImageJ writes the micro sign escaped
    "millimeter": 1e6, "millimetre": 1e6, "mm": 1e6, "centimeter": 1e7, "cm": 1e7,
    "meter": 1e9, "metre": 1e9, "m": 1e9,
}


def nm_per(unit) -> float | None:
    """Nanometres per `unit`; None for no unit, "pixel" or an unknown one."""
    return NM_PER_UNIT.get(str(unit).strip().lower()) if unit is not None else None


@dataclass(frozen=True)
class Axis:
    name: str
    type: str | None
    unit: str | None

    @property
    def is_space(self) -> bool:
        # OME-Zarr 0.3 axes are bare names; without a type, z/y/x are taken as space.
        return self.type == "space" or (self.type is None and self.name in SPACE)


@dataclass(frozen=True)
class Level:
    """One dataset: index i along each axis lies at i * scale + translation (in the axes' units)."""

    path: str
    scale: tuple[float, ...]
    translation: tuple[float, ...]


@dataclass(frozen=True)
class Multiscale:
    name: str | None
    axes: tuple[Axis, ...]
    levels: tuple[Level, ...]

    @property
    def paths(self) -> list[str]:
        return [level.path for level in self.levels]

    @property
    def units_known(self) -> bool:
        """Whether every axis has a unit: axes without one are how unet-dist records "voxel size
        unknown" (the scale is then a placeholder of 1)."""
        return all(axis.unit for axis in self.axes)

    def voxel_size(self, level: int = 0) -> tuple[float, ...] | None:
        """The level's (z, y, x) voxel size in nm; None for a 2D image, an axis without a known
        length unit, or a size that is not positive."""
        space = self._space_in_nm(self.levels[level].scale)
        return space if space is not None and all(v > 0 for v in space) else None

    def offset(self, level: int = 0) -> tuple[float, ...] | None:
        """Where the level's voxel (0, 0, 0) lies, (z, y, x) in nm; None as for `voxel_size`."""
        return self._space_in_nm(self.levels[level].translation)

    def _space_in_nm(self, values: tuple[float, ...]) -> tuple[float, ...] | None:
        space = [(value, nm_per(axis.unit)) for value, axis in zip(values, self.axes) if axis.is_space]
        if len(space) != 3 or any(factor is None for _, factor in space):
            return None
        out = tuple(value * factor for value, factor in space)
        return out if all(math.isfinite(v) for v in out) else None


def multiscales(attrs: Mapping) -> list[Multiscale]:
    """The multiscales a group's attributes list (0.5 under `ome`, else 0.4); malformed ones skipped."""
    ome = attrs.get("ome")
    found = (ome.get("multiscales") if isinstance(ome, Mapping) else None) or attrs.get("multiscales")
    if not isinstance(found, list):
        return []
    parsed = (_multiscale(entry) for entry in found if isinstance(entry, Mapping))
    return [m for m in parsed if m is not None]


def read_multiscale(attrs: Mapping) -> Multiscale | None:
    """The first multiscale of a group's attributes (the one viewers show), or None."""
    found = multiscales(attrs)
    return found[0] if found else None


def _multiscale(entry: Mapping) -> Multiscale | None:
    axes = tuple(_axis(a) for a in entry.get("axes", []))
    datasets = entry.get("datasets")
    if not isinstance(datasets, list) or not datasets or not all(isinstance(d, Mapping) for d in datasets):
        return None
    shared = entry.get("coordinateTransformations", [])
    levels = tuple(_level(d, shared, len(axes)) for d in datasets)
    name = entry.get("name")
    return Multiscale(str(name) if name is not None else None, axes, levels)


def _axis(axis) -> Axis:
    if isinstance(axis, Mapping):
        return Axis(str(axis.get("name")), axis.get("type"), axis.get("unit"))
    return Axis(str(axis), None, None)


def _level(dataset: Mapping, shared, ndim: int) -> Level:
    scale, shift = [1.0] * ndim, [0.0] * ndim
    for t in (*_transforms(dataset.get("coordinateTransformations")), *_transforms(shared)):
        kind = t.get("type")
        values = t.get(kind) if isinstance(kind, str) else None
        if not isinstance(values, list) or len(values) != ndim:
            continue  # "identity", or a transform stored in a file: nothing to compose
        try:
            values = [float(v) for v in values]
        except (TypeError, ValueError):
            continue
        if kind == "scale":
            scale = [s * v for s, v in zip(scale, values)]
            shift = [o * v for o, v in zip(shift, values)]
        elif kind == "translation":
            shift = [o + v for o, v in zip(shift, values)]
    return Level(str(dataset.get("path")), tuple(scale), tuple(shift))


def _transforms(value) -> list[Mapping]:
    return [t for t in value if isinstance(t, Mapping)] if isinstance(value, list) else []
