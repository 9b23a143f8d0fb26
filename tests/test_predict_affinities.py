"""Prediction of affinities (model.target: affinities): one (C, Z, Y, X) OME-Zarr image, exact against a
whole-volume pass, the same on 1 and 2 ranks and after kill -9 + resume; what only membranes have, refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unet_dist import checkpoint
from unet_dist.config import ModelConfig
from unet_dist.data import pyramid
from unet_dist.data.store import RAW
from unet_dist.data.synth import synthesize
from unet_dist.files import FAULT_ENV
from unet_dist.predict.manifest import records
from unet_dist.model import build_model
from unet_dist.predict.block_plan import padded_input_shape
from unet_dist.predict.pipeline import predict
from unet_dist.predict.prediction_store import PROBABILITY, probability_float

from helpers import ENV, ROOT, check_ome, run_cli, save_checkpoint, torchrun_cmd

AFF3 = ModelConfig(dims=3, target="affinities", depth=1, base_channels=4)
AFF2 = ModelConfig(dims=2, target="affinities", depth=1, base_channels=4)
# blocks of 4 x 16 x 16 in shards of 1 x 2 x 2 blocks on 12 x 40 x 44: 12 shards, edge blocks partial
ARGS3 = ["predict.block_size=[4,16,16]", "predict.shard_blocks=[1,2,2]", "predict.pyramid_max_side=16",
         "predict.batch_size=2"]


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@torch.inference_mode()
def whole_pass(ckpt: Path, cfg: ModelConfig, raw: np.ndarray) -> np.ndarray:
    """Float32 affinities (C, Z, Y, X) of the whole volume in one pass (2D: every slice one image),
    mirrored by the network's context as the block plan mirrors."""
    model = build_model(cfg)
    model.load_state_dict(checkpoint.load(ckpt)["model"])
    images = raw.astype(np.float32)[:, None] / 255 if cfg.dims == 2 else raw.astype(np.float32)[None, None] / 255
    spatial = images.shape[2:]
    in_shape, context = padded_input_shape(cfg, spatial)
    after = [i - s - c for i, s, c in zip(in_shape, spatial, context)]
    padded = np.pad(images, [(0, 0), (0, 0), *zip(context, after)], mode="symmetric")
    out = torch.sigmoid(model.eval()(torch.from_numpy(np.ascontiguousarray(padded))).float()).numpy()
    out = out[(slice(None), slice(None), *(slice(c, c + s) for c, s in zip(context, spatial)))]
    return out.transpose(1, 0, 2, 3) if cfg.dims == 2 else out[0]  # (C, Z, Y, X)


def level_arrays(out: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(out), mode="r")
    return {name: array[:] for name, array in group.arrays()}


