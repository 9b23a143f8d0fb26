"""Unlabelled voxels (`labels/ignore`): convert --ignore-id / --ignore-value / --ignore-mask, and a store
whose labels are garbage inside the ignored region trains, validates, predicts and evaluates bit for bit
like one whose labels are clean there (issue 14, item 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from helpers import SMOKE, blobs, check_ome, patch_spec, run_cli, write_cremi
from unet_dist import checkpoint
from unet_dist.config import AugmentConfig
from unet_dist.data import pyramid
from unet_dist.data.augment import Augmenter
from unet_dist.data import store as st
from unet_dist.data.instances import IDS, Rule, membrane_target
from unet_dist.data.patches import OpenVolume, PatchSpec, PatchStream
from unet_dist.data.synth import SynthVolume
from unet_dist.errors import UserError
from unet_dist.metrics import confusion_counts, scores_from_confusion

IGNORE_PATH = st.label_path(st.IGNORE)
SHAPE = (10, 128, 128)


def ignored_region(shape) -> np.ndarray:
    """Unlabelled: the columns x >= 80 of every slice and a square in slices 2-3 and 8."""
    ignore = np.zeros(shape, np.uint8)
    ignore[:, :, 80:] = 1
    ignore[2:4, 10:40, 20:50] = 1
    ignore[8, 60:100, 0:30] = 1
    return ignore


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """An HDF5 file: raw, binary labels (0/1), labels with 2 on unlabelled voxels, and the mask."""
    path = tmp_path_factory.mktemp("ignore") / "vol.h5"
    slab = SynthVolume(SHAPE, seed=3).slab(0, SHAPE[0])
    ignore = ignored_region(SHAPE)
    with h5py.File(path, "w") as f:
        f["raw"], f["labels"], f["mask"] = slab["raw"], slab["labels"], ignore
        f["labels_2"] = np.where(ignore == 1, 2, slab["labels"]).astype(np.uint8)
    return path


def convert(source: Path, out: Path, *flags: str):
    return run_cli("convert", "--raw", f"{source}:raw", "--resolution", "40,4,4", "--out", out, *flags)


@pytest.fixture(scope="module")
def stores(source, tmp_path_factory):
    """(clean, garbage): converted with --ignore-mask; the second's target holds random 0/1 inside
    the ignored region (level 0), as a store made elsewhere might."""
    folder = tmp_path_factory.mktemp("stores")
    clean, garbage = folder / "clean.zarr", folder / "garbage.zarr"
    done = convert(source, clean, "--labels", f"{source}:labels", "--ignore-mask", f"{source}:mask")
    assert done.code == 0, done.err
    shutil.copytree(clean, garbage)
    target = zarr.open_array(str(garbage / st.TARGET_PATH), mode="r+")
    ignore = ignored_region(SHAPE)
    noise = np.random.default_rng(11).integers(0, 2, SHAPE, dtype=np.uint8)
    target[:] = np.where(ignore == 1, noise, target[:])
    assert np.count_nonzero((target[:] != zarr.open_array(str(clean / st.TARGET_PATH))[:]) & (ignore == 1)) > 1000
    return clean, garbage


def test_convert_writes_the_ignore_label_image(source, stores, tmp_path):
    clean, _ = stores
    with h5py.File(source) as f:
        labels, ignore = f["labels"][:], f["mask"][:]
    group = zarr.open_group(str(clean), mode="r")
    assert st.label_names(group) == [st.TARGET, st.IGNORE]
    np.testing.assert_array_equal(group[IGNORE_PATH][:], ignore)
    np.testing.assert_array_equal(group[st.TARGET_PATH][:], np.where(ignore == 1, 0, labels))  # 0 where ignored
    assert group["labels"][st.IGNORE].attrs["unet_dist"]["ignore"]["ignore_mask"] == f"{source}:mask"
    check_ome(clean, "raw", [st.TARGET, st.IGNORE], levels=1)

    # --ignore-value: the reserved label value, taken out before the binary check
    by_value = tmp_path / "value.zarr"
    done = convert(source, by_value, "--labels", f"{source}:labels_2", "--ignore-value", "2")
    assert done.code == 0, done.err
    assert "ignored fraction" in done.out
    for path in (st.TARGET_PATH, IGNORE_PATH):
        np.testing.assert_array_equal(zarr.open_array(str(by_value / path))[:], group[path][:])
    check_ome(by_value, "raw", [st.TARGET, st.IGNORE], levels=1)
    info = json.loads(run_cli("info", by_value, "--json").out)
    assert info["arrays"][IGNORE_PATH]["ignored_fraction"] == pytest.approx(ignore.mean())
    assert "warning" not in done.err
    # a value that the labels never hold: converted, with a warning
    done = convert(source, tmp_path / "none.zarr", "--labels", f"{source}:labels", "--ignore-value", "7")
    assert done.code == 0 and "warning: --ignore-value marked no voxel as unlabelled" in done.err, done.err


def reference_target(ids: np.ndarray, rule: Rule, ignored: np.ndarray) -> np.ndarray:
    """The documented rule voxel by voxel, unlabelled voxels being nobody's neighbour (and 0)."""
    out = np.zeros(ids.shape, np.uint8)
    Z, Y, X = ids.shape
    w, dz = rule.width, rule.width if rule.three_d else 0
    for z, y, x in np.ndindex(ids.shape):
        if ignored[z, y, x]:
            continue
        window = (slice(max(0, z - dz), z + dz + 1), slice(max(0, y - w), y + w + 1), slice(max(0, x - w), x + w + 1))
        others = (ids[window] != ids[z, y, x]) & ~ignored[window]
        out[z, y, x] = not others.any() and (ids[z, y, x] != 0 or rule.background_interior)
    return out


