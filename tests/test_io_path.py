"""The predictor's I/O path: the decoded-chunk cache, block order and ownership, readers/writers, the
codec pipeline switch, and outputs equal, bit for bit, to the previous host-side pipeline (float32
tiles in, float32 probabilities out, quantized on the host). Real stores on disk throughout."""

from __future__ import annotations

import importlib.util
import threading

import numpy as np
import pytest
import torch
import zarr

from unet_dist import checkpoint
from unet_dist.config import PredictConfig, load_config
from unet_dist.data.chunk_cache import ChunkCache
from unet_dist.data.patches import to_unit_float
from unet_dist.data.damaged_chunks import writing_every_chunk
from unet_dist.data.store import RAW
from unet_dist.data.synth import synthesize
from unet_dist.errors import UserError
from unet_dist.predict.block_plan import (assign, block_core, block_order, input_region, make_plan, mirror_box,
                                  read_mirrored)
from unet_dist.checkpoint import load_model
from unet_dist.predict.pipeline import BlockPipeline, io_threads, predict
from unet_dist.predict.prediction_store import MASK, PROBABILITY, create_prediction, quantize
from unet_dist.predict.manifest import Manifest, entries, records
from unet_dist.predict.tilenet import TileNet

from helpers import SMALL, require_module


@pytest.fixture(scope="module")
def straddling_volume(tmp_path_factory):
    """Chunks of 40 that blocks of 32 straddle."""
    out = tmp_path_factory.mktemp("vol") / "vol.zarr"
    synthesize(out, shape=(4, 100, 120), seed=3, chunks=(1, 40, 40))
    return out


def raw_array(store):
    return zarr.open_group(str(store), mode="r")[RAW]


def outputs(store):
    group = zarr.open_group(str(store), mode="r")
    return {name: group[path][:] for name, path in (("probability", PROBABILITY), ("mask", MASK))}


# ------------------------------------------------------------------------------------ the cache

def block_boxes(plan, shape):
    return [mirror_box(input_region(plan, block_core(plan, i)), shape) for i in range(plan.n_blocks)]


def test_cache_returns_what_zarr_returns_and_decodes_every_chunk_once(straddling_volume):
    raw = raw_array(straddling_volume)
    plan = make_plan(SMALL, PredictConfig(block_size=[1, 32, 32], halo=[0, 8, 8]), raw.shape, (0, raw.shape[0]))
    boxes = block_boxes(plan, raw.shape)
    cache = ChunkCache(raw, boxes)
    for i, box in enumerate(boxes):
        region = input_region(plan, block_core(plan, i))
        assert np.array_equal(read_mirrored(raw, region, cache.read), read_mirrored(raw, region))
    assert cache.decoded_bytes == raw.nbytes  # every chunk of the volume, once
    uncached = sum(len(cache.chunks_of(b)) for b in boxes) * 40 * 40  # what reading per block decodes
    assert uncached > 2.5 * cache.decoded_bytes
    assert cache.amplification < 1.0  # halos overlap: fewer bytes decoded than delivered
    assert cache._live == {} and cache._live_bytes == 0  # every chunk dropped after its last block


def test_cache_under_concurrent_readers_and_a_tiny_cap(straddling_volume):
    raw = raw_array(straddling_volume)
    rng = np.random.default_rng(0)
    boxes = []
    for _ in range(60):
        z = int(rng.integers(0, 4))
        y, x = int(rng.integers(0, 90)), int(rng.integers(0, 110))
        boxes.append((slice(z, z + 1), slice(y, min(100, y + int(rng.integers(1, 50)))),
                      slice(x, min(120, x + int(rng.integers(1, 50))))))
    for cap in (1 << 30, 3000):  # 3000 bytes: less than two chunks, so chunks are decoded again
        cache = ChunkCache(raw, boxes, max_bytes=cap)
        got, errors = [None] * len(boxes), []

        def work(k):
            try:
                for i in range(k, len(boxes), 4):
                    got[i] = cache.read(boxes[i])
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for box, data in zip(boxes, got):
            assert np.array_equal(data, raw[box])
        touched = {c for b in boxes for c in cache.chunks_of(b)}
        if cap > raw.nbytes:
            assert cache.decoded_bytes == sum(np.prod([s.stop - s.start for s in cache.chunk_box(c)])
                                              for c in touched)
        assert cache._live_bytes == 0


