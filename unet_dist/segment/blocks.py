"""One block's work, pure numpy: the input read around it, its fragments, and its edges.

Input: a prediction store's level 0, either affinities (C, Z, Y, X; channel c links voxel v to
v + offsets[c], the convention of issue 24) or a membrane prediction (Z, Y, X, the probability of
neuron interior). Both become, per block, a boundary map for the watershed and one value per
nearest-neighbour link (v, v - e_axis) for the edges: the affinity channel of that offset, or for a
membrane prediction the smaller interior probability of the two voxels (the boundary of a contact
is its more boundary-like side: with the mean, every link across a one-pixel membrane scores ~0.5,
at the merge threshold, and noise merged cells through it), on y and x only, so slices are
segmented apart.

Fragments: a seeded watershed (scikit-image) of the smoothed boundary map on the block plus its
halo, cropped to the block: seeds are the maxima of the distance to the boundary (within
2 * seed_spacing + 1 voxels) where the boundary is below seed_boundary, as DaCapo / LSD seed theirs.
IDs are unique across blocks with no communication: block i's fragments are base(i) + 0..n-1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.ndimage as ndi
from skimage.segmentation import watershed

from unet_dist.data.damaged_chunks import read_region
from unet_dist.predict.block_plan import BlockGrid
from unet_dist.predict.prediction_store import probability_float
from unet_dist.segment.graph import BINS, link_bins

NEAREST = ((-1, 0, 0), (0, -1, 0), (0, 0, -1))


@dataclass(frozen=True)
class Plan(BlockGrid):
    """The segmentation's blocks (one chunk of labels/neurons each) over the volume (Z, Y, X).
    Has the fields `predict.block_plan.block_core` and `assign` read, so they cut it the same way."""

    shape: tuple[int, int, int]
    block: tuple[int, int, int]
    halo: tuple[int, int, int]
    z0: int = 0  # where the volume starts in its input's z (predict's blocks may start later): here, at 0

    def base(self, index: int) -> int:
        """The first fragment ID of block `index`: a block holds at most prod(block) fragments."""
        return index * math.prod(self.block) + 1


@dataclass(frozen=True)
class Input:
    """The prediction as the segmentation reads it: `links` are the channels of the nearest-neighbour
    offsets (z, y, x order; None where absent: z of a 2D prediction)."""

    array: object  # zarr array, level 0
    kind: str  # "affinities" | "membrane"
    links: tuple[int | None, ...]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[-3:])

    @property
    def dims(self) -> int:
        return 2 if self.links[0] is None else 3


def nearest_channels(offsets) -> tuple[int | None, ...]:
    """Per axis (z, y, x), the channel whose offset is one step back along it, or None."""
    found = {tuple(int(v) for v in o): c for c, o in enumerate(offsets)}
    return tuple(found.get(o) for o in NEAREST)


def read_links(inp: Input, region) -> tuple[np.ndarray, np.ndarray]:
    """(links, valid) over `region` (slices, within the volume): links[a, v] is the value of the link
    between v and v - e_a in [0, 1]; valid[a, v] says it exists (v - e_a inside the volume and the axis
    linked)."""
    region = tuple(region)
    links = np.zeros((3, *(r.stop - r.start for r in region)), np.float32)
    valid = np.zeros(links.shape, bool)
    if inp.kind == "affinities":
        for a, c in enumerate(inp.links):
            if c is not None:
                links[a] = probability_float(read_region(inp.array, (slice(c, c + 1), *region)))[0]
                valid[a] = True
    else:
        grown = tuple(slice(max(r.start - 1, 0), r.stop) for r in region)
        p = probability_float(read_region(inp.array, grown))
        # one voxel before the region on every axis (a copy where the volume starts: no link there)
        p = np.pad(p, [(int(r.start == 0), 0) for r in region], mode="edge")
        here = p[1:, 1:, 1:]
        for a in (1, 2):  # a membrane prediction links voxels within slices only
            back = [slice(1, None)] * 3
            back[a] = slice(0, -1)
            links[a] = np.minimum(here, p[tuple(back)])
            valid[a] = True
    for a, r in enumerate(region):
        if r.start == 0 and valid[a].any():
            index = [slice(None)] * 3
            index[a] = 0
            valid[a][tuple(index)] = False
            links[a][tuple(index)] = 0
    return links, valid


def boundary_map(links: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """1 - the mean of the links that touch each voxel (its own, and its next neighbours' back to it)."""
    total = np.zeros(links.shape[1:], np.float32)
    count = np.zeros(links.shape[1:], np.float32)
    for a in range(3):
        lv, ok = links[a] * valid[a], valid[a].astype(np.float32)
        total += lv
        count += ok
        ahead = [slice(None)] * 3
        back = [slice(None)] * 3
        ahead[a], back[a] = slice(1, None), slice(None, -1)
        total[tuple(back)] += lv[tuple(ahead)]  # the link v+e_a -> v also touches v
        count[tuple(back)] += ok[tuple(ahead)]
    return 1 - total / np.maximum(count, 1)


def fragments(boundary: np.ndarray, dims: int, seed_boundary: float, seed_spacing: int,
              smooth_sigma: float, background: float = 1.0) -> np.ndarray:
    """Watershed fragments of `boundary` (a block plus halo), labels 1..n, 0 where the boundary
    exceeds `background` (so edges never run through the layer between neurons); 2D: slices apart."""
    sigma = (0 if dims == 2 else smooth_sigma, smooth_sigma, smooth_sigma)
    smooth = ndi.gaussian_filter(boundary, sigma) if smooth_sigma > 0 else boundary
    foreground = boundary <= background
    inside = (np.minimum(smooth, boundary) < seed_boundary) & foreground  # thin processes keep their seeds
    # a 2D prediction measures distance within slices: z steps cost more than any slice is wide
    sampling = (max(boundary.shape) + 1.0, 1.0, 1.0) if dims == 2 else None
    distance = ndi.distance_transform_edt(inside, sampling=sampling)
    size = 2 * seed_spacing + 1
    peaks = inside & (ndi.maximum_filter(distance, size=(1 if dims == 2 else size, size, size)) == distance)
    structure = ndi.generate_binary_structure(3, 1)
    if dims == 2:
        structure[0] = structure[2] = False
    seeds, n = ndi.label(peaks, structure=structure)
    return watershed(smooth, seeds, connectivity=structure, mask=foreground)


def block_fragments(inp: Input, plan: Plan, index: int, core, cfg) -> np.ndarray:
    """The block's fragment IDs (uint64), unique across blocks: base(index) + 0..n-1, numbered in
    order of first appearance (C order) so a block's IDs depend on nothing but the block."""
    region = tuple(slice(max(lo - h, 0), min(hi + h, n)) for (lo, hi), h, n in zip(core, plan.halo, plan.shape))
    if inp.kind == "membrane":  # the probability itself: its boundary voxels are the membrane's
        boundary = 1 - probability_float(read_region(inp.array, region))
    else:
        boundary = boundary_map(*read_links(inp, region))
    labels = fragments(boundary, inp.dims, cfg.seed_boundary, cfg.seed_spacing, cfg.smooth_sigma,
                       cfg.background)
    crop = tuple(slice(lo - r.start, hi - r.start) for (lo, hi), r in zip(core, region))
    labels = labels[crop]
    values, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))  # ranks of the labels by first appearance
    if values[0] == 0:  # background stays 0; fragments rank after it
        order = order - (order > order[0])
    ids = order[inverse.reshape(labels.shape)].astype(np.uint64) + np.uint64(plan.base(index))
    ids[labels == 0] = 0
    return ids


