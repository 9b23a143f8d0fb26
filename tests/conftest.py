"""Shared fixtures: real stores on disk, checkpoints, the real console script in a subprocess, free
ports. Fixtures only: the plain functions and constants the tests share are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

from helpers import (ISBI_ENV, REQUIRE_ENV, ROOT, SMALL, convert_stack, pick_free_port, read_stack, require, run_cli,
                     save_checkpoint)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def free_port():
    return pick_free_port()


ISBI_FILES = ("train-volume.tif", "train-labels.tif")


def _isbi_path() -> Path:
    return Path(os.environ.get(ISBI_ENV) or ROOT / "data" / "isbi2012")


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
    return read_stack(em_dir)


@pytest.fixture(scope="session")
def em_store(em_dir, tmp_path_factory) -> Path:
    """`em_dir` converted to a store (2d chunks, 50 x 4 x 4 nm)."""
    return convert_stack(em_dir, tmp_path_factory.mktemp("em") / "em.zarr")


@pytest.fixture(scope="session")
def isbi_arrays(isbi_dir) -> dict:
    """The ISBI training stack as tifffile reads it: raw uint8, labels 0/255."""
    return read_stack(isbi_dir)


@pytest.fixture(scope="session")
def isbi_store(isbi_dir, tmp_path_factory) -> Path:
    """The ISBI training stack converted to a store (2d chunks, 50 x 4 x 4 nm)."""
    return convert_stack(isbi_dir, tmp_path_factory.mktemp("isbi") / "isbi.zarr")


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


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint of the smoke model with random weights."""
    return save_checkpoint(tmp_path_factory.mktemp("ckpt"), SMALL)


@pytest.fixture(scope="module")
def volume(tmp_path_factory) -> Path:
    """A synthetic store of 6 x 100 x 120 for the predictor: blocks of 32 leave partial edge blocks."""
    from unet_dist.data.synth import synthesize

    out = tmp_path_factory.mktemp("vol") / "vol.zarr"
    synthesize(out, shape=(6, 100, 120), seed=3)
    return out
