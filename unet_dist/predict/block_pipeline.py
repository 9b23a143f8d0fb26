"""One rank's read -> compute -> write pipeline for prediction blocks.

Reader threads load the next blocks (Blosc releases the GIL) while the model runs batches of tiles
(always `batch_size` tiles, so results do not depend on which blocks share a batch); writer threads
store finished blocks and then record them in the manifest. Whole chunks are read and written as
files by data/chunk_io.py where it can show its bytes equal zarr's. An affinity model's blocks are
(C, *block), all channels in one chunk, and have no mask.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zarr

from unet_dist.config import PredictConfig
from unet_dist.data.chunk_cache import ChunkCache
from unet_dist.data.chunk_io import ChunkFiles
from unet_dist.data.damaged_chunks import read_region, writing_every_chunk
from unet_dist.metrics import confusion_counts
from unet_dist.predict.block_plan import Plan, as_slices, block_core, input_region, mirror_box, read_mirrored
from unet_dist.predict.failures import in_block
from unet_dist.predict.manifest import Manifest
from unet_dist.predict.output import OutputWriter
from unet_dist.predict.prediction_store import MASK, PROBABILITY
from unet_dist.predict.tilenet import TileNet
from unet_dist.runtime import usable_cores

def prefetch(fn: Callable, items: Iterable, pool: ThreadPoolExecutor, depth: int) -> Iterator:
    """fn(item) for each item, in order, computed up to `depth` items ahead in `pool`."""
    items, pending = iter(items), deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(items, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield result


@dataclass
class _Block:
    index: int
    core: tuple
    tiles: np.ndarray | None  # (n, *model tile), the raw dtype: 2D, one per slice; 3D, one
    label: np.ndarray | None
    valid: np.ndarray | None = None  # labelled voxels of the core (None: all), for the counts
    prob: np.ndarray | None = None  # (n, *core of one tile) (affinities: (n, C, ...)), the stored dtype
    mask: np.ndarray | None = None  # (n, *core of one tile); None for affinities
    remaining: int = 0
    out_shape: tuple = ()  # the shape of prob


def io_threads(cfg: PredictConfig, cores: int | None = None) -> tuple[int, int]:
    """(readers, writers): as configured, else one each per usable core, at least 2 (a thread
    blocked on the file system costs nothing) and at most 16 (zarr decodes in its own pool too)."""
    auto = max(2, min(16, cores or usable_cores()))
    return cfg.readers or auto, cfg.writers or auto


def block_crop(plan: Plan) -> tuple[slice, ...]:
    """Where a whole block lies in the model's output tile (spatial axes of the model)."""
    axes = (1, 2) if plan.dims == 2 else (0, 1, 2)
    return tuple(slice(plan.offset[a], plan.offset[a] + plan.block[a]) for a in axes)


