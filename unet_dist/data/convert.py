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
from unet_dist.data.convert_labels import ConvertLabels, check_label_options
from unet_dist.data.layout import Layout, resolve_layout
from unet_dist.data.slab_writer import Progress
from unet_dist.data.instances import IDS, Rule
from unet_dist.data.ome import image_levels, write_em_store
from unet_dist.data.ome_metadata import read_multiscale
from unet_dist.data.sources import Source, open_source
from unet_dist.data.intensity import intensity_of
from unet_dist.errors import UserError


# ---------------------------------------------------------------- raw checks


def _check_finite(source: Source, slab: np.ndarray, z0: int) -> None:
    # Slice by slice: the boolean temporaries then cost O(slice), not O(slab).
    if slab.dtype.kind != "f":
        return
    for i, plane in enumerate(slab):
        if not np.isfinite(plane).all():
            raise UserError(f"{source.slice_name(z0 + i)}: NaN or infinite values")


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
    intensity_range: tuple[float, float] | None = None,
) -> dict:
    """Write `raw` (and `labels`) into a new Zarr v3 store at `out`; returns a summary dict.

    `raw` and `labels` are what `open_source` takes: PATH or PATH:INNER. `resolution` (z, y, x nm)
    overrides the sources' voxel size; without it, a source must record one. With `instances` (a
    boundary rule), `labels` are object IDs: kept as `labels/neuron_ids`, the target derived by the rule.

    Unlabelled voxels (the label image `ignore`, 1 = unlabelled; their target is stored as 0): IDs equal
    to `ignore_id` (with `instances`), label values equal to `ignore_value` (binary labels), and/or the
    non-zero voxels of `ignore_mask` (PATH[:INNER], any source). A float `raw` is scaled to [0, 1] by
    `intensity_range` (LO, HI), else by its measured range with a warning (data/intensity.py).
    """
    started = time.perf_counter()
    out = check_out(out, overwrite)
    resolution = None if resolution is None else _check_resolution(resolution)
    check_label_options(labels, instances, label_threshold, invert, ignore_id, ignore_value, ignore_mask)
    raw_src = open_source(raw)
    sources = [raw_src]
    try:
        label_side = ConvertLabels(raw_src, sources, labels, instances, label_threshold, invert, ignore_id,
                                   ignore_value, ignore_mask)
        resolution = decide_voxel_size(resolution, sources)
        layout = resolve_layout(raw_src.shape, chunks, shard)
        intensity = intensity_of(raw_src, intensity_range)
        raw_dtype = np.float32 if intensity.scales else np.uint8 if raw_src.dtype == bool else raw_src.dtype
        dtypes = {"raw": raw_dtype} | label_side.dtypes()

        def read_slab(z0, z1):
            slab = raw_src.read(z0, z1)
            _check_finite(raw_src, slab, z0)
            slab = {"raw": intensity.apply(slab).astype(raw_dtype, copy=False)}
            return slab | label_side.read(z0, z1, layout.shape[0], slab["raw"].shape)

        with atomic_store_dir(out, overwrite) as tmp:
            plan, pyramid_s = _write_store(tmp, raw_src, label_side, layout, resolution, raw_dtype, read_slab,
                                           progress, intensity)
    finally:
        for source in sources:
            source.close()
    with_labels = label_side.src is not None
    summary = _summary(out, layout, dtypes, resolution, label_side.ones if with_labels else None, started, plan,
                       pyramid_s)
    label_side.summarize(summary, int(np.prod(layout.shape)))
    return summary


def _write_store(tmp: Path, raw_src: Source, label_side: ConvertLabels, layout, resolution, raw_dtype, read_slab,
                 progress, intensity):
    """The store's arrays and attributes into `tmp`: (pyramid plan, seconds spent on the pyramid)."""
    instances = label_side.instances
    extra = {"instances": instances.record()} if instances is not None else {}
    ignore = label_side.ignore_record()
    attrs = st.provenance({"raw": raw_src.record(), **label_side.source_records()},
                          label_threshold=label_side.threshold, invert=label_side.invert,
                          intensity=intensity.record(), **extra,
                          **({"ignore": ignore} if ignore else {}))
    plan, pyramid_s = write_em_store(tmp, layout, resolution, raw_dtype, label_side.src is not None, read_slab,
                                     attrs, progress, ids_dtype=label_side.ids_dtype,
                                     target_attrs={"unet_dist": extra} if extra else None,
                                     ignore=label_side.with_ignore)
    if ignore:
        zarr.open_group(str(tmp / "labels" / st.IGNORE), mode="r+").attrs["unet_dist"] = {"ignore": ignore}
    return plan, pyramid_s


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
