"""The prediction's bookkeeping files: the manifest of finished blocks, and the lock beside the output.

The manifest (`PRED.zarr/.manifest/`) is what `predict --resume` trusts: a block listed there under
the current run key (a hash of the weights and the prediction settings) is not predicted again.
Each batch of finished blocks is a Zarr group of its own whose attributes list them, so a reader that
walks the store (zarr's `members(max_depth=None)`, `tree()`) finds only nodes: zarr warns once for
every file or folder in a group that is not a node.
No torch here: the job launchers read the manifest on machines that only submit.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from unet_dist.errors import UserError, writing
from unet_dist.files import fault_point, write_json_atomic

MANIFEST = ".manifest"
MAX_BATCH = 64  # blocks per manifest file, at most
BATCH_SECONDS = 2.0  # a pending block waits at most about this long for its batch's file


class Manifest:
    """Finished blocks, recorded in batches; an entry counts only with the current run key.

    A block is added once its chunks are stored, and a batch is written (the group `blocks-<first>/`,
    its smallest index: unique, since a recorded block is never predicted again under its key) when it
    holds `every` blocks, when its oldest has waited BATCH_SECONDS, and at `flush`. A file per block
    cost 0.13 ms of a writer's time per block, as much as encoding the block (BENCHMARKS.md, io);
    a kill now loses the pending batch, which a resume predicts again. The `blocks-<first>.json` and
    `block-<i>.json` files of earlier versions still count.
    """

    def __init__(self, out: Path, key: str, rank: int = 0, every: int = 1):
        self.dir, self.key, self.rank, self.every = Path(out) / MANIFEST, key, rank, every
        self._lock = threading.Lock()
        self._pending: list[int] = []
        self._since = 0.0
        self.recorded = 0  # blocks this object wrote to the manifest: what a failed run leaves finished

    def create(self) -> None:
        self.dir.mkdir(exist_ok=True)
        (self.dir / "zarr.json").write_text(json.dumps(_group({"unet_dist": "finished prediction blocks"})))

    def batch_for(self, n_blocks: int) -> None:
        """Batches for a run of `n_blocks`: a kill loses at most 1/64 of it (or MAX_BATCH blocks)."""
        self.every = max(1, min(MAX_BATCH, n_blocks // 64))

    def done(self) -> set[int]:
        return {i for key, blocks in entries(self.dir.parent) if key == self.key for i in blocks}

    def mark(self, *indices: int) -> None:
        """Blocks `indices` are stored; recorded with their batch, all in the same one (a shard's blocks
        are stored together, so a resume finds all of them or none)."""
        if not indices:
            return
        with self._lock:
            if not self._pending:
                self._since = time.monotonic()
            self._pending.extend(int(i) for i in indices)
            if len(self._pending) < self.every and time.monotonic() - self._since < BATCH_SECONDS:
                return
            batch, self._pending = self._pending, []
        self._write(batch)

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        if batch:
            self._write(batch)

    def _write(self, batch: list[int]) -> None:
        node = self.dir / f"blocks-{min(batch)}"
        fault_point("block-mark", node)
        write_json_atomic(node / "zarr.json", _group({"key": self.key, "rank": self.rank, "blocks": sorted(batch)}),
                          indent=None)
        with self._lock:
            self.recorded += len(batch)


def _group(attributes: dict) -> dict:
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes}


def records(out: Path) -> Iterator[dict]:
    """`{"key", "rank", "blocks"}` of every readable batch in the manifest of the prediction `out`, any
    version: groups `blocks-<first>/` now, `blocks-<first>.json` and `block-<i>.json` files before."""
    for pattern in ("blocks-*/zarr.json", "blocks-*.json", "block-*.json"):
        for path in (Path(out) / MANIFEST).glob(pattern):
            try:
                entry = json.loads(path.read_text())
                entry = entry["attributes"] if entry.get("node_type") == "group" else entry
                blocks = [int(i) for i in entry["blocks"]] if "blocks" in entry else [int(entry["block"])]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # a file another writer is replacing, or not ours
            yield {"key": entry.get("key"), "rank": entry.get("rank"), "blocks": blocks}


def entries(out: Path) -> Iterator[tuple[str | None, list[int]]]:
    """(run key, blocks) of every readable manifest batch of the prediction `out`, any version."""
    for record in records(out):
        yield record["key"], record["blocks"]


class OutputLock:
    """`.PRED.zarr.lock` beside the output: one prediction writes an output at a time.

    A lock left by a process that died on this host is stale and taken over (kill -9 then resume);
    one held by a live process, or by another host, is respected.
    """

    def __init__(self, out: Path, writer: str = "prediction"):
        # `writer`: what this process writes into `out` (segment takes the same lock: a segmentation
        # never reads a prediction being written, nor two write labels/neurons at once)
        self.out, self.path, self.writer = out, out.parent / f".{out.name}.lock", writer
        self.mine = False

    def holder(self) -> str | None:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return None  # its owner is gone
            except (PermissionError, KeyError, ValueError):
                pass
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"

    def acquire(self) -> None:
        for _ in range(2):
            try:
                with writing(self.out):  # the output's folder is full, read-only or not ours
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held_by = self.holder()
                if held_by:
                    raise UserError(self.refusal(held_by)) from None
                self.path.unlink(missing_ok=True)
                continue
            with writing(self.out), os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(), "writer": self.writer,
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
            self.mine = True
            return

    def refusal(self, held_by: str) -> str:
        """The line for a lock held by `held_by` (`holder()`), naming what that process writes."""
        try:
            writer = json.loads(self.path.read_text()).get("writer", "prediction")
        except (OSError, ValueError, AttributeError):
            writer = "prediction"  # a lock of an earlier version: only predictions took it
        return f"{self.out}: another {writer} ({held_by}) is writing it; wait for it, or delete {self.path} if it is gone"

    def release(self) -> None:
        if self.mine:
            # on a file system gone read-only the lock stays: a dead process's lock is taken over
            with contextlib.suppress(OSError):
                self.path.unlink(missing_ok=True)
            self.mine = False


def finished_blocks(out) -> int:
    """Blocks the manifest of the prediction `out` lists (any run key): the launchers' measure of
    progress between a job's start and its time limit."""
    return sum(len(blocks) for _, blocks in entries(Path(out)))


if __name__ == "__main__":  # slurm/predict.sbatch: python -m unet_dist.predict.manifest PRED.zarr
    import sys

    print(finished_blocks(sys.argv[1]))
