"""EM volumes (any source `data.sources` reads) to a Zarr v3 volume store, and `info` about a store.

Inputs are read lazily, a slab of slices at a time, and the store is written slab by slab, so
memory stays O(slab) for volumes of any size. Every mistake in the input is a UserError that names
the file and the problem, raised before or during the write; either way nothing is left at `out`.
The voxel size is the source's, or `resolution`; never a default (see `decide_voxel_size`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import zarr

from unet_dist.data import store as st

from unet_dist.data.atomic_dir import atomic_store_dir, check_out

from unet_dist.data.layout import Layout, resolve_layout

from unet_dist.data.slab_writer import Progress
from unet_dist.data.instances import IDS, Rule, check_ids_dtype, looks_like_ids, target_of_slab
from unet_dist.data.ome import image_levels, write_em_store
from unet_dist.data.ome_metadata import read_multiscale
from unet_dist.data.sources import Source, open_source
from unet_dist.errors import UserError


# ---------------------------------------------------------------- slab checks and label mapping


# Checks and mapping go slice by slice: their boolean temporaries then cost O(slice), not O(slab).


def _check_finite(source: Source, slab: np.ndarray, z0: int) -> None:
    if slab.dtype.kind != "f":
        return
    for i, plane in enumerate(slab):
        if not np.isfinite(plane).all():
            raise UserError(f"{source.slice_name(z0 + i)}: NaN or infinite values")


class LabelMapper:
    """Source label values -> uint8 (1 interior, 0 membrane), checking binarity slice by slice."""

    def __init__(self, source: Source, threshold: float | None, invert: bool, ignore_value: float | None = None):
        self.source, self.threshold, self.invert, self.ignore_value = source, threshold, invert, ignore_value
        dtype = source.dtype
        if threshold is None and dtype.kind not in "biu":
            raise UserError(
                f"{source.path}: labels of type {dtype} are not integers; "
                "pass --label-threshold T (label = value > T)"
            )
        self.top = 1 if dtype.kind == "b" else np.iinfo(dtype).max if dtype.kind in "iu" else None
        if ignore_value is not None and threshold is None and ignore_value in (0, 1, self.top):
            raise UserError(f"--ignore-value {ignore_value:g}: a label value of {source.path} ({{0, 1}} or "
                            f"{{0, {self.top}}}); the unlabelled voxels need a value of their own")
        self.seen: set[int] = set()

    def __call__(self, slab: np.ndarray, z0: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(target, ignored voxels or None): ignored voxels (value == ignore_value) are 0 in the target."""
        out = np.empty(slab.shape, np.uint8)
        ignored = None if self.ignore_value is None else np.empty(slab.shape, np.uint8)
        for i, plane in enumerate(slab):
            skip = None
            if ignored is not None:
                skip = plane == self.ignore_value
                ignored[i] = skip
                if skip.any():  # the rest is checked and mapped as usual
                    plane = np.where(skip, 0, plane).astype(plane.dtype, copy=False)
            if self.threshold is not None:
                label = plane > self.threshold
            else:
                self._check_binary(plane, z0 + i)
                label = plane != 0
            if self.invert:
                np.logical_not(label, out=label)
            if skip is not None:
                label &= ~skip
            out[i] = label
        return out, ignored

    def _check_binary(self, plane: np.ndarray, z: int) -> None:
        # {0, 1} or {0, max of the dtype} (e.g. 0/255); anything else needs a threshold.
        odd = (plane != 0) & (plane != 1) & (plane != self.top)
        for value in (1, self.top):
            if value not in self.seen and (plane == value).any():
                self.seen.add(value)
        if odd.any() or len(self.seen) > 1:
            bad = np.unique(plane[odd])[:5].tolist() if odd.any() else sorted(self.seen)
            where = self.source.slice_name(z) if odd.any() else str(self.source.path)
            hint = "pass --label-threshold T to binarise (label = value > T)"
            if looks_like_ids(plane):
                # A threshold would merge every neuron into one interior (no membranes at all).
                hint = ("they look like instance labels (one ID per object): pass --instances to keep "
                        "the IDs and derive the target from their boundaries")
            raise UserError(
                f"{where}: labels are not binary (values {', '.join(map(str, bad))} found; "
                f"expected {{0, 1}} or {{0, {self.top}}}); {hint}"
            )


