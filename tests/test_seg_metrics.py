"""Neuron metrics (evaluate/instance_metrics.py, `evaluate --seg`): scikit-image's numbers, hand-made
splits and merges, tables merged from pieces, and the same JSON on 1 and 2 ranks."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import zarr
from skimage.metrics import adapted_rand_error, variation_of_information

from unet_dist.data.layout import Layout
from unet_dist.data.ome import Pyramid, create_label_image, write_em_store
from unet_dist.evaluate.instance_metrics import contingency, merge_tables, scores, segmentation_scores
from unet_dist.evaluate import segmentation
from unet_dist.evaluate.segmentation import evaluate_segmentation

from helpers import ENV, ROOT, fake_prediction, run_cli, torchrun_cmd

SHAPE = (9, 24, 20)


def random_pair(seed: int, shape=SHAPE):
    """True IDs with 0s, a prediction of big uint64 IDs (0 included) agreeing in part, an ignore mask."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, 7, shape).astype(np.int32)
    ids = np.array([0, 1, 2**40 + 3, 2**63 + 5, 17, 2**64 - 1], np.uint64)
    pred = np.where(rng.random(shape) < 0.6, ids[true % len(ids)], ids[rng.integers(0, len(ids), shape)])
    return true, pred, (rng.random(shape) < 0.15).astype(np.uint8)


