"""Inputs of `bench segment`, all synthetic: neuron IDs, their affinity prediction store (any size,
written chunk by chunk) and a fragment graph of any size for the global step.

Neurons are Voronoi cells of random points separated by a one-voxel layer of ID 0, as in the
FIB-SEM volume; affinities follow issue 24's convention (channel c of offset o: 1 iff v + o is
inside, ids[v] != 0 and ids[v] == ids[v + o]), blurred and with Gaussian noise so the watershed
over-segments as it does on a network's output, stored as `predict` stores them (uint8 = round(255 a)).
A volume larger than one tile repeats the tile: making a gigavoxel input costs one tile's work
plus the writes, and fragments and edges still grow with the volume (the tile's seams are boundaries).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi

from unet_dist.data.affinities import affinities
from unet_dist.segment.graph import BINS

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


def voronoi_ids(shape, cell: int = 12, seed: int = 0) -> np.ndarray:
    """Neuron IDs 1..n (int64), Voronoi cells of about `cell`^3 voxels, 0 on a one-voxel layer where
    cells meet."""
    rng = np.random.default_rng(seed)
    n = max(2, math.prod(shape) // cell ** 3)
    marker = np.zeros(shape, bool)
    marker[tuple(rng.integers(0, s, n) for s in shape)] = True
    _, nearest = ndi.distance_transform_edt(~marker, return_indices=True)
    ids, _ = ndi.label(marker)
    ids = ids[tuple(nearest)].astype(np.int64)
    del nearest
    edge = np.zeros(shape, bool)
    for a in range(3):
        edge |= np.pad(np.diff(ids, axis=a) != 0, [(0, 1) if i == a else (0, 0) for i in range(3)])
    ids[edge] = 0
    return ids


def noisy_affinities(ids: np.ndarray, blur: float = 0.7, noise: float = 0.1, seed: int = 1) -> np.ndarray:
    """A network's output stand-in: the true affinities blurred, plus noise, as uint8 round(255 a)."""
    a = ndi.gaussian_filter(affinities(ids, NEAREST, np.float32), (0, blur, blur, blur))
    a += np.random.default_rng(seed).normal(0, noise, a.shape).astype(np.float32)
    return np.rint(np.clip(a, 0, 1) * 255).astype(np.uint8)


def write_affinity_store(path, shape, chunk, read_chunk, offsets=NEAREST, voxel_nm: float = 10.0) -> Path:
    """An affinity prediction store as `predict` writes it (level 0; root attrs target, offsets),
    chunks (C, *chunk), each chunk from read_chunk(box) -> uint8 (C, *box shape): memory of one chunk."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    array = group.create_array("0", shape=(len(offsets), *shape), dtype=np.uint8, chunks=(len(offsets), *chunk),
                               dimension_names=["c", "z", "y", "x"])
    axes = [{"name": "c", "type": "channel"}] + [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    scale = [1.0, voxel_nm, voxel_nm, voxel_nm]
    group.attrs.update({
        "ome": {"version": "0.5", "multiscales": [{"name": "affinities", "axes": axes, "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}]}]},
        "unet_dist": {"predict": {"run_key": "bench-segment", "target": "affinities",
                                  "offsets": [list(o) for o in offsets],
                                  "settings": {"slices": [0, int(shape[0])]}}}})
    grid = [range(0, n, c) for n, c in zip(shape, chunk)]
    for z in grid[0]:
        for y in grid[1]:
            for x in grid[2]:
                box = tuple(slice(lo, min(lo + c, n)) for lo, c, n in zip((z, y, x), chunk, shape))
                array[(slice(None), *box)] = read_chunk(box)
    return Path(path)


def tiled_reader(tile: np.ndarray):
    """read_chunk for a volume that repeats `tile` (C, TZ, TY, TX) along every axis; chunks must not
    straddle a repeat (tile sides are multiples of the chunk sides)."""
    sides = tile.shape[1:]

    def read_chunk(box):
        local = tuple(slice(b.start % t, b.start % t + (b.stop - b.start)) for b, t in zip(box, sides))
        return tile[(slice(None), *local)]

    return read_chunk


def tiled_shape(voxels: float, tile) -> tuple[int, int, int]:
    """A Z, Y, X of about `voxels` voxels in whole tiles: y and x grow first (up to 8 tiles each),
    then z, as an EM volume is wide and deep."""
    tz, ty, tx = tile
    side = max(1, min(8, round((voxels / math.prod(tile)) ** (1 / 3))))
    z = max(1, round(voxels / (tz * ty * tx * side * side)))
    return (z * tz, side * ty, side * tx)


def planar_graph(fragments: int, keep: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Edges as the pipeline's global step receives them ({a, b (a < b), sum, count, hist}; fragment IDs
    1..n of one block): fragments on a 3D grid, each linked to its next neighbour along z, y and x
    (about 3 n edges, as a fragment's contacts in a volume; a random `keep` of them), link sums of
    count random voxels, in random order (as blocks' edges arrive)."""
    rng = np.random.default_rng(seed)
    side = max(2, round(fragments ** (1 / 3)))
    dims = (max(1, fragments // (side * side)), side, side)
    n = math.prod(dims)
    index = np.arange(1, n + 1, dtype=np.uint64).reshape(dims)
    a = np.concatenate([index[tuple(slice(0, -1) if i == k else slice(None) for i in range(3))].ravel()
                        for k in range(3)])
    b = np.concatenate([index[tuple(slice(1, None) if i == k else slice(None) for i in range(3))].ravel()
                        for k in range(3)])
    del index
    if keep < 1:
        chosen = rng.random(len(a)) < keep
        a, b = a[chosen], b[chosen]
    order = rng.permutation(len(a))
    a, b = a[order], b[order]
    count = rng.integers(1, 200, len(a))
    mean = rng.beta(2, 2, len(a))  # half the contacts above 0.5: large merged components, as after a watershed
    hist = link_histograms(rng, count, mean)
    centres = (np.arange(BINS) + 0.5) / BINS
    return {"a": a, "b": b, "sum": hist @ centres, "count": count.astype(np.int64), "hist": hist, "fragments": n}


def link_histograms(rng: np.random.Generator, count: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """(E, BINS) uint32 histograms of `count` link values around `mean`: a quarter of them one bin
    below mean's bin, a quarter one above, the rest in it (cheap at 10^7 edges; only the statistics'
    size and their pooling matter to the global step's cost)."""
    centre = np.minimum((mean * BINS).astype(np.int64), BINS - 1)
    below = rng.binomial(count, 0.25)
    above = rng.binomial(count - below, 1 / 3)
    hist = np.zeros((len(count), BINS), np.uint32)
    rows = np.arange(len(count))
    np.add.at(hist, (rows, np.maximum(centre - 1, 0)), below.astype(np.uint32))
    np.add.at(hist, (rows, np.minimum(centre + 1, BINS - 1)), above.astype(np.uint32))
    np.add.at(hist, (rows, centre), (count - below - above).astype(np.uint32))
    return hist
