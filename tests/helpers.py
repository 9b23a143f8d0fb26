"""Plain helpers the test modules share: paths, the console script in a subprocess, the rule for a
missing prerequisite, and writers of the stores, checkpoints and foreign files the tests read.

Test modules import from here, never from each other or from conftest.py (which holds fixtures only).
Heavy or optional libraries (torch, h5py, tensorstore, ome-zarr) are imported inside the function that
needs them, so a test that does not use one does not depend on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import zarr

from unet_dist.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SMOKE = CONFIGS / "smoke.yaml"
# One thread per process: the tests start several ranks on a machine of few cores.
ENV = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}

ISBI_ENV = "UNET_DIST_ISBI_DIR"
# .ci/run sets this: there the ISBI data, the SLURM cluster, Chromium and the optional libraries are
# part of the machine, so a test that needs one fails when it is missing instead of skipping (a skip
# in CI hides a gap).
REQUIRE_ENV = "UNET_DIST_REQUIRE_ALL"


# ------------------------------------------------------------------------- prerequisites

def require(problem: str | None) -> None:
    """Skip (on a developer's machine) or fail (under .ci/run) when a prerequisite is missing."""
    if problem is None:
        return
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"{problem} (required: ${REQUIRE_ENV} is set)")
    pytest.skip(problem)


def require_module(name: str, hint: str = ""):
    """The module `name`, imported; a missing one skips the test, or fails it under .ci/run (`require`)."""
    try:
        return __import__(name)
    except ImportError:
        require(f"{name} is not installed{f' ({hint})' if hint else ''}")


# ------------------------------------------------------------------------- the console script

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