def skimage_scores(true, pred):
    ranks = np.unique(pred, return_inverse=True)[1].reshape(pred.shape)  # skimage's sparse table wants small IDs
    split, merge = variation_of_information(true, ranks, ignore_labels=(0,))
    return split, merge, adapted_rand_error(true, ranks, ignore_labels=(0,))[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_scikit_image_with_zeros_and_an_ignore_mask(seed):
    true, pred, ignore = random_pair(seed)
    for mask in (None, ignore):
        got = segmentation_scores(true, pred, mask)
        shown = true if mask is None else np.where(mask == 0, true, 0)  # ignored voxels as true 0
        split, merge, are = skimage_scores(shown, pred)
        assert got["voi_split"] == pytest.approx(split, rel=1e-12, abs=1e-12)
        assert got["voi_merge"] == pytest.approx(merge, rel=1e-12, abs=1e-12)
        assert got["adapted_rand_error"] == pytest.approx(are, rel=1e-12, abs=1e-12)
        assert got["voxels"] == np.count_nonzero(shown) and got["neurons"] == 6
        assert got["cremi_score"] == pytest.approx(np.sqrt((split + merge) * are))


def test_tables_of_pieces_merge_to_the_whole_exactly():
    true, pred, ignore = random_pair(5)
    whole = scores(contingency(true, pred, ignore))
    pieces = [contingency(true[a:b], pred[a:b], ignore[a:b]) for a, b in ((4, 9), (0, 1), (1, 4))]
    assert scores(merge_tables(*pieces)) == whole  # every float, bit for bit
    assert scores(merge_tables(merge_tables(pieces[2], pieces[0]), pieces[1])) == whole


def test_hand_made_split_merge_and_perfect():
    true = np.zeros((2, 8, 9), np.int32)
    true[:, :, :4], true[:, :, 5:] = 3, 9  # two neurons, a boundary column of 0 between them
    perfect = segmentation_scores(true, true.astype(np.uint64) * 7)
    assert (perfect["voi"], perfect["adapted_rand_error"], perfect["cremi_score"]) == (0.0, 0.0, 0.0)
    assert (perfect["split_neurons"], perfect["merged_neurons"], perfect["neurons"]) == (0, 0, 2)

    split = true.astype(np.uint64)
    split[:, :4, :4] = 4  # neuron 3 cut in two halves
    got = segmentation_scores(true, split)
    assert got["voi_split"] > 0 and got["voi_merge"] == 0 and got["adapted_rand_error"] > 0
    assert (got["split_neurons"], got["merged_neurons"], got["segments"]) == (1, 0, 3)

    merged = np.where(true > 0, 1, 0).astype(np.uint64)  # both neurons one segment
    got = segmentation_scores(true, merged)
    assert got["voi_merge"] == pytest.approx(1.0) and got["voi_split"] == 0  # two equal halves: one bit
    assert (got["split_neurons"], got["merged_neurons"]) == (0, 1)

    speck = true.astype(np.uint64)
    speck[0, 0, 0] = 5  # 1 of 64 voxels of neuron 3: below 5%, no split counted, VOI still sees it
    got = segmentation_scores(true, speck)
    assert got["split_neurons"] == 0 and got["voi_split"] > 0
    assert segmentation_scores(true, speck, fraction=0.01)["split_neurons"] == 1


def write_store_pair(folder, true, ignore, seg, first: int):
    """A labels store (neuron_ids, ignore) and a prediction store of slices first.. with labels/neurons."""
    labels = folder / "labels.zarr"
    slab = lambda a, b: {"raw": np.zeros((b - a, *true.shape[1:]), np.uint8), "labels": (true[a:b] > 0).astype(
        np.uint8), "ids": true[a:b], "ignore": ignore[a:b]}  # noqa: E731
    write_em_store(labels, Layout(true.shape, (2, *true.shape[1:]), None), (10.0, 10.0, 10.0), np.uint8, True,
                   slab, {}, ids_dtype=np.int32, ignore=True)
    pred = folder / "pred.zarr"
    fake_prediction(pred, (true[first:first + len(seg)] > 0).astype(np.uint8), first=first)
    plan = Pyramid.plan(Layout(seg.shape, (2, *seg.shape[1:]), None), (10.0, 10.0, 10.0))
    level0 = create_label_image(zarr.open_group(str(pred), mode="r+"), "neurons", plan, np.uint64,
                                [first * 10.0, 0.0, 0.0])[0]
    level0[:] = seg
    return labels, pred


@pytest.fixture
def store_pair(tmp_path):
    true, pred, ignore = random_pair(7)
    return (*write_store_pair(tmp_path, true, ignore, pred[2:], first=2), true, pred, ignore)


def test_evaluate_seg_reads_the_stores_slab_by_slab(store_pair, tmp_path, monkeypatch):
    labels, pred, true, seg, ignore = store_pair
    monkeypatch.setattr(segmentation, "SORT_VOXELS", 700)  # slabs of 2 slices sorted one slice at a time
    out = tmp_path / "m.json"
    got = evaluate_segmentation(pred, labels, slices=(3, 8), json_out=out)
    assert json.loads(out.read_text()) == got
    assert {k: got[k] for k in scores(contingency(true, seg)).keys()} == scores(contingency(
        true[3:8], seg[3:8], ignore[3:8]))  # the prediction starts at slice 2: placed by its settings
    assert got["slices"] == [3, 8] and got["ignored"] == "labels/ignore/0"


def test_bad_inputs_are_one_line(store_pair, tmp_path):
    labels, pred, true, seg, ignore = store_pair
    other = tmp_path / "other"
    other.mkdir()
    no_ids = other / "no_ids.zarr"
    write_em_store(no_ids, Layout(true.shape, true.shape, None), (10.0, 10.0, 10.0), np.uint8, True,
                   lambda a, b: {"raw": np.zeros_like(true[a:b], np.uint8), "labels": (true[a:b] > 0).astype(np.uint8)},
                   {})
    bare = other / "bare.zarr"
    fake_prediction(bare, (true > 0).astype(np.uint8))
    wide = other / "wide"
    wide.mkdir()
    _, wide_pred = write_store_pair(wide, np.pad(true, ((0, 0), (0, 0), (0, 3))), np.pad(ignore, ((0, 0), (0, 0), (0, 3))),
                                    np.pad(seg, ((0, 0), (0, 0), (0, 3))), first=0)
    for args, message in (
            ((bare, labels), "no label image 'neurons' (run unet-dist segment --pred"),
            ((pred, no_ids), "no label image 'neuron_ids' (the true neuron IDs"),
            ((wide_pred, labels), "do not cover the segmentation (9, 24, 23)"),
            ((f"{pred}:labels/nothing", labels), "no array 'labels/nothing'")):
        done = run_cli("evaluate", "--seg", args[0], "--labels", args[1])
        assert done.code == 2 and message in done.err, done.err
        assert len(done.err.strip().splitlines()) == 1 and not done.out


@pytest.mark.slow
def test_two_ranks_write_exactly_the_json_of_one(store_pair, tmp_path, free_port):
    labels, pred, *_ = store_pair
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    done = run_cli("evaluate", "--seg", pred, "--labels", labels, "--json", one)
    assert done.code == 0, done.err
    proc = subprocess.run(torchrun_cmd(2, free_port, "evaluate", "--seg", pred, "--labels", labels, "--json", two),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("voi_split") == 1  # rank 0 alone prints
    assert json.loads(two.read_text()) == json.loads(one.read_text())
    assert json.loads(one.read_text())["segments"] == 5  # big uint64 IDs went through the gather intact
