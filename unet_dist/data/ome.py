"""The OME-Zarr 0.5 side of a store: metadata, multiscale images and label images, the upgrade.

`store.py` owns the array-level rules (codecs, every chunk stored, atomic directories, damaged
chunks named); this module arranges arrays into what OME-Zarr readers (ome-zarr-py and napari,
neuroglancer, ome-zarr-models) expect: an image at the root with levels `0..n-1`, a `labels`
group listing its label images, each a multiscale image of its own with `image-label` metadata.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from unet_dist.data import pyramid
from unet_dist.data.instances import IDS
from unet_dist.data.damaged_chunks import writing_every_chunk
from unet_dist.data.layout import Layout, create_volume_array, resolve_layout
from unet_dist.data.ome_metadata import read_multiscale
from unet_dist.data.slab_writer import Progress, write_volumes
from unet_dist.data.store import AXES, IGNORE, RAW, TARGET, UPGRADING, label_names, label_path, open_store
from unet_dist.errors import UserError
from unet_dist.files import fault_point

VERSION = "0.5"
# label value -> (what it means, RGBA shown by viewers that read `colors`)
LABEL_VALUES = {
    TARGET: {0: ("membrane", (0, 0, 0, 0)), 1: ("neuron interior", (60, 200, 90, 110))},
    "mask": {0: ("membrane", (0, 0, 0, 0)), 1: ("neuron interior", (230, 120, 40, 110))},
    IGNORE: {0: ("labelled", (0, 0, 0, 0)), 1: ("unlabelled (ignored)", (200, 40, 200, 90))},
}


def _axes(known: bool, channels: bool = False) -> list[dict]:
    # Axes without a unit record "voxel size unknown"; the scale is then a placeholder of 1.
    space = [{"name": n, "type": "space", **({"unit": "nanometer"} if known else {})} for n in AXES]
    return [{"name": "c", "type": "channel"}] * channels + space


def multiscale(name: str, scales: Sequence[Sequence[float]], known: bool,
               translation: Sequence[float] | None = None, channels: bool = False) -> dict:
    """One OME multiscale: level k maps index i to i * scale_k + translation_k. Coordinates are voxel
    centres (as neuroglancer and the OME-NGFF discussion read them), so a coarse voxel, the mean of
    f fine ones, sits (f - 1) / 2 fine voxels further on: translation_k = t_0 + (scale_k - scale_0) / 2.
    `channels`: a leading channel axis c, never downsampled (scale 1, translation 0 at every level)."""
    base = [float(v) for v in translation] if translation is not None else [0.0] * len(scales[0])
    lead = [] if not channels else [1.0]
    datasets = []
    for level, scale in enumerate(scales):
        transforms = [{"type": "scale", "scale": lead + [float(v) for v in scale]}]
        shift = [t + (s - s0) / 2 for t, s, s0 in zip(base, scale, scales[0])]
        if any(shift):
            transforms.append({"type": "translation", "translation": [0.0] * len(lead) + shift})
        datasets.append({"path": str(level), "coordinateTransformations": transforms})
    return {"name": name, "axes": _axes(known, channels), "datasets": datasets}


def image_attrs(name: str, scales, known: bool, translation=None, channels: bool = False) -> dict:
    return {"ome": {"version": VERSION, "multiscales": [multiscale(name, scales, known, translation, channels)]}}


def label_image_attrs(name: str, scales, known: bool, translation=None) -> dict:
    attrs = image_attrs(name, scales, known, translation)
    label = {"version": VERSION, "source": {"image": "../../"}}
    if name in LABEL_VALUES:
        values = LABEL_VALUES[name]
        label["colors"] = [{"label-value": v, "rgba": list(rgba)} for v, (_, rgba) in values.items()]
        label["properties"] = [{"label-value": v, "class": meaning} for v, (meaning, _) in values.items()]
    attrs["ome"]["image-label"] = label
    return attrs


@dataclass(frozen=True)
class Pyramid:
    """The levels a volume of `layout` gets: factors between levels, their shapes and voxel sizes."""

    layout: Layout
    steps: tuple[tuple[int, ...], ...]
    voxel_size: tuple[float, ...] | None

    @classmethod
    def plan(cls, layout: Layout, voxel_size, max_side: int = pyramid.MAX_SIDE) -> "Pyramid":
        vs = tuple(float(v) for v in voxel_size) if voxel_size else None
        return cls(layout, tuple(pyramid.plan_levels(layout.shape, vs, max_side)), vs)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return pyramid.level_shapes(self.layout.shape, self.steps)

    @property
    def scales(self) -> list[list[float]]:
        return pyramid.level_scales(self.voxel_size or (1.0,) * 3, self.steps)

    def level_layout(self, level: int) -> Layout:
        if level == 0:
            return self.layout
        shape = self.shapes[level]
        chunks = tuple(min(c, n) for c, n in zip(self.layout.chunks, shape))
        return resolve_layout(shape, chunks, self.layout.shards)


def create_image(group: zarr.Group, name: str, plan: Pyramid, dtype, kind: str,
                 translation=None, channels: int | None = None) -> list[zarr.Array]:
    """The image at `group`'s root: metadata and empty levels; with `channels`, levels of
    (C, Z, Y, X) under axes c, z, y, x (coarser levels are coarser in space only)."""
    group.attrs.update(image_attrs(name, plan.scales, plan.voxel_size is not None, translation, bool(channels)))
    return _levels(group, plan, dtype, kind, channels)


def create_label_image(group: zarr.Group, name: str, plan: Pyramid, dtype, translation=None,
                       kind: str = "labels") -> list[zarr.Array]:
    """`labels/<name>` under the image `group`, listed in `labels`' metadata, with empty levels."""
    labels = group.require_group("labels")
    names = label_names(group)
    if name not in names:
        labels.attrs.update({"ome": {"version": VERSION, "labels": [*names, name]}})
    image = labels.require_group(name)
    image.attrs.update(label_image_attrs(name, plan.scales, plan.voxel_size is not None, translation))
    return _levels(image, plan, dtype, kind)


