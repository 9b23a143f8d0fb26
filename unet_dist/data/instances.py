"""Instance labels (one ID per neuron) and the binary training target derived from them.

The rule (recorded with the target, `Rule.record()`): a voxel is membrane (0) where a voxel within
`width` pixels of it has another ID, "within" meaning the (2 width + 1)^2 square around it in its
own slice (2D, the default: EM sections are thick, so a neighbour in the next section is far away)
or the (2 width + 1)^3 cube (3D, for near-isotropic volumes). Voxels outside the volume are not
neighbours. ID 0 is background / extracellular space: membrane too, unless `background_interior`,
which makes 0 one more segment (interior, with boundaries to its neighbours like any other ID).
Everything else is neuron interior (1). Width 0: no boundaries, the target is `id != 0`.

Unlabelled voxels (`ignored`, e.g. CREMI's reserved ID; the store's `labels/ignore`) are nobody's
neighbour: their ID is unknown, so a voxel next to them is membrane only for a real other ID within
the window (their own target is 0 and never used).

A slab needs `halo` slices of IDs beyond each end (0 in 2D, `width` in 3D) to give the same target
as the whole volume: convert and relabel read that much more and crop (`target_of_slab`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from unet_dist.errors import UserError

IDS = "neuron_ids"  # the label image that keeps the IDs next to the binary target


@dataclass(frozen=True)
class Rule:
    width: int = 1
    three_d: bool = False
    background_interior: bool = False

    def __post_init__(self):
        if isinstance(self.width, bool) or not isinstance(self.width, int) or self.width < 0:
            raise UserError(f"--boundary-width: expected a whole number of pixels >= 0, got {self.width!r}")

    @property
    def halo(self) -> int:
        return self.width if self.three_d else 0

    def record(self) -> dict:
        """What the target's attributes say about how it was made (relabel reads it back)."""
        return {"derived_from": IDS, "boundary_width": self.width, "boundary_3d": self.three_d,
                "background_interior": self.background_interior,
                "rule": ("membrane (0) where a voxel within boundary_width pixels "
                         + ("(a cube in 3D)" if self.three_d else "(a square in its slice)")
                         + " has another ID" + ("" if self.background_interior else ", and where the ID is 0")
                         + "; neuron interior (1) elsewhere")}

    @classmethod
    def from_record(cls, record: dict) -> "Rule":
        return cls(int(record["boundary_width"]), bool(record["boundary_3d"]), bool(record["background_interior"]))


def check_ids_dtype(dtype, where: str) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        raise UserError(f"{where}: instance labels of type {dtype}; --instances needs integer IDs "
                        "(uint16, uint32, uint64)")
    return dtype


def check_ids(ids: np.ndarray, where: str) -> None:
    if ids.dtype.kind == "i" and ids.size and ids.min() < 0:
        raise UserError(f"{where}: negative IDs ({int(ids.min())}); instance labels are IDs >= 0 (0 = background)")


def membrane_target(ids: np.ndarray, rule: Rule, ignored: np.ndarray | None = None) -> np.ndarray:
    """uint8 target (1 interior, 0 membrane) of a (Z, Y, X) block of IDs, every slice by the rule.

    `ignored` (same shape, optional): unlabelled voxels, no neighbours of anyone, 0 in the target.
    In 3D the block's first and last slices see only the slices in the block: callers pass a halo.
    """
    ids = np.asarray(ids)
    if ids.ndim != 3:
        raise ValueError(f"need a (Z, Y, X) block, got shape {ids.shape}")
    if ignored is not None:
        ignored = np.asarray(ignored) != 0
    w = rule.width
    if w == 0:
        same = np.ones(ids.shape, bool)
    else:
        # Another ID within the window <=> the window's max or min differs from the centre. Mode
        # "nearest" repeats edge voxels, which are inside the window already: no invented neighbours.
        # An unlabelled voxel takes the dtype's lowest value for the max and its highest for the min,
        # so it never differs from a labelled centre.
        size = (2 * w + 1 if rule.three_d else 1, 2 * w + 1, 2 * w + 1)
        info = np.iinfo(ids.dtype) if ids.dtype.kind in "iu" else None
        same = np.empty(ids.shape, bool)
        for z in range(ids.shape[0]) if not rule.three_d else (None,):
            sl = slice(None) if z is None else slice(z, z + 1)  # slice by slice in 2D: O(slice) temporaries
            block = ids[sl]
            low = high = block
            if ignored is not None and info is not None:
                low = np.where(ignored[sl], info.min, block).astype(ids.dtype, copy=False)
                high = np.where(ignored[sl], info.max, block).astype(ids.dtype, copy=False)
            same[sl] = (ndimage.maximum_filter(low, size=size, mode="nearest") == block)
            same[sl] &= (ndimage.minimum_filter(high, size=size, mode="nearest") == block)
    if not rule.background_interior:
        same &= ids != 0
    if ignored is not None:
        same &= ~ignored
    return same.view(np.uint8)


def target_of_slab(read: Callable[[int, int], np.ndarray], z0: int, z1: int, depth: int, rule: Rule,
                   where: str = "", ignored_of: Callable | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(IDs of z0..z1, their target) with `read(a, b)` giving IDs of slices a..b; reads the rule's
    halo beyond each end (within 0..depth) so the slab's target equals the whole volume's.
    `ignored_of(ids, a, b)`: the unlabelled voxels of those slices (`membrane_target`'s `ignored`)."""
    a, b = max(0, z0 - rule.halo), min(depth, z1 + rule.halo)
    ids = np.asarray(read(a, b))
    check_ids(ids, where)
    target = membrane_target(ids, rule, None if ignored_of is None else ignored_of(ids, a, b))
    return ids[z0 - a:z1 - a], target[z0 - a:z1 - a]


def looks_like_ids(values: np.ndarray) -> bool:
    """Integer labels with several distinct non-zero values (a slice of CREMI holds hundreds):
    instance IDs rather than a mask with a few stray values, for which a threshold is the fix."""
    if values.dtype.kind not in "iu":
        return False
    distinct = np.unique(values)
    return np.count_nonzero(distinct) >= 4
