"""`bench io`'s limits, measured in child processes beside the pipeline: every input chunk file
read and decoded in a tight loop, a memory copy, and what the identity pipeline cannot avoid beyond
decoding (encoding the outputs, and writing their files) with no halo, cache, queue or batch.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from pathlib import Path


def pin_cores(cores: int) -> None:
    """This process on its first `cores` usable cores."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])


def run_limit(store: str, cores: int, out: str | None = None, block: list | None = None,
              shard_blocks: list | None = None) -> dict:
    """Every chunk file of `raw` read and decoded (its crc32c checked, where it has one) in a tight
    loop on `cores` threads; a memory copy;
    with `out` and `block`, the decode + encode + write limit (`io_limit`) too."""
    from concurrent.futures import ThreadPoolExecutor

    import numcodecs.blosc
    import numpy as np

    from unet_dist.bench.common import cpu_seconds
    from unet_dist.data.chunk_io import ChunkFiles, checked
    from unet_dist.data.store import RAW, open_store
    from unet_dist.runtime import keep_freed_memory

    pin_cores(cores)
    keep_freed_memory()  # the allocator as the pipeline measured beside it has it (predict() sets it)
    numcodecs.blosc.use_threads = False  # one decode per thread, as zarr's worker threads do
    raw = open_store(store)[RAW]
    files = sorted(str(p) for p in (Path(store) / RAW / "c").rglob("*") if p.is_file())
    nbytes = math.prod(raw.chunks) * raw.dtype.itemsize

    source = ChunkFiles.of(raw)
    checksum = source is not None and source.checksum  # checked as the pipeline checks it

    def decode(part) -> int:
        out = np.empty(nbytes, np.uint8)
        for path in part:
            with open(path, "rb") as f:
                frame = f.read()
            numcodecs.blosc.decompress(checked(frame, path) if checksum else frame, out)
        return len(part) * nbytes

    parts = [files[i::cores] for i in range(cores)]
    t0, c0 = time.perf_counter(), cpu_seconds()
    with ThreadPoolExecutor(cores) as pool:
        decoded = sum(pool.map(decode, parts))
    decode_s, decode_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    src, dst = np.ones(nbytes, np.uint8), np.empty(nbytes, np.uint8)
    t0 = time.perf_counter()
    for _ in range(len(files)):
        np.copyto(dst, src)
    copy_s = time.perf_counter() - t0
    result = {"decode_bytes": decoded, "decode_s": decode_s, "decode_cpu_s": decode_cpu_s,
              "copy_bytes": nbytes * len(files), "copy_s": copy_s, "chunks": len(files)}
    if out is not None:
        result |= io_limit(raw, out, cores, block, shard_blocks or [1, 1, 1])
    return result


