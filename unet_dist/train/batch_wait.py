"""Waiting for the loader's next batch without waiting forever, and without missing a stop signal.

A worker that stops delivering (a hung file system, a stopped process) would stall the trainer
for good, and a stop signal would only be acted on at the next step boundary, which never comes:
on SLURM that is SIGKILL after the grace period and lost steps. So while the main process waits
for a batch, an interval timer (SIGALRM, every `SLICE_S`) checks the stop flag and how long the
batch has been owed (`data.loader_timeout_s`), and ends the wait by raising from its handler.

Not the DataLoader's own `timeout=`: that bounds only the wait on its queue, and the main process
also blocks after it, unpickling a batch whose tensors it fetches from the worker that made them
(torch's file-descriptor sharing): a worker stopped just after queueing a batch stalls it there.
An exception raised inside the DataLoader leaves its iterator unusable, so it always ends the run.

Batch `i` of this rank's stream comes from worker `i % W` (data/patches.py), so the worker that
owes the batch is known without asking the DataLoader.
"""

from __future__ import annotations

import signal

from unet_dist.compat.dataloader import stop_workers, worker_pids
from unet_dist.errors import UserError

SLICE_S = 1.0  # the longest a stop signal waits while a batch is owed


class StopWhileWaiting(Exception):
    """A stop signal arrived while the loader owed a batch."""


class LoaderStalled(UserError):
    """No batch from the worker that owes it within `data.loader_timeout_s`."""


class BatchWaiter:
    """`next(waiter)`: the loader's next batch, or StopWhileWaiting / LoaderStalled after a slice;
    `close()` shuts the workers down, a stalled one killed without waiting for it. Only with
    loader workers: without, the main process makes the batches itself and nothing waits."""

    def __init__(self, loader, stop, timeout_s: float, start_batch: int, rank: int):
        self.iterator = iter(loader)
        self.stop, self.timeout_s, self.rank = stop, timeout_s, rank
        self.workers = loader.num_workers
        self.first_batch = self.next_batch = start_batch  # the stream's index of the batch `next` returns
        self.stalled: tuple[int, ...] = ()
        self.waited = 0.0
        self.waiting = False
        self.previous = signal.signal(signal.SIGALRM, self._tick) if self.workers else None

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.workers:
            return next(self.iterator)
        self.waited, self.waiting = 0.0, True
        signal.setitimer(signal.ITIMER_REAL, SLICE_S, SLICE_S)
        try:
            batch = next(self.iterator)
        finally:
            self.waiting = False
            signal.setitimer(signal.ITIMER_REAL, 0)
        self.next_batch += 1
        return batch

    def _tick(self, signum, frame) -> None:
        if not self.waiting:
            return
        self.waited += SLICE_S
        if self.stop.raised or (self.timeout_s and self.waited >= self.timeout_s):
            self.waiting = False
            self.stalled = (self.owing_worker(),)
            if self.stop.raised:
                raise StopWhileWaiting()
            raise LoaderStalled(self.stall_message())

    def owing_worker(self) -> int:
        # the stream's worker w makes batches start + w, start + w + W, ... (data/patches.py)
        return (self.next_batch - self.first_batch) % self.workers

    def stall_message(self) -> str:
        worker = self.owing_worker()
        pids = worker_pids(self.iterator)
        pid = pids[worker] if worker < len(pids) else None
        return (f"loader worker {worker} (pid {pid}) has not delivered batch {self.next_batch} of rank "
                f"{self.rank} in {self.waited:g} s (data.loader_timeout_s={self.timeout_s:g}): it is stalled "
                "(a hung file system or a stopped process)")

    def close(self) -> None:
        if self.previous is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)
        stop_workers(self.iterator, self.stalled)
