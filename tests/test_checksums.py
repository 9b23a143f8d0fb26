"""Every chunk the project writes ends with zarr's crc32c checksum (issue 22): new stores have the
codec, our chunk and shard files are zarr-python's bytes and zarr, tensorstore and we read them, a
flipped byte in an input chunk is one line naming the chunk file (exit 2) instead of a quietly
different prediction, and stores written before, without the codec, still predict. Real stores and
the real console script throughout."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.errors import ZarrUserWarning

from unet_dist import checkpoint
from unet_dist.config import Config, ModelConfig, PredictConfig, to_dict
from unet_dist.data.chunk_io import ChunkFiles
from unet_dist.data.damaged_chunks import EVERY_CHUNK_STORED, read_region
from unet_dist.data.layout import COMPRESSORS
from unet_dist.data.shard_io import ShardFiles
from unet_dist.data.store import RAW
from unet_dist.errors import UserError
from unet_dist.model import build_model

try:
    import tensorstore
except ImportError:  # an optional reader; the CI image has it
    tensorstore = None

MODEL = ModelConfig(dims=2, depth=2, base_channels=8)
SHAPE, CHUNKS, SHARDS = (3, 50, 70), (1, 16, 32), (2, 32, 64)  # edge chunks and edge shards


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint of random weights: the bytes of the prediction matter here, not its quality."""
    torch.manual_seed(0)
    cfg = Config(model=MODEL, predict=PredictConfig())
    state = {"model": build_model(MODEL).state_dict(), "model_config": to_dict(MODEL), "step": 1, "config": to_dict(cfg)}
    return checkpoint.save(tmp_path_factory.mktemp("ckpt"), state, keep_last=1)


def arrays_of(group: zarr.Group) -> dict[str, zarr.Array]:
    with warnings.catch_warnings():  # a stray file in a store of ours (once the manifest's) is a fault
        warnings.simplefilter("error", ZarrUserWarning)
        return {path: a for path, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}


def chunk_codec_names(array: zarr.Array) -> list[str]:
    """The codecs a chunk (an inner chunk, when sharded) goes through, by name."""
    codecs = array.metadata.to_dict()["codecs"]
    if codecs[0]["name"] == "sharding_indexed":
        codecs = codecs[0]["configuration"]["codecs"]
    return [c["name"] for c in codecs]


def flip_a_byte(path: Path, at: float = 0.5) -> None:
    """One bit of the file's compressed body flipped (not the Blosc header: that was caught before)."""
    data = bytearray(path.read_bytes())
    i = max(16, int(len(data) * at))
    data[i] ^= 0x10
    path.write_bytes(bytes(data))


def predict_args(ckpt, store, out, *extra) -> list[str]:
    return ["predict", "--checkpoint", str(ckpt), "--input", str(store), "--out", str(out),
            "--device", "cpu", "--slices", "3:5", *extra]


# ------------------------------------------------------------------------- the codec in new stores


def test_new_stores_checksum_every_chunk(em_store, tiny_synth_store, ckpt, cli, tmp_path):
    for out, extra in ((tmp_path / "chunks.zarr", ["predict.shard_blocks=[1,1,1]"]),
                       (tmp_path / "shards.zarr", ["predict.block_size=[1,64,64]", "predict.shard_blocks=[1,2,2]"])):
        done = cli(*predict_args(ckpt, em_store, out, *extra))
        assert done.code == 0, done.err
    stores = {"convert": em_store, "synth": tiny_synth_store, "predict": tmp_path / "chunks.zarr",
              "predict, sharded": tmp_path / "shards.zarr"}
    for what, store in stores.items():
        arrays = arrays_of(zarr.open_group(str(store), mode="r"))
        assert RAW in arrays and len(arrays) >= 2, (what, sorted(arrays))  # label images (and levels) too
        for path, array in arrays.items():
            names = chunk_codec_names(array)
            assert names[-2:] == ["blosc", "crc32c"], (what, path, names)
    sharded = zarr.open_group(str(tmp_path / "shards.zarr"), mode="r")[RAW]
    assert sharded.shards is not None and ShardFiles.of(sharded).inner.checksum
    assert ChunkFiles.of(zarr.open_group(str(em_store), mode="r")[RAW]).checksum


# ------------------------------------------------------------- our files are zarr-python's bytes


def make(path: Path, dtype, sharded: bool, checksum: bool = True) -> zarr.Array:
    group = zarr.open_group(str(path), mode="a", zarr_format=3)
    compressors = [BloscCodec(**COMPRESSORS["probability"])] + ([Crc32cCodec()] if checksum else [])
    return group.create_array("a", shape=SHAPE, chunks=CHUNKS, shards=SHARDS if sharded else None, dtype=dtype,
                              compressors=compressors, fill_value=0, config={"write_empty_chunks": True},
                              attributes={EVERY_CHUNK_STORED: True})


