"""Stopping a DataLoader's worker processes now, through its iterator's `_shutdown_workers`.

The trainer's loader workers ignore the stop signals (train/signals.py), so the terminate() that
multiprocessing sends daemon children at interpreter exit cannot end them, and a persistent
loader and its iterator hold each other: left to the garbage collector, the exit could wait for
the workers forever (seen under torchrun). torch has no public call for it; the multi-process
iterator's private `_shutdown_workers` is the one its own finaliser uses.
"""

from __future__ import annotations

import functools

from unet_dist.compat import TESTED_RANGES, out_of_range
from unet_dist.errors import warn_once

TESTED = TESTED_RANGES["torch"]
SHUTDOWN = "_shutdown_workers"


@functools.cache
def _problem() -> str | None:
    problem = out_of_range("torch", TESTED)
    if problem is None:
        from torch.utils.data import dataloader

        iterator = getattr(dataloader, "_MultiProcessingDataLoaderIter", None)
        if not callable(getattr(iterator, SHUTDOWN, None)):
            problem = "torch's multi-process DataLoader iterator has no _shutdown_workers"
    return problem


def stop_workers(batches) -> None:
    """Shut down the workers of `batches` (a DataLoader's iterator) now; nothing for 0 workers
    (a single-process iterator has no workers and no `_shutdown_workers`)."""
    problem = _problem()
    shutdown = getattr(batches, SHUTDOWN, None)
    if problem is not None:
        consequence = ("stopping its workers through an untested private call" if shutdown is not None else
                       "its worker processes are left to the garbage collector (the exit may wait for them)")
        warn_once(f"{problem}: {consequence}")
    if shutdown is not None:
        shutdown()
