"""Whole shards written by us (data/shard_io.py): the same files, byte for byte, as zarr-python
writes when a shard's region is assigned, edge shards included; read back equal by zarr and by an
independent reader (tensorstore); zarr for anything else. Real stores on disk throughout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import BloscCodec, BytesCodec, ShardingCodec, TransposeCodec, ZstdCodec

from unet_dist.data.shard_io import ShardFiles
from unet_dist.data.damaged_chunks import EVERY_CHUNK_STORED
from unet_dist.data.layout import Layout, create_volume_array
from unet_dist.errors import UserError

try:
    import tensorstore
except ImportError:  # an optional, independent reader
    tensorstore = None

# Edge shards and edge chunks on every axis; the edge shards hold inner chunks wholly beyond the array.
SHAPE, CHUNKS, SHARDS = (5, 70, 90), (2, 16, 32), (4, 64, 64)
KINDS = {
    "uint8 lz4 shuffle": ("uint8", BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")),
    "uint8 lz4 bitshuffle": ("uint8", BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")),
    "uint8 zstd-3": ("uint8", BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")),
    "float16 lz4 shuffle": ("float16", BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")),
    "float32 uncompressed": ("float32", None),
}


def make(path: Path, dtype, compressor, shape=SHAPE, chunks=CHUNKS, shards=SHARDS, fill=0) -> zarr.Array:
    group = zarr.open_group(str(path), mode="a", zarr_format=3)
    return group.create_array("a", shape=shape, chunks=chunks, shards=shards, dtype=dtype,
                              compressors=compressor, fill_value=fill, config={"write_empty_chunks": True},
                              attributes={EVERY_CHUNK_STORED: True})


def data_of(dtype, shape=SHAPE, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        data = rng.random(shape).astype(dtype)
    else:
        data = (rng.integers(0, 4, shape) * rng.integers(0, 200, shape)).astype(dtype)
    data[0:2, 0:16, 0:32] = 0  # inner chunks all of the fill value, stored all the same: an inner one,
    data[-1:, -(shape[1] % 16 or 16):, -(shape[2] % 32 or 32):] = 0  # and an edge one
    return data


def grid(shape, unit) -> list[tuple[int, ...]]:
    return list(np.ndindex(*(-(-n // u) for n, u in zip(shape, unit))))


def region(coords, unit, shape) -> tuple[slice, ...]:
    return tuple(slice(c * u, min((c + 1) * u, n)) for c, u, n in zip(coords, unit, shape))


def shard_files(array_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(array_dir)): p.read_bytes() for p in sorted(array_dir.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


def write_all(files: ShardFiles, data: np.ndarray) -> None:
    for shard in grid(files.shape, files.shards):
        encoded = {}
        for chunk in files.chunks_in(shard):
            box = files.box(chunk)
            assert files.chunk_of(box) == chunk and files.shard_of(chunk) == shard
            encoded[chunk] = files.encode(chunk, data[box])
        files.write(shard, encoded)


def assert_same_files(theirs: Path, ours: Path, count: int) -> None:
    a, b = shard_files(theirs), shard_files(ours)
    assert sorted(a) == sorted(b) and len(a) == count
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def assert_read_back(path: Path, data: np.ndarray) -> None:
    got = zarr.open_array(str(path), mode="r")[:]
    assert got.dtype == data.dtype and np.array_equal(got, data)
    if tensorstore is not None:
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
        assert np.array_equal(tensorstore.open(spec).result().read().result(), data)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_shards_are_zarrs_bytes_and_read_back_by_zarr_and_tensorstore(kind, tmp_path):
    dtype, compressor = KINDS[kind]
    data = data_of(dtype)
    theirs = make(tmp_path / "zarr.zarr", dtype, compressor)
    for shard in grid(SHAPE, SHARDS):  # as the predictor's shards would go through zarr: one whole shard a call
        box = region(shard, SHARDS, SHAPE)
        theirs[box] = data[box]
    files = ShardFiles.of(make(tmp_path / "ours.zarr", dtype, compressor))
    assert files is not None and (files.shape, files.chunks, files.shards) == (SHAPE, CHUNKS, SHARDS)
    write_all(files, data)
    assert_same_files(tmp_path / "zarr.zarr" / "a", tmp_path / "ours.zarr" / "a", len(grid(SHAPE, SHARDS)))
    assert_read_back(tmp_path / "ours.zarr" / "a", data)
    reader = ShardFiles.of(zarr.open_array(str(tmp_path / "zarr.zarr" / "a"), mode="r"))
    for chunk in grid(SHAPE, CHUNKS):
        got = reader.read(chunk)
        assert got.dtype == theirs.dtype and np.array_equal(got, data[reader.box(chunk)])


def test_an_edge_shard_holds_its_chunks_inside_the_array_only(tmp_path):
    """Found in zarr 3.1.6: inner chunks wholly beyond the array are left out of the shard (index
    entry 2**64-1), while all-fill inner chunks inside it are stored (write_empty_chunks=True)."""
    data = data_of("uint8")
    make(tmp_path / "zarr.zarr", "uint8", None, fill=7)[4:8, 64:128, 64:128] = data[4:8, 64:128, 64:128]
    files = ShardFiles.of(make(tmp_path / "s.zarr", "uint8", None, fill=7))
    assert files.chunks_in((1, 1, 1)) == [(2, 4, 2)]  # z 4..5, y 64..70, x 64..90 of a 2x4x2 shard
    assert len(files.chunks_in((0, 0, 0))) == 16 and len(files.chunks_in((0, 1, 0))) == 2 * 1 * 2
    write_all(files, data)
    shard = (tmp_path / "s.zarr" / "a" / "c" / "1" / "1" / "1").read_bytes()
    assert shard == (tmp_path / "zarr.zarr" / "a" / "c" / "1" / "1" / "1").read_bytes()
    index = np.frombuffer(shard[-16 * 16 - 4:-4], "<u8").reshape(2, 4, 2, 2)
    stored = np.argwhere(index[..., 0] != 2**64 - 1).tolist()
    assert stored == [[0, 0, 0]] and index[0, 0, 0].tolist() == [0, 2 * 16 * 32]  # padded whole
    assert np.array_equal(files.read((2, 4, 2)), np.zeros((1, 6, 26), np.uint8))


def test_the_predictors_layout_of_2d_blocks(tmp_path):
    """Blocks of 1x512x512 finishing in any order, buffered per shard of 1x1024x1024, each shard
    written when its last block is in: zarr's files, in arrays made as the predictor makes them."""
    layout = Layout(shape=(3, 1100, 1300), chunks=(1, 512, 512), shards=(1, 1024, 1024))
    for kind, dtype in (("mask", "uint8"), ("probability", "float16")):
        data = data_of(dtype, layout.shape, seed=1)
        theirs, ours = (create_volume_array(zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="a"), kind,
                                            layout, dtype, kind=kind) for name in ("zarr", "ours"))
        theirs[:] = data
        files = ShardFiles.of(ours)
        assert files is not None and files.chunks == layout.chunks and files.shards == layout.shards
        pending: dict[tuple, dict] = {}
        for chunk in np.random.default_rng(2).permutation(grid(layout.shape, layout.chunks)):
            chunk = tuple(int(c) for c in chunk)
            shard = files.shard_of(chunk)
            pending.setdefault(shard, {})[chunk] = files.encode(chunk, data[files.box(chunk)])
            if len(pending[shard]) == len(files.chunks_in(shard)):
                files.write(shard, pending.pop(shard))
        assert not pending
        assert_same_files(tmp_path / "zarr.zarr" / kind, tmp_path / "ours.zarr" / kind, 3 * 2 * 2)
        assert_read_back(tmp_path / "ours.zarr" / kind, data)


