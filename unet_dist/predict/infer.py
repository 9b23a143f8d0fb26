"""Running the U-Net on the block plan's tiles in plain PyTorch: one block's probability.

Used by validation during training (train/validation.py) and by `report` (visualize/report.py), so
both see exactly the predictor's tiling (block_plan.py) and its arithmetic at the borders (the U-Net
paper's mirrored overlap-tile). The predictor itself runs the same tiles through `tilenet.TileNet`
(CUDA graphs, pinned buffers, test-time augmentation).
"""

from __future__ import annotations

import numpy as np
import torch

from unet_dist.data.patches import to_unit_float
from unet_dist.predict.block_plan import Plan, block_core, input_region, read_mirrored


@torch.inference_mode()
def forward_tiles(model: torch.nn.Module, tiles: np.ndarray, device: torch.device, autocast_ctx,
                  memory_format=torch.contiguous_format) -> np.ndarray:
    """Interior probabilities (n, C, *out) of a batch of tiles (n, *tile) in [0, 1], float32; C is the
    network's output channels (1 for the membrane target, one per offset for affinities)."""
    x = torch.from_numpy(np.ascontiguousarray(tiles[:, None], dtype=np.float32)).to(device, non_blocking=True)
    with autocast_ctx:
        logits = model(x.contiguous(memory_format=memory_format))
    return torch.sigmoid(logits.float()).cpu().numpy()


def block_output(model: torch.nn.Module, raw, plan: Plan, index: int, batch: int, device: torch.device,
                 autocast_ctx, memory_format=torch.contiguous_format):
    """The output (float32, (C, *block)) of block `index` of `plan` over the raw array, `batch` tiles per
    forward pass, and the block's output voxels ([lo, hi) per (z, y, x) axis)."""
    offset = plan.offset[1:] if plan.dims == 2 else plan.offset
    core = block_core(plan, index)
    shape = tuple(b - a for a, b in core)
    tiles = to_unit_float(read_mirrored(raw, input_region(plan, core)))
    tiles = tiles if plan.dims == 2 else tiles[None]
    out = np.concatenate([forward_tiles(model, tiles[i:i + batch], device, autocast_ctx, memory_format)
                          for i in range(0, len(tiles), batch)])
    crop = (slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(offset, shape[3 - len(offset):]))
    out = out[crop]  # 2D: (Z, C, Y, X), one tile per slice; 3D: (1, C, Z, Y, X)
    out = np.moveaxis(out, 1, 0) if plan.dims == 2 else out[0]
    return np.ascontiguousarray(out.reshape(out.shape[0], *shape)), core


def block_probability(model: torch.nn.Module, raw, plan: Plan, index: int, batch: int, device: torch.device,
                      autocast_ctx, memory_format=torch.contiguous_format):
    """The interior probability (float32, the block's output shape) of block `index` of a one-channel
    (membrane) model, and the block's output voxels ([lo, hi) per axis)."""
    out, core = block_output(model, raw, plan, index, batch, device, autocast_ctx, memory_format)
    return out[0], core