@pytest.mark.parametrize("rule", [Rule(0), Rule(1), Rule(2, background_interior=True), Rule(1, three_d=True)])
def test_unlabelled_voxels_are_nobodys_neighbour(rule):
    ids = blobs((4, 13, 11), 7, seed=rule.width, dtype=np.uint16)
    ignored = np.zeros(ids.shape, bool)
    ignored[:, 4:8, 3:9] = True
    ignored[1, 0, :] = True
    np.testing.assert_array_equal(membrane_target(ids, rule, ignored), reference_target(ids, rule, ignored))


def test_convert_ignore_id_with_instances(tmp_path):
    ids = blobs((3, 300, 64), 8, seed=2, dtype=np.uint32)
    ids[:, :, 50:] = 77  # the reserved ID, as CREMI marks unlabelled voxels
    src = tmp_path / "cremi.hdf"
    write_cremi(src, ids)
    out = tmp_path / "s.zarr"
    done = run_cli("convert", "--raw", f"{src}:volumes/raw", "--labels", f"{src}:volumes/labels/neuron_ids",
                   "--instances", "--ignore-id", "77", "--out", out)
    assert done.code == 0, done.err
    group = zarr.open_group(str(out), mode="r")
    assert st.label_names(group) == [st.TARGET, IDS, st.IGNORE]
    np.testing.assert_array_equal(group[IGNORE_PATH][:], (ids == 77).astype(np.uint8))
    target = group[st.TARGET_PATH][:]
    np.testing.assert_array_equal(target, membrane_target(ids, Rule(1), ids == 77))
    assert not target[ids == 77].any()
    # the column next to the unlabelled region is not made membrane by it
    np.testing.assert_array_equal(target[:, :, 49], membrane_target(ids[:, :, :50], Rule(1))[:, :, 49])
    assert target[:, :, 49].sum() > membrane_target(ids, Rule(1))[:, :, 49].sum()
    np.testing.assert_array_equal(group[st.label_path(IDS)][:], ids)  # the IDs are kept as they are
    check_ome(out, "raw", [st.TARGET, IDS, st.IGNORE], levels=2)
    np.testing.assert_array_equal(group[st.label_path(st.IGNORE, 1)][:],
                                  pyramid.downsample((ids == 77).astype(np.uint8), (1, 2, 2), "mode"))
    # relabel keeps the unlabelled voxels at 0
    assert run_cli("relabel", out, "--boundary-width", "2").code == 0
    np.testing.assert_array_equal(zarr.open_group(str(out), mode="r")[st.TARGET_PATH][:],
                                  membrane_target(ids, Rule(2), ids == 77))