# ---------------------------------------------------------------- convert


def convert(
    raw,
    out,
    labels=None,
    resolution=None,
    chunks="2d",
    shard=None,
    label_threshold: float | None = None,
    invert: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    instances: Rule | None = None,
    ignore_id: int | None = None,
    ignore_value: float | None = None,
    ignore_mask=None,
) -> dict:
    """Write `raw` (and `labels`) into a new Zarr v3 store at `out`; returns a summary dict.

    `raw` and `labels` are what `open_source` takes: PATH or PATH:INNER. `resolution` (z, y, x nm)
    overrides the sources' voxel size; without it, a source must record one. With `instances` (a
    boundary rule), `labels` are object IDs: kept as `labels/neuron_ids`, the target derived by the rule.

    Unlabelled voxels (the label image `ignore`, 1 = unlabelled; their target is stored as 0): IDs equal
    to `ignore_id` (with `instances`), label values equal to `ignore_value` (binary labels), and/or the
    non-zero voxels of `ignore_mask` (PATH[:INNER], any source).
    """
    started = time.perf_counter()
    out = check_out(out, overwrite)
    if resolution is not None:
        resolution = _check_resolution(resolution)
    if instances is not None and (labels is None or label_threshold is not None or invert):
        raise UserError("--instances needs --labels (object IDs) and excludes --label-threshold and --invert")
    _check_ignore_options(labels, instances, ignore_id, ignore_value, ignore_mask)
    raw_src = open_source(raw)
    sources = [raw_src]
    try:
        label_src = mapper = mask_src = None
        if ignore_mask is not None:
            mask_src = open_source(ignore_mask)
            sources.append(mask_src)
            if mask_src.shape != raw_src.shape:
                raise UserError(f"{mask_src.path}: the ignore mask has shape {mask_src.shape} but "
                                f"{raw_src.path} has {raw_src.shape}")
        if labels is not None:
            label_src = open_source(labels)
            sources.append(label_src)
            if label_src.shape != raw_src.shape:
                raise UserError(
                    f"{label_src.path}: labels have shape {label_src.shape} but "
                    f"{raw_src.path} has {raw_src.shape}"
                )
            if instances is None:
                mapper = LabelMapper(label_src, label_threshold, invert, ignore_value)
            else:
                ids_dtype = check_ids_dtype(label_src.dtype, label_src.path)
                if ignore_id is not None and not _representable(ignore_id, ids_dtype):
                    raise UserError(f"--ignore-id {ignore_id}: not a value of {label_src.path}'s IDs ({ids_dtype})")
        resolution = decide_voxel_size(resolution, sources)
        layout = resolve_layout(raw_src.shape, chunks, shard)
        raw_dtype = np.uint8 if raw_src.dtype == bool else raw_src.dtype
        dtypes = {"raw": raw_dtype} | ({"labels": np.uint8} if label_src is not None else {})
        if instances is not None:
            dtypes["ids"] = ids_dtype
        with_ignore = ignore_id is not None or ignore_value is not None or ignore_mask is not None
        if with_ignore:
            dtypes["ignore"] = np.uint8
        ones = ignored = 0

        def unlabelled(ids, a, b):
            """Instance labels' unlabelled voxels in slices a..b: the ignore ID's and the mask's."""
            out = np.zeros(ids.shape, bool) if ignore_id is None else ids == ignore_id
            if mask_src is not None:
                out |= mask_src.read(a, b) != 0
            return out

        def read_slab(z0, z1):
            nonlocal ones, ignored
            slab = {"raw": raw_src.read(z0, z1).astype(raw_dtype, copy=False)}
            _check_finite(raw_src, slab["raw"], z0)
            skip = None
            if instances is not None:  # IDs of the slab plus the rule's halo, the target cropped to the slab
                slab["ids"], slab["labels"] = target_of_slab(label_src.read, z0, z1, layout.shape[0], instances,
                                                             label_src.path, unlabelled if with_ignore else None)
                if with_ignore:
                    skip = unlabelled(slab["ids"], z0, z1).view(np.uint8)
            elif label_src is not None:
                slab["labels"], skip = mapper(label_src.read(z0, z1), z0)
            if with_ignore:
                if skip is None:
                    skip = np.zeros(slab["raw"].shape, np.uint8)
                if mask_src is not None and instances is None:
                    skip |= (mask_src.read(z0, z1) != 0).view(np.uint8)
                slab["labels"] = np.where(skip != 0, np.uint8(0), slab["labels"])  # ignored voxels hold 0
                slab["ignore"] = skip
                ignored += int(np.count_nonzero(skip))
            if label_src is not None:
                ones += int(np.count_nonzero(slab["labels"]))
            return slab

        with atomic_store_dir(out, overwrite) as tmp:
            provenance = {"raw": raw_src.record()}
            if label_src is not None:
                provenance["labels"] = label_src.record()
            extra = {"instances": instances.record()} if instances is not None else {}
            ignore = _ignore_record(ignore_id, ignore_value, mask_src) if with_ignore else None
            if mask_src is not None:
                provenance["ignore"] = mask_src.record()
            attrs = st.provenance(provenance, label_threshold=label_threshold, invert=invert, **extra,
                                  **({"ignore": ignore} if ignore else {}))
            plan, pyramid_s = write_em_store(tmp, layout, resolution, raw_dtype, label_src is not None, read_slab,
                                             attrs, progress, ids_dtype=dtypes.get("ids"),
                                             target_attrs={"unet_dist": extra} if extra else None,
                                             ignore=with_ignore)
            if ignore:
                zarr.open_group(str(tmp / "labels" / st.IGNORE), mode="r+").attrs["unet_dist"] = {"ignore": ignore}
    finally:
        for source in sources:
            source.close()
    summary = _summary(out, layout, dtypes, resolution, ones if label_src is not None else None, started, plan,
                       pyramid_s)
    if with_ignore:
        summary["ignored_fraction"] = ignored / max(1, int(np.prod(layout.shape)))
        if ignored == 0:  # e.g. --ignore-value 2.5 on integer labels, or the wrong --ignore-id
            print(f"warning: {' '.join(_ignore_flags(ignore_id, ignore_value, ignore_mask))} marked no voxel as "
                  "unlabelled", file=sys.stderr, flush=True)
    return summary


