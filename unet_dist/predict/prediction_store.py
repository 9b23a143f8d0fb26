"""The prediction store's format: what `predict` writes and `evaluate`, `export`, `report`, `cv` read.

An OME-Zarr 0.5 image whose image is the probability of neuron interior (levels `0`, `1`, ...;
uint8 = round(255 p), or float16) with the binary mask as the label image `labels/mask`
(1 = neuron interior, 0 = membrane), chunks = the prediction block (in shards of a few blocks per
axis, `predict.shard_blocks`, when the volume has that many), the input's voxel size, and
the first predicted input slice as a z translation.

The probability is the store's image rather than a label image of the input store: a prediction
is written apart from its input (another node, another run), may cover a slice range of it, and
is opened on its own by viewers; its voxel size and translation place it on the input in any viewer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import zarr

from unet_dist.data import pyramid
from unet_dist.data.ome import Pyramid, create_image, create_label_image, image_levels
from unet_dist.data.layout import Layout
from unet_dist.data.store import RAW, label_path, open_store
PROBABILITY = RAW
MASK_NAME = "mask"
MASK = label_path(MASK_NAME)
ARRAYS = (PROBABILITY, MASK)


def quantize(prob: np.ndarray, dtype: str) -> np.ndarray:
    return np.rint(prob * 255).astype(np.uint8) if dtype == "uint8" else prob.astype(np.float16)


def probability_float(values: np.ndarray) -> np.ndarray:
    """Stored probabilities as float32 in [0, 1] (uint8 holds round(255 p))."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values.astype(np.float32) / np.float32(255)
    return values.astype(np.float32)


def create_prediction(group: zarr.Group, shape, block, dtype: str, voxel_size, z0: int,
                      max_side: int = pyramid.MAX_SIDE, shard=None) -> Pyramid:
    """Metadata and empty levels of probability and mask in `group` (missing ones only); chunks
    are the blocks, grouped into shards of shape `shard` when given."""
    plan = Pyramid.plan(Layout(tuple(shape), tuple(block), shard and tuple(shard)), voxel_size, max_side)
    translation = [z0 * plan.scales[0][0], 0.0, 0.0]
    create_image(group, "probability", plan, dtype, "probability", translation)
    create_label_image(group, MASK_NAME, plan, np.uint8, translation, kind="mask")
    return plan


def build_pyramids(group: zarr.Group, rank: int = 0, world: int = 1,
                   barrier: Callable[[], None] | None = None) -> int:
    """Levels above 0 of probability (mean) and mask (mode), each rank writing its own chunks."""
    written = 0
    for image, rule in ((group, "mean"), (group["labels"][MASK_NAME], "mode")):
        levels = image_levels(image)
        written += pyramid.build(levels, pyramid.steps_of(image), rule, rank, world, barrier)
    return written


def open_prediction(path, arrays: Sequence[str] = ARRAYS):
    """A prediction store and the first input slice it covers."""
    group = open_store(Path(path), arrays=arrays)
    settings = group.attrs.get("unet_dist", {}).get("predict", {}).get("settings", {})
    return group, int(settings.get("slices", [0])[0])