class BlockPipeline:
    """Read -> compute -> write for this rank's blocks: reader threads decode inputs, the TileNet runs
    batches, writer threads store whole chunks and record each block in the manifest."""

    def __init__(self, plan: Plan, net: TileNet, raw, labels, out_group, manifest: Manifest, cfg: PredictConfig,
                 ignore=None):
        self.plan, self.net, self.raw, self.labels, self.cfg = plan, net, raw, labels, cfg
        self.ignore = ignore  # the labels' unlabelled voxels (1), counted nowhere
        image = out_group[PROBABILITY]
        self.channels = image.shape[0] if image.ndim == 4 else None  # affinities (C, Z, Y, X); None: membrane
        self.mask = None if self.channels else writing_every_chunk(out_group[MASK])
        self.manifest = manifest
        self.raw_cache = self.label_cache = None
        # Our own chunk files only with zarr's own pipeline: predict.codec_pipeline=zarrs asks for zarrs.
        own_files = cfg.codec_pipeline == "zarr"
        self.chunk_files = ChunkFiles.of if own_files else (lambda array: None)
        outputs = [writing_every_chunk(out_group[PROBABILITY])] + ([self.mask] if self.mask is not None else [])
        self.output = OutputWriter(plan, outputs, own_files)
        # the block that completes a shard writes it: so long a write must not stop the loop
        self.shard_size = math.prod(plan.shard_blocks)

    def plan_reads(self, todo: Sequence[int]) -> None:
        """Let the blocks `todo` share decoded input chunks (predict.chunk_cache_mb > 0)."""
        cap = self.cfg.chunk_cache_mb << 20
        if not cap or not isinstance(self.raw, zarr.Array):
            return
        cores = [block_core(self.plan, i) for i in todo]
        self.raw_cache = ChunkCache(self.raw, [mirror_box(input_region(self.plan, c), self.raw.shape)
                                               for c in cores], cap, self.chunk_files(self.raw))
        if isinstance(self.labels, zarr.Array):
            self.label_cache = ChunkCache(self.labels, [as_slices(self._input_core(c)) for c in cores], cap,
                                          self.chunk_files(self.labels))

    def read(self, index: int) -> _Block:
        with in_block(self.plan, index):  # a damaged input chunk is named with the block that needs it
            return self._read(index)

    def _read(self, index: int) -> _Block:
        core = block_core(self.plan, index)
        tiles = read_mirrored(self.raw, input_region(self.plan, core), self.raw_cache and self.raw_cache.read)
        tiles = tiles if self.plan.dims == 2 else tiles[None]
        label = valid = None
        if self.labels is not None:
            box = as_slices(self._input_core(core))
            label = self.label_cache.read(box) if self.label_cache else read_region(self.labels, box)
            valid = self._valid(box)
        return _Block(index, core, tiles, label, valid)

    def _valid(self, box) -> np.ndarray | None:
        return None if self.ignore is None else read_region(self.ignore, box) == 0

    def _input_core(self, core):
        return ((core[0][0] + self.plan.z0, core[0][1] + self.plan.z0), *core[1:])

    def write(self, block: _Block) -> np.ndarray:
        """Store a finished block, then record what is stored for good (with shards: whole shards);
        returns its confusion counts (zeros without labels)."""
        shape = tuple(hi - lo for lo, hi in block.core)
        if self.channels:  # (n, C, ...) -> (C, *block): 2D tiles are slices, a 3D block one tile
            outputs, mask = (np.moveaxis(block.prob, 1, 0).reshape((self.channels, *shape)),), None
        else:
            mask = block.mask.reshape(shape)
            outputs = (block.prob.reshape(shape), mask)
        # a full disk or a read-only output: one line naming the output and the block
        with in_block(self.plan, block.index, self.manifest.dir.parent):
            self.manifest.mark(*self.output.store(block.index, outputs))
        return np.zeros(4, np.int64) if block.label is None else confusion_counts(mask, block.label, valid=block.valid)

    def recount(self, index: int) -> np.ndarray:
        """Counts of a block finished earlier, from its stored mask."""
        core = block_core(self.plan, index)
        mask = np.asarray(self.mask[as_slices(core)])
        box = as_slices(self._input_core(core))
        return confusion_counts(mask, read_region(self.labels, box), valid=self._valid(box))

    def run(self, todo: list[int], readers: int, writers: int, on_block: Callable[[], None]) -> np.ndarray:
        """Predict and store the blocks `todo`; returns the summed confusion counts of their cores.

        One batch waits on the device while the next is assembled and submitted, so on a GPU the
        host never idles the device between batches."""
        self.manifest.batch_for(len(todo))
        try:
            return self._run(todo, readers, writers, on_block)
        finally:  # blocks stored before a failure or Ctrl-C are kept for the resume
            self.manifest.flush()

    def _expect(self, block: _Block, stored) -> int:
        """Shape (and, for several tiles, allocate) the outputs of `block`; returns its tile count."""
        shape = tuple(hi - lo for lo, hi in block.core)
        n = len(block.tiles)
        spatial = (n, *shape[1:]) if self.plan.dims == 2 else (1, *shape)
        block.out_shape = spatial[:1] + ((self.channels,) if self.channels else ()) + spatial[1:]
        if n > 1:  # a 2D block of several slices gathers its tiles' outputs
            block.prob = np.empty(block.out_shape, stored)
            block.mask = None if self.channels else np.empty(spatial, np.uint8)
        block.remaining = n
        return n

    @staticmethod
    def _gather(block: _Block, t: int, p: np.ndarray, m: np.ndarray | None, stored) -> None:
        """Tile `t`'s outputs (probability `p`, mask `m` or None) into `block`."""
        crop = tuple(slice(0, n) for n in block.out_shape[1:])  # blocks at the far edges are smaller
        if block.prob is None:
            # A block of one tile keeps the model's output (the batch's own arrays, which
            # TileNet never reuses): the writer thread's encoder copies it, not this loop.
            block.prob = p[crop][None].astype(stored, copy=False)
            block.mask = None if m is None else m[crop][None]
        else:
            block.prob[t] = p[crop]
            if m is not None:
                block.mask[t] = m[crop]
        block.remaining -= 1

    def _run(self, todo: list[int], readers: int, writers: int, on_block: Callable[[], None]) -> np.ndarray:
        counts = np.zeros(4, np.int64)
        batch, refs, inflight = [], [], deque()
        waiting = None  # (Pending, refs) of the batch submitted last
        stored = np.uint8 if self.cfg.probability_dtype == "uint8" else np.float16

        def drain(keep: int) -> None:
            nonlocal counts
            while len(inflight) > keep:
                counts += inflight.popleft().result()
                on_block()

        def collect(pending, refs_of) -> None:
            prob, mask = pending.result()
            for (block, t), p, m in zip(refs_of, prob, [None] * len(prob) if mask is None else mask):
                self._gather(block, t, p, m, stored)
                if block.remaining == 0:
                    inflight.append(write_pool.submit(self.write, block))
            drain(keep=2 * writers + self.shard_size)  # bounded: at most this many finished blocks wait

        def flush() -> None:
            nonlocal waiting
            pending = self.net.submit(np.stack(batch))
            for block, t in refs:
                if t == len(block.tiles) - 1:
                    block.tiles = None  # all its tiles are in submitted batches
            if waiting is not None:
                collect(*waiting)
            waiting = (pending, list(refs))
            batch.clear()
            refs.clear()

        with ThreadPoolExecutor(readers, "predict-read") as read_pool, \
                ThreadPoolExecutor(writers, "predict-write") as write_pool:
            for block in prefetch(self.read, todo, read_pool, depth=2 * readers + self.cfg.batch_size):
                n = self._expect(block, stored)
                for t in range(n):
                    batch.append(block.tiles[t])
                    refs.append((block, t))
                    if len(batch) == self.cfg.batch_size:
                        flush()
            if batch:
                flush()
            if waiting is not None:
                collect(*waiting)
            drain(keep=0)
        return counts
