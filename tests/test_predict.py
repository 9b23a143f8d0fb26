"""The predictor: block grid and halos (pure), seams, 1 vs 2 ranks, kill -9 and resume, bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from unet_dist import checkpoint
from unet_dist.cli import main
from unet_dist.config import ModelConfig, PredictConfig, to_dict
from unet_dist.data.synth import synthesize
from unet_dist.errors import UserError
from unet_dist.model import build_model, halo, pooling_factor
from unet_dist.predict.manifest import records
from unet_dist.predict.prediction_store import MASK, PROBABILITY, probability_float
from unet_dist.data.store import RAW
from unet_dist.files import FAULT_ENV
from unet_dist.predict.block_plan import (assign, block_core, input_region, make_plan, mirror_indices,
                                          padded_input_shape, read_mirrored)
from unet_dist.predict.pipeline import predict
from unet_dist.predict.tilenet import tta_average

from helpers import ENV, ROOT, SMALL, prediction_arrays, run_cli, run_rank_alone, save_checkpoint, torchrun_cmd


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ pure functions

def test_blocks_cover_the_volume_once_and_ranks_own_disjoint_blocks():
    cfg = PredictConfig(block_size=[2, 32, 48], halo=[0, 0, 0])
    plan = make_plan(SMALL, cfg, (9, 100, 130), (2, 9))
    assert plan.shape == (7, 100, 130) and plan.block == (2, 32, 48) and plan.grid == (4, 4, 3)
    seen = np.zeros(plan.shape, np.int32)
    for i in range(plan.n_blocks):
        seen[tuple(slice(lo, hi) for lo, hi in block_core(plan, i))] += 1
    assert (seen == 1).all()
    blocks = list(range(plan.n_blocks))
    owned = [assign(blocks, r, 3) for r in range(3)]
    assert sorted(sum(owned, [])) == blocks and max(map(len, owned)) - min(map(len, owned)) <= 1


@pytest.mark.parametrize("model_cfg", [SMALL, ModelConfig(dims=3, depth=1, base_channels=4),
                                       ModelConfig(dims=2, depth=2, base_channels=8, upsample="interp")])
def test_tiles_start_on_the_pooling_grid_with_enough_halo(model_cfg):
    plan = make_plan(model_cfg, PredictConfig(block_size=[4, 32, 32], halo=[0, 5, 5]), (10, 90, 70), (0, 10))
    pool = pooling_factor(model_cfg)
    need = halo(model_cfg)
    axes = (1, 2) if model_cfg.dims == 2 else (0, 1, 2)
    for a, p, h in zip(axes, pool, need):
        assert plan.context[a] >= h and plan.context[a] % p == 0
        assert plan.tile[a] == plan.block[a] + 2 * plan.context[a]
    for i in range(plan.n_blocks):
        for a, p in zip(axes, pool):
            assert input_region(plan, block_core(plan, i))[a][0] % p == 0


def test_block_sizes_off_the_pooling_grid_are_refused_and_small_volumes_clamp():
    with pytest.raises(UserError, match="predict.block_size.*pooling factor"):
        make_plan(SMALL, PredictConfig(block_size=[1, 30, 32]), (4, 100, 100), (0, 4))
    plan = make_plan(SMALL, PredictConfig(block_size=[8, 512, 512]), (3, 50, 61), (0, 3))
    assert plan.block == (3, 52, 64)  # the volume, rounded up to the pooling factor 4


def test_mirror_indices_match_numpy_symmetric_padding_for_any_reach():
    for n in (1, 2, 5, 9):
        for before, after in ((0, 0), (3, 4), (12, 20)):
            expected = np.pad(np.arange(n), (before, after), mode="symmetric")
            assert np.array_equal(mirror_indices(-before, n + after, n), expected)
    vol = np.random.default_rng(0).integers(0, 255, (5, 7, 9), dtype=np.uint8)
    region = ((-3, 8), (2, 5), (-12, 21))
    padded = np.pad(vol, ((3, 3), (0, 0), (12, 12)), mode="symmetric")
    assert np.array_equal(read_mirrored(vol, region), padded[:, 2:5, :])


def test_tta_maps_every_transform_back():
    x = torch.rand(2, 1, 8, 12)
    seen = []

    def fn(t):
        seen.append(t)
        return t ** 2  # pointwise, so equivariant: every transform must map back onto x ** 2

    assert torch.allclose(tta_average(fn, x), x ** 2)
    assert len(seen) == 8 and len({tuple(t.flatten().tolist()) for t in seen}) == 8


# ---------------------------------------------------------------------------------------- seams

def test_seamless_2d_equals_whole_image_away_from_the_border(ckpt, volume, tmp_path):
    out = tmp_path / "pred.zarr"
    result = predict(ckpt, volume, out, overrides=["predict.block_size=[2,32,48]", "predict.probability_dtype=float16",
                                                   "predict.batch_size=3"])
    assert result["blocks"] == 3 * 4 * 3  # more than one block along every axis
    tiled = probability_float(zarr.open_group(str(out))[PROBABILITY][:])
    model = checkpoint_model(ckpt, SMALL)
    raw = zarr.open_group(str(volume))[RAW][:].astype(np.float32) / 255
    whole = forward_whole(model, SMALL, raw, torch.device("cpu"), torch.autocast("cpu", enabled=False))
    m = halo(SMALL)[0]
    inner = (slice(None), slice(m, -m), slice(m, -m))
    assert np.abs(tiled[inner] - whole[inner]).max() < 5e-4  # float16 storage rounds by <= 2^-12
    # forward_whole mirrors the image border by the same halo, so even the borders agree.
    assert np.abs(tiled - whole).max() < 5e-4


def test_seamless_valid_padding_equals_whole_image_everywhere(volume, tmp_path):
    cfg = ModelConfig(dims=2, depth=2, base_channels=8, padding="valid")
    ckpt = save_checkpoint(tmp_path / "ck", cfg, seed=2)
    out = tmp_path / "pred.zarr"
    predict(ckpt, volume, out, overrides=["predict.block_size=[1,32,32]", "predict.probability_dtype=float16"])
    tiled = probability_float(zarr.open_group(str(out))[PROBABILITY][:])
    raw = zarr.open_group(str(volume))[RAW][:].astype(np.float32) / 255
    whole = forward_whole(checkpoint_model(ckpt, cfg), cfg, raw, torch.device("cpu"),
                          torch.autocast("cpu", enabled=False))
    assert np.abs(tiled - whole).max() < 5e-4  # both mirror the volume: equal up to the borders


def test_seamless_3d_volume_larger_than_a_block_on_every_axis(tmp_path):
    cfg = ModelConfig(dims=3, depth=1, base_channels=4)  # halo 9, pooling 2
    ckpt = save_checkpoint(tmp_path / "ck", cfg, seed=1)
    store = tmp_path / "vol.zarr"
    synthesize(store, shape=(22, 40, 44), seed=5)
    out = tmp_path / "pred.zarr"
    result = predict(ckpt, store, out, labels=store,
                     overrides=["predict.block_size=[8,16,16]", "predict.probability_dtype=float16"])
    assert result["blocks"] == 3 * 3 * 3 and 0 <= result["dice_neuron"] <= 1
    assert zarr.open_group(str(out))[PROBABILITY].chunks == (8, 16, 16)
    tiled = probability_float(zarr.open_group(str(out))[PROBABILITY][:])
    raw = zarr.open_group(str(store))[RAW][:].astype(np.float32) / 255
    whole = forward_whole(checkpoint_model(ckpt, cfg), cfg, raw[None], torch.device("cpu"),
                          torch.autocast("cpu", enabled=False))[0]
    m = halo(cfg)[0]
    inner = (slice(m, -m),) * 3
    assert np.abs(tiled[inner] - whole[inner]).max() < 5e-4


@torch.inference_mode()
def forward_whole(model: torch.nn.Module, model_cfg, images: np.ndarray, device: torch.device,
                  autocast_ctx) -> np.ndarray:
    """The seams' reference: a batch of whole images (N, *spatial) in one pass, each mirrored by the
    network's context (np.pad "symmetric", as the block plan mirrors), cropped back to the image."""
    spatial = images.shape[1:]
    in_shape, context = padded_input_shape(model_cfg, spatial)
    after = tuple(i - s - c for i, s, c in zip(in_shape, spatial, context))
    padded = np.pad(images, [(0, 0), *zip(context, after)], mode="symmetric")
    with autocast_ctx:
        logits = model(torch.from_numpy(np.ascontiguousarray(padded[:, None])).to(device))
    out = torch.sigmoid(logits.float())[:, 0]
    # Same padding: the output is aligned with the padded input, so the image starts `context` in.
    # Valid padding: the output already starts `context` into the input, where the image begins.
    start = context if model_cfg.padding == "same" else (0,) * len(spatial)
    return out[(slice(None), *(slice(c, c + s) for c, s in zip(start, spatial)))].cpu().numpy()


