"""What zarr-python does that chunk_io.py and shard_io.py repeat to write files with zarr's bytes.

A shard stores its inner chunks in zarr's Morton order, and zarr's default `index_codecs` code its
index; zarr keeps the order in `zarr.core.indexing`, not a public API. A chunk of an array whose
codecs end with `crc32c` ends with the checksum as zarr's `Crc32cCodec` appends it. A file that
differs from zarr's in any of these would still be read by us but be wrong for zarr and
tensorstore, silently. So the files are written by us only on tested zarr versions where the
order, the defaults and the checksum are as below; elsewhere every chunk and shard goes through
zarr-python (slower, same results).
"""

from __future__ import annotations

import functools
import itertools

import google_crc32c

from unet_dist.compat import TESTED_RANGES, out_of_range
from unet_dist.errors import warn_once

TESTED = TESTED_RANGES["zarr"]
# zarr's default index codecs of a shard, as (name, configuration) pairs: the only ones we write
INDEX_CODECS = [("bytes", {"endian": "little"}), ("crc32c", {})]
CHECKSUM_CODEC = ("crc32c", {})  # zarr's checksum codec: uint32 little endian crc32c after the bytes
PROBE_GRID = (2, 3, 5)  # uneven extents: an axis drops out of the interleaving early


@functools.lru_cache(maxsize=16)
def morton_order(grid: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Every coordinate of `grid` in the order zarr stores a shard's chunks: by Morton code, the
    bits of the coordinates interleaved from the lowest, axis 0 first in each round, an axis
    dropping out once its bits (those that its extent needs) are spent."""
    bits = [(n - 1).bit_length() for n in grid]

    def code(coords):
        z = out = 0
        for bit in range(max(bits, default=0)):
            for axis, c in enumerate(coords):
                if bit < bits[axis]:
                    z |= ((c >> bit) & 1) << out
                    out += 1
        return z

    return tuple(sorted(itertools.product(*(range(n) for n in grid)), key=code))


def codec_pairs(codecs) -> list[tuple[str, dict]]:
    """Codecs' metadata JSON (dicts) as (name, configuration) pairs."""
    return [(c.get("name"), dict(c.get("configuration") or {})) for c in codecs]


def zarrs_morton_order(grid: tuple[int, ...]) -> tuple[tuple[int, ...], ...] | None:
    """zarr's own order for `grid`, or None where zarr no longer has the function."""
    try:
        from zarr.core.indexing import morton_order_iter
    except ImportError:
        return None
    return tuple(tuple(int(c) for c in coords) for coords in morton_order_iter(grid))


def default_index_codecs() -> list[tuple[str, dict]]:
    from zarr.codecs import ShardingCodec

    return codec_pairs(c.to_dict() for c in ShardingCodec(chunk_shape=(1,)).index_codecs)


def zarrs_checksummed(data: bytes) -> bytes:
    """The chunk file zarr writes for `data` (uint8, one chunk) through bytes -> crc32c."""
    import numpy as np
    import zarr
    from zarr.codecs import Crc32cCodec
    from zarr.storage import MemoryStore

    files: dict = {}
    array = zarr.create_array(MemoryStore(files), shape=(len(data),), chunks=(len(data),), dtype="uint8",
                              compressors=Crc32cCodec(), fill_value=0)
    array[:] = np.frombuffer(data, np.uint8)
    return files["c/0"].to_bytes()


def checksum_matches_zarr(probe: bytes = b"unet_dist crc32c probe") -> bool:
    from zarr.codecs import Crc32cCodec

    ours = probe + google_crc32c.value(probe).to_bytes(4, "little")
    return codec_pairs([Crc32cCodec().to_dict()]) == [CHECKSUM_CODEC] and zarrs_checksummed(probe) == ours


@functools.cache
def _problem() -> str | None:
    problem = out_of_range("zarr", TESTED)
    if problem is None and zarrs_morton_order(PROBE_GRID) != morton_order(PROBE_GRID):
        problem = "zarr's shard chunk order (zarr.core.indexing.morton_order_iter) moved or changed"
    if problem is None and default_index_codecs() != INDEX_CODECS:
        problem = f"zarr's default shard index codecs are {default_index_codecs()}, not {INDEX_CODECS}"
    if problem is None and not checksum_matches_zarr():
        problem = "zarr's crc32c codec no longer appends the crc32c of the bytes, uint32 little endian"
    return problem


def files_match_zarr() -> bool:
    """Whether chunk and shard files may be written by us as zarr-python's bytes (see the module doc);
    the first refusal says why in one line."""
    problem = _problem()
    if problem is not None:
        warn_once(f"{problem}: chunks and shards are read and written through zarr-python (slower)")
    return problem is None