def test_the_index_may_come_first(tmp_path):
    dtype, compressor = KINDS["uint8 lz4 bitshuffle"]
    data = data_of(dtype)
    shards = {"shape": SHARDS, "index_location": "start"}
    make(tmp_path / "zarr.zarr", dtype, compressor, shards=shards)[:] = data
    files = ShardFiles.of(make(tmp_path / "ours.zarr", dtype, compressor, shards=shards))
    write_all(files, data)
    assert_same_files(tmp_path / "zarr.zarr" / "a", tmp_path / "ours.zarr" / "a", len(grid(SHAPE, SHARDS)))
    assert_read_back(tmp_path / "ours.zarr" / "a", data)
    assert all(np.array_equal(files.read(c), data[files.box(c)]) for c in grid(SHAPE, CHUNKS))


def test_what_it_cannot_prove_equal_is_left_to_zarr(tmp_path):
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="w", zarr_format=3)
    common = dict(shape=SHAPE, dtype="uint8", fill_value=0)
    sharded = dict(chunks=CHUNKS, shards=SHARDS, **common)
    unsharded = root.create_array("unsharded", chunks=CHUNKS, compressors=BloscCodec(), **common)
    zstd = root.create_array("zstd", compressors=ZstdCodec(level=3), **sharded)  # zarr's default
    transposed = root.create_array("transposed", filters=TransposeCodec(order=(2, 1, 0)), **sharded)
    serializer = dict(chunk_shape=CHUNKS, codecs=[BytesCodec(), BloscCodec()])
    no_crc = root.create_array("no_crc", chunks=SHARDS, compressors=None, serializer=ShardingCodec(
        **serializer, index_codecs=[BytesCodec()]), **common)
    with pytest.warns(UserWarning, match="sharding"):  # zarr's too: the shards compressed again, whole
        shards_compressed = root.create_array("shards_compressed", chunks=SHARDS, compressors=ZstdCodec(),
                                              serializer=ShardingCodec(**serializer), **common)
    big_endian = root.create_array("big", shape=SHAPE, chunks=CHUNKS, shards=SHARDS, dtype=">u2", fill_value=0)
    in_memory = zarr.create_array(zarr.storage.MemoryStore(), compressors=BloscCodec(), **sharded)
    assert no_crc.shards == SHARDS
    for array in (unsharded, zstd, transposed, no_crc, shards_compressed, big_endian, in_memory, np.zeros(SHAPE, np.uint8)):
        assert ShardFiles.of(array) is None, array
    assert ShardFiles.of(root.create_array("blosc", compressors=BloscCodec(), **sharded)) is not None
    assert ShardFiles.of(root.create_array("plain", compressors=None, **sharded)) is not None


