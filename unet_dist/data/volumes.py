"""Arrays inside existing stores, for train and predict: a store made by another tool is read as
it is, without converting it.

A store is a Zarr v3 group (ours, or any OME-Zarr 0.5) or a Zarr v2 group (OME-Zarr 0.4, CREMI-like
Zarr copies, ...); zarr-python reads both. Inside it, the raw array and the label array are named
by paths (`data.raw_array`, `data.labels`; `predict --input STORE:ARRAY --labels STORE:LABEL`):

- a path to an array (`volumes/raw`), or to an OME multiscale group, which stands for its level 0;
- for labels, a plain name (no `/`) is a label image of the store: `neuron_interior` is
  `labels/neuron_interior/0`. The defaults are the layout `convert` writes.

The checks (one line each, before anything starts): a 3D (z, y, x) array of numbers; labels that
are integers and, in a sample of chunks, only 0 and 1; a chunk layout that does not make each
patch read more than `data.max_files_per_patch` chunk files (random patches over many small chunks
spend their time opening files: such a store is better converted once).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import zarr

from unet_dist.errors import UserError
from unet_dist.data.instances import looks_like_ids
from unet_dist.data.damaged_chunks import sampled_chunks
from unet_dist.data.ome_metadata import read_multiscale
from unet_dist.data.store import IGNORE, RAW, TARGET, _missing, label_path, open_store, voxel_size


def label_array_path(name: str) -> str:
    """`neuron_interior` -> `labels/neuron_interior/0`; a path (with `/`) stays as it is."""
    name = name.strip("/")
    return name if "/" in name else label_path(name)


def split_store_spec(spec, default: str) -> tuple[Path, str]:
    """`STORE[:ARRAY]` -> (STORE, ARRAY or default); a path that exists is never split."""
    from unet_dist.data.sources import split_spec

    path, inner = split_spec(spec)
    return path, inner or default


def _is_v2(path: Path) -> bool:
    return (path / ".zgroup").is_file() or (path / ".zarray").is_file()


def open_group(store) -> zarr.Group:
    """Our layout and any Zarr v3 group through `open_store` (its checks and messages); a Zarr v2
    group as it is."""
    path = Path(store)
    if not _is_v2(path):
        return open_store(path, arrays=())
    try:
        return zarr.open_group(str(path), mode="r")
    except Exception as exc:  # a v2 array at the root, a damaged .zgroup
        raise UserError(f"{path}: not a readable Zarr group ({exc})") from None


def open_array(store, inner: str, what: str = "array") -> tuple[zarr.Array, str]:
    """The array at `inner` in `store` (an OME multiscale group means its level 0) and its path."""
    group = open_group(store)
    inner = inner.strip("/")
    try:
        node = group[inner]
    except KeyError:
        node = None
    if isinstance(node, zarr.Group):
        multiscale = read_multiscale(node.attrs)
        if multiscale is not None:
            inner = f"{inner}/{multiscale.levels[0].path}"
            node = group[inner] if _has(group, inner) else None
    if not isinstance(node, zarr.Array):
        parts = inner.split("/")
        if len(parts) == 3 and parts[0] == "labels" and not _is_v2(Path(store)):
            raise UserError(f"{store}: {_missing(group, inner)}")  # lists the label images
        raise UserError(f"{store}: no array '{inner}' (arrays: {_listing(group)})")
    return node, inner


def _has(group: zarr.Group, path: str) -> bool:
    try:
        group[path]
    except KeyError:
        return False
    return True


def _listing(group: zarr.Group, limit: int = 8) -> str:
    names = sorted(path for path, node in group.members(max_depth=None) if isinstance(node, zarr.Array))
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more if names else "none"


def check_volume(array: zarr.Array, where: str) -> None:
    if array.ndim != 3:
        raise UserError(f"{where}: an array of shape {tuple(array.shape)}; train and predict need a 3D (z, y, x) "
                        "array (unet-dist convert --raw STORE:ARRAY makes one, dropping axes of length 1)")
    if np.dtype(array.dtype).kind not in "biuf":
        raise UserError(f"{where}: an array of type {array.dtype}; expected numbers")


def files_per_patch(array: zarr.Array, patch) -> float:
    """Expected chunks a randomly placed `patch` (z, y, x) overlaps: (p - 1) / c + 1 per axis.
    Each chunk is a file (or, sharded, a read and a decode of its own)."""
    return math.prod((min(p, n) - 1) / c + 1 for p, c, n in zip(patch, array.chunks, array.shape))


def check_chunking(array: zarr.Array, patch, limit: int, where: str, key: str = "data.max_files_per_patch") -> None:
    files = files_per_patch(array, patch)
    if files > limit:
        raise UserError(f"{where}: chunks {'x'.join(map(str, array.chunks))} make each "
                        f"{'x'.join(map(str, patch))} patch read about {files:.0f} chunk files (more than "
                        f"{key}={limit}); convert it once (unet-dist convert --raw STORE:ARRAY ...), "
                        "which writes whole-slice chunks")


def check_binary(array: zarr.Array, where: str) -> None:
    """Labels for training and Dice: integers, 0 and 1 only (checked on a sample of chunks here,
    on every patch while training)."""
    dtype = np.dtype(array.dtype)
    if dtype.kind not in "biu":
        raise UserError(f"{where}: labels of type {dtype}; training needs a binary 0/1 array "
                        "(unet-dist convert --label-threshold T makes one)")
    for box, values in sampled_chunks(array):
        if values.max(initial=0) > 1 or values.min(initial=0) < 0:
            hint = ("they look like instance labels (one ID per object): unet-dist convert --instances derives "
                    "a binary target from them" if looks_like_ids(values)
                    else "unet-dist convert --label-threshold T (or --invert) makes a 0/1 target")
            raise UserError(f"{where}: labels hold values other than 0 and 1 ("
                            f"{', '.join(map(str, np.unique(values)[:5]))} in the chunk at "
                            f"{', '.join(f'{s.start}:{s.stop}' for s in box)}); {hint}")


def open_training(store, raw_array: str = RAW, labels: str | None = TARGET, patch=None, max_files: int | None = None):
    """(raw, labels, raw path, label path) of a training store, every check applied; `patch` (z, y, x)
    and `max_files` for the chunk layout check (None: not checked, e.g. a second opening). `labels`
    None: the raw alone (affinity targets come from the IDs: open_ids), (raw, None, raw path, None)."""
    raw, raw_path = open_array(store, raw_array, "raw")
    lab, lab_path = (None, None) if labels is None else open_array(store, label_array_path(labels), "labels")
    check_volume(raw, f"{store}:{raw_path}")
    if lab is not None:
        check_volume(lab, f"{store}:{lab_path}")
        if tuple(lab.shape) != tuple(raw.shape):
            raise UserError(f"{store}: raw {tuple(raw.shape)} and labels {tuple(lab.shape)} differ in shape")
    if patch is not None and max_files is not None:
        for array, path in ((raw, raw_path), (lab, lab_path))[:1 if lab is None else 2]:
            check_chunking(array, patch, max_files, f"{store}:{path}")
        if lab is not None:
            check_binary(lab, f"{store}:{lab_path}")
    return raw, lab, raw_path, lab_path


def open_labels(spec, shape=None) -> tuple[Path, zarr.Array, str, zarr.Array | None]:
    """`--labels STORE[:LABEL]` (predict, evaluate): the store, its binary labels (3D, 0/1 in sampled
    chunks, of `shape` when given), their path, and the store's unlabelled-voxel mask or None."""
    store, name = split_store_spec(spec, TARGET)
    array, path = open_array(store, label_array_path(name))
    where = f"{store}:{path}"
    check_volume(array, where)
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise UserError(f"{store}: labels {tuple(array.shape)} differ in shape from raw {tuple(shape)}")
    check_binary(array, where)
    ignore, _ = open_ignore(store, IGNORE, array.shape)  # unlabelled voxels (convert --ignore-*) count nowhere
    return store, array, path, ignore


