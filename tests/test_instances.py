"""Instance labels: the boundary rule against plain loops, convert --instances on a CREMI-like HDF5
(streamed slab by slab = whole volume), relabel, and evaluate scoring against the true segments."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr

from helpers import blobs, check_ome, run_cli, write_cremi
from unet_dist.data import pyramid
from unet_dist.data import store as st
from unet_dist.data.instances import IDS, Rule, membrane_target
from unet_dist.predict.prediction_store import MASK, PROBABILITY, create_prediction

IDS_PATH = st.label_path(IDS)


def reference_target(ids: np.ndarray, rule: Rule) -> np.ndarray:
    """The documented rule, voxel by voxel: membrane where a voxel within `width` (Chebyshev, in the
    slice or in 3D) has another ID, or (unless background_interior) where the ID is 0."""
    out = np.zeros(ids.shape, np.uint8)
    Z, Y, X = ids.shape
    w, dz = rule.width, rule.width if rule.three_d else 0
    for z in range(Z):
        for y in range(Y):
            for x in range(X):
                me = ids[z, y, x]
                other = False
                for k in range(max(0, z - dz), min(Z, z + dz + 1)):
                    for j in range(max(0, y - w), min(Y, y + w + 1)):
                        for i in range(max(0, x - w), min(X, x + w + 1)):
                            other |= bool(ids[k, j, i] != me)
                out[z, y, x] = not other and (me != 0 or rule.background_interior)
    return out


@pytest.mark.parametrize("rule", [Rule(0), Rule(1), Rule(2), Rule(1, background_interior=True),
                                  Rule(1, three_d=True), Rule(2, three_d=True, background_interior=True)])
def test_rule_equals_plain_loops(rule):
    ids = blobs((4, 13, 11), 7, seed=rule.width)
    np.testing.assert_array_equal(membrane_target(ids, rule), reference_target(ids, rule))


def convert_cli(src: Path, out: Path, *extra: str):
    return run_cli("convert", "--raw", f"{src}:volumes/raw", "--labels", f"{src}:volumes/labels/neuron_ids",
                   "--out", out, "--instances", *extra)


@pytest.fixture(scope="module")
def cremi(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cremi")
    ids = blobs((7, 300, 270), 12, seed=5)
    raw = write_cremi(folder / "sample.hdf", ids)
    return folder / "sample.hdf", ids, raw


@pytest.mark.parametrize("chunks,rule,flags", [
    ("2d", Rule(1), ()),
    ("2,128,128", Rule(2, three_d=True), ("--boundary-width", "2", "--boundary-3d")),  # halo across slabs
    ("3,300,270", Rule(1, three_d=True, background_interior=True), ("--boundary-3d", "--background-interior")),
])
def test_convert_instances_streams_the_rule(cremi, tmp_path, chunks, rule, flags):
    src, ids, raw = cremi
    out = tmp_path / "s.zarr"
    done = convert_cli(src, out, "--chunks", chunks, *flags)
    assert done.code == 0, done.err
    group = zarr.open_group(str(out), mode="r")
    assert st.label_names(group) == [st.TARGET, IDS]
    np.testing.assert_array_equal(group[st.RAW][:], raw)
    kept = group[IDS_PATH]
    assert kept.dtype == np.uint64
    np.testing.assert_array_equal(kept[:], ids)
    # slab by slab (slabs of 1, 2 or 3 slices) equals the rule on the whole volume
    np.testing.assert_array_equal(group[st.TARGET_PATH][:], membrane_target(ids, rule))
    # levels by mode: real IDs only, and the target's levels from the target
    np.testing.assert_array_equal(group[st.label_path(IDS, 1)][:], pyramid.downsample(ids, (1, 2, 2), "mode"))
    assert set(np.unique(group[st.label_path(IDS, 1)][:])) <= set(np.unique(ids))
    np.testing.assert_array_equal(group[st.label_path(st.TARGET, 1)][:],
                                  pyramid.downsample(membrane_target(ids, rule), (1, 2, 2), "mode"))
    recorded = group["labels"][st.TARGET].attrs["unet_dist"]["instances"]
    assert recorded["boundary_width"] == rule.width and recorded["boundary_3d"] == rule.three_d
    assert recorded["background_interior"] == rule.background_interior
    assert group.attrs["unet_dist"]["instances"] == recorded
    check_ome(out, "raw", [st.TARGET, IDS], levels=2)
    assert f"from neuron_ids: boundary width {rule.width} px" in done.out


def test_relabel_swaps_in_another_width(cremi, tmp_path):
    src, ids, _ = cremi
    out = tmp_path / "s.zarr"
    assert convert_cli(src, out).code == 0
    done = run_cli("relabel", out, "--boundary-width", "3")
    assert done.code == 0, done.err
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(group[st.TARGET_PATH][:], membrane_target(ids, Rule(3)))
    np.testing.assert_array_equal(group[st.label_path(st.TARGET, 1)][:],
                                  pyramid.downsample(membrane_target(ids, Rule(3)), (1, 2, 2), "mode"))
    assert group["labels"][st.TARGET].attrs["unet_dist"]["instances"]["boundary_width"] == 3
    check_ome(out, "raw", [st.TARGET, IDS], levels=2)
    assert sorted(p.name for p in (out / "labels").iterdir()) == [IDS, st.TARGET, "zarr.json"]
    # 3D: each slab (one slice here) reads its halo of IDs from the neighbouring slices
    assert run_cli("relabel", out, "--boundary-width", "2", "--boundary-3d").code == 0
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")[st.TARGET_PATH][:],
                                  membrane_target(ids, Rule(2, three_d=True)))

    # A failure half-way (a damaged IDs chunk) leaves the old target as it was, and no temporaries.
    before = {p: p.read_bytes() for p in (out / "labels" / st.TARGET).rglob("*") if p.is_file()}
    (out / IDS_PATH / "c" / "5" / "0" / "0").unlink()
    done = run_cli("relabel", out, "--boundary-width", "1")
    errors = [line for line in done.err.splitlines() if line.startswith("error:")]  # progress lines may precede it
    assert done.code == 2 and len(errors) == 1 and "chunk file is missing" in errors[0] and "Traceback" not in done.err
    after = {p: p.read_bytes() for p in (out / "labels" / st.TARGET).rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in (out / "labels").iterdir()) == [IDS, st.TARGET, "zarr.json"]


def test_instance_labels_without_instances_are_refused_with_the_hint(cremi, tmp_path):
    src, _, _ = cremi
    out2 = tmp_path / "t.zarr"
    done = run_cli("convert", "--raw", f"{src}:volumes/raw", "--labels", f"{src}:volumes/labels/neuron_ids",
                   "--out", out2)
    assert done.code == 2 and "not binary" in done.err and "pass --instances" in done.err
    assert len(done.err.strip().splitlines()) == 1 and not out2.exists()


@pytest.mark.parametrize("ids,extra,fragment", [
    (np.full((2, 16, 16), 1.5, np.float32), (), "float32; --instances needs integer IDs"),
    (np.full((2, 16, 16), -3, np.int32), (), "negative IDs (-3)"),
    (np.ones((2, 16, 16), np.uint16), ("--label-threshold", "0"), "excludes --label-threshold"),
    (np.ones((2, 16, 16), np.uint16), ("--boundary-width", "-1"), "--boundary-width"),
])
def test_bad_instance_labels(tmp_path, ids, extra, fragment):
    src = tmp_path / "bad.hdf"
    write_cremi(src, ids)
    out = tmp_path / "s.zarr"
    done = run_cli("convert", "--raw", f"{src}:volumes/raw", "--labels", f"{src}:volumes/labels/neuron_ids",
                   "--out", out, "--instances", *extra)
    assert done.code == 2 and fragment in done.err, done.err
    assert len(done.err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.glob(".s.zarr*")) == []


def write_prediction(out: Path, prob_u8: np.ndarray) -> None:
    group = zarr.open_group(str(out), mode="w", zarr_format=3,
                            attributes={"unet_dist": {"predict": {"settings": {"slices": [0, len(prob_u8)]}}}})
    create_prediction(group, prob_u8.shape, (1, *prob_u8.shape[1:]), "uint8", (40.0, 4.0, 4.0), 0)
    group[PROBABILITY][:] = prob_u8
    group[MASK][:] = (prob_u8 > 127).astype(np.uint8)


def test_evaluate_scores_against_neuron_ids(tmp_path):
    """Two touching neurons (IDs 5 | 9, columns 0-31 | 32-63) that the binary target (boundary width 0)
    merges; the prediction draws the membrane on column 32. Against the IDs it splits them right."""
    ids = np.zeros((2, 64, 64), np.uint32)
    ids[:, :, :32], ids[:, :, 32:] = 5, 9
    src = tmp_path / "two.hdf"
    write_cremi(src, ids)
    with_ids, binary = tmp_path / "ids.zarr", tmp_path / "binary.zarr"
    assert convert_cli(src, with_ids, "--boundary-width", "0").code == 0
    with h5py.File(src, "a") as f:
        f["volumes/labels/target"] = (ids != 0).astype(np.uint8)
    assert run_cli("convert", "--raw", f"{src}:volumes/raw", "--labels", f"{src}:volumes/labels/target",
                   "--out", binary).code == 0
    prob = np.full(ids.shape, 255, np.uint8)
    prob[:, :, 32] = 0
    pred = tmp_path / "pred.zarr"
    write_prediction(pred, prob)

    results = {}
    for name, store in (("ids", with_ids), ("binary", binary)):
        done = run_cli("evaluate", "--pred", pred, "--labels", store, "--json", tmp_path / f"{name}.json")
        assert done.code == 0, done.err
        results[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert results["ids"]["segments"] == "neuron_ids" and results["binary"]["segments"] == "binary target"

    # By hand (metrics.py, interpretation 5): the thinned prediction holds 2048 pixels of ID 5, 1984
    # of ID 9 and 64 dam pixels (singletons); no false merges (precision 1).
    tp = 2048**2 + 1984**2 + 64
    for name, pairs in (("ids", 2 * 2048**2), ("binary", 4096**2)):
        recall = tp / pairs
        assert results[name]["v_rand"] == pytest.approx(2 * recall / (1 + recall), rel=1e-12), name
    assert results["ids"]["v_info"] > results["binary"]["v_info"]
    assert results["ids"]["dice_neuron"] == results["binary"]["dice_neuron"]  # the same binary target
