"""Several volumes in one run (data.volumes): per-volume slices and weights, a patch stream that is
still a function of (seed, rank, batch), validation per volume and pooled, and the mistakes refused."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
import yaml

from helpers import ROOT, SMOKE, run_cli, torchrun_cmd
from unet_dist import checkpoint
from unet_dist.config import AugmentConfig, from_dict, load_config
from unet_dist.data.augment import Augmenter
from unet_dist.data.patches import OpenVolume, PatchSpec, PatchStream
from unet_dist.data.store import RAW, TARGET_PATH
from unet_dist.runtime import autocast
from unet_dist.errors import UserError
from unet_dist.model import build_model
from unet_dist.train.validation import validate

QUIET = AugmentConfig(intensity=False, noise_std=0.0, elastic=False)  # a constant patch stays constant
CPU = torch.device("cpu")


def coded_store(path: Path, base: int, depth: int = 8, side: int = 48) -> Path:
    """Slice z of the raw is the constant `base + z`, so a patch's mean tells its volume and slice."""
    group = zarr.open_group(path, mode="w")
    raw = group.create_array(RAW, shape=(depth, side, side), chunks=(1, side, side), dtype="uint8")
    raw[:] = (base + np.arange(depth, dtype=np.uint8))[:, None, None]
    group.create_array(TARGET_PATH, shape=(depth, side, side), chunks=(1, side, side), dtype="uint8")[:] = 1
    return path


def volumes_config(tmp_path, volumes: list[dict], *extra: str):
    return load_config(SMOKE, [f"data.volumes={json.dumps(volumes)}", "data.patch_size=[32,32]",
                               f"run.dir={tmp_path / 'run'}", *extra])


def codes(stream: PatchStream, n_batches: int) -> list[tuple[int, int]]:
    """(volume index, raw value) of every patch of the first batches, read through make_batch."""
    volumes = [OpenVolume.open(v) for v in stream.spec.volumes]
    out = []
    for index in range(n_batches):
        batch = stream.make_batch(volumes, Augmenter(QUIET), index)
        values = torch.round(batch["raw"].mean(dim=(1, 2, 3)) * 255).int().tolist()
        out += list(zip(batch.get("volume", torch.zeros(len(values), dtype=torch.int64)).tolist(), values))
    return out


@pytest.fixture
def two_stores(tmp_path):
    return coded_store(tmp_path / "a.zarr", 10), coded_store(tmp_path / "b.zarr", 100)


def test_patches_follow_the_weights_and_slices_and_repeat(tmp_path, two_stores):
    a, b = two_stores
    cfg = volumes_config(tmp_path, [{"store": str(a), "weight": 3, "val_slices": [6, 8]},
                                    {"store": str(b), "train_slices": [0, 4], "val_slices": [4, 8]}],
                         "data.batch_size=8")
    spec = PatchSpec.from_config(cfg, 0, (0, 0))
    assert [v.name for v in spec.volumes] == ["a", "b"]
    seen = codes(PatchStream(spec, QUIET), 60)
    for volume, value in seen:  # the volume index names the store the patch came from
        assert (value - 10 if volume == 0 else value - 100) in range(8)
    share_a = sum(v == 0 for v, _ in seen) / len(seen)
    assert 0.68 < share_a < 0.82  # 3 : 1 over 480 patches (binomial sd 0.02)
    # a: no train_slices -> every slice but its validation slices 6:8; b: its train_slices 0:4
    assert {value - 10 for v, value in seen if v == 0} == set(range(6))
    assert {value - 100 for v, value in seen if v == 1} == set(range(4))
    # a function of (seed, rank, batch): again equal, another rank different
    assert codes(PatchStream(spec, QUIET), 60) == seen
    assert codes(PatchStream(PatchSpec.from_config(cfg, 1, (0, 0)), QUIET), 60) != seen
    # weight 0: validation only, no patch
    only_a = volumes_config(tmp_path, [{"store": str(a), "val_slices": [6, 8]},
                                       {"store": str(b), "val_slices": [4, 8], "weight": 0}])
    assert {v for v, _ in codes(PatchStream(PatchSpec.from_config(only_a, 0, (0, 0)), QUIET), 20)} == {0}


def test_one_listed_volume_draws_the_single_store_stream(tmp_path, two_stores):
    a, _ = two_stores
    plain = load_config(SMOKE, [f"data.store={a}", "data.train_slices=[0,6]", "data.val_slices=[6,8]",
                                "data.patch_size=[32,32]"])
    listed = volumes_config(tmp_path, [{"store": str(a), "train_slices": [0, 6], "val_slices": [6, 8]}])
    streams = [iter(PatchStream(PatchSpec.from_config(c, 0, (0, 0)), AugmentConfig())) for c in (plain, listed)]
    for _ in range(3):
        x, y = (next(s) for s in streams)
        assert "volume" not in x and x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_validation_reports_each_volume_and_pools_them(tmp_path, tiny_synth_store, synth_store):
    """Per volume: what a single-store run of that volume reports; pooled: their voxels together."""
    vols = [{"store": str(tiny_synth_store), "name": "tiny", "val_slices": [5, 8]},
            {"store": str(synth_store), "name": "big", "val_slices": [9, 12], "weight": 2}]
    cfg = volumes_config(tmp_path, vols, "predict.block_size=[1,64,64]", "predict.halo=[0,8,8]")
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    both, _ = validate(model, cfg, CPU, autocast(CPU, "fp32"), want_panel=False)
    single = {}
    for vol in vols:
        one = load_config(SMOKE, [f"data.store={vol['store']}", "data.train_slices=[0,5]",
                                  f"data.val_slices={vol['val_slices']}", "predict.block_size=[1,64,64]",
                                  "predict.halo=[0,8,8]"])
        single[vol["name"]], _ = validate(model, one, CPU, autocast(CPU, "fp32"), want_panel=False)
    voxels = {"tiny": 3 * 96 * 128, "big": 3 * 128 * 128}
    for name, metrics in single.items():
        for key, value in metrics.items():
            assert both[key.replace("val/", f"val/{name}/")] == value
    pooled = sum(single[n]["val/pixel_error"] * voxels[n] for n in voxels) / sum(voxels.values())
    assert both["val/pixel_error"] == pytest.approx(pooled, abs=1e-12)
    lo, hi = sorted(single[n]["val/dice_membrane"] for n in voxels)
    assert lo <= both["val/dice_membrane"] <= hi and lo < hi