def test_convert_instances_with_a_mask_in_3d_reads_the_mask_halo(tmp_path):
    """--ignore-mask with --instances --boundary-3d, one slice per slab: each slab's target sees the
    unlabelled voxels of its neighbouring slices, so it equals the whole volume's."""
    ids = blobs((5, 40, 36), 6, seed=4, dtype=np.uint16)
    mask = np.zeros(ids.shape, np.uint8)
    mask[1:3, 10:25, 5:30] = 1
    src = tmp_path / "c.hdf"
    write_cremi(src, ids)
    with h5py.File(src, "a") as f:
        f["mask"] = mask
    out = tmp_path / "s.zarr"
    done = run_cli("convert", "--raw", f"{src}:volumes/raw", "--labels", f"{src}:volumes/labels/neuron_ids",
                   "--instances", "--boundary-3d", "--ignore-mask", f"{src}:mask", "--out", out)
    assert done.code == 0, done.err
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(group[IGNORE_PATH][:], mask)
    np.testing.assert_array_equal(group[st.TARGET_PATH][:], reference_target(ids, Rule(1, three_d=True), mask != 0))


@pytest.mark.parametrize("flags,fragment", [
    (("--labels", "{src}:labels", "--ignore-id", "3"), "--ignore-id needs --instances"),
    (("--ignore-mask", "{src}:mask"), "--ignore-mask marks unlabelled voxels of --labels; pass --labels too"),
    (("--labels", "{src}:labels_2", "--ignore-value", "1"), "--ignore-value 1: a label value"),
    (("--labels", "{src}:labels_2"), "labels are not binary"),  # a reserved value without --ignore-value
    (("--labels", "{src}:labels", "--ignore-mask", "{src}:short"), "the ignore mask has shape (3, 128, 128)"),
    (("--labels", "{src}:labels", "--ignore-mask", "{src}:nothing"), "nothing"),
])
def test_bad_ignore_options_are_one_line_and_write_nothing(source, tmp_path, flags, fragment):
    src = tmp_path / "vol.h5"
    shutil.copy(source, src)
    with h5py.File(src, "a") as f:
        f["short"] = np.zeros((3, 128, 128), np.uint8)
    out = tmp_path / "s.zarr"
    done = convert(src, out, *(f.format(src=src) for f in flags))
    assert done.code == 2 and fragment in done.err, done.err
    assert len(done.err.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.glob(".s.zarr*")) == []


def test_ignore_value_and_id_are_refused_with_the_wrong_labels(tmp_path):
    ids = blobs((2, 16, 16), 4, seed=0, dtype=np.uint16)
    src = tmp_path / "c.hdf"
    write_cremi(src, ids)
    common = ("--raw", f"{src}:volumes/raw", "--labels", f"{src}:volumes/labels/neuron_ids", "--instances")
    for extra, fragment in ((("--ignore-value", "2"), "with --instances use --ignore-id"),
                            (("--ignore-id", "70000"), "not a value of")):
        done = run_cli("convert", *common, *extra, "--out", tmp_path / "s.zarr")
        assert done.code == 2 and fragment in done.err and len(done.err.strip().splitlines()) == 1, done.err
        assert not (tmp_path / "s.zarr").exists()


# ------------------------------------------------------------------------- the loss and the patches


def spec(store, **kw) -> PatchSpec:
    return patch_spec(store, **{**dict(z_range=(0, 7), patch_size=(64, 64), batch_size=4, seed=5), **kw})


