"""Float intensities: a float16 or float32 TIFF holding 0-255 is scaled to [0, 1] by convert (by its
measured range with a warning, or by --intensity-range) and predicts like the uint8 source; a float
input the model was not trained for is refused in one line; checkpoints record the normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr

from unet_dist import checkpoint
from unet_dist.data import store as st
from unet_dist.predict.pipeline import predict

from helpers import SMOKE, run_cli

SLICES = (0, 4)  # enough for the comparison, few enough for a quick prediction


@pytest.fixture(scope="module")
def em_slices(em_dir, tmp_path_factory):
    """The first slices of the EM stack: uint8 raw, 0/255 labels, as TIFFs of several types."""
    folder = tmp_path_factory.mktemp("intensity")
    raw = tifffile.imread(em_dir / "train-volume.tif")[slice(*SLICES)]
    labels = tifffile.imread(em_dir / "train-labels.tif")[slice(*SLICES)]
    tifffile.imwrite(folder / "labels.tif", labels, photometric="minisblack")
    for dtype in ("uint8", "float16", "float32"):
        tifffile.imwrite(folder / f"raw-{dtype}.tif", raw.astype(dtype), photometric="minisblack")
    return folder, raw


def convert(folder, dtype, out, *extra):
    return run_cli("convert", "--raw", folder / f"raw-{dtype}.tif", "--labels", folder / "labels.tif",
                   "--resolution", "50,4,4", "--out", out, *extra)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_float_volume_is_scaled_by_its_measured_range_with_a_warning(em_slices, tmp_path, dtype):
    folder, raw = em_slices
    done = convert(folder, dtype, tmp_path / "s.zarr")
    assert done.code == 0, done.err
    warnings = [line for line in done.err.splitlines() if line.startswith("warning:")]
    lo, hi = float(raw.min()), float(raw.max())
    assert len(warnings) == 1 and f"measured range [{lo:g}, {hi:g}]" in warnings[0], done.err
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    stored = group[st.RAW][:]
    assert stored.dtype == np.float32 and 0.0 <= stored.min() and stored.max() <= 1.0
    np.testing.assert_allclose(stored, (raw.astype(np.float32) - lo) / (hi - lo), atol=1e-6)
    record = group.attrs["unet_dist"]["intensity"]
    assert record == {"source_dtype": dtype, "lo": lo, "hi": hi, "origin": "measured"}


def test_intensity_range_scales_without_a_warning_and_matches_uint8(em_slices, tmp_path):
    folder, raw = em_slices
    done = convert(folder, "float16", tmp_path / "s.zarr", "--intensity-range", "0,255")
    assert done.code == 0 and "warning:" not in done.err, done.err
    stored = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")[st.RAW][:]
    np.testing.assert_allclose(stored, raw.astype(np.float32) / 255, atol=1e-6)  # what training does to uint8


@pytest.mark.parametrize("args, problem", [
    (["--intensity-range", "5"], "expected LO,HI"),
    (["--intensity-range", "9,3"], "expected LO < HI"),
])
def test_bad_intensity_ranges_are_one_line(em_slices, tmp_path, args, problem):
    folder, _ = em_slices
    done = convert(folder, "float32", tmp_path / "s.zarr", *args)
    assert done.code == 2 and done.err.count("\n") == 1 and problem in done.err, done.err
    assert not (tmp_path / "s.zarr").exists()


def test_intensity_range_on_integers_is_refused(em_slices, tmp_path):
    folder, _ = em_slices
    done = convert(folder, "uint8", tmp_path / "s.zarr", "--intensity-range", "0,255")
    assert done.code == 2 and "holds uint8 values" in done.err and done.err.count("\n") == 1, done.err


def test_float_volumes_predict_like_the_uint8_source(em_slices, ckpt, tmp_path):
    folder, _ = em_slices
    scores = {}
    for dtype in ("uint8", "float16", "float32"):
        store = tmp_path / f"{dtype}.zarr"
        assert convert(folder, dtype, store).code == 0
        result = predict(ckpt, store, tmp_path / f"pred-{dtype}.zarr", labels=store, device="cpu",
                         precision="fp32")
        scores[dtype] = result["dice_neuron"]
    assert abs(scores["float16"] - scores["uint8"]) <= 0.01 * scores["uint8"], scores
    assert abs(scores["float32"] - scores["uint8"]) <= 0.01 * scores["uint8"], scores


def test_a_float_input_out_of_the_models_range_is_refused(em_slices, ckpt, tmp_path):
    _, raw = em_slices
    foreign = tmp_path / "foreign.zarr"  # another tool's store: float 0-255, never scaled
    zarr.open_group(str(foreign), mode="w", zarr_format=3).create_array(
        "raw", data=raw.astype(np.float32), chunks=(1, *raw.shape[1:]))
    done = run_cli("predict", "--checkpoint", ckpt, "--input", f"{foreign}:raw", "--out", tmp_path / "p.zarr",
                   "--device", "cpu")
    assert done.code == 2 and done.err.count("\n") == 1, done.err
    assert "float intensities reach [" in done.err and "--intensity-range" in done.err
    assert not (tmp_path / "p.zarr").exists()


def test_checkpoints_record_the_normalisation(tiny_synth_store, tmp_path):
    done = run_cli("train", "--config", SMOKE, f"data.store={tiny_synth_store}", "data.train_slices=[0,6]",
                   "data.val_slices=[6,8]", f"run.dir={tmp_path / 'run'}", "train.steps=1", "data.num_workers=0")
    assert done.code == 0, done.err[-2000:]
    saved = checkpoint.load(tmp_path / "run" / "checkpoints" / "step-000000001.pt")
    assert saved["normalisation"]["input_range"] == [0.0, 1.0]