def test_a_shard_is_written_from_exactly_its_chunks(tmp_path):
    files = ShardFiles.of(make(tmp_path / "s.zarr", "uint8", None))
    data = data_of("uint8")
    encoded = {c: files.encode(c, data[files.box(c)]) for c in files.chunks_in((1, 1, 1))}
    beyond = (3, 4, 2)  # in the shard's grid but beyond the array
    for bad in ({}, {**encoded, beyond: encoded[(2, 4, 2)]}, {**encoded, (0, 0, 0): encoded[(2, 4, 2)]}):
        with pytest.raises(ValueError, match="missing|not in the shard"):
            files.write((1, 1, 1), bad)
    with pytest.raises(ValueError, match="beyond the array"):
        files.write((2, 0, 0), {})
    assert not (tmp_path / "s.zarr" / "a" / "c" / "1").exists()
    files.write((1, 1, 1), encoded)
    assert sorted(p.name for p in (tmp_path / "s.zarr" / "a" / "c" / "1" / "1").iterdir()) == ["1"]  # no leftovers


def test_a_read_only_array_is_not_written(tmp_path):
    make(tmp_path / "s.zarr", "uint8", None)
    files = ShardFiles.of(zarr.open_array(str(tmp_path / "s.zarr" / "a"), mode="r"))
    with pytest.raises(UserError, match="read-only"):
        files.write((1, 1, 1), {(2, 4, 2): b"x" * (2 * 16 * 32)})
    with pytest.raises(UserError, match="read-only"):
        files.encode((0, 0, 0), np.zeros(CHUNKS, np.uint8))


def test_damaged_and_missing_shards_are_one_line_naming_the_file(tmp_path):
    array = make(tmp_path / "s.zarr", "uint8", KINDS["uint8 zstd-3"][1])
    array[:] = data_of("uint8")
    files = ShardFiles.of(array)
    path = tmp_path / "s.zarr" / "a" / "c" / "0" / "1" / "0"
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[-10] ^= 1  # in the index: the checksum no longer matches
    first = bytearray(good)
    first[4] ^= 0xFF  # in the first chunk's Blosc header: the size it decodes to
    for bad in (bytes(flipped), good[:100], bytes(first)):
        path.write_bytes(bad)
        with pytest.raises(UserError, match=f"{path}.*damaged chunk"):
            files.read((0, 4, 0))
    path.unlink()
    with pytest.raises(UserError, match="chunk file is missing"):
        files.read((0, 4, 0))
