"""Affinity targets: the convention against plain loops (offsets, 0s, edges, ignore, 2D and 3D), the
patch stream's targets after augmentation, the loss and validation on them, a store without IDs,
and short real training runs (3D on the FIB-SEM volume, 2D on a made-up instance store)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import ROOT, SMOKE, blobs, patch_spec, run_cli, write_cremi
from unet_dist import checkpoint
from unet_dist.config import AugmentConfig
from unet_dist.data.affinities import affinities, affinity_valid, reach
from unet_dist.data.patches import IGNORED_ID, PatchStream, compact_ids

FIB = ROOT.parent / "shared" / "data" / "flyem-fib"
OFFSETS_3D = ((-1, 0, 0), (0, -1, 0), (0, 0, -1), (0, -3, 0), (-2, 0, 0), (0, 2, 1), (1, -1, 2))
OFFSETS_2D = ((0, -1, 0), (0, 0, -1), (0, -3, 0), (0, 2, -4))


def reference(ids: np.ndarray, offsets, ignore=None) -> tuple[np.ndarray, np.ndarray]:
    """The convention, voxel by voxel: (affinities, valid)."""
    full = ids if ids.ndim == 3 else ids[None]
    skip = np.zeros(full.shape, bool) if ignore is None else (ignore if ignore.ndim == 3 else ignore[None]) != 0
    aff = np.zeros((len(offsets), *full.shape), np.uint8)
    valid = np.zeros((len(offsets), *full.shape), bool)
    for c, o in enumerate(offsets):
        for z, y, x in np.ndindex(*full.shape):
            n = (z + o[0], y + o[1], x + o[2])
            if all(0 <= v < s for v, s in zip(n, full.shape)):
                aff[c, z, y, x] = full[z, y, x] != 0 and full[z, y, x] == full[n]
                valid[c, z, y, x] = not (skip[z, y, x] or skip[n])
    return (aff, valid) if ids.ndim == 3 else (aff[:, 0], valid[:, 0])


@pytest.mark.parametrize("shape,offsets", [((5, 9, 8), OFFSETS_3D), ((11, 10), OFFSETS_2D), ((1, 6, 7), OFFSETS_2D)])
@pytest.mark.parametrize("seed", [0, 1])
def test_affinities_equal_plain_loops(shape, offsets, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 4, shape).astype(np.int64) * 1000  # few IDs: many equal neighbours, many 0s
    ignore = (rng.random(shape) < 0.15).astype(np.uint8)
    want_aff, want_valid = reference(ids, offsets, ignore)
    got = affinities(ids, offsets)
    assert got.dtype == np.uint8 and got.shape == (len(offsets), *shape)
    np.testing.assert_array_equal(got, want_aff)
    np.testing.assert_array_equal(affinity_valid(ignore, offsets), want_valid)
    np.testing.assert_array_equal(affinity_valid(shape, offsets), reference(ids, offsets)[1])
    assert affinities(ids, offsets, dtype=np.float32).dtype == np.float32
    assert want_aff.any() and (want_valid & (want_aff == 0)).any()


def test_affinity_edges_and_bad_offsets():
    ids = np.ones((3, 4, 5), np.int32)
    aff = affinities(ids, [(-1, 0, 0), (0, 0, 2)])
    assert not aff[0, 0].any() and aff[0, 1:].all()  # z = 0 has no predecessor
    assert aff[1, :, :, :3].all() and not aff[1, :, :, 3:].any()
    assert reach([(-1, 0, 0), (0, -3, 2), (0, 1, -4)]) == (1, 3, 4)
    with pytest.raises(ValueError, match="z step"):
        affinities(ids[0], [(1, 0, 0)])


def test_compact_ids_keep_zero_and_identity():
    ids = np.array([[0, 2**60, 7], [7, 0, 2**60 + 1]], np.uint64)
    out = compact_ids(ids)
    assert out.dtype == np.int32 and (out[ids == 0] == 0).all() and (out[ids != 0] > 0).all()
    np.testing.assert_array_equal(affinities(out, [(0, 0, -1), (0, -1, 0)]), affinities(ids, [(0, 0, -1), (0, -1, 0)]))


# ------------------------------------------------------------------------- the patch stream


@pytest.fixture(scope="module")
def instance_store(tmp_path_factory) -> Path:
    """A CREMI-like store (8 x 96 x 96) converted with --instances; ID 0 is background in places."""
    folder = tmp_path_factory.mktemp("aff")
    ids = blobs((8, 96, 96), 14, seed=2)
    write_cremi(folder / "s.hdf", ids)
    out = folder / "s.zarr"
    done = run_cli("convert", "--raw", f"{folder / 's.hdf'}:volumes/raw", "--labels",
                   f"{folder / 's.hdf'}:volumes/labels/neuron_ids", "--out", out, "--instances")
    assert done.code == 0, done.err
    return out


AUGMENTED = AugmentConfig(flip=True, rot90=True, elastic=True, elastic_sigma=6.0, intensity=False)


@pytest.fixture
def augmented(monkeypatch) -> list:
    """(label patch in, label patch out) of every call of the augmenter, caught on the way."""
    import unet_dist.data.patches as patches

    seen, call = [], patches.Augmenter.__call__

    def wrapped(self, rng, raw, lab, *rest):
        out = call(self, rng, raw, lab, *rest)
        seen.append((lab.copy(), out[1].copy()))
        return out

    monkeypatch.setattr(patches.Augmenter, "__call__", wrapped)
    return seen


@pytest.mark.parametrize("patch,offsets", [((4, 48, 48), OFFSETS_3D[:5]), ((48, 48), OFFSETS_2D)])
def test_loader_targets_are_the_affinities_of_the_augmented_ids(instance_store, patch, offsets, augmented):
    """Every patch's targets equal affinities() of the ID patch the augmenter returned, the IDs survive
    the augmentation (no new values), same nonzero IDs at both ends give 1, and the crop is the model's."""
    seen = augmented
    crop = (1, 4, 4) if len(patch) == 3 else (4, 4)
    spec = patch_spec(instance_store, z_range=(0, 8), patch_size=patch, batch_size=3, seed=1, target="affinities",
                      offsets=offsets, label_crop=crop)
    stream = iter(PatchStream(spec, AUGMENTED))
    for _ in range(3):
        batch = next(stream)
        assert "error" not in batch, batch
        inner = tuple(slice(c, n - c) for c, n in zip(crop, patch))
        assert batch["label"].shape == batch["valid"].shape == (3, len(offsets), *(s.stop - s.start for s in inner))
        for b, (before, after) in enumerate(seen[-3:]):
            assert set(np.unique(after)) <= set(np.unique(before))  # nearest neighbour: IDs stay IDs
            want = affinities(after, offsets)[(slice(None), *inner)]
            valid = affinity_valid(after.shape, offsets)[(slice(None), *inner)]
            np.testing.assert_array_equal(batch["label"][b].numpy(), want)
            np.testing.assert_array_equal(batch["valid"][b].numpy(), valid)
            same = np.stack([a[inner] for a in _pairs_equal(after, offsets)])
            assert batch["label"][b].numpy()[same].all() and not batch["label"][b].numpy()[~same].any()
    assert any(not np.array_equal(np.unique(b), np.unique(a)) or not np.array_equal(a, b) for b, a in seen)


