"""Finished prediction blocks into the output arrays: whole chunks, or whole shards.

A block is one chunk of each output array (probability, mask; an affinity prediction's one array of
(C, Z, Y, X) has chunks and shards holding all channels, so a block is still one chunk, at channel
coordinate 0). Unsharded, a block is stored as soon
as it is finished. Sharded (`predict.shard_blocks`), the blocks of a shard are held until the last
one arrives and the shard is written once, whole: two writes into one shard lose data, so each rank
owns whole shards (block_plan.assign with shard_of) and reports a shard's blocks stored only
together. Held blocks are already encoded, by the writer thread that finished them, so the thread
that completes a shard only joins bytes and writes one file per array.

Chunks and shards go to files through data/chunk_io.py and data/shard_io.py where those write
zarr-python's own bytes; otherwise through zarr, a whole shard region in one assignment.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import zarr

from unet_dist.predict.block_plan import Plan, as_slices, block_core, shard_members, shard_of
from unet_dist.data.chunk_io import ChunkFiles
from unet_dist.data.shard_io import ShardFiles


def grid_coords(plan: Plan, index: int) -> tuple[int, ...]:
    return tuple(int(c) for c in np.unravel_index(index, plan.grid))


class OutputWriter:
    """Stores finished blocks into `arrays` (each block one chunk of each); thread-safe."""

    def __init__(self, plan: Plan, arrays: Sequence[zarr.Array], files: bool = True):
        self.plan, self.arrays = plan, list(arrays)
        opener = ShardFiles.of if plan.shard is not None else ChunkFiles.of
        # `files=False`: everything through zarr (the `zarrs` codec pipeline asks for that)
        self.files = [opener(a) if files else None for a in self.arrays]
        self.lead = [a.ndim - 3 for a in self.arrays]  # leading (channel) axes, whole in every chunk
        self._held: dict[tuple, dict[int, list]] = {}  # shard -> block -> one part per array
        self._lock = threading.Lock()

    def store(self, index: int, outputs: Sequence[np.ndarray]) -> list[int]:
        """Store block `index`'s outputs (one per array, in the block's shape). Returns the blocks
        now stored for good: this one, or with shards all of its shard's once its last block is in
        (none before)."""
        region = as_slices(block_core(self.plan, index))
        coords = grid_coords(self.plan, index)
        if self.plan.shard is None:
            for array, files, data, lead in zip(self.arrays, self.files, outputs, self.lead):
                if files is None:
                    array[(slice(None),) * lead + region] = data
                else:
                    files.write((0,) * lead + coords, data)
            return [index]
        # the output's chunks are the blocks and its shards the plan's: grid coordinates are theirs
        parts = [data if files is None else files.encode((0,) * lead + coords, data)
                 for files, data, lead in zip(self.files, outputs, self.lead)]
        shard = shard_of(self.plan, index)
        members = shard_members(self.plan, shard)
        with self._lock:
            held = self._held.setdefault(shard, {})
            held[index] = parts
            if len(held) < len(members):
                return []
            del self._held[shard]
        for a, (array, files, lead) in enumerate(zip(self.arrays, self.files, self.lead)):
            if files is None:
                self._store_region(array, members, [held[i][a] for i in members])
            else:
                files.write((0,) * lead + shard, {(0,) * lead + grid_coords(self.plan, i): held[i][a] for i in members})
        return members

    def _store_region(self, array: zarr.Array, members: list[int], blocks: list[np.ndarray]) -> None:
        """A shard's blocks assembled and assigned through zarr at once (whole shard, one write)."""
        cores = [block_core(self.plan, i) for i in members]
        lo = [min(c[a][0] for c in cores) for a in range(3)]
        hi = [max(c[a][1] for c in cores) for a in range(3)]
        lead = array.ndim - 3
        whole = np.empty([*array.shape[:lead], *(h - l for l, h in zip(lo, hi))], array.dtype)
        every = (slice(None),) * lead
        for core, data in zip(cores, blocks):
            whole[every + tuple(slice(a - l, b - l) for (a, b), l in zip(core, lo))] = data
        array[every + tuple(slice(l, h) for l, h in zip(lo, hi))] = whole
