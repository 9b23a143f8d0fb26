"""The GradScaler protocol of torch's fused optimizers, used to skip a non-finite step on the device.

A fused optimizer (Adam on GPUs) that sets `_step_supports_amp_scaling` reads two attributes in
`step()`, as GradScaler drives it: `found_inf` (a float tensor, nonzero: skip the step, Adam's step
count included) and `grad_scale` (None: the gradients are unscaled already). Neither is public API,
so the device path is taken only on tested torch versions; elsewhere the step reads the flag on the
host, which is always right and costs one synchronisation per step.
"""

from __future__ import annotations

import functools

import torch

from unet_dist.compat import TESTED_RANGES, out_of_range
from unet_dist.errors import warn_once

TESTED = TESTED_RANGES["torch"]
SUPPORTS_SCALING = "_step_supports_amp_scaling"


@functools.cache
def _problem() -> str | None:
    return out_of_range("torch", TESTED)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` can take the skip decision from a device tensor (see the module doc)."""
    if not getattr(optimizer, SUPPORTS_SCALING, False):
        return False
    problem = _problem()
    if problem is not None:
        warn_once(f"{problem}: a fused optimizer's non-finite steps are skipped by reading the flag "
                  "on the host (one synchronisation per step)")
        return False
    return True


def step_if_finite(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """optimizer.step() only where `finite` (a 0-d bool tensor) holds, without the host waiting for
    the GPU to learn the answer where the optimizer can take it on the device; others read the flag
    (on a CPU that costs nothing)."""
    if skips_on_device(optimizer):
        optimizer.found_inf = (~finite).to(torch.float32)
        optimizer.grad_scale = None
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf, optimizer.grad_scale
    elif bool(finite):
        optimizer.step()
