"""The README's CREMI-style walk-through, run as written (bash, the `unet-dist` command) on three
small CREMI-like HDF5 files: instance labels with an unlabelled ID -> stores -> training on the
three volumes (configs/cremi.yaml at test size) -> predict -> evaluate against the neuron IDs -> view."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import yaml
import zarr
from PIL import Image

from helpers import CONFIGS, ROOT, blobs, require
from unet_dist.data import store as st

NO_LABEL = 2**64 - 3  # the README's --ignore-id
SHAPE = (12, 96, 96)
VAL = (9, 12)  # the test's stand-in for the README's 100:125
VOLUMES = ("A", "B", "C")


def walkthrough_script() -> str:
    """The bash block between the README's walk-through markers."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- walkthrough -->", 1)[1].split("<!-- /walkthrough -->", 1)[0]
    return block.split("```bash\n", 1)[1].split("```", 1)[0]


def write_sample(path: Path, seed: int) -> np.ndarray:
    """CREMI's layout: volumes/raw (dark where two neurons meet, as membranes are) and
    volumes/labels/neuron_ids (uint64) with `resolution`; the columns x >= 72 of slices 0-5 carry
    the unlabelled ID. Returns the IDs."""
    ids = blobs(SHAPE, 40, seed)
    edge = np.zeros(SHAPE, bool)
    edge[:, 1:, :] |= ids[:, 1:, :] != ids[:, :-1, :]
    edge[:, :, 1:] |= ids[:, :, 1:] != ids[:, :, :-1]
    rng = np.random.default_rng(seed)
    raw = np.clip(np.where(edge | (ids == 0), 60, 180) + rng.normal(0, 20, SHAPE), 0, 255).astype(np.uint8)
    ids[:6, :, 72:] = NO_LABEL
    with h5py.File(path, "w") as f:
        for name, data in (("volumes/raw", raw), ("volumes/labels/neuron_ids", ids)):
            f.create_dataset(name, data=data, chunks=(1, *SHAPE[1:]))
            f[name].attrs["resolution"] = [40.0, 4.0, 4.0]
    return ids


def test_cremi_walkthrough_runs_as_written(tmp_path):
    script = walkthrough_script()
    assert "100:125" in script and "configs/cremi.yaml" in script
    script = script.replace("100:125", f"{VAL[0]}:{VAL[1]}")
    if "--screenshot" in script:
        from unet_dist.errors import UserError
        from unet_dist.visualize.view import find_chromium

        try:
            find_chromium()
        except UserError as exc:
            require(str(exc))
    ids = {s: write_sample(tmp_path / f"sample_{s}.hdf", seed) for seed, s in enumerate(VOLUMES)}
    # configs/cremi.yaml as it is, at test size: the volumes' validation slices, a tiny model
    cfg = yaml.safe_load((CONFIGS / "cremi.yaml").read_text())
    assert [v["store"] for v in cfg["data"]["volumes"]] == [f"runs/cremi_{s}.zarr" for s in VOLUMES]
    for volume in cfg["data"]["volumes"]:
        volume["val_slices"] = list(VAL)
    cfg["data"].update(patch_size=[64, 64], batch_size=4, num_workers=0)
    cfg["model"].update(depth=2, base_channels=8)
    cfg["train"].update(steps=40, warmup_steps=5, lr=3e-3, val_every=20, ckpt_every=20, log_every=10,
                        precision="fp32", channels_last=False)
    cfg["predict"] = {"batch_size": 1, "block_size": [1, 96, 96]}
    cfg["logging"] = {"wandb": "disabled", "images": False}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "cremi.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "runs").mkdir()
    # `unet-dist` is this interpreter's package, whatever is on PATH
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "unet-dist").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m unet_dist "$@"\n')
    (bin_dir / "unet-dist").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "WANDB_MODE": "disabled",
           "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]

    runs = tmp_path / "runs"
    info = json.loads((runs / "cremi_A.json").read_text())
    assert info["voxel_size"] == [40, 4, 4]
    for s in VOLUMES:  # the IDs kept, the unlabelled ID turned into labels/ignore
        group = st.open_store(runs / f"cremi_{s}.zarr", arrays=(st.label_path("neuron_ids"), st.label_path(st.IGNORE)))
        kept = group[st.label_path("neuron_ids")][:]
        ignored = group[st.label_path(st.IGNORE)][:].astype(bool)
        np.testing.assert_array_equal(ignored, ids[s] == NO_LABEL)
        np.testing.assert_array_equal(kept[~ignored], ids[s][~ignored])
    rows = [json.loads(line) for line in (runs / "cremi" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "val/dice_membrane" in r][-1]
    assert last["step"] == 40
    assert {f"val/cremi_{s}/dice_membrane" for s in VOLUMES} <= set(last)
    result = json.loads((runs / "cremi" / "eval_C.json").read_text())
    assert result["segments"] == "neuron_ids" and result["ignored"] == "labels/ignore/0"
    # 40 steps of a tiny net on membranes this clear already separate neurons
    assert result["dice_membrane"] > 0.6 and 0.5 < result["v_rand"] <= 1.0, result
    pred = zarr.open_group(str(runs / "cremi" / "pred_C.zarr"), mode="r")
    assert pred["0"].shape == (VAL[1] - VAL[0], *SHAPE[1:])
    if "--screenshot" in script:
        picture = np.asarray(Image.open(runs / "cremi" / "view_C.png").convert("L"))
        assert picture.std() > 10  # something was drawn

