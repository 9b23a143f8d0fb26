"""Affinity targets from instance IDs, and where they are defined; pure numpy.

The convention every part of the package uses (training targets, validation, segmentation): channel
c with offset o = (oz, oy, ox) is 1 at voxel v iff v + o lies inside the array, ids[v] != 0 and
ids[v] == ids[v + o]; else 0. ID 0 is background / the boundary layer between neurons, so an
affinity to or from it is 0, as PyTorch Connectomics' `seg_to_aff`. A voxel-channel is *valid* (it
enters loss and metrics) iff v + o is inside the array and neither v nor v + o is unlabelled.

Arrays are 3D (z, y, x) or 2D (y, x); offsets are (z, y, x) triples either way, a 2D array taking
those with z = 0 (their (y, x) part). Each channel is two slicings of the array: no loop over voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _offset_for(offset: Sequence[int], ndim: int) -> tuple[int, ...]:
    offset = tuple(int(v) for v in offset)
    if len(offset) == ndim:
        return offset
    if ndim == 2 and len(offset) == 3:
        if offset[0] != 0:
            raise ValueError(f"offset {list(offset)} has a z step; a 2D array takes offsets (0, y, x)")
        return offset[1:]
    raise ValueError(f"offset {list(offset)} does not fit a {ndim}D array")


def pair_slices(shape: Sequence[int], offset: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(here, there): the voxels v whose neighbour v + offset lies inside `shape`, and those neighbours."""
    offset = _offset_for(offset, len(shape))
    here = tuple(slice(max(0, -o), n - max(0, o)) for o, n in zip(offset, shape))
    there = tuple(slice(max(0, o), n - max(0, -o)) for o, n in zip(offset, shape))
    return here, there


def affinities(ids: np.ndarray, offsets: Sequence[Sequence[int]], dtype=np.uint8) -> np.ndarray:
    """(C, *ids.shape) affinities of the instance IDs `ids` (see the module docstring) in `dtype`."""
    ids = np.asarray(ids)
    out = np.zeros((len(offsets), *ids.shape), dtype=dtype)
    for c, offset in enumerate(offsets):
        here, there = pair_slices(ids.shape, offset)
        a, b = ids[here], ids[there]
        out[c][here] = (a == b) & (a != 0)
    return out


def affinity_valid(shape_or_ignore, offsets: Sequence[Sequence[int]]) -> np.ndarray:
    """(C, *shape) bool: where the affinities are defined. Given a shape, every voxel is labelled and
    only neighbours outside the array make a voxel-channel invalid; given an ignore mask (nonzero =
    unlabelled), an unlabelled voxel at either end does too."""
    if isinstance(shape_or_ignore, np.ndarray):
        unlabelled = shape_or_ignore != 0
        shape = unlabelled.shape
    else:
        unlabelled, shape = None, tuple(int(n) for n in shape_or_ignore)
    out = np.zeros((len(offsets), *shape), dtype=bool)
    for c, offset in enumerate(offsets):
        here, there = pair_slices(shape, offset)
        out[c][here] = True if unlabelled is None else ~(unlabelled[here] | unlabelled[there])
    return out


def reach(offsets: Sequence[Sequence[int]]) -> tuple[int, int, int]:
    """The largest |step| of the offsets per axis (z, y, x): the context a region needs around it for
    the affinities of all its voxels."""
    steps = np.abs(np.asarray([tuple(o) for o in offsets], dtype=np.int64).reshape(-1, 3))
    return tuple(int(v) for v in steps.max(axis=0, initial=0))