def _ignore_flags(ignore_id, ignore_value, ignore_mask) -> list[str]:
    return [flag for flag, v in (("--ignore-id", ignore_id), ("--ignore-value", ignore_value),
                                 ("--ignore-mask", ignore_mask)) if v is not None]


def _check_ignore_options(labels, instances, ignore_id, ignore_value, ignore_mask) -> None:
    """The --ignore-* combinations that make sense, before anything is read or written."""
    given = _ignore_flags(ignore_id, ignore_value, ignore_mask)
    if given and labels is None:
        raise UserError(f"{given[0]} marks unlabelled voxels of --labels; pass --labels too")
    if ignore_id is not None:
        if instances is None:
            raise UserError("--ignore-id needs --instances (an ID of the object IDs); for binary labels use "
                            "--ignore-value V or --ignore-mask PATH")
        if isinstance(ignore_id, bool) or not isinstance(ignore_id, (int, np.integer)) or ignore_id < 0:
            raise UserError(f"--ignore-id: expected an ID >= 0, got {ignore_id!r}")
    if ignore_value is not None:
        if instances is not None:
            raise UserError("--ignore-value is for binary labels; with --instances use --ignore-id N")
        if not np.isfinite(ignore_value):
            raise UserError(f"--ignore-value: expected a number, got {ignore_value}")