def batches(spec_, n=3, augment=None):
    stream = PatchStream(spec_, augment or AugmentConfig(elastic=False))
    it = iter(stream)
    out = [next(it) for _ in range(n)]
    assert all("error" not in b for b in out), out
    return out


@pytest.mark.parametrize("kind,weight_map", [("bce", False), ("bce_dice", True)])
def test_loss_and_gradients_ignore_labels_of_unlabelled_voxels(kind, weight_map):
    """loss_fn itself: garbage labels under valid = 0 change neither the loss nor a gradient bit."""
    from unet_dist.train.step import loss_fn

    g = torch.Generator().manual_seed(0)
    label = (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float()
    valid = (torch.rand(2, 1, 16, 16, generator=g) > 0.3).float()
    garbage = torch.where(valid > 0, label, (torch.rand(2, 1, 16, 16, generator=g) > 0.5).float())
    assert not torch.equal(garbage, label)
    weight = torch.rand(2, 1, 16, 16, generator=g) * valid + 0.5 * valid if weight_map else None
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.rand(2, 1, 16, 16, generator=g)

    def grads(lab):
        net.zero_grad()
        loss = loss_fn(net(x), lab, weight, kind, valid)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    (la, ga), (lb, gb) = grads(label), grads(garbage)
    assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ga, gb))
    # and without the mask the garbage would have counted
    assert not torch.equal(loss_fn(net(x), label, weight, kind), loss_fn(net(x), garbage, weight, kind))


def test_patches_of_a_garbage_store_equal_the_clean_one(stores):
    clean, garbage = stores
    for options in ({}, {"weight_map": True}):
        a = batches(spec(clean, **options))
        b = batches(spec(garbage, **options))
        for x, y in zip(a, b):
            assert set(x) == set(y) >= {"raw", "label", "valid"} | ({"weight"} if options else set())
            for key in x:
                assert torch.equal(x[key], y[key]), key
            if options:
                assert torch.all(x["weight"][x["valid"] == 0] == 0)
            assert torch.all(x["label"][x["valid"] == 0] == 0)
    # data.ignore="" reads the target as it is: the garbage shows
    a, b = batches(spec(clean, ignore="")), batches(spec(garbage, ignore=""))
    assert "valid" not in a[0] and not all(torch.equal(x["label"], y["label"]) for x, y in zip(a, b))


def test_patches_below_the_labelled_fraction_are_never_drawn(source, tmp_path):
    """Only a 40 x 40 corner of each slice is labelled: every drawn 32 x 32 patch is at least half labelled."""
    corner = np.ones(SHAPE, np.uint8)
    corner[:, :40, :40] = 0
    src = tmp_path / "corner.h5"
    with h5py.File(source) as f, h5py.File(src, "w") as g:
        g["raw"], g["labels"], g["mask"] = f["raw"][:], f["labels"][:], corner
    store = tmp_path / "corner.zarr"
    assert convert(src, store, "--labels", f"{src}:labels", "--ignore-mask", f"{src}:mask").code == 0
    check_ome(store, "raw", [st.TARGET, st.IGNORE], levels=1)
    s = spec(store, patch_size=(32, 32), min_labelled_fraction=0.5)
    stream = PatchStream(s, AugmentConfig(elastic=False))
    (source,) = [OpenVolume.open(v) for v in s.volumes]
    fractions = []
    for index in range(40):
        rng = np.random.default_rng([s.seed, s.rank, index])
        for _ in range(s.batch_size):
            region, skip = stream._draw(rng, source)
            fractions.append(stream.labelled_fraction(skip))
            assert region[1].start < 40 and region[2].start < 40
    assert min(fractions) >= 0.5 and max(fractions) == 1.0
    # the batches agree: valid is the labelled share of each patch (no elastic deformation here)
    for batch in batches(s, n=5):
        assert batch["valid"].mean(dim=(1, 2, 3)).min() >= 0.5
    # without the threshold the corner's neighbours are drawn too; above what the corner allows: one line
    loose = spec(store, patch_size=(32, 32), min_labelled_fraction=0.0)
    assert min(float(b["valid"].mean(dim=(1, 2, 3)).min()) for b in batches(loose, n=10)) < 0.5
    greedy = PatchStream(spec(store, patch_size=(48, 48), min_labelled_fraction=0.9), AugmentConfig.disabled())
    with pytest.raises(UserError, match="lower data.min_labelled_fraction"):
        greedy.make_batch([source], Augmenter(AugmentConfig.disabled()), 0)