def files_of(array_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(array_dir)): p.read_bytes() for p in sorted(array_dir.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


def write_ours(array: zarr.Array, data: np.ndarray) -> None:
    files = ChunkFiles.of(array) or ShardFiles.of(array)
    assert files is not None and (files.inner if isinstance(files, ShardFiles) else files).checksum
    grid = [-(-n // c) for n, c in zip(SHAPE, CHUNKS)]
    if isinstance(files, ChunkFiles):
        for coords in np.ndindex(*grid):
            files.write(coords, data[files.box(coords)])
        return
    shard_grid = [-(-n // s) for n, s in zip(SHAPE, SHARDS)]
    for shard in np.ndindex(*shard_grid):
        files.write(shard, {c: files.encode(c, data[files.box(c)]) for c in files.chunks_in(shard)})


@pytest.mark.parametrize("sharded", [False, True], ids=["chunks", "shards"])
@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_our_checksummed_files_are_zarrs_bytes_and_every_reader_reads_them(sharded, dtype, tmp_path):
    rng = np.random.default_rng(1)
    data = (rng.random(SHAPE) * 200).astype(dtype)
    data[0, :16, :32] = 0  # a whole chunk of the fill value: stored all the same
    theirs = make(tmp_path / "zarr.zarr", dtype, sharded)
    theirs[:] = data
    ours = make(tmp_path / "ours.zarr", dtype, sharded)
    write_ours(ours, data)
    expected = files_of(tmp_path / "zarr.zarr" / "a")
    assert expected and files_of(tmp_path / "ours.zarr" / "a") == expected
    files = ChunkFiles.of(ours) or ShardFiles.of(ours)
    grid = [-(-n // c) for n, c in zip(SHAPE, CHUNKS)]
    for coords in np.ndindex(*grid):
        assert np.array_equal(files.read(coords), data[files.box(coords)])
    assert np.array_equal(zarr.open_array(str(tmp_path / "ours.zarr" / "a"), mode="r")[:], data)
    if tensorstore is not None:
        spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "ours.zarr" / "a")}}
        assert np.array_equal(tensorstore.open(spec).result().read().result(), data)


@pytest.mark.parametrize("sharded", [False, True], ids=["chunks", "shards"])
def test_a_flipped_bit_in_a_chunk_is_one_line_naming_its_file(sharded, tmp_path):
    array = make(tmp_path / "s.zarr", "uint8", sharded)
    array[:] = np.random.default_rng(2).integers(0, 255, SHAPE, dtype=np.uint8)
    path = tmp_path / "s.zarr" / "a" / "c" / "0" / "1" / "1"
    flip_a_byte(path, at=0.3)  # a shard: inside its first inner chunk, not the index at its end
    files = ChunkFiles.of(array) or ShardFiles.of(array)
    for read in (lambda: files.read((0, 2, 2) if sharded else (0, 1, 1)),
                 lambda: read_region(array, (slice(0, 1), slice(32, 48), slice(64, 70)) if sharded
                                     else (slice(0, 1), slice(16, 32), slice(32, 64)))):
        with pytest.raises(UserError, match="damaged chunk") as caught:
            read()
        assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    assert "crc32c checksum" in str(pytest.raises(UserError, files.read, (0, 2, 2) if sharded else (0, 1, 1)).value)


# ------------------------------------------------------------------------- through the commands


def one_error_line(err: str) -> str:
    """The one `error:` line (progress lines may come before it), naming a damaged chunk."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "damaged chunk" in errors[0] and "Traceback" not in err, err
    return errors[0]


def test_a_flipped_byte_in_a_converted_store_stops_predict_and_evaluate(em_store, ckpt, cli, tmp_path):
    good = tmp_path / "good.zarr"
    done = cli(*predict_args(ckpt, em_store, good))
    assert done.code == 0, done.err
    store = tmp_path / "em.zarr"
    shutil.copytree(em_store, store)
    chunk = store / RAW / "c" / "4" / "0" / "0"
    flip_a_byte(chunk)
    out = tmp_path / "pred.zarr"
    done = cli(*predict_args(ckpt, store, out))
    assert done.code == 2, done.err
    assert str(chunk) in one_error_line(done.err) and "crc32c checksum" in done.err
    # evaluate reads the labels the same way: a flipped byte there is the same line
    labels = store / "labels" / "neuron_interior" / "0" / "c" / "3" / "0" / "0"
    flip_a_byte(labels)
    done = cli("evaluate", "--pred", good, "--labels", store, "--slices", "3:5")
    assert done.code == 2, done.err
    assert str(labels) in one_error_line(done.err)


def without_checksums(store: Path) -> None:
    """Every array of `store` written again by zarr as stores were before issue 22: our layout and
    Blosc codec, no crc32c."""
    group = zarr.open_group(str(store), mode="r+")
    for path, array in arrays_of(group).items():
        data, attrs, blosc = array[:], dict(array.attrs), array.compressors[0]
        parent = group[path.rsplit("/", 1)[0]] if "/" in path else group
        name = path.rsplit("/", 1)[-1]
        fresh = parent.create_array(name, shape=array.shape, chunks=array.chunks, shards=array.shards,
                                    dtype=array.dtype, compressors=blosc, fill_value=0,
                                    dimension_names=array.metadata.dimension_names, attributes=attrs,
                                    config={"write_empty_chunks": True}, overwrite=True)
        fresh[:] = data


def test_a_store_written_before_checksums_still_predicts_the_same(tiny_synth_store, ckpt, cli, tmp_path):
    old = tmp_path / "old.zarr"
    shutil.copytree(tiny_synth_store, old)
    without_checksums(old)
    raw = zarr.open_group(str(old), mode="r")[RAW]
    assert chunk_codec_names(raw) == ["bytes", "blosc"]
    assert ChunkFiles.of(raw) is not None and not ChunkFiles.of(raw).checksum  # still read by us
    outs = {}
    for name, store in (("new", tiny_synth_store), ("old", old)):
        outs[name] = tmp_path / f"{name}-pred.zarr"
        done = cli(*predict_args(ckpt, store, outs[name]))
        assert done.code == 0, done.err
    new, before = (zarr.open_group(str(outs[k]), mode="r") for k in ("new", "old"))
    for path in (RAW, "labels/mask/0"):
        assert np.array_equal(new[path][:], before[path][:])
        assert chunk_codec_names(before[path])[-1] == "crc32c"  # what predict writes has it, whatever it reads
