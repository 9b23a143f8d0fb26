"""Whole chunks read and written by us (data/chunk_io.py): the same files, byte for byte, as
zarr-python writes, the same arrays as it reads, edge chunks included; zarr for anything else.
Real stores on disk throughout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, TransposeCodec, ZstdCodec

from unet_dist.data.chunk_io import ChunkFiles
from unet_dist.data.damaged_chunks import EVERY_CHUNK_STORED
from unet_dist.errors import UserError

SHAPE, CHUNKS = (3, 50, 70), (2, 16, 32)  # edge chunks on every axis
KINDS = {
    "uint8 lz4 shuffle": ("uint8", BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")),
    "uint8 lz4 bitshuffle": ("uint8", BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")),
    "uint8 zstd-3": ("uint8", BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")),
    "float16 lz4 shuffle": ("float16", BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")),
    "uint16 zstd blocksize": ("uint16", BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", blocksize=1024)),
    "float32 uncompressed": ("float32", None),
}


def make(path: Path, dtype, compressor, fill=0, **extra) -> zarr.Array:
    group = zarr.open_group(str(path), mode="a", zarr_format=3)
    return group.create_array("a", shape=SHAPE, chunks=CHUNKS, dtype=dtype, compressors=compressor,
                               fill_value=fill, config={"write_empty_chunks": True},
                               attributes={EVERY_CHUNK_STORED: True}, **extra)


def data_of(dtype, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        data = rng.random(SHAPE).astype(dtype)
    else:
        data = (rng.integers(0, 4, SHAPE) * rng.integers(0, 200, SHAPE)).astype(dtype)
    data[0:2, 16:32, 0:32] = 0  # a whole chunk of the fill value: stored all the same
    return data


def chunk_files(array_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(array_dir)): p.read_bytes() for p in sorted(array_dir.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


def all_chunks(files: ChunkFiles):
    grid = [-(-n // c) for n, c in zip(files.shape, files.chunks)]
    return list(np.ndindex(*grid))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_writes_are_zarrs_bytes_and_reads_are_zarrs_arrays(kind, tmp_path):
    dtype, compressor = KINDS[kind]
    data = data_of(dtype)
    theirs = make(tmp_path / "zarr.zarr", dtype, compressor, fill=0)
    theirs[:] = data
    ours = make(tmp_path / "ours.zarr", dtype, compressor, fill=0)
    files = ChunkFiles.of(ours)
    assert files is not None
    for coords in all_chunks(files):
        box = files.box(coords)
        assert files.chunk_of(box) == tuple(coords)
        files.write(coords, data[box])
    a, b = chunk_files(tmp_path / "zarr.zarr" / "a"), chunk_files(tmp_path / "ours.zarr" / "a")
    assert sorted(a) == sorted(b) and len(a) == len(all_chunks(files))
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]
    reader = ChunkFiles.of(zarr.open_array(str(tmp_path / "zarr.zarr" / "a"), mode="r"))
    for coords in all_chunks(reader):
        got = reader.read(coords)
        assert got.dtype == theirs.dtype and np.array_equal(got, theirs[reader.box(coords)])


def test_an_edge_chunk_is_padded_with_the_fill_value_as_zarr_pads_it(tmp_path):
    data = data_of("uint8")
    theirs = make(tmp_path / "zarr.zarr", "uint8", KINDS["uint8 lz4 shuffle"][1], fill=7)
    theirs[:] = data
    ours = make(tmp_path / "ours.zarr", "uint8", KINDS["uint8 lz4 shuffle"][1], fill=7)
    files = ChunkFiles.of(ours)
    edge = (1, 3, 2)
    files.write(edge, data[files.box(edge)])
    key = "c/1/3/2"
    assert (tmp_path / "ours.zarr" / "a" / key).read_bytes() == (tmp_path / "zarr.zarr" / "a" / key).read_bytes()


def test_regions_that_are_not_one_whole_chunk_are_not_claimed(tmp_path):
    files = ChunkFiles.of(make(tmp_path / "s.zarr", "uint8", None))
    assert files.chunk_of((slice(2, 3), slice(48, 50), slice(64, 70))) == (1, 3, 2)
    for region in [(slice(0, 1), slice(0, 16), slice(0, 32)),  # part of a chunk
                   (slice(0, 2), slice(0, 32), slice(0, 32)),  # two chunks
                   (slice(0, 2), slice(8, 24), slice(0, 32)),  # off the grid
                   (slice(0, 2), slice(0, 16, 2), slice(0, 32))]:  # strided
        assert files.chunk_of(region) is None, region
    with pytest.raises(ValueError, match="expected"):
        files.write((0, 0, 0), np.zeros((1, 16, 32), np.uint8))


def test_what_it_cannot_prove_equal_is_left_to_zarr(tmp_path):
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    common = dict(shape=SHAPE, dtype="uint8", fill_value=0)
    sharded = root.create_array("sharded", chunks=(1, 16, 32), shards=(2, 32, 64), **common)
    zstd = root.create_array("zstd", chunks=CHUNKS, compressors=ZstdCodec(level=3), **common)  # zarr's default
    transposed = root.create_array("transposed", chunks=CHUNKS, filters=TransposeCodec(order=(2, 1, 0)), **common)
    big_endian = root.create_array("big", shape=SHAPE, chunks=CHUNKS, dtype=">u2", fill_value=0)
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), chunks=CHUNKS, **common)
    for array in (sharded, zstd, transposed, big_endian, in_memory, np.zeros(SHAPE, np.uint8)):
        assert ChunkFiles.of(array) is None
    assert ChunkFiles.of(root.create_array("blosc", chunks=CHUNKS, compressors=BloscCodec(), **common)) is not None


def test_damaged_and_missing_chunks_are_one_line_naming_the_file(tmp_path):
    array = make(tmp_path / "s.zarr", "uint8", KINDS["uint8 zstd-3"][1])
    array[:] = data_of("uint8")
    files = ChunkFiles.of(array)
    path = tmp_path / "s.zarr" / "a" / "c" / "0" / "1" / "1"
    good = path.read_bytes()
    for bad in (b"not a blosc frame", good[:-10], good[:8]):
        path.write_bytes(bad)
        with pytest.raises(UserError, match=f"{path}: damaged chunk"):
            files.read((0, 1, 1))
    path.unlink()
    with pytest.raises(UserError, match="chunk file is missing"):
        files.read((0, 1, 1))
    # an array that does not promise every chunk: a missing one is the fill value, as zarr reads it
    other = zarr.open_group(str(tmp_path / "o.zarr"), mode="w", zarr_format=3).create_array(
        "a", shape=SHAPE, chunks=CHUNKS, dtype="uint8", fill_value=9, compressors=BloscCodec())
    got = ChunkFiles.of(other).read((1, 3, 2))
    assert got.shape == (1, 2, 6) and np.array_equal(got, other[2:3, 48:50, 64:70])


def test_a_read_only_array_is_not_written(tmp_path):
    make(tmp_path / "s.zarr", "uint8", None)
    files = ChunkFiles.of(zarr.open_array(str(tmp_path / "s.zarr" / "a"), mode="r"))
    with pytest.raises(UserError, match="read-only"):
        files.write((0, 0, 0), np.zeros(CHUNKS, np.uint8))