@pytest.mark.parametrize("volumes,extra,fragment", [
    ([{"stor": "a.zarr"}], [], "unknown key 'data.volumes[0].stor' (did you mean 'store'?)"),
    ([{"store": "a.zarr", "val_slices": [0, 2], "weight": -1}], [], "data.volumes[0].weight: must be >= 0"),
    ([{"store": "a.zarr"}], [], "no volume has val_slices"),
    ([{"store": "a.zarr", "val_slices": [0, 2], "weight": 0}], [], "every weight is 0"),
    ([{"store": "a.zarr", "val_slices": [2, 1]}], [], "data.volumes[0].val_slices: expected"),
    ([{"store": "a.zarr", "val_slices": [0, 2]}], ["data.holdout_slices=[0,2]"], "data.holdout_slices: folds"),
    ("a.zarr", [], "data.volumes: expected list of mappings of VolumeConfig"),
])
def test_config_mistakes_are_named(tmp_path, volumes, extra, fragment):
    with pytest.raises(UserError) as err:
        load_config(SMOKE, [f"data.volumes={json.dumps(volumes)}", *extra])
    assert fragment in str(err.value)


def test_train_refuses_bad_volumes_in_one_line_before_anything_is_written(tmp_path, two_stores):
    a, b = two_stores
    twin = coded_store(tmp_path / "other" / "a.zarr", 50)
    small = coded_store(tmp_path / "small.zarr", 50, side=24)
    cases = [
        ([{"store": str(a), "val_slices": [6, 8]}, {"store": str(twin), "val_slices": [6, 8]}],
         "more than one volume is named 'a'"),
        ([{"store": str(a), "val_slices": [6, 8]}, {"store": str(b), "val_slices": [6, 9]}],
         "data.volumes 'b'.val_slices: [6, 9) is outside the store's 8 slices"),
        ([{"store": str(a), "val_slices": [6, 8]}, {"store": str(tmp_path / "none.zarr"), "val_slices": [0, 1]}],
         "none.zarr"),
        ([{"store": str(a), "val_slices": [6, 8]}, {"store": str(small), "val_slices": [6, 8]}],
         "does not fit in the training volume"),
    ]
    for i, (volumes, fragment) in enumerate(cases):
        run = tmp_path / f"run{i}"
        done = run_cli("train", "--config", SMOKE, f"data.volumes={json.dumps(volumes)}", "data.patch_size=[32,32]",
                       f"run.dir={run}")
        assert done.code == 2 and fragment in done.err, done.err
        assert len(done.err.strip().splitlines()) == 1 and not run.exists()
    config = tmp_path / "cv.yaml"
    config.write_text(yaml.safe_dump({"data": {"volumes": [{"store": str(a), "val_slices": [6, 8]}]}}))
    done = run_cli("cv", "--config", config)
    assert done.code == 2 and "unset data.volumes" in done.err


@pytest.mark.slow
def test_two_ranks_train_on_two_volumes(tmp_path, tiny_synth_store, synth_store, free_port):
    """torchrun, 2 ranks, 2 stores of different shapes: per-volume and pooled validation in
    metrics.jsonl and on the console, equal to one process validating the final weights."""
    run = tmp_path / "run"
    vols = [{"store": str(tiny_synth_store), "name": "tiny", "train_slices": [0, 5], "val_slices": [5, 8]},
            {"store": str(synth_store), "name": "big", "val_slices": [9, 12], "weight": 2}]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(torchrun_cmd(2, free_port, "train", "--config", SMOKE, f"data.volumes={json.dumps(vols)}",
                                       f"run.dir={run}", "train.steps=8", "train.val_every=4", "train.log_every=4",
                                       "data.patch_size=[48,48]", "predict.block_size=[1,64,64]"),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "volumes: tiny (" in proc.stdout and "big (" in proc.stdout
    assert "membrane Dice by volume: tiny " in proc.stdout
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    vals = [r for r in rows if "val/dice_membrane" in r]
    assert [r["step"] for r in vals] == [4, 8]
    keys = {f"val/{n}/{k}" for n in ("tiny", "big") for k in ("dice_membrane", "dice_neuron", "pixel_error")}
    assert keys <= set(vals[-1])
    state = checkpoint.load(run / "checkpoints" / "step-000000008.pt")
    cfg = from_dict(state["config"])
    model = build_model(cfg.model)
    model.load_state_dict(state["model"])
    single, _ = validate(model, cfg, CPU, autocast(CPU, "fp32"), want_panel=False)
    assert set(single) == {k for k in vals[-1] if k.startswith("val/") and k != "val/replica_spread"}
    for key, value in single.items():
        assert value == pytest.approx(vals[-1][key], abs=1e-9), key