def test_a_damaged_chunk_is_one_line_naming_its_file(tmp_path):
    store = tmp_path / "vol.zarr"
    synthesize(store, shape=(2, 64, 64), seed=1, chunks=(1, 32, 32))
    chunk = store / RAW / "c" / "1" / "0" / "1"
    chunk.write_bytes(b"not a blosc frame")
    cache = ChunkCache(raw_array(store), [(slice(1, 2), slice(0, 64), slice(0, 64))])
    with pytest.raises(UserError, match=str(chunk)):
        cache.read((slice(1, 2), slice(0, 64), slice(0, 64)))
    chunk.unlink()
    with pytest.raises(UserError, match="chunk file is missing"):
        ChunkCache(raw_array(store)).read((slice(1, 2), slice(20, 40), slice(20, 40)))


def test_mirrored_reads_equal_the_index_gather_for_any_reach():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        shape = tuple(int(rng.integers(1, 12)) for _ in range(3))
        a = rng.integers(0, 255, shape, dtype=np.uint8)
        region = []
        for n in shape:
            lo = int(rng.integers(-15, n))
            region.append((lo, int(rng.integers(lo + 1, n + 16))))
        from unet_dist.predict.block_plan import mirror_indices

        ref = a[np.ix_(*[mirror_indices(lo, hi, n) for (lo, hi), n in zip(region, shape)])]
        assert np.array_equal(read_mirrored(a, region), ref), (shape, region)


# ------------------------------------------------------------------------- order and ownership

def test_block_order_finishes_a_chunk_depth_column_by_column_and_ranks_get_runs():
    plan = make_plan(SMALL, PredictConfig(block_size=[1, 32, 32], halo=[0, 8, 8], shard_blocks=[1, 1, 1]),
                     (8, 64, 64), (0, 8))
    order = block_order(plan, range(plan.n_blocks), (4, 64, 64))
    cores = [block_core(plan, i) for i in order]
    assert sorted(order) == list(range(plan.n_blocks))
    # the first 4 blocks are slices 0..3 of the first (y, x) column: one 3D chunk, used up at once
    assert [c[0][0] for c in cores[:4]] == [0, 1, 2, 3] and len({c[1:] for c in cores[:4]}) == 1
    assert block_order(plan, range(plan.n_blocks), (1, 64, 64)) == list(range(plan.n_blocks))  # 2D: C order
    for world in (1, 2, 3, 5):
        runs = [assign(order, r, world) for r in range(world)]
        assert sum(runs, []) == order and max(map(len, runs)) - min(map(len, runs)) <= 1


def test_readers_and_writers_default_from_the_cores_and_are_validated():
    assert io_threads(PredictConfig(), cores=1) == (2, 2)
    assert io_threads(PredictConfig(), cores=8) == (8, 8)
    assert io_threads(PredictConfig(), cores=128) == (16, 16)
    assert io_threads(PredictConfig(readers=3, writers=5), cores=8) == (3, 5)
    with pytest.raises(UserError, match="predict.readers"):
        load_config(None, ["predict.readers=-1"])
    with pytest.raises(UserError, match="predict.codec_pipeline"):
        load_config(None, ["predict.codec_pipeline=tensorstore"])


# ---------------------------------------------------------- equal to the previous pipeline, bit for bit