def open_ignore(store, name: str = IGNORE, shape=None) -> tuple[zarr.Array | None, str | None]:
    """The unlabelled-voxel mask of `store` (1 = unlabelled; `convert --ignore-*` writes `labels/ignore`)
    and its path, or (None, None). `name` as `data.labels` takes it (a label image name or a path);
    "" means none. The default name may be absent (a store without unlabelled voxels); another name must
    exist. Checked: 3D, integers, the labels' `shape`."""
    name = (name or "").strip("/ ")
    if not name:
        return None, None
    path = label_array_path(name)
    if name == IGNORE and not _has(open_group(store), path):
        return None, None
    array, path = open_array(store, path, "ignore")
    _check_integers(array, f"{store}:{path}", "an ignore mask", "1 = unlabelled")
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise UserError(f"{store}: the ignore mask {tuple(array.shape)} and the labels {tuple(shape)} differ in shape")
    return array, path


def _check_integers(array, where: str, what: str, meaning: str) -> None:
    """A 3D volume of integers (label images beside the raw)."""
    check_volume(array, where)
    if np.dtype(array.dtype).kind not in "biu":
        raise UserError(f"{where}: {what} of type {array.dtype}; expected integers ({meaning})")


def voxel_size_of(store, inner: str):
    """The array's voxel size in nm: our stores' OME scale, else what its OME metadata records."""
    path = Path(store)
    if inner == RAW and not _is_v2(path):
        return voxel_size(open_store(path, arrays=()))
    from unet_dist.data.sources.zarr_arrays import ZarrSource

    try:
        return ZarrSource(path, inner).voxel_size
    except UserError:
        return None


def open_ids(store, name: str, shape=None, patch=None, max_files: int | None = None) -> tuple[zarr.Array, str]:
    """The instance IDs affinity targets come from (`data.ids`, a label image name or a path) and their
    path; checked: present (else the command that writes them), 3D integers of the raw's `shape`, and,
    given `patch` and `max_files`, their chunk layout."""
    group, path = open_group(store), label_array_path(name)
    if not _has(group, path):  # a label image's group (multiscale) or a plain array path
        path = name.strip("/")
    if not _has(group, path):
        raise UserError(f"{store}: no {label_array_path(name).removesuffix('/0')} (instance IDs, one per neuron) "
                        "for model.target=affinities; write them with unet-dist convert --labels IDS --instances, "
                        "or name them in data.ids")
    array, path = open_array(store, path, "ids")
    where = f"{store}:{path}"
    _check_integers(array, where, "instance IDs", "0 = boundary")
    if shape is not None and tuple(array.shape) != tuple(shape):
        raise UserError(f"{store}: raw {tuple(shape)} and the instance IDs {tuple(array.shape)} differ in shape")
    if patch is not None and max_files is not None:
        check_chunking(array, patch, max_files, where)
    return array, path
