"""The volume store: one Zarr v3 group per volume, valid OME-Zarr 0.5, shared by every step.

Layout (ARCHITECTURE.md, Formats):
- the image at the group's root, as multiscale levels `0`, `1`, ... (the raw EM volume; in a
  prediction store, the probability);
- label images under `labels/<name>/0`, `1`, ... with `image-label` metadata and the image's
  levels: `neuron_interior` is the binary training target (1 = neuron interior, 0 = membrane);
  a prediction store's `mask` is one too; `ignore` (optional) marks unlabelled voxels (1), whose
  target is stored as 0 and must never reach a loss or a count;
- voxel size in nm in the OME coordinate transformations; our provenance under `unet_dist`.

The first layout (arrays `raw` and `labels` at the root) is not valid OME-Zarr (`labels` is
reserved for a group of label images); such a store is refused with a line that says how to
upgrade it.

This module opens and reads stores; beside it `layout` (chunks, shards, codecs), `atomic_dir`
(stores appear whole or not at all), `slab_writer` (streaming writes) and `damaged_chunks` (reads
that name a damaged chunk's file).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from unet_dist import __version__
from unet_dist.data.ome_metadata import read_multiscale
from unet_dist.errors import UserError

AXES = ("z", "y", "x")
LABEL_CONVENTION = "labels: 1 = neuron interior, 0 = membrane (uint8)"

RAW = "0"  # level 0 of the image at the root: the raw volume (in a prediction store, the probability)
TARGET = "neuron_interior"  # the binary training target's label image
IGNORE = "ignore"  # the unlabelled voxels' label image (uint8, 1 = unlabelled: never in a loss or a count)
OLD_LAYOUT = ("raw", "probability")  # root arrays of the first layout


def label_path(name: str, level: int = 0) -> str:
    return f"labels/{name}/{level}"


TARGET_PATH = label_path(TARGET)


def open_store(path, arrays: Sequence[str] = (RAW,), mode: str = "r") -> zarr.Group:
    """Open an existing Zarr v3 group and check that it holds `arrays` (paths); UserError if not."""
    path = Path(path)
    if (path / ".zgroup").is_file():
        raise UserError(f"{path}: a Zarr v2 store; unet_dist reads Zarr v3 (convert it again)")
    if not (path / "zarr.json").is_file():
        raise UserError(f"{path}: not a Zarr store")
    try:
        group = zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # zarr raises several types for "this is not a group"
        raise UserError(f"{path}: not a Zarr store ({exc})") from None
    if group.metadata.zarr_format != 3:
        raise UserError(f"{path}: a Zarr v{group.metadata.zarr_format} store; Zarr v3 is needed")
    roots = {name for name, _ in group.arrays()}
    # Only our own first layout carries our provenance: another tool's store with an array named
    # `raw` at its root is read as it is (data.raw_array=raw).
    if RAW not in roots and roots & set(OLD_LAYOUT) and "unet_dist" in group.attrs:
        raise UserError(f"{path}: a store in the first unet-dist layout (arrays {', '.join(sorted(roots))} at "
                        f"the root, not OME-Zarr); run `unet-dist upgrade {path}` (moves them, copies no chunk "
                        "data) or convert it again")
    if UPGRADING in group.attrs.get("unet_dist", {}):
        raise UserError(f"{path}: an upgrade stopped half way; run `unet-dist upgrade {path}` again to finish it")
    for name in arrays:
        if not _is_array(group, name):
            raise UserError(f"{path}: {_missing(group, name)}")
    return group


UPGRADING = "upgrading"  # the root's unet_dist attribute while `upgrade` moves arrays (data/ome.py)


def _is_array(group: zarr.Group, name: str) -> bool:
    try:
        return isinstance(group[name], zarr.Array)
    except KeyError:
        return False


def _missing(group: zarr.Group, name: str) -> str:
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "labels":
        names = label_names(group)
        return f"no label image '{parts[1]}' (label images: {', '.join(names) or 'none'})"
    present = sorted(n for n, _ in group.arrays())
    return f"no array '{name}' (arrays: {', '.join(present) or 'none'})"


def slices_within(slices, depth: int, source: str, first: int = 0) -> tuple[int, int]:
    """(start, stop) within slices first .. first + depth (all of them for None)."""
    if slices is None:
        return first, first + depth
    lo, hi = (int(s) for s in slices)
    if not first <= lo < hi <= first + depth:
        raise UserError(f"{source}: slices {lo}:{hi} are not within its slices {first}:{first + depth}")
    return lo, hi


def label_names(group: zarr.Group) -> list[str]:
    """The label images a store lists (OME `labels` attribute of its `labels` group)."""
    try:
        return list(group["labels"].attrs["ome"]["labels"])
    except (KeyError, TypeError):
        return []


def voxel_size(group: zarr.Group) -> tuple[float, ...] | None:
    """The voxel size in nm of level 0 from the OME metadata, or None when the store gives none."""
    multiscale = read_multiscale(group.attrs)
    return multiscale.voxel_size(0) if multiscale is not None else None


def provenance(sources: dict, **extra) -> dict:
    """Our attribute block: who wrote the store, when, from what."""
    return {
        "unet_dist": {
            "version": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "sources": sources,
            "label_convention": LABEL_CONVENTION,
            **extra,
        }
    }


def stored_bytes(path) -> int:
    """Bytes on disk under `path` (file sizes), i.e. what the array really costs."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize
