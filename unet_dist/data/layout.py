"""How a volume array is cut and coded: chunks, optional shards, the slabs one write covers, and our
Blosc codecs per kind of array (raw, labels, probability, mask), each chunk checksummed (crc32c)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from unet_dist.data.damaged_chunks import EVERY_CHUNK_STORED
from unet_dist.data.store import AXES
from unet_dist.errors import UserError


# Raw EM is mostly noise (zstd level 3 compresses it as well as level 5, ~1.5x faster); byte
# shuffle helps 16-bit data. Bitshuffle makes 0/1 labels about 1.6x smaller than byte shuffle (ISBI).
COMPRESSORS = {
    "raw": dict(cname="zstd", clevel=3, shuffle="shuffle"),
    "labels": dict(cname="zstd", clevel=3, shuffle="bitshuffle"),
    # Predictor outputs are written at GPU speed: lz4 encodes probabilities 6x and masks 2.7x faster
    # than zstd-3 for 30-50% larger files (BENCHMARKS.md, codec table).
    "probability": dict(cname="lz4", clevel=5, shuffle="shuffle"),
    "mask": dict(cname="lz4", clevel=5, shuffle="bitshuffle"),
}
# Every chunk ends with the crc32c of its compressed bytes (zarr's `crc32c` codec, read by
# zarr-python, tensorstore and zarrs): a flipped bit in a store is one line naming the chunk, not
# a few wrong voxels spread by the network over a prediction. `bench io` turns it off to measure it.
_checksums = [True]


@contextlib.contextmanager
def checksums(on: bool):
    """Arrays created inside this context with (`on`) or without the crc32c codec; `bench io` only."""
    before, _checksums[0] = _checksums[0], on
    try:
        yield
    finally:
        _checksums[0] = before


@dataclass(frozen=True)
class Layout:
    """Chunks and optional shards of a (Z, Y, X) array; slabs are what one write (or read) covers."""

    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    shards: tuple[int, int, int] | None

    @classmethod
    def of(cls, array) -> "Layout":
        """The layout of an existing array, e.g. to stream it slab by slab."""
        return cls(tuple(array.shape), tuple(array.chunks), array.shards)

    @property
    def slab_depth(self) -> int:
        # Whole shards per write: two writes into one shard lose data (measured with zarr 3.1).
        return (self.shards or self.chunks)[0]

    def slabs(self) -> Iterator[tuple[int, int]]:
        depth = self.slab_depth
        for z0 in range(0, self.shape[0], depth):
            yield z0, min(z0 + depth, self.shape[0])


def parse_zyx(text: str, what: str) -> tuple[int, int, int]:
    """'1,512,512' -> (1, 512, 512); for CLI arguments."""
    try:
        values = tuple(int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UserError(f"{what}: expected three integers z,y,x, got '{text}'")
    return check_zyx(values, what)


def resolve_layout(shape, chunks="2d", shard=None) -> Layout:
    """Turn a preset ("2d", "3d") or explicit (z, y, x) chunks plus an optional shard into a Layout."""
    shape = tuple(int(s) for s in shape)
    z, y, x = shape
    if chunks == "2d":
        chunk_shape = (1, min(y, 1024), min(x, 1024))
    elif chunks == "3d":
        chunk_shape = (min(z, 32), min(y, 256), min(x, 256))
    elif isinstance(chunks, str):
        if chunks.replace(",", "").replace("x", "").isdigit():
            chunk_shape = parse_zyx(chunks, "chunks")
        else:
            raise UserError(f"chunks: expected '2d', '3d' or z,y,x, got '{chunks}'")
    else:
        chunk_shape = check_zyx(chunks, "chunks")
    shard_shape = None
    if shard is not None:
        shard_shape = parse_zyx(shard, "shard") if isinstance(shard, str) else check_zyx(shard, "shard")
        # A shard beyond the volume only needs to cover it: (32, ...) on 30 slices of 3d chunks
        # (30, ...) becomes 30, so presets clipped to small volumes still combine with a shard.
        shard_shape = tuple(
            min(s, -(-n // c) * c) for s, n, c in zip(shard_shape, shape, chunk_shape)
        )
        bad = [s for s, c in zip(shard_shape, chunk_shape) if s % c]
        if bad:
            raise UserError(
                f"shard: {shard_shape} is not a multiple of the chunks {chunk_shape} on every axis"
            )
    return Layout(shape, chunk_shape, shard_shape)


def check_zyx(values, what) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"{what}: expected three positive integers z,y,x, got {values!r}") from None
    if len(values) != 3 or min(values) < 1:
        raise UserError(f"{what}: expected three positive integers z,y,x, got {values}")
    return values  # type: ignore[return-value]


def create_volume_array(group: zarr.Group, name: str, layout: Layout, dtype, kind: str = "raw",
                        channels: int | None = None):
    """An empty (Z, Y, X) array with our codecs and OME dimension names; with `channels`, (C, Z, Y, X)
    whose every chunk and shard holds all channels (a block is written whole, all its channels)."""
    lead = (int(channels),) if channels else ()
    return group.create_array(
        name,
        shape=lead + tuple(layout.shape),
        dtype=np.dtype(dtype),
        chunks=lead + tuple(layout.chunks),
        shards=layout.shards and lead + tuple(layout.shards),
        compressors=[BloscCodec(**COMPRESSORS[kind])] + ([Crc32cCodec()] if _checksums[0] else []),
        fill_value=0,
        dimension_names=("c",) * len(lead) + AXES,
        # Every chunk is stored, even an all-zero one, so a missing chunk file means damage.
        config={"write_empty_chunks": True},
        attributes={EVERY_CHUNK_STORED: True},
    )
