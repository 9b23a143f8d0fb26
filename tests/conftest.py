"""Shared fixtures: real stores on disk, the real console script in a subprocess, free ports."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

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
            f"--master_addr=127.0.0.1", f"--master_port={port}", "-m", "unet_dist", *map(str, args)]


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def free_port():
    from unet_dist.dist import free_port as pick

    return pick()


def isbi_dir() -> Path | None:
    path = Path(os.environ.get("UNET_DIST_ISBI_DIR", ROOT / "data" / "isbi2012"))
    return path if (path / "train-volume.tif").is_file() else None


@pytest.fixture(scope="session")
def isbi_store(tmp_path_factory) -> Path:
    """The ISBI training volume and labels converted once per session."""
    src = isbi_dir()
    if src is None:
        pytest.skip("ISBI data not found: set UNET_DIST_ISBI_DIR to the folder with train-volume.tif")
    from unet_dist.data.convert import convert

    out = tmp_path_factory.mktemp("isbi") / "isbi2012.zarr"
    convert(raw=src / "train-volume.tif", labels=src / "train-labels.tif", out=out, resolution=(50.0, 4.0, 4.0))
    return out


@pytest.fixture(scope="session")
def synth_store(tmp_path_factory) -> Path:
    """A small EM-like synthetic store (12 x 128 x 128) with exact labels."""
    from unet_dist.data.synth import synthesize

    out = tmp_path_factory.mktemp("synth") / "synth.zarr"
    synthesize(out, shape=(12, 128, 128), seed=1)
    return out