def _pairs_equal(ids, offsets):
    """Per offset: voxels whose neighbour carries the same nonzero ID (False where it is outside)."""
    from unet_dist.data.affinities import pair_slices

    out = []
    for o in offsets:
        here, there = pair_slices(ids.shape, o)
        m = np.zeros(ids.shape, bool)
        m[here] = (ids[here] == ids[there]) & (ids[here] != 0)
        out.append(m)
    return out


def test_loader_ignore_travels_with_the_ids(tmp_path, augmented):
    """Unlabelled voxels (labels/ignore) move with the IDs: a voxel-channel is invalid exactly where one
    end is unlabelled after the augmentation (or outside the patch)."""
    ids = blobs((4, 64, 64), 9, seed=4, dtype=np.uint32)
    ids[:, 20:30, 10:50] = 77  # the ignore ID: convert --ignore-id 77
    write_cremi(tmp_path / "s.hdf", ids)
    out = tmp_path / "s.zarr"
    done = run_cli("convert", "--raw", f"{tmp_path / 's.hdf'}:volumes/raw", "--labels",
                   f"{tmp_path / 's.hdf'}:volumes/labels/neuron_ids", "--out", out, "--instances", "--ignore-id", "77")
    assert done.code == 0, done.err
    spec = patch_spec(out, z_range=(0, 4), patch_size=(48, 48), batch_size=4, seed=3, target="affinities",
                      offsets=OFFSETS_2D, min_labelled_fraction=0.0)
    batch = next(iter(PatchStream(spec, AUGMENTED)))
    assert "error" not in batch, batch
    valid = batch["valid"].numpy()
    assert (valid == 0).mean() > 0.05 and valid.shape == (4, len(OFFSETS_2D), 48, 48)
    for b, (_, after) in enumerate(augmented):
        unlabelled = after == IGNORED_ID
        np.testing.assert_array_equal(valid[b], affinity_valid(unlabelled.astype(np.uint8), OFFSETS_2D))
        np.testing.assert_array_equal(batch["label"][b].numpy(), affinities(np.where(unlabelled, 0, after), OFFSETS_2D))