def run_rank_alone(rank: int, world_size: int, port: int, *args: str, env: dict | None = None,
                   timeout: float = 60) -> Completed:
    """Run the console script as one rank of a torchrun world whose other ranks never start. A rank
    that waited in a collective would time out here; one that checks its input first says why, alone.
    (Under a real torchrun the first rank to exit has the agent stop the others, so whether every
    rank got to print is a race.)"""
    world = {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
             "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "OMP_NUM_THREADS": "1"}
    return run_cli(*args, env={**world, **(env or {})}, timeout=timeout)


def torchrun_worker_pids(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the workers a torchrun agent runs now."""
    ranks = {}
    for pid in map(int, Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks.update({int(item[5:]): pid for item in environ if item.startswith(b"RANK=")})
    return ranks


def pick_free_port() -> int:
    """A free TCP port on this host, for a torchrun rendezvous."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------- training and scoring

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


def read_stack(folder: Path) -> dict:
    """An EM stack as ISBI ships it (train-volume.tif, train-labels.tif) as tifffile reads it."""
    import tifffile

    return {"raw": tifffile.imread(folder / "train-volume.tif"), "labels": tifffile.imread(folder / "train-labels.tif")}


def convert_stack(folder: Path, out: Path) -> Path:
    """That stack converted to a store (2d chunks, 50 x 4 x 4 nm)."""
    from unet_dist.data.convert import convert

    convert(folder / "train-volume.tif", out, labels=folder / "train-labels.tif", resolution=(50, 4, 4))
    return out


# ------------------------------------------------------------------------- checkpoints and predictions

SMALL = ModelConfig(dims=2, depth=2, base_channels=8)  # the smoke model: halo 23, pooling 4


def save_checkpoint(folder: Path, model_cfg: ModelConfig = SMALL, seed: int = 0, predict_cfg=None) -> Path:
    """Random weights (and batch-norm statistics, so eval mode is not an identity) in a checkpoint."""
    import torch

    from unet_dist import checkpoint
    from unet_dist.config import Config, PredictConfig, to_dict
    from unet_dist.model import build_model

    torch.manual_seed(seed)
    model = build_model(model_cfg)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm3d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    cfg = Config(model=model_cfg, predict=predict_cfg or PredictConfig())
    state = {"model": model.state_dict(), "model_config": to_dict(model_cfg), "step": 7, "config": to_dict(cfg)}
    return checkpoint.save(folder, state, keep_last=1)


def prediction_arrays(pred: Path) -> dict[str, np.ndarray]:
    """Every level of probability and mask, keyed by path ("0", "1", ..., "labels/mask/0", ...)."""
    group = zarr.open_group(str(pred), mode="r")
    return {path: array[:] for path, array in group.arrays()} | {
        f"labels/mask/{path}": array[:] for path, array in group["labels/mask"].arrays()}


def fake_prediction(out: Path, labels: np.ndarray, first: int = 0, seed: int = 0) -> np.ndarray:
    """A prediction store as `predict` writes it, holding a noisy, blurred copy of the labels."""
    from scipy import ndimage

    from unet_dist.predict.prediction_store import MASK, PROBABILITY, create_prediction, probability_float

    rng = np.random.default_rng(seed)
    prob = ndimage.uniform_filter(labels.astype(np.float32), size=(1, 5, 5)) * 0.8 + 0.1
    prob = np.clip(prob + rng.normal(0, 0.15, labels.shape), 0, 1)
    u8 = np.rint(prob * 255).astype(np.uint8)
    group = zarr.open_group(str(out), mode="w", zarr_format=3,
                            attributes={"unet_dist": {"predict": {"settings": {"slices": [first, first + len(u8)]}}}})
    create_prediction(group, u8.shape, (1, *u8.shape[1:]), "uint8", (50.0, 4.0, 4.0), first)
    group[PROBABILITY][:] = u8
    group[MASK][:] = (probability_float(u8) > 0.5).astype(np.uint8)
    return u8


# ------------------------------------------------------------------------- OME-Zarr as others read it

def check_ome(path: Path, image: str, labels: list[str], levels: int) -> None:
    """ome-zarr-models validates image, labels group and every label image; ome-zarr-py's Reader
    (what napari's OME-Zarr plugin uses) finds the image and every label image with all levels."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    group = zarr.open_group(str(path), mode="r")
    model = Image.from_zarr(group)
    assert [m.name for m in model.ome_attributes.multiscales] == [image]
    assert len(model.datasets[0]) == levels
    if labels:
        assert list(model.labels.attributes.ome.labels) == labels
        for name in labels:
            label = ImageLabel.from_zarr(group["labels"][name])
            assert label.attributes.ome.image_label.source.image == "../../"
            assert len(label.attributes.ome.multiscales[0].datasets) == levels
    else:
        assert model.labels is None

    nodes = list(Reader(parse_url(str(path)))())
    found = {}
    for node in nodes:
        kinds = {type(spec) for spec in node.specs}
        if Multiscales in kinds:
            found[node.metadata["name"]] = (Label in kinds, len(node.data))
    assert found == {image: (False, levels), **{name: (True, levels) for name in labels}}


def ome_multiscale(levels: int, scale0, unit, version, translation=None, axes="zyx"):
    """OME `multiscales` metadata of `levels` levels, each halving y and x."""
    axis = lambda n: {"name": n, "type": "space", "unit": unit} if n in "zyx" else {"name": n, "type": "channel"}  # noqa: E731
    datasets = []
    for i in range(levels):
        factor = [1.0] * (len(axes) - 3) + [1.0, 2.0 ** i, 2.0 ** i]
        transforms = [{"type": "scale", "scale": [s * f for s, f in zip(scale0, factor)]}]
        if translation:
            transforms.append({"type": "translation", "translation": translation})
        datasets.append({"path": str(i), "coordinateTransformations": transforms})
    multiscale = {"axes": [axis(n) for n in axes], "datasets": datasets}
    if version == "0.4":
        multiscale["version"] = "0.4"
    return multiscale


# ------------------------------------------------------------------------- foreign files

def first_layout_store(path: Path, raw: np.ndarray, labels: np.ndarray) -> None:
    """A store as unet-dist wrote it before the OME-Zarr layout: raw and labels at the root."""
    scale = {"type": "scale", "scale": [50.0, 4.0, 4.0]}
    axes = [{"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    attrs = {"ome": {"version": "0.5", "multiscales": [
        {"name": n, "axes": axes, "datasets": [{"path": n, "coordinateTransformations": [scale]}]}
        for n in ("raw", "labels")]}, "unet_dist": {"version": "0.1.0", "sources": {}}}
    group = zarr.open_group(str(path), mode="w", zarr_format=3, attributes=attrs)
    for name, data in (("raw", raw), ("labels", labels)):
        group.create_array(name, data=data, chunks=(1, *data.shape[1:]), dimension_names=("z", "y", "x"))


def blobs(shape, n, seed, dtype=np.uint64) -> np.ndarray:
    """Touching neurons: each voxel takes the ID of its nearest seed (big IDs, some 0 = background)."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 1, (n, 3)) * shape
    ids = np.array([0] + list(rng.choice(2**40, n - 1, replace=False) + 1), dtype=dtype) if dtype == np.uint64 \
        else np.arange(n, dtype=dtype) * 3
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    nearest = np.argmin(((grid[..., None, :] - points) ** 2 * (4, 1, 1)).sum(-1), axis=-1)
    return ids[nearest]


def write_cremi(path: Path, ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A CREMI-like HDF5 file: volumes/raw (uint8) and volumes/labels/neuron_ids, resolution in nm."""
    import h5py

    raw = np.random.default_rng(seed).integers(0, 256, ids.shape, dtype=np.uint8)
    with h5py.File(path, "w") as f:
        f.create_dataset("volumes/raw", data=raw, chunks=(1, *ids.shape[1:]))
        f["volumes/raw"].attrs["resolution"] = [40.0, 4.0, 4.0]
        f.create_dataset("volumes/labels/neuron_ids", data=ids, chunks=(2, *ids.shape[1:]))
        f["volumes/labels/neuron_ids"].attrs["resolution"] = [40.0, 4.0, 4.0]
    return raw


def write_hdf5(path, arrays: dict, chunks=None, **attrs):
    import h5py

    with h5py.File(path, "w") as f:
        for name, data in arrays.items():
            ds = f.create_dataset(name, data=data, chunks=chunks, compression="gzip" if chunks else None)
            ds.attrs.update(attrs)
    return path


def write_n5_tensorstore(path, data, block=(3, 8, 8), **attrs):
    ts = require_module("tensorstore")

    store = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(path)},
                     "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": list(block[::-1]),
                                  "dataType": str(data.dtype), "compression": {"type": "gzip"}}},
                    create=True).result()
    store[...] = data.T  # N5 axes are x, y, z
    if attrs:
        meta = json.loads((path / "attributes.json").read_text())
        (path / "attributes.json").write_text(json.dumps({**meta, **attrs}))


def write_precomputed(path, data, resolution_xyz, offset_xyz, scales=1):
    ts = require_module("tensorstore")

    for s in range(scales):
        f = 2 ** s
        level = np.ascontiguousarray(data[:, ::f, ::f])
        store = ts.open({
            "driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(path)},
            "multiscale_metadata": {"type": "image", "data_type": str(data.dtype), "num_channels": 1},
            "scale_metadata": {"size": list(level.shape[::-1]), "voxel_offset": list(offset_xyz),
                               "resolution": [resolution_xyz[0] * f, resolution_xyz[1] * f, resolution_xyz[2]],
                               "encoding": "raw", "chunk_size": [8, 8, 3]}}, create=True).result()
        store[...] = level.T[..., None]  # x, y, z, channel