def checkpoint_model(path: Path, model_cfg) -> torch.nn.Module:
    model = build_model(model_cfg)
    model.load_state_dict(checkpoint.load(path)["model"])
    return model.eval()


# --------------------------------------------------------------------- outputs, slices, export

def test_outputs_metadata_slices_and_export(ckpt, volume, tmp_path):
    full, part = tmp_path / "full.zarr", tmp_path / "part.zarr"
    args = ["predict.block_size=[1,48,48]"]
    whole = predict(ckpt, volume, full, labels=volume, overrides=args)
    predict(ckpt, volume, part, slices=(2, 5), overrides=args)
    a, b = prediction_arrays(full), prediction_arrays(part)
    assert b["0"].shape == (3, 100, 120) and b["0"].dtype == np.uint8
    assert np.array_equal(a["0"][2:5], b["0"])  # 2D: slices are independent
    u8, mask = a["0"], a["labels/mask/0"].astype(bool)
    assert ((u8 >= 129) <= mask).all() and (mask <= (u8 >= 128)).all()  # mask = p > 0.5 before rounding

    from ome_zarr_models.v05.image import Image as OmeImage

    group = zarr.open_group(str(part), mode="r")
    image = OmeImage.from_zarr(group)  # arrays, dimension names, label images and all
    assert [m.name for m in image.ome_attributes.multiscales] == ["probability"]
    assert image.labels.attributes.ome.labels == ["mask"]
    for levels in (group, group["labels/mask"]):  # the slice range as a translation on every level
        transforms = levels.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        assert transforms == [{"type": "scale", "scale": [50.0, 4.0, 4.0]},
                              {"type": "translation", "translation": [100.0, 0.0, 0.0]}]
    assert group[MASK].metadata.dimension_names == ("z", "y", "x")
    info = group.attrs["unet_dist"]
    assert info["predict"]["complete"] and info["predict"]["settings"]["slices"] == [2, 5]
    assert info["predict"]["checkpoint_step"] == 7 and info["version"]
    assert info["sources"]["checkpoint"]["weights_sha256"] == info["predict"]["settings"]["weights_sha256"]
    assert zarr.open_group(str(full), mode="r").attrs["unet_dist"]["predict"]["metrics"]["dice_neuron"] \
        == whole["dice_neuron"]

    import tifffile

    tif = tmp_path / "pred.tif"
    assert main(["export", str(part), "--out", str(tif), "--slices", "3:5"]) == 0
    pages = tifffile.imread(tif)
    assert pages.dtype == np.float32 and pages.shape == (2, 100, 120)
    assert np.array_equal(pages, probability_float(b["0"][1:3]))
    assert main(["export", str(part), "--out", str(tif)]) == 2  # exists
    assert main(["export", str(part), "--out", str(tmp_path / "m.tif"), "--array", "mask"]) == 0
    assert set(np.unique(tifffile.imread(tmp_path / "m.tif"))) <= {0, 255}
    assert main(["export", str(part), "--out", str(tmp_path / "x.tif"), "--slices", "0:3"]) == 2


