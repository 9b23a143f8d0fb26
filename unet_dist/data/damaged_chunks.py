"""Damaged stores named down to the chunk: reads that turn a chunk that does not decode, or a chunk
file missing from an array that stores every chunk, into one line naming the file."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import zarr

from unet_dist.errors import UserError


EVERY_CHUNK_STORED = "unet_dist_every_chunk_stored"


def writing_every_chunk(array):
    """`array` writing every chunk, an all-fill one too, where it promises that (EVERY_CHUNK_STORED):
    zarr forgets the `write_empty_chunks` of `create_volume_array` when an array is opened again."""
    if isinstance(array, zarr.Array) and array.attrs.get(EVERY_CHUNK_STORED):
        return array.with_config({"write_empty_chunks": True})
    return array


def _chunk_file(array, coords) -> Path | None:
    """The file that holds the chunk (the shard, when sharded) at `coords`, for local stores."""
    root = getattr(array.store_path.store, "root", None)
    if root is None:
        return None
    return Path(root) / array.store_path.path / array.metadata.encode_chunk_key(tuple(coords))


def _chunks_of(array, region: tuple[slice, ...]) -> list[tuple[int, ...]]:
    unit = array.shards or array.chunks
    ranges = []
    for sl, n, u in zip(region, array.shape, unit):
        start, stop, _ = sl.indices(n)
        ranges.append(range(start // u, (max(stop, start + 1) - 1) // u + 1))
    return list(itertools.product(*ranges))


def damaged_chunk(where, exc: BaseException) -> UserError:
    """The one line for a chunk that does not decode (here and in `chunk_io`)."""
    return UserError(f"{where}: damaged chunk, cannot be decoded ({type(exc).__name__}: {str(exc)[:120]})")


def missing_chunk(path) -> UserError:
    return UserError(f"{path}: chunk file is missing (deleted?); the store is damaged")


def read_region(array, region: tuple[slice, ...]) -> np.ndarray:
    """`array[region]`, with a damaged store named down to the chunk instead of a codec traceback.

    A chunk that does not decode is a UserError naming its file; in arrays written by this project
    (every chunk stored) a missing chunk file is one too, instead of silently reading zeros.
    """
    if not isinstance(array, zarr.Array):  # in-memory arrays cannot be damaged
        return np.asarray(array[region])
    region = tuple(region) + (slice(None),) * (array.ndim - len(region))
    try:
        data = np.asarray(array[region])
    except Exception as exc:
        for coords in _chunks_of(array, region):
            unit = array.shards or array.chunks
            box = tuple(slice(c * u, (c + 1) * u) for c, u in zip(coords, unit))
            try:
                array[box]
            except Exception:
                raise damaged_chunk(_chunk_file(array, coords) or f"{array.store_path} chunk {coords}",
                                    exc) from None
        raise
    if array.attrs.get(EVERY_CHUNK_STORED):
        for coords in _chunks_of(array, region):
            path = _chunk_file(array, coords)
            if path is not None and not path.exists():
                raise missing_chunk(path)
    return data


def sampled_chunks(array) -> Iterator[tuple[tuple[slice, ...], np.ndarray]]:
    """(region, values) of the first, middle and last chunk: a cheap look at what a volume holds
    (a mask or IDs, 0..1 or 0..255) without reading all of it."""
    grid = [-(-n // c) for n, c in zip(array.shape, array.chunks)]
    total = math.prod(grid)
    for flat in sorted({0, total // 2, total - 1}):
        coords = np.unravel_index(flat, grid)
        box = tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip(coords, array.chunks, array.shape))
        yield box, read_region(array, box)
