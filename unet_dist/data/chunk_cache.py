"""Decoded chunks shared by the reads of neighbouring regions: each chunk is decoded once.

A predictor block reads its core plus a halo of context; with 1024^2 chunks a 576^2 region
straddles up to four of them, and decoding each whole for every block that touches it costs several
times the bytes delivered. The reads are known before the first one (every block's input region),
so the cache counts, per chunk, how many planned reads still need it, and drops a chunk when that
count reaches zero: with blocks in chunk order the live chunks are about two rows of them, whatever
the volume's depth. `max_bytes` bounds the cache for orders where that is not so (evicting the
least recently used chunk, decoded again if needed later: bytes, not correctness).

Reader threads may ask for the same chunk at once: the first decodes, the others wait for it.
Chunks are decoded by `chunk_io.ChunkFiles` when given one, else with `store.read_region`; either
way a damaged chunk is the same one-line error.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future

import numpy as np

from unet_dist.data.damaged_chunks import read_region
Box = tuple[slice, ...]


class ChunkCache:
    """Region reads of one (N-d) zarr array through its decoded chunks (inner chunks when sharded)."""

    def __init__(self, array, planned: Iterable[Box] = (), max_bytes: int = 1 << 30, files=None):
        self.array, self.files = array, files
        self.shape = tuple(int(n) for n in array.shape)
        self.unit = tuple(int(c) for c in array.chunks)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._uses: Counter = Counter()
        self._live: OrderedDict[tuple, Future] = OrderedDict()
        self._live_bytes = 0
        self.decoded_bytes = 0  # what decoding cost: whole chunks, a re-decoded one counted again
        self.delivered_bytes = 0  # what the reads returned
        self.peak_bytes = 0
        for box in planned:
            self._uses.update(self.chunks_of(box))

    def chunks_of(self, box: Box) -> list[tuple[int, ...]]:
        ranges = []
        for sl, n, u in zip(box, self.shape, self.unit):
            start, stop, _ = sl.indices(n)
            ranges.append(range(start // u, (max(stop, start + 1) - 1) // u + 1))
        return list(itertools.product(*ranges))

    def chunk_box(self, coords) -> Box:
        return tuple(slice(c * u, min((c + 1) * u, n)) for c, u, n in zip(coords, self.unit, self.shape))

    def read(self, box: Box, out: np.ndarray | None = None) -> np.ndarray:
        """`array[box]` (unit steps), into `out` when given; a planned read also spends its claim on
        the chunks."""
        box = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(box, self.shape))
        shape = tuple(sl.stop - sl.start for sl in box)
        if out is None:
            out = np.empty(shape, self.array.dtype)
        elif out.shape != shape:
            raise ValueError(f"out has shape {out.shape}, the box {shape}")
        for coords in self.chunks_of(box):
            chunk = self._get(coords)
            cbox = self.chunk_box(coords)
            src, dst = [], []
            for sl, c in zip(box, cbox):
                lo, hi = max(sl.start, c.start), min(sl.stop, c.stop)
                src.append(slice(lo - c.start, hi - c.start))
                dst.append(slice(lo - sl.start, hi - sl.start))
            out[tuple(dst)] = chunk[tuple(src)]
            self._spend(coords)
        with self._lock:
            self.delivered_bytes += out.nbytes
        return out

    def _get(self, coords) -> np.ndarray:
        with self._lock:
            future = self._live.get(coords)
            mine = future is None
            if mine:
                future = self._live[coords] = Future()
            else:
                self._live.move_to_end(coords)
        if mine:
            try:
                data = (self.files.read(coords) if self.files is not None
                        else read_region(self.array, self.chunk_box(coords)))
            except BaseException as exc:
                with self._lock:
                    self._live.pop(coords, None)
                future.set_exception(exc)
                raise
            with self._lock:  # counted before anyone can see it done, so a drop subtracts what was added
                self.decoded_bytes += data.nbytes
                self._live_bytes += data.nbytes
                self.peak_bytes = max(self.peak_bytes, self._live_bytes)
                future.set_result(data)
                self._evict_over_cap()
        return future.result()

    def _spend(self, coords) -> None:
        with self._lock:
            self._uses[coords] -= 1
            if self._uses[coords] <= 0:  # its last planned read (or an unplanned one): drop it
                del self._uses[coords]
                self._drop(coords)

    def _drop(self, coords) -> None:
        future = self._live.pop(coords, None)
        if future is not None and future.done() and future.exception() is None:
            self._live_bytes -= future.result().nbytes

    def _evict_over_cap(self) -> None:
        for coords in list(self._live):
            if self._live_bytes <= self.max_bytes:
                return
            if self._live[coords].done():
                self._drop(coords)

    @property
    def amplification(self) -> float:
        """Bytes decoded per byte delivered (below 1 when regions overlap, as halos do)."""
        return self.decoded_bytes / self.delivered_bytes if self.delivered_bytes else 0.0