def test_tta_is_the_mean_of_the_eight_transformed_predictions(ckpt, volume, tmp_path):
    """predict.tta=true equals predicting each flip / rotation of the slice plainly, mapping it back
    and averaging (seamless tiles make a tile's prediction that of the whole image)."""
    args = ["predict.block_size=[1,64,64]", "predict.probability_dtype=float16"]
    tta = predict(ckpt, volume, tmp_path / "tta.zarr", slices=(0, 1), overrides=[*args, "predict.tta=true"])
    assert tta["blocks"] == 4
    raw = zarr.open_group(str(volume))[RAW][0:1]
    total = np.zeros(raw.shape, np.float64)
    for k in range(4):
        for flip in (False, True):
            turned = np.rot90(raw[:, :, ::-1] if flip else raw, k, axes=(1, 2))
            store = tmp_path / f"t{k}{int(flip)}.zarr"
            synthesize(store, shape=turned.shape, seed=0)  # a store of that shape, then its raw replaced
            zarr.open_group(str(store), mode="r+")[RAW][:] = turned
            predict(ckpt, store, tmp_path / f"p{k}{int(flip)}.zarr", overrides=args)
            back = np.rot90(zarr.open_group(str(tmp_path / f"p{k}{int(flip)}.zarr"))[PROBABILITY][:], -k, axes=(1, 2))
            total += back[:, :, ::-1] if flip else back
    expected = total / 8
    got = probability_float(zarr.open_group(str(tmp_path / "tta.zarr"))[PROBABILITY][:])
    plain = probability_float(prediction_arrays(predict_plain(ckpt, volume, tmp_path, args))["0"])
    assert np.abs(got - expected).max() < 2e-3  # float16 storage of 8 terms
    assert np.abs(got - plain).max() > 10 * np.abs(got - expected).max()  # and it is not the plain pass


