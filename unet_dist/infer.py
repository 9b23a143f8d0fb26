"""Running a U-Net on whole images: mirror padding to a shape the network accepts, then crop.

Shared by the trainer's validation (whole slices) and the predictor (blocks plus halo), so both
see exactly the same arithmetic at the borders (the U-Net paper's mirrored overlap-tile).
"""

from __future__ import annotations

import numpy as np
import torch

from .model import halo, valid_input_shape


def padded_input_shape(model_cfg, out_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The smallest input shape whose output covers `out_shape`, and the context before each axis.

    Same padding: round each axis up to what the poolings divide (context 0). Valid padding: add
    the network's halo on each side and round up to a size the network accepts.
    """
    if model_cfg.padding == "same":
        return valid_input_shape(model_cfg, tuple(out_shape)), (0,) * len(out_shape)
    context = tuple(halo(model_cfg))  # valid padding: output = input - 2 * halo on every axis
    grown = tuple(o + 2 * c for o, c in zip(out_shape, context))
    return valid_input_shape(model_cfg, grown), context


def mirror_pad(image: np.ndarray, before: tuple[int, ...], after: tuple[int, ...]) -> np.ndarray:
    return np.pad(image, list(zip(before, after)), mode="symmetric")


@torch.inference_mode()
def forward_whole(model: torch.nn.Module, model_cfg, images: np.ndarray, device: torch.device,
                  autocast_ctx) -> np.ndarray:
    """Interior probabilities for a batch of whole images (N, *spatial), float32, same shape.

    Images are float32 in [0, 1]; each is mirrored to a shape the network accepts, and the output
    is cropped back to the input's own extent.
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
    # Same padding: output aligned with the padded input, cropped at the front. Valid padding: the
    # output starts `context` into the input, which is where the image begins.
    crop = (slice(None),) + tuple(slice(0, s) for s in spatial)
    return out[crop].cpu().numpy()