def previous_pipeline(ckpt, store, block, batch_size, dtype="uint8"):
    """What the predictor computed before this path: float32 tiles scaled on the host, the model in
    channels_last on batches padded to `batch_size` with the last tile, float32 probabilities back,
    cropped, then quantized and thresholded with numpy."""
    model, cfg, _ = load_model(ckpt, [f"predict.block_size={block}", f"predict.batch_size={batch_size}"])
    raw = raw_array(store)
    plan = make_plan(cfg.model, cfg.predict, raw.shape, (0, raw.shape[0]))
    model = model.to(memory_format=torch.channels_last)
    prob = np.zeros(plan.shape, np.uint8 if dtype == "uint8" else np.float16)
    mask = np.zeros(plan.shape, np.uint8)
    with torch.inference_mode():
        for i in range(plan.n_blocks):
            core = block_core(plan, i)
            tiles = to_unit_float(read_mirrored(raw, input_region(plan, core)))
            for t, tile in enumerate(tiles):
                x = torch.from_numpy(np.ascontiguousarray(np.repeat(tile[None, None], batch_size, axis=0)))
                p = torch.sigmoid(model(x.contiguous(memory_format=torch.channels_last)).float())[0, 0].numpy()
                p = p[tuple(slice(o, o + hi - lo) for o, (lo, hi) in zip(plan.offset[1:], core[1:]))]
                z = core[0][0] + t
                prob[z, core[1][0]:core[1][1], core[2][0]:core[2][1]] = quantize(p, dtype)
                mask[z, core[1][0]:core[1][1], core[2][0]:core[2][1]] = p > cfg.predict.threshold
    return {"probability": prob, "mask": mask}


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_outputs_equal_the_previous_pipeline_bit_for_bit(ckpt, straddling_volume, tmp_path, dtype):
    ref = previous_pipeline(ckpt, straddling_volume, "[1,32,32]", 2, dtype)
    runs = {"cache, 3 readers": ["predict.readers=3", "predict.writers=1"],
            "no cache, 1 reader": ["predict.chunk_cache_mb=0", "predict.readers=1", "predict.writers=2"]}
    for name, extra in runs.items():
        out = tmp_path / f"{name.replace(' ', '').replace(',', '-')}.zarr"
        predict(ckpt, straddling_volume, out, overrides=["predict.block_size=[1,32,32]", "predict.batch_size=2",
                                              f"predict.probability_dtype={dtype}", *extra])
        got = outputs(out)
        for key in ref:
            assert got[key].dtype == ref[key].dtype and np.array_equal(got[key], ref[key]), (name, key)


def test_the_zarrs_codec_pipeline_reads_and_writes_the_same_bytes(ckpt, straddling_volume, tmp_path):
    require_module("zarrs", "pip install -e '.[bench]'")
    args = ["predict.block_size=[1,32,32]"]
    a = predict(ckpt, straddling_volume, tmp_path / "a.zarr", labels=straddling_volume, overrides=args)
    b = predict(ckpt, straddling_volume, tmp_path / "b.zarr", labels=straddling_volume,
                overrides=[*args, "predict.codec_pipeline=zarrs"])
    assert a["dice_neuron"] == b["dice_neuron"]
    x, y = outputs(tmp_path / "a.zarr"), outputs(tmp_path / "b.zarr")
    assert all(np.array_equal(x[k], y[k]) for k in x)


def test_the_predictors_chunk_files_are_the_bytes_zarr_writes(ckpt, straddling_volume, tmp_path):
    """The predictor writes its chunks itself (data/chunk_io.py): the same files as zarr-python
    writing the same arrays into the same layout, edge blocks included (100 x 120 in blocks of 32)."""
    out = tmp_path / "ours.zarr"
    predict(ckpt, straddling_volume, out, overrides=["predict.block_size=[1,32,32]", "predict.shard_blocks=[1,1,1]"])
    got = outputs(out)
    ref = tmp_path / "zarr.zarr"
    group = zarr.open_group(str(ref), mode="w", zarr_format=3)
    create_prediction(group, got["probability"].shape, (1, 32, 32), "uint8", None, 0, 32)
    for path, key in ((PROBABILITY, "probability"), (MASK, "mask")):
        writing_every_chunk(zarr.open_group(str(ref), mode="r+")[path])[:] = got[key]
        ours, theirs = chunk_bytes(out / path), chunk_bytes(ref / path)
        assert len(ours) == 64 and sorted(ours) == sorted(theirs)
        assert all(ours[k] == theirs[k] for k in ours), path
    # the fast path is what ran: the pipeline takes our chunk files for zarr's pipeline only
    raw = raw_array(straddling_volume)
    plan = make_plan(SMALL, PredictConfig(block_size=[1, 32, 32], shard_blocks=[1, 1, 1]), raw.shape, (0, raw.shape[0]))
    pred = zarr.open_group(str(out), mode="r+")
    for name, used in (("zarr", True), ("zarrs", False)):
        pipeline = BlockPipeline(plan, None, raw, None, pred, Manifest(out, "k"), PredictConfig(codec_pipeline=name))
        assert all((files is not None) == used for files in pipeline.output.files)


def chunk_bytes(array_dir) -> dict[str, bytes]:
    return {str(p.relative_to(array_dir)): p.read_bytes() for p in array_dir.rglob("*")
            if p.is_file() and p.name != "zarr.json"}