def predict_plain(ckpt, volume, tmp_path, args) -> Path:
    predict(ckpt, volume, tmp_path / "plain.zarr", slices=(0, 1), overrides=args)
    return tmp_path / "plain.zarr"


# ------------------------------------------------------------------------------------ bad input

def test_bad_input_gives_one_line_and_loses_nothing(ckpt, volume, tmp_path, capsys):
    out = tmp_path / "pred.zarr"
    base = ["predict", "--checkpoint", str(ckpt), "--input", str(volume), "--out", str(out)]

    def fails(*extra, match: str):
        capsys.readouterr()
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err

    # weights of another model config under this model_config
    other = checkpoint.load(save_checkpoint(tmp_path / "other", ModelConfig(dims=2, depth=2, base_channels=4)))
    other["model_config"] = other["config"]["model"] = to_dict(SMALL)
    torch.save(other, tmp_path / "mismatch.pt")
    assert main(["predict", "--checkpoint", str(tmp_path / "mismatch.pt"), "--input", str(volume),
                 "--out", str(out)]) == 2
    assert "weights do not fit its model_config" in capsys.readouterr().err
    raw_less = tmp_path / "labels_only.zarr"
    zarr.open_group(str(raw_less), mode="w").create_array("labels", shape=(2, 8, 8), dtype="uint8")
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(raw_less), "--out", str(out)]) == 2
    assert "no array '0' (arrays: labels)" in capsys.readouterr().err
    fails("--slices", "4:9", match="slices 4:9 are not within")
    fails("predict.block_size=[1,30,30]", match="pooling factor")
    fails("model.depth=3", match="only predict.* settings")
    assert not out.exists()

    assert main([*base, "--slices", "0:2", "predict.block_size=[1,48,48]"]) == 0
    before = prediction_arrays(out)
    fails("--slices", "0:2", "predict.block_size=[1,48,48]", match="pass --resume to continue it or --overwrite")
    fails("--slices", "0:2", "predict.block_size=[1,64,64]", "--resume", match="another block_size")
    second = save_checkpoint(tmp_path / "second", SMALL, seed=9)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", str(second), "--input", str(volume), "--out", str(out),
                 "--slices", "0:2", "predict.block_size=[1,48,48]", "--resume"]) == 2
    assert "another weights_sha256" in capsys.readouterr().err
    after = prediction_arrays(out)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # nothing lost
    not_a_store = tmp_path / "folder"
    not_a_store.mkdir()
    (not_a_store / "precious.txt").write_text("keep")
    assert main(["predict", "--checkpoint", str(ckpt), "--input", str(volume), "--out", str(not_a_store),
                 "--overwrite"]) == 2
    assert (not_a_store / "precious.txt").read_text() == "keep"
    assert main([*base, "--slices", "0:2", "predict.block_size=[1,64,64]", "--overwrite"]) == 0
    assert zarr.open_group(str(out))[PROBABILITY].chunks == (1, 64, 64)


# ---------------------------------------------------------------------- real processes: ranks

# levels 1 and 2 of 60 and 30 pixels: a level-1 chunk covers blocks of both ranks
PRED_ARGS = ["predict.block_size=[1,32,32]", "predict.batch_size=2", "predict.pyramid_max_side=32"]


@pytest.fixture(scope="module")
def reference(ckpt, volume, tmp_path_factory):
    """One uninterrupted single-process run through the console script."""
    out = tmp_path_factory.mktemp("ref") / "pred.zarr"
    done = run_cli("predict", "--checkpoint", ckpt, "--input", volume, "--out", out, "--labels", volume,
                   *PRED_ARGS, env={"OMP_NUM_THREADS": "1"})
    assert done.code == 0, done.err
    return out, last_json(done.out)


def manifest_entries(out: Path) -> list[dict]:
    return list(records(out))


