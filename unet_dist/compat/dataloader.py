"""A DataLoader's worker processes: their pids, and stopping them now, a stalled one too.

The trainer's loader workers ignore the stop signals (train/signals.py), so the terminate() that
multiprocessing sends daemon children at interpreter exit cannot end them, and a persistent
loader and its iterator hold each other: left to the garbage collector, the exit could wait for
the workers forever (seen under torchrun). torch has no public call for it; the multi-process
iterator's private `_shutdown_workers` is the one its own finaliser uses. A worker that is stalled
(stopped, hung in a read) never leaves: it is killed, after its pid left torch's SIGCHLD watch
(which would otherwise raise "worker killed" in the main process), and so is any worker still
alive after the shutdown, since the exit would join it forever.
"""

from __future__ import annotations

import functools
import os
import signal

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


def worker_pids(batches) -> list[int | None]:
    """The pid of each worker of `batches` (a DataLoader's iterator), by worker index; [] without
    workers or where torch keeps them elsewhere."""
    return [getattr(w, "pid", None) for w in getattr(batches, "_workers", ())]


def _forget_pids(batches) -> None:
    """Take the workers off torch's SIGCHLD watch, as `_shutdown_workers` does at its end."""
    if getattr(batches, "_worker_pids_set", False):
        from torch.utils.data._utils import signal_handling

        signal_handling._remove_worker_pids(id(batches))
        batches._worker_pids_set = False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_workers(batches, stalled: tuple[int, ...] = ()) -> None:
    """Shut down the workers of `batches` (a DataLoader's iterator) now, the `stalled` worker
    indices killed first without waiting for them; nothing for 0 workers (a single-process
    iterator has no workers and no `_shutdown_workers`)."""
    problem = _problem()
    shutdown = getattr(batches, SHUTDOWN, None)
    if problem is not None:
        consequence = ("stopping its workers through an untested private call" if shutdown is not None else
                       "its worker processes are left to the garbage collector (the exit may wait for them)")
        warn_once(f"{problem}: {consequence}")
    workers = list(getattr(batches, "_workers", ()))
    if stalled:
        _forget_pids(batches)
        for index in stalled:
            _kill(workers[index].pid)
            workers[index].join()  # killed: it goes now, even while stopped
    if shutdown is not None:
        shutdown()
    for worker in workers:
        if worker.is_alive():  # it ignores SIGTERM, and the exit would join it forever
            _kill(worker.pid)
            worker.join()
