"""Training, prediction and evaluation on stores made by other tools, read as they are (data/volumes.py): a
Zarr v2 group with CREMI-like paths trains and predicts exactly as the same data converted does;
unsuitable arrays are one line each, before anything starts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import zarr

from helpers import SMOKE, run_cli
from unet_dist import checkpoint
from unet_dist.data import store as st

TRAIN = ("train.steps=4", "train.val_every=2", "train.ckpt_every=4", "train.log_every=1", "train.warmup_steps=1",
         "train.deterministic=true", "data.train_slices=[0,8]", "data.val_slices=[8,12]", "data.num_workers=0")


@pytest.fixture(scope="module")
def v2_store(synth_store, tmp_path_factory):
    """The synthetic volume in a Zarr v2 group as another tool writes it: other paths, other chunks,
    no OME metadata, plus arrays that are wrong for training."""
    ours = zarr.open_group(str(synth_store), mode="r")
    raw, target = ours[st.RAW][:], ours[st.TARGET_PATH][:]
    path = tmp_path_factory.mktemp("foreign") / "cremi_v2.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    group.create_array("volumes/raw", data=raw, chunks=(1, 64, 64))
    group.create_array("volumes/labels/membrane", data=target, chunks=(2, 64, 64))
    ids = (np.arange(target.size, dtype=np.uint32).reshape(target.shape) // 700) * target
    group.create_array("volumes/labels/neuron_ids", data=ids, chunks=(2, 64, 64))
    group.create_array("volumes/labels/float", data=target.astype(np.float32), chunks=(2, 64, 64))
    group.create_array("volumes/tiny_chunks", data=raw, chunks=(1, 4, 4))
    group.create_array("volumes/raw4d", data=raw[None], chunks=(1, 1, 64, 64))
    assert (path / ".zgroup").is_file()
    return path


def losses(run_dir) -> list:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("train/loss"), r.get("val/dice_membrane")) for r in rows
            if "train/loss" in r or "val/dice_membrane" in r]


def test_a_zarr_v2_store_trains_and_predicts_as_the_converted_one(synth_store, v2_store, tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    done = run_cli("train", "--config", SMOKE, f"data.store={synth_store}", f"run.dir={ours}", *TRAIN)
    assert done.code == 0, done.err
    done = run_cli("train", "--config", SMOKE, f"data.store={v2_store}", f"run.dir={theirs}", *TRAIN,
                   "data.raw_array=volumes/raw", "data.labels=volumes/labels/membrane")
    assert done.code == 0, done.err
    assert losses(theirs) == losses(ours) and len(losses(ours)) >= 4  # the same patches, bit for bit

    ckpt = ours / "checkpoints" / "step-000000004.pt"
    results = {}
    for name, spec in (("ours", (synth_store, synth_store)),
                       ("theirs", (f"{v2_store}:volumes/raw", f"{v2_store}:volumes/labels/membrane"))):
        out = tmp_path / f"{name}.zarr"
        done = run_cli("predict", "--checkpoint", ckpt, "--input", spec[0], "--labels", spec[1], "--out", out,
                       "--slices", "8:12", "--device", "cpu", "predict.block_size=[1,64,64]")
        assert done.code == 0, done.err
        results[name] = json.loads(done.out.strip().splitlines()[-1])
        results[name + "_prob"] = zarr.open_group(str(out), mode="r")[st.RAW][:]
    np.testing.assert_array_equal(results["theirs_prob"], results["ours_prob"])
    assert results["theirs"]["dice_membrane"] == results["ours"]["dice_membrane"]
    assert json.loads(json.dumps(zarr.open_group(str(tmp_path / "theirs.zarr")).attrs["unet_dist"]["sources"]))[
        "input"]["array"] == "volumes/raw"
    # evaluate reads the foreign labels the same way: the same numbers as against the converted store
    scores = {}
    for name, labels in (("ours", synth_store), ("theirs", f"{v2_store}:volumes/labels/membrane")):
        done = run_cli("evaluate", "--pred", tmp_path / "ours.zarr", "--labels", labels, "--json", tmp_path / f"{name}.json")
        assert done.code == 0, done.err
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    keys = ("dice_neuron", "dice_membrane", "pixel_error", "v_rand", "v_info")
    assert {k: scores["theirs"][k] for k in keys} == {k: scores["ours"][k] for k in keys}
    assert scores["theirs"]["segments"] == "binary target" and scores["theirs"]["labels"].endswith(":volumes/labels/membrane")
    done = run_cli("evaluate", "--pred", tmp_path / "ours.zarr", "--labels", f"{v2_store}:volumes/labels/neuron_ids")
    assert done.code == 2 and "other than 0 and 1" in done.err and len(done.err.strip().splitlines()) == 1


@pytest.mark.parametrize("overrides,fragments", [
    (("data.raw_array=volumes/tiny_chunks",), ("volumes/tiny_chunks: chunks 1x4x4", "about 281 chunk files",
                                               "data.max_files_per_patch=256", "convert it")),
    (("data.raw_array=volumes/raw4d",), ("volumes/raw4d: an array of shape (1, 12, 128, 128)", "3D (z, y, x)")),
    (("data.labels=volumes/labels/neuron_ids",), ("volumes/labels/neuron_ids: labels hold values other than 0 and 1",
                                                  "convert --instances")),
    (("data.labels=volumes/labels/float",), ("labels of type float32", "--label-threshold")),
    (("data.raw_array=volumes/nope",), ("no array 'volumes/nope' (arrays: volumes/labels/float,",)),
    (("data.raw_array=0",), ("no array '0' (arrays: volumes/labels/float",)),  # the default is not there
])
def test_unsuitable_arrays_are_one_line_before_anything_starts(v2_store, tmp_path, overrides, fragments):
    run = tmp_path / "run"
    done = run_cli("train", "--config", SMOKE, f"data.store={v2_store}", f"run.dir={run}", *TRAIN,
                   "data.raw_array=volumes/raw", "data.labels=volumes/labels/membrane", *overrides)  # later wins
    assert done.code == 2, done.err
    assert len(done.err.strip().splitlines()) == 1, done.err
    for fragment in fragments:
        assert fragment in done.err, done.err
    assert not run.exists()


def test_more_files_per_patch_can_be_allowed(v2_store, tmp_path):
    """The limit is a config key: a user who knows the file system copes can raise it."""
    run = tmp_path / "run"
    done = run_cli("train", "--config", SMOKE, f"data.store={v2_store}", f"run.dir={run}", *TRAIN,
                   "train.steps=1", "data.raw_array=volumes/tiny_chunks", "data.labels=volumes/labels/membrane",
                   "data.max_files_per_patch=400")
    assert done.code == 0, done.err
    status = json.loads((run / "status.json").read_text())
    assert status["status"] == "completed" and status["step"] == 1
    # the step it trained read the tiny-chunk array, under the raised limit
    data = checkpoint.load(status["checkpoint"])["config"]["data"]
    assert data["raw_array"] == "volumes/tiny_chunks" and data["max_files_per_patch"] == 400
    train_losses = [loss for _, loss, _ in losses(run) if loss is not None]
    assert train_losses and all(math.isfinite(loss) for loss in train_losses)


def test_predict_labels_that_are_ids_are_refused(synth_store, v2_store, tmp_path):
    ckpt_run = tmp_path / "run"
    assert run_cli("train", "--config", SMOKE, f"data.store={synth_store}", f"run.dir={ckpt_run}", *TRAIN,
                   "train.steps=1").code == 0
    out = tmp_path / "pred.zarr"
    done = run_cli("predict", "--checkpoint", ckpt_run / "checkpoints" / "step-000000001.pt",
                   "--input", f"{v2_store}:volumes/raw", "--labels", f"{v2_store}:volumes/labels/neuron_ids",
                   "--out", out)
    assert done.code == 2 and "other than 0 and 1" in done.err and "--instances" in done.err, done.err
    assert not out.exists()
