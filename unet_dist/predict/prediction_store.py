"""The prediction store's format: what `predict` writes and `evaluate`, `export`, `report`, `cv` read.

An OME-Zarr 0.5 image whose image is the probability of neuron interior (levels `0`, `1`, ...;
uint8 = round(255 p), or float16) with the binary mask as the label image `labels/mask`
(1 = neuron interior, 0 = membrane), chunks = the prediction block (in shards of a few blocks per
axis, `predict.shard_blocks`, when the volume has that many), the input's voxel size, and
the first predicted input slice as a z translation.

The probability is the store's image rather than a label image of the input store: a prediction
is written apart from its input (another node, another run), may cover a slice range of it, and
is opened on its own by viewers; its voxel size and translation place it on the input in any viewer.

A model with `target: affinities` gives an affinity prediction instead: the image `affinities`, levels
of (C, Z, Y, X) under axes c, z, y, x (channel c: the affinity of each voxel to its neighbour at
`offsets[c]`, uint8 = round(255 a) or float16; chunks and shards hold all channels of a block), no
mask, and the root attributes `unet_dist.predict.target = "affinities"` and `.offsets`. Coarser levels
average space only. It is turned into neurons by `segment`; what reads a membrane probability
(`evaluate` without --seg, `export`, `report`, `cv`) refuses it in one line (`open_prediction`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import zarr

from unet_dist.data import pyramid
from unet_dist.data.ome import Pyramid, create_image, create_label_image, image_levels
from unet_dist.data.layout import Layout
from unet_dist.data.store import RAW, label_names, label_path, open_store
from unet_dist.errors import UserError

PROBABILITY = RAW
MASK_NAME = "mask"
MASK = label_path(MASK_NAME)
NEURONS = "neurons"  # the label image `segment` adds: one ID per neuron (uint64, 0 = none)
NEURONS_PATH = label_path(NEURONS)
ARRAYS = (PROBABILITY, MASK)
MEMBRANE, AFFINITIES = "membrane", "affinities"  # `unet_dist.predict.target`; absent: membrane


def quantize(prob: np.ndarray, dtype: str) -> np.ndarray:
    return np.rint(prob * 255).astype(np.uint8) if dtype == "uint8" else prob.astype(np.float16)


def probability_float(values: np.ndarray) -> np.ndarray:
    """Stored probabilities as float32 in [0, 1] (uint8 holds round(255 p))."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values.astype(np.float32) / np.float32(255)
    return values.astype(np.float32)


def create_prediction(group: zarr.Group, shape, block, dtype: str, voxel_size, z0: int,
                      max_side: int = pyramid.MAX_SIDE, shard=None, channels: int | None = None) -> Pyramid:
    """Metadata and empty levels of probability and mask in `group` (missing ones only); chunks
    are the blocks, grouped into shards of shape `shard` when given. With `channels`: the
    affinities' (C, Z, Y, X) levels instead, and no mask."""
    plan = Pyramid.plan(Layout(tuple(shape), tuple(block), shard and tuple(shard)), voxel_size, max_side)
    translation = [z0 * plan.scales[0][0], 0.0, 0.0]
    if channels:
        create_image(group, AFFINITIES, plan, dtype, "probability", translation, channels)
        return plan
    create_image(group, "probability", plan, dtype, "probability", translation)
    create_label_image(group, MASK_NAME, plan, np.uint8, translation, kind="mask")
    return plan


def build_pyramids(group: zarr.Group, rank: int = 0, world: int = 1,
                   barrier: Callable[[], None] | None = None) -> int:
    """Levels above 0 of probability (mean) and mask (mode), each rank writing its own chunks."""
    written = 0
    images = [(group, "mean")]  # an affinity prediction's channels are averaged in space only (steps_of)
    if MASK_NAME in label_names(group):
        images.append((group["labels"][MASK_NAME], "mode"))
    for image, rule in images:
        levels = image_levels(image)
        written += pyramid.build(levels, pyramid.steps_of(image), rule, rank, world, barrier)
    return written


def prediction_target(group: zarr.Group) -> str:
    """`membrane` or `affinities`: what a prediction store's image holds."""
    return group.attrs.get("unet_dist", {}).get("predict", {}).get("target", MEMBRANE)


def prediction_offsets(group: zarr.Group) -> list[tuple[int, int, int]]:
    """The (z, y, x) offsets of an affinity prediction's channels, in channel order."""
    offsets = group.attrs.get("unet_dist", {}).get("predict", {}).get("offsets", [])
    return [tuple(int(v) for v in offset) for offset in offsets]


def open_prediction(path, arrays: Sequence[str] = ARRAYS, target: str | None = MEMBRANE):
    """A prediction store of `target` (None: either) and the first input slice it covers; UserError
    for the other target (checked before the arrays, as an affinity prediction has no mask)."""
    group = open_store(Path(path), arrays=())
    found = prediction_target(group)
    if target is not None and found != target:
        if found == AFFINITIES:
            raise UserError(f"{path}: an affinity prediction, not a membrane probability; turn it into neurons "
                            f"with `unet-dist segment --pred {path}`, then score it with `unet-dist evaluate --seg`")
        raise UserError(f"{path}: a membrane prediction, not affinities (predict with a model of "
                        "model.target: affinities)")
    group = open_store(Path(path), arrays=arrays)
    settings = group.attrs.get("unet_dist", {}).get("predict", {}).get("settings", {})
    return group, int(settings.get("slices", [0])[0])
