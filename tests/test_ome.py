"""Every store the project writes is OME-Zarr 0.5 as the field's readers see it; pyramids; the upgrade."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from unet_dist.data import pyramid
from unet_dist.data import store as st
from unet_dist.data.convert import convert
from unet_dist.data.ome import image_levels
from unet_dist.data.synth import synthesize
from unet_dist.files import FAULT_ENV

from helpers import ENV, ROOT, SMALL, check_ome, first_layout_store, run_cli, save_checkpoint


def test_convert_and_synth_stores_are_valid_ome_zarr(isbi_dir, tmp_path):
    isbi = tmp_path / "isbi.zarr"
    convert(isbi_dir / "train-volume.tif", isbi, labels=isbi_dir / "train-labels.tif", resolution=(50, 4, 4))
    check_ome(isbi, "raw", [st.TARGET], levels=2)  # 512 -> 256 in y, x
    raw_only = tmp_path / "raw.zarr"
    convert(isbi_dir / "train-volume.tif", raw_only, chunks="3d", shard=(32, 512, 512), resolution=(50, 4, 4))
    check_ome(raw_only, "raw", [], levels=2)
    synth = tmp_path / "synth.zarr"
    synthesize(synth, shape=(4, 600, 520), seed=0)
    check_ome(synth, "raw", [st.TARGET], levels=3)  # 600 -> 300 -> 150
    group = zarr.open_group(str(synth), mode="r")
    scales = [d["coordinateTransformations"][0]["scale"] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
    assert scales == [[50.0, 4.0, 4.0], [50.0, 8.0, 8.0], [50.0, 16.0, 16.0]]  # anisotropic: z kept
    # voxel centres: a level-1 voxel (mean of 2 x 2) sits half a fine voxel further on in y and x
    shifts = [d["coordinateTransformations"][1:] for d in group.attrs["ome"]["multiscales"][0]["datasets"]]
    assert shifts == [[], [{"type": "translation", "translation": [0.0, 2.0, 2.0]}],
                      [{"type": "translation", "translation": [0.0, 6.0, 6.0]}]]
    assert [a.shape for a in image_levels(group)] == [(4, 600, 520), (4, 300, 260), (4, 150, 130)]
    # written slab by slab with level 0 (no level halves z): the same as the plain definition
    levels = image_levels(group)
    np.testing.assert_array_equal(levels[1][:2, :50, :60],
                                  reference_downsample(levels[0][:2, :100, :120], (1, 2, 2), "mean"))
    target = image_levels(group["labels"][st.TARGET])
    np.testing.assert_array_equal(target[2][:], reference_downsample(target[1][:], (1, 2, 2), "mode"))


def test_prediction_store_is_valid_ome_zarr(tmp_path, tiny_synth_store):

    from unet_dist.predict.pipeline import predict

    ckpt = save_checkpoint(tmp_path / "ck", SMALL)
    out = tmp_path / "pred.zarr"
    predict(ckpt, tiny_synth_store, out, slices=(2, 6),
            overrides=["predict.block_size=[1,32,32]", "predict.pyramid_max_side=32"])
    check_ome(out, "probability", ["mask"], levels=3)  # 128 -> 64 -> 32


# ------------------------------------------------------------------------------------ pyramids

def reference_downsample(data: np.ndarray, step, rule: str) -> np.ndarray:
    """The plain definition, one output voxel at a time: the box of `step` voxels, cut at the far
    edge and completed by repeating the edge voxel; mean rounded half up, or the most frequent value
    (smallest on ties)."""
    out_shape = tuple(-(-n // f) for n, f in zip(data.shape, step))
    out = np.zeros(out_shape, data.dtype)
    for index in itertools.product(*map(range, out_shape)):
        members = [data[tuple(min(i * f + o, n - 1) for i, f, o, n in zip(index, step, offset, data.shape))]
                   for offset in itertools.product(*map(range, step))]
        if rule == "mean":
            out[index] = int(np.floor(sum(int(m) for m in members) / len(members) + 0.5))
        else:
            values, counts = np.unique(members, return_counts=True)
            out[index] = values[counts.argmax()]
    return out


@pytest.mark.parametrize("step", [(1, 2, 2), (2, 2, 2)])
def test_levels_equal_a_plain_numpy_downsampling(tmp_path, step):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (5, 37, 42), dtype=np.uint8)  # odd sides: partial boxes at the edges
    ids = rng.integers(0, 4, (5, 37, 42), dtype=np.uint8)
    group = zarr.open_group(str(tmp_path / "p.zarr"), mode="w")
    mask = (ids > 1).astype(np.uint8)  # a binary target takes the majority path of the mode rule
    for name, data, rule in (("raw", raw, "mean"), ("ids", ids, "mode"), ("mask", mask, "mode")):
        level0 = group.create_array(f"{name}0", data=data, chunks=(2, 8, 8))
        # level 1 with chunks of (2, 5, 5): every level-1 chunk reads a region spanning level-0 chunks
        shape1 = tuple(-(-n // f) for n, f in zip(data.shape, step))
        level1 = group.create_array(f"{name}1", shape=shape1, dtype=data.dtype, chunks=(2, 5, 5))
        written = sum(pyramid.write_level(level0, level1, step, rule, rank, 3) for rank in range(3))
        assert written == level1.size
        np.testing.assert_array_equal(level1[:], reference_downsample(data, step, rule))


def test_mode_keeps_thin_membranes_and_never_invents_ids():
    target = np.ones((1, 4, 4), np.uint8)
    target[0, :, 1] = 0  # a one-pixel membrane: half of each 2 x 2 box on its column
    assert (pyramid.downsample(target, (1, 2, 2), "mode")[0, :, 0] == 0).all()
    ids = np.array([[[7, 9], [9, 300]]], np.uint16)
    assert pyramid.downsample(ids, (1, 2, 2), "mode").tolist() == [[[9]]]
    assert pyramid.downsample(ids, (1, 2, 2), "mean").tolist() == [[[81]]]  # why labels never use mean


def test_level_plan_follows_the_voxel_size():
    plan = pyramid.plan_levels
    assert plan((30, 512, 512), (50, 4, 4)) == [(1, 2, 2)]
    assert plan((1000, 10000, 10000), (50, 4, 4))[:4] == [(1, 2, 2)] * 3 + [(2, 2, 2)]  # 32 nm: near 50
    assert plan((500, 2048, 2048), (8, 8, 8)) == [(2, 2, 2)] * 3  # FIB-SEM: z too
    assert plan((1, 2048, 2048), (50, 4, 4)) == [(1, 2, 2)] * 3  # one slice: z is never halved
    assert plan((30, 256, 200), (50, 4, 4)) == []
    steps = plan((1000, 10000, 10000), (50, 4, 4))
    assert max(pyramid.level_shapes((1000, 10000, 10000), steps)[-1][1:]) <= pyramid.MAX_SIDE


# ---------------------------------------------------------------------------- the first layout

def test_first_layout_is_refused_in_one_line_then_upgraded_without_copying(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (3, 300, 260), dtype=np.uint8)
    labels = (rng.random((3, 300, 260)) > 0.3).astype(np.uint8)
    old = tmp_path / "old.zarr"
    first_layout_store(old, raw, labels)
    for args in (["info", old], ["train", "--config", "configs/smoke.yaml", f"data.store={old}",
                                 f"run.dir={tmp_path / 'run'}"]):
        done = run_cli(*args)
        assert done.code == 2 and done.err.count("\n") == 1, done.err
        assert "first unet-dist layout" in done.err and f"unet-dist upgrade {old}" in done.err
    assert not (tmp_path / "run" / "checkpoints").exists()

    chunk = old / "raw" / "c" / "1" / "0" / "0"
    inode = os.stat(chunk).st_ino
    done = run_cli("upgrade", old)
    assert done.code == 0, done.err
    assert os.stat(old / "0" / "c" / "1" / "0" / "0").st_ino == inode  # moved, not copied
    check_ome(old, "raw", [st.TARGET], levels=2)
    group = st.open_store(old, arrays=(st.RAW, st.TARGET_PATH))
    np.testing.assert_array_equal(group[st.RAW][:], raw)
    np.testing.assert_array_equal(group[st.TARGET_PATH][:], labels)
    np.testing.assert_array_equal(group["1"][:], reference_downsample(raw, (1, 2, 2), "mean"))
    assert st.voxel_size(group) == (50.0, 4.0, 4.0) and group.attrs["unet_dist"]["version"] == "0.1.0"
    again = run_cli("upgrade", old)
    assert again.code == 2 and "nothing to upgrade" in again.err and again.err.count("\n") == 1


def test_an_upgrade_killed_half_way_is_refused_in_one_line_then_finished(tmp_path):
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (2, 300, 260), dtype=np.uint8)
    labels = (rng.random((2, 300, 260)) > 0.3).astype(np.uint8)
    old = tmp_path / "old.zarr"
    first_layout_store(old, raw, labels)
    # killed after the arrays moved and before any metadata of the new layout was written
    proc = subprocess.Popen([sys.executable, "-m", "unet_dist", "upgrade", str(old)], cwd=ROOT,
                            env={**ENV, FAULT_ENV: "upgrade-moved"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    marker = tmp_path / "old.zarr.paused"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (old / "0").is_dir() and not (old / "raw").exists()
    half = run_cli("info", old)
    assert half.code == 2 and half.err.count("\n") == 1 and "upgrade stopped half way" in half.err, half.err
    done = run_cli("upgrade", old)
    assert done.code == 0, done.err
    check_ome(old, "raw", [st.TARGET], levels=2)
    group = st.open_store(old, arrays=(st.RAW, st.TARGET_PATH))
    np.testing.assert_array_equal(group[st.RAW][:], raw)
    np.testing.assert_array_equal(group[st.TARGET_PATH][:], labels)
    assert "upgrading" not in group.attrs["unet_dist"]