def test_loss_is_the_mean_over_valid_voxel_channels():
    from unet_dist.train.step import loss_fn

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 8, 8, generator=g)
    label = (torch.rand(2, 3, 4, 8, 8, generator=g) > 0.5).float()
    valid = (torch.rand(2, 3, 4, 8, 8, generator=g) > 0.3).float()
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, label, reduction="none")
    want = per[valid > 0].mean()
    assert torch.allclose(loss_fn(logits, label, None, "bce", valid), want)
    garbage = torch.where(valid > 0, label, 1 - label)
    for kind in ("bce", "bce_dice"):
        assert torch.equal(loss_fn(logits, label, None, kind, valid), loss_fn(logits, garbage, None, kind, valid))


# ------------------------------------------------------------------------- the CLI


def test_a_store_without_ids_is_one_line(tmp_path):
    done = run_cli("synth", "--out", tmp_path / "s.zarr", "--shape", "4,64,64")
    assert done.code == 0, done.err
    done = run_cli("train", "--config", SMOKE, f"data.store={tmp_path / 's.zarr'}", f"run.dir={tmp_path / 'run'}",
                   "model.target=affinities", "data.train_slices=[0,3]", "data.val_slices=[3,4]")
    assert done.code == 2, done.err
    lines = done.err.strip().splitlines()
    assert len(lines) == 1 and "no labels/neuron_ids" in lines[0] and "convert" in lines[0] and "--instances" in lines[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_2d_affinity_run_on_an_instance_store(instance_store, tmp_path):
    run = tmp_path / "run"
    done = run_cli("train", "--config", SMOKE, f"data.store={instance_store}", f"run.dir={run}",
                   "model.target=affinities", "model.offsets=[[0,-1,0],[0,0,-1],[0,-4,0]]", "data.train_slices=[0,6]",
                   "data.val_slices=[6,8]", "train.steps=4", "train.val_every=2", "train.ckpt_every=4",
                   "train.loss=bce_dice", "model.depth=1", "model.base_channels=4", "predict.block_size=[1,48,48]")
    assert done.code == 0, done.err
    state = checkpoint.load(checkpoint.step_path(run / "checkpoints", 4))
    assert state["model_config"]["target"] == "affinities"
    assert state["model_config"]["offsets"] == [[0, -1, 0], [0, 0, -1], [0, -4, 0]]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val/affinity_error" in r]
    assert val and all(0 <= r["val/affinity_error"] <= 1 and 0 <= r["val/affinity_dice"] <= 1 for r in val)
    assert (run / "checkpoints" / "best.pt").exists()
    # offsets that do not match the checkpoint: one line naming the file and the key, nothing written
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    again = run_cli("train", "--config", SMOKE, f"data.store={instance_store}", f"run.dir={run}", "--resume", "auto",
                    "model.target=affinities", "model.offsets=[[0,-1,0],[0,0,-1],[0,-3,0]]", "data.train_slices=[0,6]",
                    "data.val_slices=[6,8]", "train.steps=6", "model.depth=1", "model.base_channels=4",
                    "predict.block_size=[1,48,48]")
    assert again.code == 2 and again.err.count("\n") == 1, again.err
    assert "model.offsets" in again.err and "another model config" in again.err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before


@pytest.mark.slow
def test_3d_affinity_run_on_the_fib_volume(tmp_path):
    if not (FIB / "train-gt.lzf.h5").exists():
        pytest.skip(f"{FIB} is not there")
    store = tmp_path / "fib.zarr"
    done = run_cli("convert", "--raw", f"{FIB / 'train-image.h5'}:stack", "--labels", f"{FIB / 'train-gt.lzf.h5'}:stack",
                   "--instances", "--resolution", "10,10,10", "--out", store)
    assert done.code == 0, done.err
    from unet_dist.config import load_config
    from unet_dist.train.loop import check_inputs

    recipe = load_config(ROOT / "configs" / "flyem_fib_cpu.yaml", [f"data.store={store}"])
    assert recipe.model.target == "affinities" and check_inputs(recipe) == (0, 0, 0)  # its patch and blocks fit
    run = tmp_path / "run"
    done = run_cli("train", "--config", SMOKE, f"data.store={store}", f"run.dir={run}", "model.dims=3",
                   "model.target=affinities", "model.offsets=[[-1,0,0],[0,-1,0],[0,0,-1],[0,-3,0]]", "model.depth=1", "model.base_channels=4", "data.patch_size=[8,32,32]",
                   "data.batch_size=2", "data.train_slices=[0,40]", "data.val_slices=[40,50]", "train.steps=3",
                   "train.val_every=3", "train.ckpt_every=3", "predict.block_size=[10,50,100]")
    assert done.code == 0, done.err
    state = checkpoint.load(run / "checkpoints" / "best.pt")
    assert state["model_config"]["target"] == "affinities"
    assert state["model_config"]["offsets"] == [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, -3, 0]]
    assert state["model"]["head.weight"].shape[0] == 4
    status = json.loads((run / "status.json").read_text())
    assert "val/affinity_error" in json.dumps(status)
    # the validation split chose the merge threshold; predict records it and segment takes it
    from unet_dist.segment.volume import THRESHOLDS

    assert state["segment_threshold"] in THRESHOLDS
    pred = tmp_path / "pred.zarr"
    done = run_cli("predict", "--checkpoint", run / "checkpoints" / "best.pt", "--input", store, "--out", pred,
                   "predict.block_size=[10,50,100]")
    assert done.code == 0, done.err
    done = run_cli("segment", "--pred", pred, "--block-size", "25,50,100")
    assert done.code == 0, done.err
    assert f"segment: threshold {state['segment_threshold']}, chosen on the training run's validation split" in done.err
    assert json.loads(done.out.splitlines()[-1])["blocks"] == 8  # (3 steps: the neurons may be none yet)
    done = run_cli("evaluate", "--seg", pred, "--labels", store, "--json", tmp_path / "m.json")
    assert done.code == 0, done.err
    scores = json.loads((tmp_path / "m.json").read_text())
    assert scores["neurons"] == 87 and scores["voi"] == pytest.approx(scores["voi_split"] + scores["voi_merge"])
    assert 0 <= scores["adapted_rand_error"] <= 1