@pytest.fixture(scope="module")
def store3(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("aff") / "vol.zarr"
    synthesize(out, shape=(12, 40, 44), seed=5)
    return out


@pytest.fixture(scope="module")
def ckpt3(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ck3"), AFF3, seed=1)


@pytest.fixture(scope="module")
def reference3(ckpt3, store3, tmp_path_factory):
    """One uninterrupted single-process run through the console script."""
    out = tmp_path_factory.mktemp("ref") / "pred.zarr"
    done = run_cli("predict", "--checkpoint", ckpt3, "--input", store3, "--out", out, *ARGS3,
                   env={"OMP_NUM_THREADS": "1"})
    assert done.code == 0, done.err
    return out, last_json(done.out)


def test_3d_affinities_are_one_channel_image_equal_to_a_whole_pass(ckpt3, store3, reference3):
    out, result = reference3
    group = zarr.open_group(str(out), mode="r")
    u8 = group[PROBABILITY]
    assert u8.shape == (3, 12, 40, 44) and u8.dtype == np.uint8
    assert u8.chunks == (3, 4, 16, 16) and u8.shards == (3, 4, 32, 32)
    assert u8.metadata.dimension_names == ("c", "z", "y", "x")
    multiscale = group.attrs["ome"]["multiscales"][0]
    assert [(a["name"], a["type"]) for a in multiscale["axes"]] == [("c", "channel"), ("z", "space"),
                                                                      ("y", "space"), ("x", "space")]
    scales = [d["coordinateTransformations"][0]["scale"] for d in multiscale["datasets"]]
    assert all(s[0] == 1.0 for s in scales) and len(scales) == 3
    attrs = group.attrs["unet_dist"]["predict"]
    assert attrs["target"] == "affinities" and attrs["offsets"] == [[-1, 0, 0], [0, -1, 0], [0, 0, -1]]
    assert attrs["complete"] and "labels" not in group  # no mask
    check_ome(out, "affinities", [], levels=3)

    raw = zarr.open_group(str(store3))[RAW][:]
    whole = whole_pass(ckpt3, AFF3, raw)
    got = probability_float(u8[:])
    # uint8 holds round(255 a): off by at most 1/510, plus float noise between tiled and whole passes
    # (both mirror the volume by the same context, so the borders agree too)
    assert np.abs(got - whole).max() <= 1 / 510 + 1e-5
    assert np.array_equal(u8[:], np.rint(whole * 255).astype(np.uint8)) or \
        np.abs(u8[:].astype(int) - np.rint(whole * 255)).max() <= 1  # a value at .5 may round either way
    # coarser levels: the mean over space of each channel, channels kept
    levels = level_arrays(out)
    for k in (1, 2):
        below, above = levels[str(k - 1)], levels[str(k)]
        assert above.shape[0] == 3
        assert np.array_equal(above, np.stack([pyramid.downsample(c, (1, 2, 2), "mean") for c in below]))


def test_float16_affinities_are_the_whole_pass(ckpt3, store3, tmp_path):
    out = tmp_path / "pred.zarr"
    predict(ckpt3, store3, out, overrides=[*ARGS3, "predict.probability_dtype=float16"])
    got = zarr.open_group(str(out))[PROBABILITY][:]
    assert got.dtype == np.float16
    whole = whole_pass(ckpt3, AFF3, zarr.open_group(str(store3))[RAW][:])
    assert np.abs(got.astype(np.float32) - whole).max() < 5e-4  # float16 rounds by <= 2^-12


def test_2d_affinity_model_on_a_2d_store(tmp_path):
    store = tmp_path / "em.zarr"
    synthesize(store, shape=(3, 50, 60), seed=2)  # 2d chunks (one slice each), as ISBI's store
    ckpt = save_checkpoint(tmp_path / "ck", AFF2, seed=3)
    out = tmp_path / "pred.zarr"
    result = predict(ckpt, store, out, overrides=["predict.block_size=[2,32,32]", "predict.batch_size=3"])
    assert result["blocks"] == 2 * 2 * 2
    group = zarr.open_group(str(out), mode="r")
    got = group[PROBABILITY][:]
    assert got.shape == (2, 3, 50, 60) and group[PROBABILITY].chunks == (2, 2, 32, 32)
    assert group.attrs["unet_dist"]["predict"]["offsets"] == [[0, -1, 0], [0, 0, -1]]
    whole = whole_pass(ckpt, AFF2, zarr.open_group(str(store))[RAW][:])
    assert np.abs(probability_float(got) - whole).max() <= 1 / 510 + 1e-5
    check_ome(out, "affinities", [], levels=1)


def test_what_needs_a_membrane_is_refused_in_one_line(ckpt3, store3, reference3, tmp_path):
    out = tmp_path / "pred.zarr"
    for extra, match in ((["--labels", store3], "--labels scores a membrane prediction"),
                         (["predict.tta=true"], "predict.tta: test-time flips do not apply to affinities")):
        done = run_cli("predict", "--checkpoint", ckpt3, "--input", store3, "--out", out, *ARGS3, *extra,
                       env={"OMP_NUM_THREADS": "1"})
        assert done.code == 2 and match in done.err and len(done.err.strip().splitlines()) == 1, done.err
        assert not out.exists()
    pred = reference3[0]
    for args in (["evaluate", "--pred", pred, "--labels", store3], ["export", pred, "--out", tmp_path / "p.tif"]):
        done = run_cli(*args, env={"OMP_NUM_THREADS": "1"})
        assert done.code == 2 and "an affinity prediction" in done.err, done.err
        assert len(done.err.strip().splitlines()) == 1 and not (tmp_path / "p.tif").exists()


@pytest.mark.slow
def test_two_ranks_equal_one_rank(ckpt3, store3, reference3, tmp_path, free_port):
    ref_out, ref = reference3
    out = tmp_path / "pred.zarr"
    proc = subprocess.run(torchrun_cmd(2, free_port, "predict", "--checkpoint", ckpt3, "--input", store3,
                                       "--out", out, *ARGS3), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert last_json(proc.stdout)["blocks"] == ref["blocks"] == 27
    a, b = level_arrays(ref_out), level_arrays(out)
    assert sorted(a) == sorted(b) == ["0", "1", "2"]
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_killed_then_resumed_equals_uninterrupted(ckpt3, store3, reference3, tmp_path, free_port):
    ref_out, ref = reference3
    out = tmp_path / "pred.zarr"
    args = ["predict", "--checkpoint", ckpt3, "--input", store3, "--out", out, "--resume", *ARGS3]
    # the fault point holds the first shard's writer before its manifest entry: killed then, some
    # shards are recorded and never all of them
    proc = subprocess.Popen([sys.executable, "-m", "unet_dist", *map(str, args)], cwd=ROOT,
                            env={**ENV, FAULT_ENV: "block-mark"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    manifest = out / ".manifest"
    entries = lambda: list(records(out))  # noqa: E731
    deadline = time.monotonic() + 120
    while not (list(manifest.glob("*.paused")) and entries()):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sum(len(e["blocks"]) for e in entries())
    assert 1 <= done < ref["blocks"]
    resumed = subprocess.run(torchrun_cmd(2, free_port, *args), cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = last_json(resumed.stdout)
    assert result["blocks_skipped"] >= done and result["blocks_predicted"] == ref["blocks"] - result["blocks_skipped"]
    a, b = level_arrays(ref_out), level_arrays(out)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_view_shows_affinities_as_rgb_where_they_are(ckpt3, store3, reference3, tmp_path):
    """Channel 0 set to the store's neuron interior and the others to 0: the layer is red exactly there."""
    pytest.importorskip("neuroglancer")
    pytest.importorskip("playwright")
    from unet_dist.visualize.view import find_chromium

    find_chromium()
    pred = tmp_path / "pred.zarr"
    predict(ckpt3, store3, pred, overrides=ARGS3)
    group = zarr.open_group(str(pred), mode="r+")
    target = zarr.open_group(str(store3), mode="r")["labels/neuron_interior/0"][:]
    group["0"][:] = np.stack([target * np.uint8(255), 0 * target, 0 * target])
    png = tmp_path / "v.png"
    done = run_cli("view", pred, "--slices", "6:7", "--screenshot", png, env={"OMP_NUM_THREADS": "1"}, timeout=400)
    assert done.code == 0, done.err
    result = last_json(done.out)
    assert result["layers"] == {"affinities": "ok"} and result["page_errors"] == []
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    x, y, w, h = result["panels"][0]["rect"]
    # the panel without its edges (the layer's axis legend, the scale bar): the volume, grey around it
    panel = image[int(y + 0.05 * h):int(y + 0.9 * h), int(x + 0.05 * w):int(x + 0.95 * w)]
    drawn = np.argwhere(np.abs(panel - 128).max(axis=-1) > 40)
    (top, left), (bottom, right) = drawn.min(axis=0), drawn.max(axis=0) + 1
    inside = panel[top:bottom, left:right]
    red = (inside[..., 0] > 128) & (inside[..., 1] < 64) & (inside[..., 2] < 64)
    black = inside.max(axis=-1) < 64
    assert (red | black).mean() > 0.99  # no green or blue: channels 1 and 2 are 0
    # slice 6 of the target, sampled at the drawn pixels: red exactly where the neuron interior is
    rows = np.arange(bottom - top) * target.shape[1] // (bottom - top)
    cols = np.arange(right - left) * target.shape[2] // (right - left)
    assert (red == (target[6][np.ix_(rows, cols)] == 1)).mean() > 0.97