def io_limit(raw, out: str, cores: int, block: list, shard_blocks: list) -> dict:
    """What the identity pipeline cannot avoid, in a tight loop on `cores` threads: each input chunk
    decoded, and the output chunks inside it encoded with the outputs' codecs (probability = raw,
    mask = raw > 127) and written as new files, a file per chunk (data/chunk_io.py) and, apart, a
    file per shard of `shard_blocks` blocks (data/shard_io.py); no halo, cache, queue or batch.
    Empty where an output chunk does not lie inside one input chunk (shards: where a shard is not
    made of whole input chunks)."""
    block = [min(b, n) for b, n in zip(block, raw.shape)]
    shard = [min(b * k, -(-n // b) * b) for b, k, n in zip(block, shard_blocks, raw.shape)]
    if any(c % b for c, b in zip(raw.chunks, block)):
        return {}
    loops = _IoLoops.create(raw, out, block, shard)
    return loops.measure(cores) if loops is not None else {}


class _IoLoops:
    """The tight loops of `io_limit`: decode an input chunk, encode (and write) the outputs in it."""

    def __init__(self, raw, source, outputs: dict, block: list, shard: list):
        self.raw, self.source, self.outputs, self.block, self.shard = raw, source, outputs, block, shard
        self.in_grid = [-(-n // c) for n, c in zip(raw.shape, raw.chunks)]

    @classmethod
    def create(cls, raw, out: str, block: list, shard: list):
        """The loops with their two outputs (`out`-chunks, `out`-shards) created, or None where
        data/chunk_io.py or data/shard_io.py cannot handle the arrays."""
        import zarr

        from unet_dist.data.chunk_io import ChunkFiles
        from unet_dist.data.shard_io import ShardFiles
        from unet_dist.predict.prediction_store import MASK, PROBABILITY, create_prediction

        source = ChunkFiles.of(raw)
        outputs = {}
        for name, layout in (("chunks", None), ("shards", shard)):
            group = zarr.open_group(f"{out}-{name}", mode="w", zarr_format=3)
            create_prediction(group, raw.shape, block, "uint8", None, 0, shard=layout)
            outputs[name] = [(ShardFiles if layout else ChunkFiles).of(group[path]) for path in (PROBABILITY, MASK)]
        if source is None or None in outputs["chunks"] + outputs["shards"]:
            return None
        return cls(raw, source, outputs, block, shard)

    def encoded(self, coords, files) -> tuple[int, list]:
        """Input chunk `coords` decoded; (its bytes, [(output chunk, [bytes per output])])."""
        import numpy as np

        chunk, box = self.source.read(coords), self.source.box(coords)
        coded = []
        for corner in itertools.product(*(range(s.start, s.stop, b) for s, b in zip(box, self.block))):
            local = tuple(slice(c - s.start, min(c + b, s.stop) - s.start) for c, s, b in zip(corner, box, self.block))
            data = chunk[local]
            at = tuple(c // b for c, b in zip(corner, self.block))
            coded.append((at, [f.encode(at, v) for f, v in zip(files, (data, np.greater(data, 127).view(np.uint8)))]))
        return chunk.nbytes, coded

    def per_chunk(self, part, write: bool) -> int:
        done = 0
        for coords in part:
            nbytes, coded = self.encoded(coords, self.outputs["chunks"])
            for at, parts in coded:
                for files, data in zip(self.outputs["chunks"], parts):
                    if write:
                        files.store(at, data)
            done += nbytes
        return done

    def per_shard(self, part, write: bool) -> int:
        per_shard_chunks = [s // c for s, c in zip(self.shard, self.raw.chunks)]
        done = 0
        for at_shard in part:
            held = [{}, {}]
            for inner in itertools.product(*(range(a * k, min((a + 1) * k, g))
                                             for a, k, g in zip(at_shard, per_shard_chunks, self.in_grid))):
                nbytes, coded = self.encoded(inner, self.outputs["shards"])
                for at, parts in coded:
                    for h, data in zip(held, parts):
                        h[at] = data
                done += nbytes
            for files, h in zip(self.outputs["shards"], held):
                files.write(at_shard, h)
        return done

    def measure(self, cores: int) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        from unet_dist.bench.common import cpu_seconds

        grids = {"chunks": list(np.ndindex(*self.in_grid))}
        if not any(s % c for s, c in zip(self.shard, self.raw.chunks)):
            grids["shards"] = list(np.ndindex(*(-(-n // s) for n, s in zip(self.raw.shape, self.shard))))
        result = {}
        # decode + encode alone first: the difference is what writing the files costs (the kernel's
        # page cache), measured apart because on some machines it exceeds all the rest
        runs = [("io_limit_no_write", self.per_chunk, "chunks", False), ("io_limit", self.per_chunk, "chunks", True),
                ("io_limit_shards", self.per_shard, "shards", True)]
        for name, work, grid_name, write in runs:
            if grid_name not in grids:
                continue
            grid = grids[grid_name]
            t0, c0 = time.perf_counter(), cpu_seconds()
            with ThreadPoolExecutor(cores) as pool:
                total = sum(pool.map(lambda part: work(part, write), [grid[i::cores] for i in range(cores)]))
            result |= {f"{name}_bytes": total, f"{name}_s": time.perf_counter() - t0,
                       f"{name}_cpu_s": cpu_seconds() - c0}
        return result
