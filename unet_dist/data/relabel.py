"""`unet-dist relabel`: the training target derived again from a store's `labels/neuron_ids` by
another boundary rule (width, 2D/3D, background), without converting again.

The new target (level 0 slab by slab with the rule's halo, then its levels by mode) is written
into a hidden sibling `labels/.neuron_interior.tmp-<pid>`, a complete label image, and swapped with
the old one in one `renameat2(RENAME_EXCHANGE)` (Linux), so at every moment `labels/neuron_interior`
is the old target or the new one. Where the file system cannot exchange, two renames are used
(old aside, new in); a crash between them leaves the old one aside as `.neuron_interior.old-<pid>`,
which the next relabel puts back before it starts. The rule in force is in the target's
`unet_dist.instances` attribute.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import shutil
from pathlib import Path

import numpy as np
import zarr

from unet_dist.data import pyramid
from unet_dist.data.instances import IDS, Rule, target_of_slab
from unet_dist.data.ome import VERSION, image_levels, label_image_attrs
from unet_dist.data.ome_metadata import read_multiscale
from unet_dist.data.damaged_chunks import read_region
from unet_dist.data.layout import Layout, create_volume_array
from unet_dist.data.store import IGNORE, TARGET, label_names, label_path, open_store
from unet_dist.monitor.progress import Progress
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def relabel(path, rule: Rule) -> dict:
    """Rewrite `labels/neuron_interior` (all levels) of the store at `path` from its `neuron_ids`."""
    path = Path(path)
    labels_dir = path / "labels"
    _recover(labels_dir)
    group = open_store(path, arrays=(label_path(IDS),))
    ids_image = group["labels"][IDS]
    ids_levels = image_levels(ids_image)
    tmp = labels_dir / f".{TARGET}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ones = 0
    try:
        target = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes=_attrs(ids_image, rule))
        levels = [create_volume_array(target, str(i), Layout(tuple(a.shape), tuple(a.chunks), a.shards),
                                      np.uint8, "labels") for i, a in enumerate(ids_levels)]
        ids0, depth = ids_levels[0], ids_levels[0].shape[0]
        where = f"{path}:{label_path(IDS)}"
        # unlabelled voxels (convert --ignore-*) keep a target of 0, as convert stores them
        # (no neighbours of anyone; membrane_target)
        ignore = group[label_path(IGNORE)] if IGNORE in label_names(group) else None
        ignored_of = None if ignore is None else (lambda ids, a, b: read_region(ignore, (slice(a, b),)) != 0)
        progress = Progress("relabel", depth, "slices")
        for z0, z1 in Layout.of(levels[0]).slabs():  # whole shards per write
            _, slab = target_of_slab(lambda a, b: read_region(ids0, (slice(a, b),)), z0, z1, depth, rule, where,
                                     ignored_of)
            levels[0][z0:z1] = slab
            ones += int(np.count_nonzero(slab))
            progress.update(z1)
        pyramid.build(levels, pyramid.steps_of(ids_image), "mode")
        _swap_in(tmp, labels_dir / TARGET)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if TARGET not in label_names(group):  # a store converted with IDs only had no target to replace
        names = label_names(group)
        group["labels"].attrs.update({"ome": {"version": VERSION, "labels": [TARGET, *names]}})
    return {"store": str(path), "rule": rule.record(),
            "label_fraction": ones / max(1, int(np.prod(ids_levels[0].shape)))}


def _attrs(ids_image: zarr.Group, rule: Rule) -> dict:
    """The IDs' multiscale (same levels, scales, translation) under the target's name and classes."""
    multiscale = read_multiscale(ids_image.attrs)
    scales = [level.scale for level in multiscale.levels]
    attrs = label_image_attrs(TARGET, scales, multiscale.units_known, multiscale.levels[0].translation)
    record = {**rule.record(), "relabelled": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    return {**attrs, "unet_dist": {"instances": record}}


def _swap_in(new: Path, target: Path) -> None:
    if not target.exists():
        os.rename(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # now the old target
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.rename(target, old)
    os.rename(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux renameat2); False where that is not available."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _recover(labels_dir: Path) -> None:
    """Put back a target left aside by a crash between the two renames; drop dead temporaries."""
    if not labels_dir.is_dir():
        return
    target = labels_dir / TARGET
    for old in sorted(labels_dir.glob(f".{TARGET}.old-*")):
        if not target.exists():
            os.rename(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp in labels_dir.glob(f".{TARGET}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and _alive(int(pid))):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