@pytest.mark.slow
def test_two_ranks_equal_one_rank(ckpt, volume, reference, tmp_path, free_port):
    ref_out, ref = reference
    out = tmp_path / "pred.zarr"
    proc = subprocess.run(torchrun_cmd(2, free_port, "predict", "--checkpoint", ckpt, "--input", volume,
                                       "--out", out, "--labels", volume, *PRED_ARGS),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = last_json(proc.stdout)
    assert proc.stdout.count('"blocks"') == 1  # rank 0 reports
    for key in ("dice_neuron", "dice_membrane", "pixel_error", "blocks", "voxels_predicted"):
        assert two[key] == ref[key]
    a, b = prediction_arrays(ref_out), prediction_arrays(out)
    assert sorted(a) == sorted(b) == ["0", "1", "2", "labels/mask/0", "labels/mask/1", "labels/mask/2"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    owners = {i: e["rank"] for e in manifest_entries(out) for i in e["blocks"]}
    # Contiguous halves (neighbouring blocks share input chunks), and every chunk has one writer.
    assert owners == {i: int(i >= ref["blocks"] // 2) for i in range(ref["blocks"])}


@pytest.mark.slow
def test_killed_then_resumed_equals_uninterrupted(ckpt, volume, reference, tmp_path, free_port):
    ref_out, ref = reference
    out = tmp_path / "pred.zarr"
    # shards of 2 x 2 blocks: a writer thread finishes the second shard while the first one's is held
    args = ["predict", "--checkpoint", ckpt, "--input", volume, "--out", out, "--labels", volume, "--resume",
            *PRED_ARGS, "predict.shard_blocks=[1,2,2]"]
    # The fault point holds the first shard's writer before its manifest entry: killed then, the run
    # has at least one shard recorded (the others go on meanwhile) and never all of them.
    proc = subprocess.Popen([sys.executable, "-m", "unet_dist", *map(str, args)], cwd=ROOT,
                            env={**ENV, FAULT_ENV: "block-mark"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    manifest = out / ".manifest"
    deadline = time.monotonic() + 120
    while not (list(manifest.glob("*.paused")) and manifest_entries(out)):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sum(len(e["blocks"]) for e in manifest_entries(out))
    assert 1 <= done < ref["blocks"]
    # the same arguments again, now on 2 ranks: only the missing blocks are predicted
    resumed = subprocess.run(torchrun_cmd(2, free_port, *args), cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    result = last_json(resumed.stdout)
    assert result["blocks_skipped"] >= done and result["blocks_predicted"] == ref["blocks"] - result["blocks_skipped"]
    for key in ("dice_neuron", "dice_membrane", "pixel_error"):
        assert result[key] == ref[key]
    a, b = prediction_arrays(ref_out), prediction_arrays(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    again = run_cli(*args, env={"OMP_NUM_THREADS": "1"})  # finished: nothing left to do
    assert again.code == 0 and last_json(again.out)["blocks_predicted"] == 0


def test_the_store_lists_without_warnings_and_a_lost_batch_is_predicted_again(ckpt, volume, reference, tmp_path):
    """zarr warns once for every entry of a group that is not a node: the manifest's batches are groups."""
    ref_out, ref = reference
    out = tmp_path / "pred.zarr"
    shutil.copytree(ref_out, out)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        group = zarr.open_group(str(out), mode="r")
        members = dict(group.members(max_depth=None))
        group.tree()
    assert [str(w.message) for w in caught] == [] and "labels/mask/0" in members
    lost = min((out / ".manifest").glob("blocks-*"))
    n_lost = len(json.loads((lost / "zarr.json").read_text())["attributes"]["blocks"])
    shutil.rmtree(lost)
    again = run_cli("predict", "--checkpoint", ckpt, "--input", volume, "--out", out, "--labels", volume,
                    "--resume", *PRED_ARGS, env={"OMP_NUM_THREADS": "1"})
    assert again.code == 0, again.err
    assert last_json(again.out)["blocks_predicted"] == n_lost and n_lost < ref["blocks"]
    a, b = prediction_arrays(ref_out), prediction_arrays(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_every_rank_reports_a_mistake_before_any_collective(ckpt, tmp_path, free_port):
    raw_less = tmp_path / "labels_only.zarr"
    zarr.open_group(str(raw_less), mode="w").create_array("labels", shape=(2, 8, 8), dtype="uint8")
    out = tmp_path / "pred.zarr"
    args = ("predict", "--checkpoint", ckpt, "--input", raw_less, "--out", out)
    for rank in (0, 1):
        alone = run_rank_alone(rank, 2, free_port, *args)
        assert alone.code == 2 and "no array '0'" in alone.err and "Traceback" not in alone.err, alone.err
    proc = subprocess.run(torchrun_cmd(2, free_port, *args), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0 and "no array '0'" in proc.stderr
    assert not out.exists()