def test_the_manifest_records_batches_and_reads_every_version(tmp_path):
    out = tmp_path / "pred"
    out.mkdir()
    manifest = Manifest(out, "key", every=3)
    manifest.create()
    for i in (5, 1, 9, 4):
        manifest.mark(i)
    assert Manifest(out, "key").done() == {1, 5, 9}  # 4 waits for its batch
    manifest.flush()
    assert sorted(p.name for p in manifest.dir.iterdir()) == ["blocks-1", "blocks-4", "zarr.json"]
    # earlier versions' files (a batch, a block) still count; another run key's entries do not
    (manifest.dir / "blocks-6.json").write_text('{"blocks": [6], "key": "key", "rank": 0}')
    (manifest.dir / "block-7.json").write_text('{"block": 7, "key": "key", "core": [], "rank": 0}')
    (manifest.dir / "block-8.json").write_text('{"block": 8, "key": "other", "core": [], "rank": 0}')
    Manifest(out, "other", rank=1).mark(2)
    assert Manifest(out, "key").done() == {1, 4, 5, 6, 7, 9}
    assert sorted(i for _, blocks in entries(out) for i in blocks) == [1, 2, 4, 5, 6, 7, 8, 9]  # any key: jobs count
    assert [r["rank"] for r in records(out) if r["blocks"] == [2]] == [1]
    for n, every in ((10, 1), (64 * 5, 5), (10 ** 6, 64)):
        manifest.batch_for(n)
        assert manifest.every == every


def test_blocks_of_zeros_are_stored_like_any_other(ckpt, straddling_volume, tmp_path):
    """A block the model calls membrane throughout is a chunk of zeros: stored all the same (the
    arrays promise every chunk), so the pyramid and every reader find it, on either I/O path."""
    state = checkpoint.load(ckpt)
    state["model"]["head.weight"].zero_()
    state["model"]["head.bias"].fill_(-30.0)  # sigmoid: 1e-13, probability 0, mask 0 everywhere
    zeros = checkpoint.save(tmp_path / "zeros", state, keep_last=1)
    pipelines = ["zarr"] + (["zarrs"] if importlib.util.find_spec("zarrs") else [])
    for name in pipelines:
        out = tmp_path / f"{name}.zarr"
        result = predict(zeros, straddling_volume, out,
                         overrides=["predict.block_size=[1,32,32]", "predict.shard_blocks=[1,1,1]",
                                                        f"predict.codec_pipeline={name}"])
        got = outputs(out)
        assert result["blocks_predicted"] == 64 and not any(v.any() for v in got.values())
        for path in (PROBABILITY, MASK):
            chunks = [p for p in (out / path / "c").rglob("*") if p.is_file()]
            assert len(chunks) == 64, (name, path)


# ---------------------------------------------------------------------------------- the GPU path

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_path_overlaps_batches_and_matches_the_cpu(ckpt, straddling_volume, tmp_path):
    """uint8 tiles through pinned buffers and the copy stream, several batches in flight, each result
    collected late: equal to the CPU's numbers within float rounding of the convolutions."""
    model, cfg, _ = load_model(ckpt)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (n, 64, 64), dtype=np.uint8) for n in (3, 3, 1, 3, 2)]
    crop = (slice(8, 56), slice(8, 56))
    cpu = TileNet(load_model(ckpt)[0], torch.device("cpu"), "fp32", 3, False, crop=crop)
    gpu = TileNet(model, torch.device("cuda"), "fp32", 3, False, crop=crop)
    pending = [gpu.submit(b) for b in batches]  # more than its slots: the oldest are collected on reuse
    for b, p in zip(batches, pending):
        prob, mask = p.result()
        ref_prob, ref_mask = cpu.submit(b).result()
        assert prob.shape == ref_prob.shape == (len(b), 48, 48) and prob.dtype == np.uint8
        assert np.abs(prob.astype(int) - ref_prob).max() <= 1  # 1/255: rounding of a float difference
        assert (mask != ref_mask).mean() < 1e-3
    # the whole predictor on the GPU against the CPU
    a = predict(ckpt, straddling_volume, tmp_path / "cpu.zarr", device="cpu", overrides=["predict.block_size=[1,32,32]"])
    b = predict(ckpt, straddling_volume, tmp_path / "gpu.zarr", device="cuda", precision="fp32",
                overrides=["predict.block_size=[1,32,32]"])
    assert a["voxels_predicted"] == b["voxels_predicted"]
    x, y = outputs(tmp_path / "cpu.zarr"), outputs(tmp_path / "gpu.zarr")
    assert np.abs(x["probability"].astype(int) - y["probability"]).max() <= 1
