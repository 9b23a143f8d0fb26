"""Running a U-Net on whole images: mirror padding to a shape the network accepts, then crop.

Shared by the trainer's validation (whole slices) and the predictor (blocks plus halo), so both
see exactly the same arithmetic at the borders (the U-Net paper's mirrored overlap-tile).
"""

from __future__ import annotations

import numpy as np
import torch

from unet_dist.model import halo, pooling_factor, valid_input_shape


def padded_input_shape(model_cfg, out_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The input shape that gives `out_shape` with full context, and the context before each axis.

    Same padding: the network's halo (rounded up to its pooling grid) on each side, then rounded
    up to what the poolings divide; the output is as large as the input. Valid padding: the halo the
    network consumes, grown to a size it accepts; the output is smaller than the input.
    """
    reach = tuple(halo(model_cfg))
    if model_cfg.padding == "same":
        pool = pooling_factor(model_cfg)
        context = tuple(-(-r // p) * p for r, p in zip(reach, pool))
        grown = tuple(o + 2 * c for o, c in zip(out_shape, context))
        return valid_input_shape(model_cfg, grown), context
    grown = tuple(o + 2 * c for o, c in zip(out_shape, reach))  # valid: output = input - 2 * halo
    return valid_input_shape(model_cfg, grown), reach


def mirror_pad(image: np.ndarray, before: tuple[int, ...], after: tuple[int, ...]) -> np.ndarray:
    return np.pad(image, list(zip(before, after)), mode="symmetric")


@torch.inference_mode()
def forward_whole(model: torch.nn.Module, model_cfg, images: np.ndarray, device: torch.device,
                  autocast_ctx) -> np.ndarray:
    """Interior probabilities for a batch of whole images (N, *spatial), float32, same shape.

    Images are float32 in [0, 1]; each is mirrored by the network's halo (the U-Net paper's
    overlap-tile border), as the predictor does, and the output is cropped back to the image.
    """
    spatial = images.shape[1:]
    in_shape, context = padded_input_shape(model_cfg, spatial)
    before = (0,) + context
    after = (0,) + tuple(i - s - c for i, s, c in zip(in_shape, spatial, context))
    padded = mirror_pad(images, before, after)
    x = torch.from_numpy(np.ascontiguousarray(padded[:, None])).to(device)
    with autocast_ctx:
        logits = model(x)
    out = torch.sigmoid(logits.float())[:, 0]
    # Same padding: the output is aligned with the padded input, so the image starts `context` in.
    # Valid padding: the output already starts `context` into the input, where the image begins.
    start = context if model_cfg.padding == "same" else (0,) * len(spatial)
    crop = (slice(None),) + tuple(slice(c, c + s) for c, s in zip(start, spatial))
    return out[crop].cpu().numpy()


@torch.inference_mode()
def forward_tiles(model: torch.nn.Module, tiles: np.ndarray, device: torch.device, autocast_ctx,
                  memory_format=torch.contiguous_format) -> np.ndarray:
    """Interior probabilities (n, *out) of a batch of tiles (n, *tile) in [0, 1], float32."""
    x = torch.from_numpy(np.ascontiguousarray(tiles[:, None], dtype=np.float32)).to(device, non_blocking=True)
    with autocast_ctx:
        logits = model(x.contiguous(memory_format=memory_format))
    return torch.sigmoid(logits.float())[:, 0].cpu().numpy()