# ------------------------------------------------------------------- train, validate, predict, evaluate


def test_training_validation_predict_and_evaluate_ignore_the_garbage(stores, tmp_path):
    """From the same seed, a few deterministic steps on each store give bit-identical parameters and
    validation metrics; predict --labels and evaluate report identical numbers, which are the counts
    over the labelled voxels only."""
    runs = {}
    for name, store in zip(("clean", "garbage"), stores):
        run = tmp_path / name
        done = run_cli("train", "--config", SMOKE, f"data.store={store}", f"run.dir={run}", "data.train_slices=[0,7]",
                       "data.val_slices=[7,10]", "train.steps=4", "train.val_every=2", "train.ckpt_every=4",
                       "train.deterministic=true", "train.loss=bce_dice", "train.weight_map=true",
                       "predict.block_size=[1,64,64]", env={"OMP_NUM_THREADS": "1"})
        assert done.code == 0, done.err
        runs[name] = run
    a = checkpoint.load(checkpoint.step_path(runs["clean"] / "checkpoints", 4))["model"]
    b = checkpoint.load(checkpoint.step_path(runs["garbage"] / "checkpoints", 4))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def rows(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

    vals = {n: [{k: v for k, v in r.items() if k.startswith(("val/dice", "val/pixel", "train/loss"))}
                for r in rows(run)] for n, run in runs.items()}
    assert vals["clean"] == vals["garbage"] and any("val/dice_membrane" in r for r in vals["clean"])

    ckpt = checkpoint.step_path(runs["clean"] / "checkpoints", 4)
    results = {}
    keys = ("dice_neuron", "dice_membrane", "pixel_error")
    for name, store in zip(("clean", "garbage"), stores):
        pred = tmp_path / f"pred-{name}.zarr"
        done = run_cli("predict", "--checkpoint", ckpt, "--input", stores[0], "--labels", store, "--slices", "7:10",
                       "--out", pred, "--device", "cpu", "predict.block_size=[1,64,64]")
        assert done.code == 0, done.err
        predicted = json.loads(done.out.strip().splitlines()[-1])
        if name == "garbage":  # resumed on a complete output: every block's counts come from recount
            done = run_cli("predict", "--checkpoint", ckpt, "--input", stores[0], "--labels", store, "--slices",
                           "7:10", "--out", pred, "--device", "cpu", "--resume", "predict.block_size=[1,64,64]")
            assert done.code == 0, done.err
            recounted = json.loads(done.out.strip().splitlines()[-1])
            assert recounted["blocks_skipped"] == recounted["blocks"] > 0
            assert {k: recounted[k] for k in keys} == {k: predicted[k] for k in keys}
        done = run_cli("evaluate", "--pred", pred, "--labels", store, "--json", tmp_path / f"{name}.json")
        assert done.code == 0, done.err
        results[name] = (predicted, json.loads((tmp_path / f"{name}.json").read_text()))
    (p_clean, e_clean), (p_garbage, e_garbage) = results["clean"], results["garbage"]
    assert {k: p_clean[k] for k in keys} == {k: p_garbage[k] for k in keys}
    evaluated = keys + ("v_rand", "v_info", "v_rand_threshold", "v_info_threshold")
    assert {k: e_clean[k] for k in evaluated} == {k: e_garbage[k] for k in evaluated}
    assert e_clean["ignored"] == IGNORE_PATH
    # the numbers are the labelled voxels' (by hand from the stores), and predict and evaluate agree
    mask = zarr.open_array(str(tmp_path / "pred-clean.zarr" / "labels" / "mask" / "0"))[:]
    target = zarr.open_array(str(stores[1] / st.TARGET_PATH))[7:10]
    labelled = zarr.open_array(str(stores[1] / IGNORE_PATH))[7:10] == 0
    expected = scores_from_confusion(confusion_counts(mask, target, valid=labelled))
    assert {k: p_clean[k] for k in keys} == {k: e_clean[k] for k in keys} == expected
    assert expected != scores_from_confusion(confusion_counts(mask, target))  # the garbage would have counted

    # validation in-process equals predict's counts over the labelled voxels
    from unet_dist.config import from_dict
    from unet_dist.runtime import autocast
    from unet_dist.model import build_model
    from unet_dist.train.validation import validate

    state = checkpoint.load(ckpt)
    cfg = from_dict(state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    cpu = torch.device("cpu")
    scores = {}
    for name, store in zip(("clean", "garbage"), stores):
        cfg.data.store = str(store)
        scores[name], _ = validate(model, cfg, cpu, autocast(cpu, "fp32"), want_panel=False)
    assert scores["clean"] == scores["garbage"]
    for key in keys:
        assert scores["clean"][f"val/{key}"] == pytest.approx(expected[key], abs=2e-3), key


def test_a_missing_named_ignore_mask_is_one_line(stores, tmp_path):
    clean, _ = stores
    done = run_cli("train", "--config", SMOKE, f"data.store={clean}", f"run.dir={tmp_path / 'r'}",
                   "data.train_slices=[0,7]", "data.val_slices=[7,10]", "data.ignore=unlabelled")
    assert done.code == 2 and "no label image 'unlabelled'" in done.err and len(done.err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()
    done = run_cli("config", "show", SMOKE, "data.min_labelled_fraction=1.5")
    assert done.code == 2 and "data.min_labelled_fraction" in done.err


def test_pictures_show_unlabelled_voxels_as_their_own_class(stores, tmp_path, monkeypatch):
    """The validation panel carries the labelled voxels; W&B's ground-truth mask gives unlabelled
    voxels class 2 ("unlabelled"), and the error overlay marks no error there (a real offline run file)."""
    from PIL import Image

    from unet_dist.config import load_config
    from unet_dist.runtime import autocast
    from unet_dist.model import build_model
    from unet_dist.monitor.training import Monitor
    from unet_dist.visualize.overlay import MISSED, INVENTED
    from unet_dist.train.validation import validate
    from wandb_records import history

    clean, _ = stores
    cfg = load_config(SMOKE, [f"data.store={clean}", "data.train_slices=[0,7]", "data.val_slices=[7,10]",
                              f"run.dir={tmp_path / 'run'}", "logging.wandb=offline", "logging.images=true"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    cpu = torch.device("cpu")
    _, (raw, label, prob, valid) = validate(model, cfg, cpu, autocast(cpu, "fp32"), want_panel=True)
    np.testing.assert_array_equal(valid, ignored_region(SHAPE)[7] == 0)  # the first block: all of slice 7

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monitor = Monitor(tmp_path / "run", cfg, 0)
    monitor.log_images(3, raw, label, prob, 0.5, valid)
    monitor.close()
    (file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    (logged,) = [row["val/masks"] for row in history(file) if "val/masks" in row]
    truth = np.asarray(Image.open(file.parent / "files" / logged["masks"]["ground_truth"]["path"]))
    np.testing.assert_array_equal(truth == 2, ~valid)
    np.testing.assert_array_equal(truth[valid], label[valid])
    (errors,) = [row["val/errors"] for row in history(file) if "val/errors" in row]
    rgb = np.asarray(Image.open(file.parent / "files" / errors["path"]).convert("RGB"))
    coloured = np.all(rgb == MISSED, axis=-1) | np.all(rgb == INVENTED, axis=-1)
    assert coloured[valid].any() and not coloured[~valid].any()  # an untrained net errs, but not there