def _representable(value: int, dtype) -> bool:
    info = np.iinfo(dtype)
    return info.min <= value <= info.max


def _ignore_record(ignore_id, ignore_value, mask_src) -> dict:
    record = {"meaning": "1 = unlabelled: never in a loss, a validation or an evaluation; the target holds 0 there"}
    if ignore_id is not None:
        record["ignore_id"] = int(ignore_id)
    if ignore_value is not None:
        record["ignore_value"] = float(ignore_value)
    if mask_src is not None:
        record["ignore_mask"] = str(mask_src.path)
    return record


def _check_resolution(resolution) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in resolution)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise UserError(f"resolution: expected three positive numbers z,y,x in nm, got {resolution}")
    return values  # type: ignore[return-value]


def decide_voxel_size(resolution, sources: list[Source]) -> tuple[float, float, float]:
    """`resolution` if given (a warning line for each source it contradicts), else the sources'.

    Never a default: a volume recorded at the wrong scale shows wrong in every viewer and trains
    at the wrong scale, so a source without a voxel size needs `--resolution`.
    """
    recorded = [(s, s.voxel_size) for s in sources if s.voxel_size is not None]
    if resolution is not None:
        for source, size in recorded:
            if not np.allclose(size, resolution, rtol=1e-6):
                print(f"warning: --resolution {_nm(resolution)} overrides the voxel size {_nm(size)} nm "
                      f"recorded in {source.path}", file=sys.stderr, flush=True)
        return resolution
    if not recorded:
        raise UserError(f"{sources[0].path}: the source records no voxel size; "
                        "pass --resolution Z,Y,X (in nm)")
    (first, size), *others = recorded
    for source, other in others:
        if not np.allclose(size, other, rtol=1e-6):
            raise UserError(f"{source.path}: voxel size {_nm(other)} nm, but {first.path} has "
                            f"{_nm(size)} nm; pass --resolution Z,Y,X to choose")
    return size


def _nm(values) -> str:
    return ",".join(f"{v:g}" for v in values)


