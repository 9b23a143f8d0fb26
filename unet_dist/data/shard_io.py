"""Shards of a sharded Zarr v3 array written whole, and their inner chunks read, as files, by us.

Millions of small chunk files are slow on Lustre and GPFS, so the predictor's outputs are sharded:
an inner chunk is one prediction block, a shard a few blocks per axis. Each rank owns whole shards,
keeps the encoded inner chunks of a shard as its blocks finish, and writes the shard file once.
zarr-python would re-read and re-write a shard on every block assigned to it, and costs about
1-2 ms of Python per call besides (chunk_io.py), so we write the file ourselves where we can show
that its bytes are zarr's: the inner chunks coded as `chunk_io.ChunkFiles` codes a chunk, laid out
in zarr's (Morton) order, followed (or preceded) by the index of (offset, nbytes) pairs, uint64
little endian plus its crc32c, as zarr's default `index_codecs` have it (order and defaults checked
on the installed zarr by compat/zarr_internals.py). `ShardFiles.of` says None for anything else and
the caller goes through zarr. Inner chunks end with their crc32c where the inner codecs end with
`crc32c` (the project's arrays), checked on every read as chunk_io.py checks a chunk.

Every inner chunk inside the array is stored, an all-fill one too (the project's arrays promise
that: `EVERY_CHUNK_STORED`, `write_empty_chunks=True`); an edge shard's inner chunks wholly beyond
the array are not, as zarr leaves them out of a shard too (index entry 2**64-1). Byte-identical
shards to zarr-python's, edge shards included, read back equal by zarr and tensorstore:
tests/test_shard_io.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c
import numpy as np
import zarr

from unet_dist.compat.zarr_internals import INDEX_CODECS, codec_pairs, morton_order
from unet_dist.errors import UserError
from unet_dist.data.chunk_io import CRC32C, ChunkFiles, chunk_codecs, local_array, replace_file
from unet_dist.data.damaged_chunks import damaged_chunk, missing_chunk
MISSING = 2**64 - 1  # an index entry's (offset, nbytes) for a chunk the shard does not hold


class ShardFiles:
    """The shards of one sharded zarr array as files; see the module doc."""

    def __init__(self, array: zarr.Array, folder: Path, inner: ChunkFiles, index_at_start: bool):
        self.array, self.folder = array, folder
        self.inner = inner  # codes the inner chunks: ChunkFiles' grid is the inner chunk grid
        self.shape, self.chunks = inner.shape, inner.chunks
        self.shards = tuple(int(s) for s in array.shards)
        self.per_shard = tuple(s // c for s, c in zip(self.shards, self.chunks))
        self.index_at_start = index_at_start
        self.index_nbytes = 16 * int(np.prod(self.per_shard)) + CRC32C
        self._folders: set[Path] = set()

    @classmethod
    def of(cls, array) -> ShardFiles | None:
        """Files of `array`'s shards, or None where only zarr knows how to read and write them."""
        found = local_array(array, sharded=True)
        if found is None or [c.get("name") for c in found[1]] != ["sharding_indexed"]:
            return None
        folder, codecs, dtype = found
        config = codec_pairs(codecs)[0][1]
        if (codec_pairs(config.get("index_codecs", ())) != INDEX_CODECS
                or config.get("index_location", "end") not in ("start", "end")
                or tuple(config.get("chunk_shape", ())) != tuple(array.chunks)):
            return None
        inner = chunk_codecs(list(config.get("codecs", ())), dtype)
        if inner is None:
            return None
        return cls(array, folder, ChunkFiles(array, folder, *inner), config.get("index_location") == "start")

    def path(self, shard_coords) -> Path:
        return self.folder / self.array.metadata.encode_chunk_key(tuple(int(c) for c in shard_coords))

    def box(self, chunk_coords) -> tuple[slice, ...]:
        """The inner chunk's voxels inside the array."""
        return self.inner.box(chunk_coords)

    def chunk_of(self, region) -> tuple[int, ...] | None:
        """The inner chunk whose in-array part `region` (slices) is exactly; None if it is not one."""
        return self.inner.chunk_of(region)

    def shard_of(self, chunk_coords) -> tuple[int, ...]:
        return tuple(int(c) // n for c, n in zip(chunk_coords, self.per_shard))

    def chunks_in(self, shard_coords) -> list[tuple[int, ...]]:
        """The inner chunks (global coordinates) that the shard holds and that lie at least partly
        inside the array, in the order the shard stores them."""
        first = [int(s) * n for s, n in zip(shard_coords, self.per_shard)]
        grid = [-(-n // c) for n, c in zip(self.shape, self.chunks)]
        chunks = (tuple(f + c for f, c in zip(first, local)) for local in morton_order(self.per_shard))
        return [c for c in chunks if all(i < g for i, g in zip(c, grid))]

    def encode(self, chunk_coords, data: np.ndarray):
        """The bytes of the inner chunk at `chunk_coords` holding `data` (its voxels inside the
        array; an edge chunk is padded with the fill value), as zarr encodes them."""
        return self.inner.encode(chunk_coords, data)

    def write(self, shard_coords, encoded: dict) -> None:
        """Write the shard file from `encoded`: {inner chunk coordinates: `encode`'s bytes} for
        exactly the chunks of `chunks_in(shard_coords)`."""
        shard = tuple(int(s) for s in shard_coords)
        if self.inner.read_only:
            raise UserError(f"{self.folder}: opened read-only, cannot write shard {shard}")
        order = self.chunks_in(shard)
        if not order:
            raise ValueError(f"shard {shard} lies beyond the array {self.shape}")
        given = {tuple(int(c) for c in coords): value for coords, value in encoded.items()}
        missing, extra = set(order) - given.keys(), given.keys() - set(order)
        if missing or extra:
            raise ValueError(f"shard {shard}: inner chunks missing {sorted(missing)}, "
                             f"not in the shard or beyond the array {sorted(extra)}")
        index = np.full(self.per_shard + (2,), MISSING, "<u8")
        offset = self.index_nbytes if self.index_at_start else 0
        parts = []
        for coords in order:
            nbytes = memoryview(given[coords]).nbytes
            index[self._local(coords)] = offset, nbytes
            offset += nbytes
            parts.append(given[coords])
        raw = index.tobytes()
        index_bytes = raw + google_crc32c.value(raw).to_bytes(CRC32C, "little")
        parts = [index_bytes, *parts] if self.index_at_start else [*parts, index_bytes]
        replace_file(self.path(shard), parts, self._folders)

    def read(self, chunk_coords) -> np.ndarray:
        """The inner chunk's voxels inside the array, as `array[box]` returns them: the shard's index
        read, then that chunk's bytes only."""
        chunk = tuple(int(c) for c in chunk_coords)
        path = self.path(self.shard_of(chunk))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if self.inner.every_stored:
                raise missing_chunk(path) from None
            return self._fill(chunk)
        where = f"{path} (inner chunk {chunk})"
        try:
            size = os.fstat(fd).st_size
            start, stop = (self.index_nbytes, size) if self.index_at_start else (0, size - self.index_nbytes)
            if stop < start:
                raise damaged_chunk(where, ValueError(f"{size} bytes, fewer than the shard's index"))
            index_bytes = os.pread(fd, self.index_nbytes, 0 if self.index_at_start else stop)
            offset, nbytes = self._index(index_bytes, where)[self._local(chunk)]
            if offset == MISSING:
                if self.inner.every_stored:  # the array promises every chunk inside it
                    raise damaged_chunk(where, ValueError("not in the shard's index"))
                return self._fill(chunk)
            if not start <= offset <= offset + nbytes <= stop:
                raise damaged_chunk(where, ValueError(f"index says bytes {offset}+{nbytes} of {size}"))
            frame = os.pread(fd, int(nbytes), int(offset))
        finally:
            os.close(fd)
        return self.inner.decode(chunk, frame, where)

    def _local(self, chunk) -> tuple[int, ...]:
        return tuple(int(c) % n for c, n in zip(chunk, self.per_shard))

    def _index(self, index_bytes: bytes, where) -> np.ndarray:
        raw, crc = index_bytes[:-CRC32C], index_bytes[-CRC32C:]
        if len(index_bytes) != self.index_nbytes or google_crc32c.value(raw).to_bytes(CRC32C, "little") != crc:
            raise damaged_chunk(where, ValueError("the shard's index does not match its checksum"))
        return np.frombuffer(raw, "<u8").reshape(self.per_shard + (2,))

    def _fill(self, chunk) -> np.ndarray:
        return np.full(tuple(s.stop - s.start for s in self.box(chunk)), self.inner.fill, self.inner.dtype)