def block_edges(inp: Input, frags_below: np.ndarray, core, lows) -> dict[str, np.ndarray]:
    """Edges of the links from the block's voxels back to their neighbours (within the block, and
    across its lower faces): {a, b (a < b), sum, count, hist}, one row per fragment pair (graph.py).

    `frags_below`: fragments of the block grown by one voxel back on each axis where `lows[a]`
    (the block does not start at the volume's start). Every link has one owner: the block of the
    voxel it starts from, so blocks' edges never overlap."""
    region = tuple(slice(lo, hi) for lo, hi in core)
    links, valid = read_links(inp, region)
    own = frags_below[tuple(slice(1 if low else 0, None) for low in lows)]
    pairs, values = [np.zeros((0, 2), np.uint64)], [np.zeros(0)]
    for a in range(3):
        if not valid[a].any():
            continue
        back = [slice(1, None) if low else slice(None) for low in lows]
        back[a] = slice(0, own.shape[a]) if lows[a] else slice(0, own.shape[a] - 1)
        here = [slice(None)] * 3
        if not lows[a]:
            here[a] = slice(1, None)
        u, v = own[tuple(here)], frags_below[tuple(back)]
        w, ok = links[a][tuple(here)], valid[a][tuple(here)] & (u != v) & (u != 0) & (v != 0)
        pairs.append(np.stack([np.minimum(u[ok], v[ok]), np.maximum(u[ok], v[ok])], 1))
        values.append(w[ok].astype(np.float64))
    return link_edges(np.concatenate(pairs), np.concatenate(values))


def _runs(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order sorting the rows by (a, b), stably; the first sorted row of each distinct pair)."""
    order = np.lexsort((pairs[:, 1], pairs[:, 0]))
    pairs = pairs[order]
    start = np.ones(len(pairs), bool)
    start[1:] = (pairs[1:] != pairs[:-1]).any(1)
    return order, np.flatnonzero(start)


def _no_edges() -> dict[str, np.ndarray]:
    return {"a": np.zeros(0, np.uint64), "b": np.zeros(0, np.uint64), "sum": np.zeros(0),
            "count": np.zeros(0, np.int64), "hist": np.zeros((0, BINS), np.uint32)}


def link_edges(pairs: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
    """One row per link (its fragment pair and value) -> one row per pair: the edge statistics."""
    if len(pairs) == 0:
        return _no_edges()
    order, idx = _runs(pairs)
    pairs, values = pairs[order], values[order]
    edge = np.zeros(len(pairs), np.int64)
    edge[idx] = 1
    edge = np.cumsum(edge) - 1  # each sorted link's row
    hist = np.bincount(edge * BINS + link_bins(values), minlength=len(idx) * BINS).reshape(len(idx), BINS)
    return {"a": pairs[idx, 0].astype(np.uint64), "b": pairs[idx, 1].astype(np.uint64),
            "sum": np.add.reduceat(values, idx), "count": np.diff(np.append(idx, len(pairs))).astype(np.int64),
            "hist": hist.astype(np.uint32)}