def _summary(out, layout, dtypes, resolution, ones, started, plan, pyramid_s) -> dict:
    voxels = int(np.prod(layout.shape))
    return {
        "out": str(out),
        "shape": list(layout.shape),
        "dtypes": {name: np.dtype(d).name for name, d in dtypes.items()},
        "chunks": list(layout.chunks),
        "shards": list(layout.shards) if layout.shards else None,
        "voxel_size": list(resolution) if resolution else None,
        "levels": [list(shape) for shape in plan.shapes],
        "pyramid_seconds": round(pyramid_s, 3),
        "pyramid_stored_bytes": sum(st.stored_bytes(out / prefix / str(level)) for level in range(1, len(plan.shapes))
                                    for prefix in ("", "labels/" + st.TARGET, "labels/" + IDS,
                                                                "labels/" + st.IGNORE)),
        "label_fraction": ones / voxels if ones is not None else None,
        "stored_bytes": st.stored_bytes(out),
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---------------------------------------------------------------- info


def store_info(path) -> dict:
    """What `unet-dist info` shows: per array layout, codecs and sizes; voxel size; provenance.

    Arrays are keyed by their path: the image's levels first, then each label image's levels.
    """
    group = st.open_store(path, arrays=())
    multiscale = read_multiscale(group.attrs)
    image_name = multiscale.name if multiscale is not None and multiscale.name else "image"
    roles = [(str(level), f"{image_name} level {level}", array)
             for level, array in enumerate(image_levels(group))]
    for name in st.label_names(group):
        roles += [(f"labels/{name}/{level}", f"label image '{name}' level {level}", array)
                  for level, array in enumerate(image_levels(group["labels"][name]))]
    arrays = {}
    for key, role, array in roles:
        stored = st.stored_bytes(Path(path) / key)
        raw_bytes = st.nbytes(array.shape, array.dtype)
        entry = {
            "role": role,
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "chunks": list(array.chunks),
            "shards": list(array.shards) if array.shards else None,
            "codecs": _codec_names(array),
            "stored_bytes": stored,
            "uncompressed_bytes": raw_bytes,
            "ratio": raw_bytes / stored if stored else None,
        }
        if key == st.TARGET_PATH:
            ones = sum(int(np.count_nonzero(array[z0:z1])) for z0, z1 in Layout.of(array).slabs())
            entry["label_fraction"] = ones / max(1, int(np.prod(array.shape)))
            rule = group["labels"][st.TARGET].attrs.get("unet_dist", {}).get("instances")
            if rule:  # derived from labels/neuron_ids (convert --instances, relabel)
                entry["instances"] = rule
        if key == st.label_path(st.IGNORE):
            ignored = sum(int(np.count_nonzero(array[z0:z1])) for z0, z1 in Layout.of(array).slabs())
            entry["ignored_fraction"] = ignored / max(1, int(np.prod(array.shape)))
        arrays[key] = entry
    return {
        "path": str(path),
        "arrays": arrays,
        "voxel_size": st.voxel_size(group),
        "provenance": group.attrs.get("unet_dist"),
    }


def _codec_names(array) -> list[str]:
    names = ["sharding_indexed"] if array.shards else []
    for codec in (*array.filters, array.serializer, *array.compressors):
        if codec is None:
            continue
        spec = codec.to_dict()
        config = spec.get("configuration", {})
        if spec["name"] == "blosc":
            names.append(f"blosc({config['cname']}, level {config['clevel']}, {config['shuffle']})")
        else:
            names.append(spec["name"])
    return names


def format_info(info: dict) -> str:
    """Human-readable lines for store_info()'s dict."""
    lines = [f"store       {info['path']}"]
    vs = info["voxel_size"]
    lines.append("voxel size  " + (" x ".join(f"{v:g}" for v in vs) + " nm (z, y, x)" if vs else "unknown"))
    for name, a in info["arrays"].items():
        ratio = f"{a['ratio']:.2f}x" if a["ratio"] else "n/a"
        lines.append(f"{name:<11} {a['role']}")
        lines.append(
            f"{'':<11} {' x '.join(map(str, a['shape']))}  {a['dtype']}  "
            f"chunks {'x'.join(map(str, a['chunks']))}  "
            f"shards {'x'.join(map(str, a['shards'])) if a['shards'] else 'none'}"
        )
        lines.append(f"{'':<11} codecs {', '.join(a['codecs'])}")
        lines.append(
            f"{'':<11} {_mb(a['stored_bytes'])} stored, {_mb(a['uncompressed_bytes'])} "
            f"uncompressed, ratio {ratio}"
        )
        if "label_fraction" in a:
            lines.append(f"{'':<11} label fraction {a['label_fraction']:.4f} (interior = 1)")
        if "ignored_fraction" in a:
            lines.append(f"{'':<11} ignored fraction {a['ignored_fraction']:.4f} (unlabelled = 1)")
        if "instances" in a:
            rule = a["instances"]
            lines.append(f"{'':<11} from {rule['derived_from']}: boundary width {rule['boundary_width']} px "
                         f"({'3D' if rule['boundary_3d'] else '2D'}), background "
                         f"{'interior' if rule['background_interior'] else 'membrane'}")
    prov = info.get("provenance")
    if prov:
        lines.append(f"created     {prov.get('created')} by unet_dist {prov.get('version')}")
        for role, src in (prov.get("sources") or {}).items():
            where = src.get("path", "") + (f":{src['inner']}" if src.get("inner") else "")
            if "sha256" in src:
                lines.append(f"{role:<11} from {where} (sha256 {src['sha256'][:16]}...)")
            elif "format" in src:  # a container: no single file to hash
                lines.append(f"{role:<11} from {where} ({src['format']})")
            else:
                lines.append(f"{role:<11} {', '.join(f'{k}={v}' for k, v in src.items())}")
        if prov.get("label_threshold") is not None or prov.get("invert"):
            lines.append(f"labels      threshold {prov.get('label_threshold')}, invert {prov.get('invert')}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
