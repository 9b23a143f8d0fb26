"""Sharded prediction outputs (`predict.shard_blocks`): ranks own whole shards, a shard is written
once and whole, the files are zarr-python's bytes and other readers read them, and a run stopped
between storing a shard and recording all of its blocks redoes that shard on resume."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from unet_dist.predict.block_plan import assign, block_order, make_plan, shard_members, shard_of, whole_shards
from unet_dist.config import ModelConfig, PredictConfig
from unet_dist.predict.prediction_store import MASK, PROBABILITY, create_prediction
from unet_dist.data.damaged_chunks import writing_every_chunk
from unet_dist.predict.pipeline import predict
from unet_dist.predict.manifest import Manifest

from helpers import check_ome, prediction_arrays, require_module, run_cli

BLOCKS = ["predict.block_size=[1,32,32]", "predict.pyramid_max_side=32"]  # 6 x 100 x 120: 6 x 4 x 4 blocks


def test_ranks_own_whole_shards_and_every_block_once():
    plan = make_plan(ModelConfig(dims=2, depth=2), PredictConfig(block_size=[1, 64, 64], shard_blocks=[2, 2, 3]),
                     (5, 300, 500), (0, 5))
    assert plan.grid == (5, 5, 8) and plan.shard == (2, 128, 192) and plan.shard_grid == (3, 3, 3)
    for in_chunks in ((1, 1024, 1024), (4, 128, 128)):
        order = block_order(plan, range(plan.n_blocks), in_chunks)
        assert sorted(order) == list(range(plan.n_blocks))
        # each shard's blocks are consecutive, so contiguous runs can follow shard boundaries
        runs = [k for k, _ in itertools.groupby(order, key=lambda i: shard_of(plan, i))]
        assert len(runs) == len(set(runs)) == plan.n_shards
        for world in (1, 2, 4, 7):
            shares = [assign(order, r, world, unit=lambda i: shard_of(plan, i)) for r in range(world)]
            assert sorted(i for s in shares for i in s) == list(range(plan.n_blocks))
            owner = {shard_of(plan, i): r for r, s in enumerate(shares) for i in s}
            assert all(owner[shard_of(plan, i)] == r for r, s in enumerate(shares) for i in s)
            assert max(map(len, shares)) - min(map(len, shares)) <= 2 * 12  # two shards of 2 x 2 x 3 blocks
    # edge shards hold fewer blocks; a shard counts as done only with all of its blocks
    assert len(shard_members(plan, (2, 2, 2))) == 1 * 1 * 2
    first = shard_members(plan, (0, 0, 0))
    assert len(first) == 12 and whole_shards(plan, first) == set(first)
    assert whole_shards(plan, first[1:] + shard_members(plan, (0, 0, 1))) == set(shard_members(plan, (0, 0, 1)))
    # [1, 1, 1] is unsharded: every block its own unit, the order and shares as before
    flat = make_plan(ModelConfig(dims=2, depth=2), PredictConfig(block_size=[1, 64, 64], shard_blocks=[1, 1, 1]),
                     (5, 300, 500), (0, 5))
    assert flat.shard is None and flat.n_shards == flat.n_blocks


def files_of(array_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(array_dir)): p.read_bytes() for p in sorted(array_dir.rglob("*"))
            if p.is_file() and p.name != "zarr.json"}


def test_sharded_outputs_equal_unsharded_in_zarrs_bytes_and_tensorstore_reads_them(ckpt, volume, tmp_path):
    sharded, flat = tmp_path / "sharded.zarr", tmp_path / "flat.zarr"
    a = predict(ckpt, volume, sharded, labels=volume, overrides=BLOCKS)
    b = predict(ckpt, volume, flat, labels=volume, overrides=[*BLOCKS, "predict.shard_blocks=[1,1,1]"])
    assert a["dice_neuron"] == b["dice_neuron"] and a["blocks"] == b["blocks"] == 96
    x, y = prediction_arrays(sharded), prediction_arrays(flat)
    assert sorted(x) == sorted(y) and all(np.array_equal(x[k], y[k]) for k in x)
    group = zarr.open_group(str(sharded), mode="r")
    assert group[PROBABILITY].shards == (1, 128, 128) and group[PROBABILITY].chunks == (1, 32, 32)
    assert zarr.open_group(str(flat), mode="r")[PROBABILITY].shards is None
    ours = files_of(sharded / PROBABILITY)
    assert len(ours) == 6 and len(files_of(flat / PROBABILITY)) == 96  # a file per slice, not per block
    # the same arrays written by zarr-python into the same layout: the same files, byte for byte
    ref = tmp_path / "zarr.zarr"
    create_prediction(zarr.open_group(str(ref), mode="w", zarr_format=3), x["0"].shape, (1, 32, 32), "uint8", None, 0,
                      32, shard=(1, 128, 128))
    for path, key in ((PROBABILITY, "0"), (MASK, "labels/mask/0")):
        writing_every_chunk(zarr.open_group(str(ref), mode="r+")[path])[:] = x[key]
        assert files_of(sharded / path) == files_of(ref / path), path
    ts = require_module("tensorstore")
    for path, key in ((PROBABILITY, "0"), (MASK, "labels/mask/0")):
        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(sharded / path)}}).result()
        assert np.array_equal(store.read().result(), x[key]), path


def test_a_sharded_prediction_is_valid_ome_zarr_with_sharded_levels(ckpt, volume, tmp_path):
    out = tmp_path / "pred.zarr"
    predict(ckpt, volume, out, overrides=BLOCKS)
    group = zarr.open_group(str(out), mode="r")
    levels = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert len(levels) == 3 and all(group[d["path"]].shards is not None for d in levels)
    check_ome(out, "probability", ["mask"], 3)  # ome-zarr-models and ome-zarr-py's reader


@pytest.mark.parametrize("value", ["[1,4]", "[0,4,4]", "[1,-2,4]"])
def test_bad_shard_blocks_are_one_line_before_anything_is_written(ckpt, volume, tmp_path, value):
    out = tmp_path / "p.zarr"
    done = run_cli("predict", "--checkpoint", ckpt, "--input", volume, "--out", out, *BLOCKS,
                   f"predict.shard_blocks={value}")
    assert done.code == 2 and len(done.err.strip().splitlines()) == 1 and "predict.shard_blocks" in done.err
    assert "Traceback" not in done.err and not out.exists()


def test_the_zarrs_pipeline_writes_whole_shards_through_zarr(ckpt, volume, tmp_path):
    require_module("zarrs", "pip install -e '.[bench]'")
    ours, theirs = tmp_path / "ours.zarr", tmp_path / "zarrs.zarr"
    predict(ckpt, volume, ours, overrides=BLOCKS)
    predict(ckpt, volume, theirs, overrides=[*BLOCKS, "predict.codec_pipeline=zarrs"])
    x, y = prediction_arrays(ours), prediction_arrays(theirs)
    assert all(np.array_equal(x[k], y[k]) for k in x)
    assert files_of(ours / PROBABILITY) == files_of(theirs / PROBABILITY)


def test_a_shard_with_unrecorded_blocks_is_redone_on_resume(ckpt, volume, tmp_path):
    """Stopped after storing a shard but before recording all of its blocks (the manifest is written
    in batches): the resumed run must redo that whole shard, since a shard is written only whole."""
    out = tmp_path / "pred.zarr"
    ref = predict(ckpt, volume, out, labels=volume, overrides=BLOCKS)
    before = prediction_arrays(out)
    key = zarr.open_group(str(out), mode="r").attrs["unet_dist"]["predict"]["run_key"]
    shutil.rmtree(out / ".manifest")
    manifest = Manifest(out, key)
    manifest.create()
    for index in range(ref["blocks"]):
        if index not in (3, 7):  # two blocks of the first shard (slice 0) unrecorded
            manifest.mark(index)
    manifest.flush()
    for path in (PROBABILITY, MASK):  # and that shard's files gone, so only a redo can bring them back
        (out / path / "c" / "0" / "0" / "0").unlink()
    again = predict(ckpt, volume, out, labels=volume, overrides=BLOCKS, resume=True)
    assert again["blocks_predicted"] == 16 and again["blocks_skipped"] == 80
    assert again["dice_neuron"] == ref["dice_neuron"]
    after = prediction_arrays(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_more_ranks_than_shards_is_refused_in_one_line(ckpt, volume, tmp_path):
    done = run_cli("predict", "--checkpoint", ckpt, "--input", volume, "--out", tmp_path / "p.zarr",
                   "--slices", "0:1", *BLOCKS, env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
                                                    "LOCAL_WORLD_SIZE": "2"})
    assert done.code == 2 and "2 ranks but only 1 shard(s)" in done.err and "predict.shard_blocks" in done.err
    assert not (tmp_path / "p.zarr").exists()


def test_resuming_with_other_shards_is_refused_naming_the_setting_to_pass(ckpt, volume, tmp_path):
    """An output written a file per block (as every output was before shards) resumes only unsharded:
    the refusal says which setting continues it, and an unsharded run keeps the key it always had."""
    out = tmp_path / "flat.zarr"
    predict(ckpt, volume, out, overrides=[*BLOCKS, "predict.shard_blocks=[1,1,1]"])
    settings = zarr.open_group(str(out), mode="r").attrs["unet_dist"]["predict"]["settings"]
    assert "shard_blocks" not in settings
    done = run_cli("predict", "--checkpoint", ckpt, "--input", volume, "--out", out, "--resume", *BLOCKS)
    assert done.code == 2 and len(done.err.strip().splitlines()) == 1
    assert "another shard_blocks" in done.err and "pass predict.shard_blocks=[1,1,1] to continue it" in done.err
    again = predict(ckpt, volume, out, overrides=[*BLOCKS, "predict.shard_blocks=[1,1,1]"], resume=True)
    assert again["blocks_predicted"] == 0 and again["blocks_skipped"] == 96
