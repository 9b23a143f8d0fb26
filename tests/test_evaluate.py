"""`evaluate`: the one-process metrics of metrics.py, over slices spread on ranks, bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from unet_dist.cli import main
from unet_dist.evaluate.scoring import evaluate
from unet_dist.predict.prediction_store import probability_float

from helpers import ENV, ROOT, evaluate_volume, fake_prediction, torchrun_cmd

KEYS = ("dice_neuron", "dice_membrane", "pixel_error", "v_rand", "v_info")


@pytest.fixture(scope="module")
def labels(synth_store) -> np.ndarray:
    return zarr.open_group(str(synth_store), mode="r")["labels/neuron_interior/0"][:]


def test_equals_one_process_metrics_and_writes_json(synth_store, labels, tmp_path):
    pred = tmp_path / "pred.zarr"
    u8 = fake_prediction(pred, labels)
    out = tmp_path / "metrics.json"
    result = evaluate(pred, synth_store, json_out=out)
    expected = evaluate_volume(probability_float(u8), labels)
    for key in KEYS + ("v_rand_threshold", "v_info_threshold"):
        assert result[key] == expected[key], key
    assert 0.5 < result["v_rand"] < 1 and 0.5 < result["v_info"] < 1
    assert json.loads(out.read_text()) == result and result["n_slices"] == len(labels)


def test_slices_follow_the_labels_numbering(synth_store, labels, tmp_path, capsys):
    pred = tmp_path / "pred.zarr"
    u8 = fake_prediction(pred, labels[4:9], first=4)  # a prediction of slices 4:9 only
    result = evaluate(pred, synth_store, slices=(5, 8))
    expected = evaluate_volume(probability_float(u8[1:4]), labels[5:8])
    assert all(result[k] == expected[k] for k in KEYS) and result["slices"] == [5, 8]
    assert main(["evaluate", "--pred", str(pred), "--labels", str(synth_store), "--slices", "2:6"]) == 2
    assert "slices 2:6 are not within its slices 4:9" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred), "--labels", str(pred)]) == 2
    assert "pred.zarr: no label image 'neuron_interior' (label images: mask)" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(synth_store), "--labels", str(synth_store)]) == 2
    assert "no label image 'mask' (label images: neuron_interior)" in capsys.readouterr().err
    assert main(["evaluate", "--pred", str(pred), "--labels", str(synth_store), "--slices", "6:x"]) == 2


@pytest.mark.slow
def test_two_ranks_report_exactly_what_one_does(synth_store, labels, tmp_path, free_port):
    pred = tmp_path / "pred.zarr"
    fake_prediction(pred, labels, seed=3)
    one = evaluate(pred, synth_store)
    out = tmp_path / "two.json"
    proc = subprocess.run(torchrun_cmd(2, free_port, "evaluate", "--pred", pred, "--labels", synth_store,
                                       "--json", out), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert proc.stdout.count("dice_neuron") == 1  # rank 0 alone prints
    assert {k: two[k] for k in KEYS} == {k: one[k] for k in KEYS}  # exact, not approximately


@pytest.mark.slow
def test_segment_neurons_of_a_membrane_prediction_are_scored_per_slice(isbi_store, tmp_path):
    """The 2D path: `segment` on a membrane probability (watershed + merge per slice), scored by the
    challenge's V_rand / V_info beside the thresholded probability's."""

    from unet_dist.metrics import isbi_segmentation_scores

    labels = zarr.open_group(str(isbi_store))["labels/neuron_interior/0"][0:3]
    pred = tmp_path / "pred.zarr"
    fake_prediction(pred, labels, seed=5)
    done = subprocess.run([sys.executable, "-m", "unet_dist", "segment", "--pred", str(pred)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = evaluate(pred, isbi_store, slices=(0, 3))
    neurons = zarr.open_group(str(pred))["labels/neurons/0"][:]
    per_slice = [isbi_segmentation_scores(neurons[z], labels[z]) for z in range(3)]
    assert result["v_rand_neurons"] == pytest.approx(np.mean([s[0] for s in per_slice]))
    assert result["v_info_neurons"] == pytest.approx(np.mean([s[1] for s in per_slice]))
    print({k: result[k] for k in ("v_rand", "v_info", "v_rand_neurons", "v_info_neurons")})
    # a watershed + merge is not worse than the best threshold's connected components on the same input
    assert result["v_rand_neurons"] >= result["v_rand"] - 0.02
