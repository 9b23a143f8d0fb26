"""Shared fixtures: real stores on disk, the real console script in a subprocess, free ports."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


@dataclass
class Completed:
    code: int
    out: str
    err: str


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> Completed:
    """Run `python -m unet_dist ARGS` as a user would; return exit code, stdout, stderr."""
    full_env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"), **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None removes a variable
    proc = subprocess.run([sys.executable, "-m", "unet_dist", *map(str, args)], cwd=cwd or ROOT,
                          env=full_env, capture_output=True, text=True, timeout=timeout)
    return Completed(proc.returncode, proc.stdout, proc.stderr)


def torchrun_cmd(nproc: int, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "unet_dist", *map(str, args)]


@pytest.fixture
def cli():
    return run_cli


def pick_free_port() -> int:
    """A free TCP port on this host, for a torchrun rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port():
    return pick_free_port()


def patch_spec(store, z_range, patch_size, batch_size, seed, rank=0, holdout=None, ignore=None, **kw):
    """The patch stream of one store (a single-store run's), `z_range` its training slices; the
    other settings config/sections.py's defaults unless given."""
    from unet_dist.config import DataConfig, TrainConfig
    from unet_dist.data.patches import PatchSpec
    from unet_dist.data.store import IGNORE, RAW, TARGET
    from unet_dist.data.training_set import Volume

    volume = Volume(store=str(store), name="v", raw_array=RAW, labels=TARGET, ignore=IGNORE if ignore is None else ignore,
                    train_slices=tuple(z_range), val_slices=None, exclude=holdout)
    crop = kw.pop("label_crop", (0,) * len(patch_size))
    train, data = TrainConfig(), DataConfig()
    defaults = dict(weight_map=train.weight_map, weight_map_w0=train.weight_map_w0,
                    weight_map_sigma=train.weight_map_sigma, min_labelled_fraction=data.min_labelled_fraction)
    return PatchSpec(volumes=(volume,), patch_size=tuple(patch_size), label_crop=crop, batch_size=batch_size,
                     seed=seed, rank=rank, **{**defaults, **kw})


def evaluate_volume(prob3d, label3d, threshold: float = 0.5) -> dict:
    """The one-process reference: Dice per class and pixel error plus V_rand / V_info of all the
    data at once, which the distributed `evaluate` (reduced sums) must reproduce."""
    from unet_dist.metrics import (ISBI_THRESHOLDS, confusion_counts, isbi_scores_from_sums, isbi_sums,
                                   scores_from_confusion)

    scores = scores_from_confusion(confusion_counts(prob3d, label3d, threshold))
    isbi = isbi_sums(prob3d, label3d, ISBI_THRESHOLDS)
    return {**scores, **isbi_scores_from_sums(isbi["sums"], isbi["n_slices"], ISBI_THRESHOLDS)}


ISBI_ENV = "UNET_DIST_ISBI_DIR"
# .ci/run sets this: there the ISBI data, the SLURM cluster and Chromium are part of the machine, so a
# test that needs one fails when it is missing instead of skipping (a skip in CI hides a gap).
REQUIRE_ENV = "UNET_DIST_REQUIRE_ALL"


def require(problem: str | None) -> None:
    """Skip (on a developer's machine) or fail (under .ci/run) when a prerequisite is missing."""
    if problem is None:
        return
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{problem} (required: ${REQUIRE_ENV} is set)")
    pytest.skip(problem)


ISBI_FILES = ("train-volume.tif", "train-labels.tif")


def _isbi_path() -> Path:
    return Path(os.environ.get(ISBI_ENV) or Path(__file__).resolve().parents[1] / "data" / "isbi2012")


@pytest.fixture(scope="session")
def isbi_dir() -> Path:
    """The ISBI 2012 folder: $UNET_DIST_ISBI_DIR, else data/isbi2012 in the checkout. For the tests
    that check ISBI's own numbers; the rest use `em_dir`, which works without it."""
    path = _isbi_path()
    missing = [n for n in ISBI_FILES if not (path / n).is_file()]
    require(f"ISBI data not found: {path} lacks {', '.join(missing)}; set ${ISBI_ENV}" if missing else None)
    return path


@pytest.fixture(scope="session")
def em_dir(tmp_path_factory) -> Path:
    """An EM stack as ISBI ships it (train-volume.tif, train-labels.tif: 30 slices, uint8, labels
    0/255): the ISBI data when it is here, else a synthetic stand-in of 30 x 256 x 256, so the trainer
    and converter tests run on a fresh machine too (under .ci/run the ISBI data is required)."""
    path = _isbi_path()
    if all((path / n).is_file() for n in ISBI_FILES):
        return path
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"ISBI data not found: {path} (required: ${REQUIRE_ENV} is set)")
    from unet_dist.data.synth import SynthVolume

    folder = tmp_path_factory.mktemp("em")
    slab = SynthVolume((30, 256, 256), seed=7).slab(0, 30)
    tifffile.imwrite(folder / "train-volume.tif", slab["raw"], photometric="minisblack")
    tifffile.imwrite(folder / "train-labels.tif", slab["labels"] * np.uint8(255), photometric="minisblack")
    return folder


@pytest.fixture(scope="session")
def em_arrays(em_dir) -> dict:
    return {"raw": tifffile.imread(em_dir / "train-volume.tif"), "labels": tifffile.imread(em_dir / "train-labels.tif")}


@pytest.fixture(scope="session")
def em_store(em_dir, tmp_path_factory) -> Path:
    """`em_dir` converted to a store (2d chunks, 50 x 4 x 4 nm)."""
    from unet_dist.data.convert import convert

    out = tmp_path_factory.mktemp("em") / "em.zarr"
    convert(em_dir / "train-volume.tif", out, labels=em_dir / "train-labels.tif", resolution=(50, 4, 4))
    return out


@pytest.fixture(scope="session")
def isbi_arrays(isbi_dir) -> dict:
    """The ISBI training stack as tifffile reads it: raw uint8, labels 0/255."""
    return {
        "raw": tifffile.imread(isbi_dir / "train-volume.tif"),
        "labels": tifffile.imread(isbi_dir / "train-labels.tif"),
    }


@pytest.fixture(scope="session")
def isbi_store(isbi_dir, tmp_path_factory) -> Path:
    """The ISBI training stack converted to a store (2d chunks, 50 x 4 x 4 nm)."""
    from unet_dist.data.convert import convert

    out = tmp_path_factory.mktemp("isbi") / "isbi.zarr"
    convert(isbi_dir / "train-volume.tif", out, labels=isbi_dir / "train-labels.tif", resolution=(50, 4, 4))
    return out


@pytest.fixture(scope="session")
def tiny_synth_store(tmp_path_factory) -> Path:
    """A small synthetic store (8 x 96 x 128, seed 0): raw uint8 + exact labels."""
    from unet_dist.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth") / "tiny.zarr"
    synthesize(out, shape=(8, 96, 128), seed=0)
    return out


@pytest.fixture(scope="session")
def synth_store(tmp_path_factory) -> Path:
    """A small EM-like synthetic store (12 x 128 x 128) with exact labels."""
    from unet_dist.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth") / "synth.zarr"
    synthesize(out, shape=(12, 128, 128), seed=1)
    return out