@pytest.mark.slow
def test_validation_segments_the_blocks_put_together(instance_store, monkeypatch):
    """validate() on a plan of several blocks: the region's affinities (C, Z, Y, X), put together from the
    blocks, are segmented at the threshold of lowest VOI; the error computed from them equals
    val/affinity_error (the blocks' targets reach into their neighbours)."""
    import contextlib

    from unet_dist.config import load_config
    from unet_dist.model import build_model
    from unet_dist.train import validation

    offsets = [[0, -1, 0], [0, 0, -1], [-1, 0, 0], [0, -5, 0]]
    cfg = load_config(SMOKE, [f"data.store={instance_store}", "model.dims=3", "model.depth=1", "model.base_channels=4",
                              "model.target=affinities", f"model.offsets={offsets}", "data.patch_size=[4,32,32]",
                              "data.train_slices=[0,4]", "data.val_slices=[5,8]", "predict.block_size=[2,48,48]"])
    seen = {}
    real = validation.best_threshold

    def spy(aff, offs, ids, unl, segment_cfg):
        seen.update(aff=aff, ids=ids, unl=unl, offs=offs)
        return real(aff, offs, ids, unl, segment_cfg)

    monkeypatch.setattr(validation, "best_threshold", spy)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    metrics, panel = validation.validate(model, cfg, torch.device("cpu"), contextlib.nullcontext(), want_panel=True)
    assert seen["aff"].shape == (4, 3, 96, 96) and seen["unl"] is None
    # the segmentation scores of the region put together, at the threshold of lowest VOI
    from unet_dist.evaluate.instance_metrics import segmentation_scores
    from unet_dist.segment.volume import THRESHOLDS, InMemory

    volume = InMemory(seen["aff"], offsets, cfg.segment)
    vois = {t: segmentation_scores(seen["ids"], volume.neurons(t))["voi"] for t in THRESHOLDS}
    assert metrics["val/segment_threshold"] == min(vois, key=vois.get)
    assert metrics["val/voi"] == pytest.approx(min(vois.values()))
    assert metrics["val/voi"] == pytest.approx(metrics["val/voi_split"] + metrics["val/voi_merge"])
    import zarr
    np.testing.assert_array_equal(seen["ids"], zarr.open_group(str(instance_store))["labels/neuron_ids/0"][5:8])
    target = affinities(seen["ids"], offsets)
    valid = affinity_valid(seen["ids"].shape, offsets)
    wrong = ((seen["aff"] > 0.5) != (target == 1)) & valid
    assert metrics["val/affinity_error"] == pytest.approx(wrong.sum() / valid.sum())
    boundary = (seen["aff"] <= 0.5) & valid, (target == 0) & valid
    dice = 2 * (boundary[0] & boundary[1]).sum() / (boundary[0].sum() + boundary[1].sum())
    assert metrics["val/affinity_dice"] == pytest.approx(dice)
    assert len(panel) == 4 and panel[1].shape == (48, 48)


def test_a_block_size_off_the_pooling_grid_is_refused_before_training(instance_store, tmp_path):
    """Validation's block plan is checked with the other inputs, not at the first validation after training."""
    done = run_cli("train", "--config", SMOKE, f"data.store={instance_store}", f"run.dir={tmp_path / 'run'}",
                   "model.dims=3", "model.depth=1", "model.target=affinities", "data.patch_size=[4,32,32]",
                   "data.train_slices=[0,6]", "data.val_slices=[6,8]", "predict.block_size=[2,31,32]")
    assert done.code == 2 and "predict.block_size" in done.err and len(done.err.strip().splitlines()) == 1, done.err
    assert not (tmp_path / "run").exists()
