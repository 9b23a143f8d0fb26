"""Multiscale pyramids: which levels a volume gets, and how each level is made from the one below.

Levels halve the finest axes until the largest y/x side is at most MAX_SIDE pixels. An axis is
halved while its voxel is less than twice the finest voxel of the level, so anisotropic EM
(50 x 4 x 4 nm) shrinks in y and x only until its pixels approach the section thickness, and
near-isotropic FIB-SEM shrinks in z too; an axis of one voxel is never halved.

Rules: `mean` for intensities (raw, probability), rounded for integer types; `mode` for label
images (the most frequent value of each block, ties to the smallest value): a mean or a max would
invent IDs that are not in the data, and for the binary target (0 = membrane) the tie rule keeps
a membrane crossing a 2 x 2 block, so coarse levels do not lose the membranes a viewer looks for.

A level is written unit by unit (a unit is a chunk, or a shard when the array is sharded), each
unit from its own region of the level below: memory is bounded by the unit, whatever the volume,
and units can be spread over ranks (unit i goes to rank i % world) because no two units share a
chunk file. Each level needs the one below complete: callers with several ranks put a barrier
between levels (`barrier`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np

from unet_dist.data.ome_metadata import read_multiscale

MAX_SIDE = 256
Rule = Literal["mean", "mode"]


def plan_levels(shape: Sequence[int], voxel_size: Sequence[float] | None,
                max_side: int = MAX_SIDE) -> list[tuple[int, ...]]:
    """The factor from each level to the one above it: [] when level 0 is small enough already.

    An unknown voxel size counts as isotropic.
    """
    shape = [int(s) for s in shape]
    size = [float(v) for v in voxel_size] if voxel_size else [1.0] * len(shape)
    steps: list[tuple[int, ...]] = []
    while max(shape[-2:]) > max_side:
        finest = min(v for v, n in zip(size, shape) if n > 1)
        step = tuple(2 if n > 1 and v < 2 * finest else 1 for v, n in zip(size, shape))
        if step == (1,) * len(shape):
            break
        steps.append(step)
        shape = [-(-n // f) for n, f in zip(shape, step)]
        size = [v * f for v, f in zip(size, step)]
    return steps


def level_shapes(shape: Sequence[int], steps: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    shapes = [tuple(int(s) for s in shape)]
    for step in steps:
        shapes.append(tuple(-(-n // f) for n, f in zip(shapes[-1], step)))
    return shapes


def level_scales(voxel_size: Sequence[float], steps: Sequence[Sequence[int]]) -> list[list[float]]:
    """Voxel size of every level, for the OME coordinate transformations."""
    scales = [[float(v) for v in voxel_size]]
    for step in steps:
        scales.append([v * f for v, f in zip(scales[-1], step)])
    return scales


def downsample(block: np.ndarray, step: Sequence[int], rule: Rule) -> np.ndarray:
    """Reduce each `step`-sized box of `block` to one value; a partial box at the far edge is
    completed by repeating the edge (so a border voxel is not diluted by zeros).

    Works on the box's members as strided views (one per offset inside the box): no transposed
    copies, small integer sums (measured: the pyramid pass had taken 70% of convert's time)."""
    step = tuple(int(f) for f in step)
    pad = [(0, -n % f) for n, f in zip(block.shape, step)]
    if any(p for _, p in pad):
        block = np.pad(block, pad, mode="edge")
    members = [block[tuple(slice(o, None, f) for o, f in zip(offset, step))]
               for offset in itertools.product(*(range(f) for f in step))]
    if rule == "mean":
        return _mean(members, block.dtype)
    if rule == "mode":
        return _mode(members)
    raise ValueError(f"unknown downsampling rule {rule!r}")


def _mean(members: list[np.ndarray], dtype) -> np.ndarray:
    k = len(members)
    if np.issubdtype(dtype, np.integer):
        wide = np.uint16 if np.dtype(dtype).itemsize == 1 and k <= 256 else np.int64
        total = members[0].astype(wide)
        for m in members[1:]:
            total += m
        return ((total + k // 2) // k).astype(dtype)  # round half up, exactly, in integers
    total = members[0].astype(np.float64)
    for m in members[1:]:
        total += m
    return (total / k).astype(dtype)


def _mode(members: list[np.ndarray]) -> np.ndarray:
    """The most frequent member of each box; the smallest value among equally frequent ones."""
    if members[0].dtype == np.uint8 and max(int(m.max(initial=0)) for m in members) <= 1:
        # a binary mask (the training target, a prediction's mask): 1 only by strict majority
        ones = members[0].astype(np.uint16)
        for m in members[1:]:
            ones += m
        return (2 * ones > len(members)).astype(np.uint8)

    def count(value: np.ndarray) -> np.ndarray:
        total = np.zeros(value.shape, np.uint8)
        for m in members:
            total += m == value
        return total

    best, best_count = members[0].copy(), count(members[0])
    for candidate in members[1:]:
        c = count(candidate)
        better = (c > best_count) | ((c == best_count) & (candidate < best))
        best[better] = candidate[better]
        best_count[better] = c[better]
    return best


def units(array) -> list[tuple[slice, ...]]:
    """The write units of a zarr array (shards when sharded, else chunks), as regions."""
    unit = array.shards or array.chunks
    grid = [range(0, n, u) for n, u in zip(array.shape, unit)]
    return [tuple(slice(a, min(a + u, n)) for a, u, n in zip(corner, unit, array.shape))
            for corner in itertools.product(*grid)]


def write_level(source, target, step: Sequence[int], rule: Rule, rank: int = 0, world: int = 1,
                threads: int = 2) -> int:
    """Fill this rank's units of `target` from `source` (the level below); returns voxels written."""
    from unet_dist.data.damaged_chunks import read_region  # a damaged source chunk is named, as everywhere else

    mine = units(target)[rank::world]

    def one(region: tuple[slice, ...]) -> int:
        below = tuple(slice(r.start * f, min(r.stop * f, n)) for r, f, n in zip(region, step, source.shape))
        reduced = downsample(read_region(source, below), step, rule)
        target[region] = reduced
        return reduced.size

    if threads <= 1 or len(mine) <= 1:
        return sum(map(one, mine))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pyramid") as pool:
        return sum(pool.map(one, mine))


def build(levels: Sequence, steps: Sequence[Sequence[int]], rule: Rule, rank: int = 0, world: int = 1,
          barrier: Callable[[], None] | None = None, threads: int = 2) -> int:
    """Write levels[1:] from levels[0], level by level; `barrier` runs after each level (ranks > 1)."""
    if len(levels) != len(steps) + 1:
        raise ValueError(f"{len(levels)} levels for {len(steps)} steps")
    written = 0
    for below, above, step in zip(levels, levels[1:], steps):
        written += write_level(below, above, step, rule, rank, world, threads)
        if barrier is not None:
            barrier()
    return written


def bytes_of(shapes: Sequence[Sequence[int]], itemsize: int) -> int:
    return sum(math.prod(s) for s in shapes) * itemsize


def steps_of(image) -> list[tuple[int, ...]]:
    """The factors between consecutive levels, from the OME scales."""
    scales = [level.scale for level in read_multiscale(image.attrs).levels]
    return [tuple(int(round(b / a)) for a, b in zip(lo, hi)) for lo, hi in zip(scales, scales[1:])]