def _levels(group: zarr.Group, plan: Pyramid, dtype, kind: str, channels: int | None = None) -> list[zarr.Array]:
    present = {n for n, _ in group.arrays()}
    levels = []
    for level in range(len(plan.steps) + 1):
        if str(level) in present:  # a resumed prediction whose creator died early
            levels.append(group[str(level)])
        else:
            levels.append(create_volume_array(group, str(level), plan.level_layout(level), dtype, kind, channels))
    return levels


def write_em_store(tmp: Path, layout: Layout, voxel_size, raw_dtype, labels: bool,
                   read_slab: Callable[[int, int], Mapping[str, np.ndarray]], attrs: dict,
                   progress: Progress | None = None, ids_dtype=None,
                   target_attrs: dict | None = None, ignore: bool = False) -> tuple[Pyramid, float]:
    """A new input store in `tmp`: raw (and the training target) slab by slab, then their pyramids.

    `read_slab(z0, z1)` returns {"raw": ..., "labels": ...} (and "ids" with `ids_dtype`: instance
    labels, kept as the label image `neuron_ids`; "ignore" with `ignore`: the unlabelled voxels, the
    label image `ignore`); `attrs` are our provenance attributes,
    `target_attrs` go to the target's label image. Returns the levels' plan and the seconds the
    coarser levels took.

    When no level halves z (anisotropic EM, the usual case), a slab's coarser levels are computed
    from the slab in memory and written with it: every level's chunks then cover the slab's z range
    whole. Measured on 1 GiB: reading level 0 back for the levels took 53-70% of convert's time.
    Otherwise the levels are built after level 0, unit by unit (pyramid.build).
    """
    plan = Pyramid.plan(layout, voxel_size)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3, attributes=attrs)
    images = {"raw": (create_image(group, "raw", plan, raw_dtype, "raw"), "mean")}
    if labels:
        images["labels"] = (create_label_image(group, TARGET, plan, np.uint8), "mode")
        if target_attrs:
            group["labels"][TARGET].attrs.update(target_attrs)
    if ids_dtype is not None:
        # IDs compress like labels (long runs of one value); the mode rule keeps them real IDs.
        images["ids"] = (create_label_image(group, IDS, plan, ids_dtype), "mode")
    if ignore:
        images["ignore"] = (create_label_image(group, IGNORE, plan, np.uint8), "mode")
    arrays = {name: levels[0] for name, (levels, _) in images.items()}
    in_slabs = all(step[0] == 1 for step in plan.steps)
    spent = {"downsample": 0.0}
    if in_slabs:
        arrays |= {f"{name}/{k}": levels[k] for name, (levels, _) in images.items() for k in range(1, len(levels))}

        def read_with_levels(z0: int, z1: int) -> dict:
            slab = dict(read_slab(z0, z1))
            started = time.perf_counter()
            for name, (levels, rule) in images.items():
                level = slab[name]
                for k, step in enumerate(plan.steps, 1):
                    slab[f"{name}/{k}"] = level = pyramid.downsample(level, step, rule)
            spent["downsample"] += time.perf_counter() - started
            return slab

        written = write_volumes(arrays, layout, read_with_levels, progress)
        return plan, spent["downsample"] + sum(s for name, s in written.items() if "/" in name)
    write_volumes(arrays, layout, read_slab, progress)
    started = time.perf_counter()
    for levels, rule in images.values():
        pyramid.build(levels, plan.steps, rule)
    return plan, time.perf_counter() - started


def image_levels(group: zarr.Group) -> list[zarr.Array]:
    """The levels of the image at `group`'s root (or of a label image group), in order."""
    return [writing_every_chunk(group[path]) for path in read_multiscale(group.attrs).paths]


# ------------------------------------------------------------------------------- the upgrade

# the first layout's root arrays -> (image name, label image name)
_FIRST_LAYOUT = {"raw": ("raw", "labels", TARGET), "probability": ("probability", "mask", "mask")}


def upgrade(path) -> dict:
    """Move a store of the first layout (root arrays raw/labels or probability/mask) into the
    OME-Zarr layout: level 0 arrays are renamed (no chunk data copied), metadata rewritten, the
    pyramid levels written. Returns what was done.

    The plan is written into the root's attributes before anything moves, so an upgrade that
    stops half way (a full disk, a killed job) is finished by running it again."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise UserError(f"{path}: not a Zarr store")
    group = zarr.open_group(str(path), mode="r+")
    old = group.attrs.asdict()
    pending = old.get("unet_dist", {}).get(UPGRADING)
    if pending is None:
        pending = _plan_upgrade(path, group, old)
        old = {**old, "unet_dist": {**old.get("unet_dist", {}), UPGRADING: pending}}
        _write_group_json(path, old)
    kind, has_label = pending["kind"], pending["label"]
    image_name, old_label, label_name = _FIRST_LAYOUT[kind]
    # each move checked on its own, so a second run picks up after the last one done ("labels" is
    # the first layout's array and, once moved, the new layout's group of label images)
    if has_label and _is_array_dir(path / old_label):
        os.replace(path / old_label, path / ".upgrade-label")
    if _is_array_dir(path / kind):
        os.replace(path / kind, path / RAW)
    if has_label and (path / ".upgrade-label").exists():
        (path / "labels" / label_name).mkdir(parents=True, exist_ok=True)
        for folder in (path / "labels", path / "labels" / label_name):  # groups before they hold the array
            _write_group_json(folder, {})
        os.replace(path / ".upgrade-label", path / label_path(label_name))
    fault_point("upgrade-moved", path)
    _write_levels(path, old, image_name, label_name if has_label else None)
    return {"path": str(path), "image": image_name, "labels": [label_name] if has_label else [],
            "levels": len(zarr.open_group(str(path), mode="r").attrs["ome"]["multiscales"][0]["datasets"])}


def _plan_upgrade(path: Path, group: zarr.Group, old: dict) -> dict:
    roots = {n for n, _ in group.arrays()}
    kind = next((k for k in _FIRST_LAYOUT if k in roots), None)
    if RAW in roots or kind is None:
        raise UserError(f"{path}: not a store of the first layout (root arrays: {', '.join(sorted(roots)) or 'none'})"
                        "; nothing to upgrade")
    return {"kind": kind, "label": _FIRST_LAYOUT[kind][1] in roots}


def _write_levels(path: Path, old: dict, image_name: str, label_name: str | None) -> None:
    """Metadata and coarser levels around the moved level-0 arrays; the plan's mark removed last."""
    metadata = read_multiscale(old)
    group = zarr.open_group(str(path), mode="r+")
    source = group[RAW]
    plan = Pyramid.plan(Layout(tuple(source.shape), tuple(source.chunks), source.shards),
                        metadata.voxel_size(0) if metadata is not None else None)
    translation = metadata.offset(0) if metadata is not None else None
    levels = create_image(group, image_name, plan, source.dtype, "raw", translation)
    pyramid.build(levels, plan.steps, "mean")
    if label_name is not None:
        group = zarr.open_group(str(path), mode="r+")
        targets = create_label_image(group, label_name, plan, np.uint8, translation)
        pyramid.build(targets, plan.steps, "mode")
    attrs = zarr.open_group(str(path), mode="r").attrs.asdict()
    ours = {k: v for k, v in attrs.get("unet_dist", {}).items() if k != UPGRADING}
    _write_group_json(path, {**{k: v for k, v in attrs.items() if k != "unet_dist"}, **({"unet_dist": ours} if ours else {})})
    open_store(path)  # the result opens as the current layout


def _is_array_dir(folder: Path) -> bool:
    try:
        return json.loads((folder / "zarr.json").read_text()).get("node_type") == "array"
    except (OSError, ValueError):
        return False


def _write_group_json(folder: Path, attributes: dict) -> None:
    meta = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    tmp = folder / "zarr.json.tmp"
    try:
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, folder / "zarr.json")
    finally:
        tmp.unlink(missing_ok=True)
