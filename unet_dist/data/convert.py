"""TIFF stacks and slice folders to a Zarr v3 volume store, and `info` about a store.

Inputs are read lazily, a slab of slices at a time, and the store is written slab by slab, so
memory stays O(slab) for volumes of any size. Every mistake in the input is a UserError that names
the file and the problem, raised before or during the write; either way nothing is left at `out`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from unet_dist.data import store as st
from unet_dist.data.ome import image_levels, write_em_store
from unet_dist.errors import UserError

TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = TIFF_SUFFIXES + (".png",)
# Pillow modes of single-channel images and the dtype their pixels have.
PNG_MODES = {"L": np.uint8, "1": np.uint8, "I;16": np.uint16, "I": np.int32, "F": np.float32}


# ---------------------------------------------------------------- lazy volume readers


class VolumeSource:
    """A (Z, Y, X) volume on disk: shape and dtype from the headers, pixels only on read()."""

    path: Path
    shape: tuple[int, int, int]
    dtype: np.dtype
    files: list[Path]

    def read(self, z0: int, z1: int) -> np.ndarray:
        raise NotImplementedError

    def slice_name(self, z: int) -> str:
        return f"{self.path} slice {z}"

    def close(self) -> None:
        pass


class TiffStack(VolumeSource):
    """A multi-page TIFF, one 2D grayscale page per slice (or a single 2D image)."""

    def __init__(self, path: Path):
        self.path, self.files = path, [path]
        try:
            with _quiet_tifffile():
                self._tif = tifffile.TiffFile(path)
                series = self._tif.series
        except Exception as exc:
            raise UserError(f"{path}: not a readable TIFF ({exc})") from None
        if not series:
            raise UserError(f"{path}: a TIFF without images")
        first = series[0]
        if len(series) > 1:
            other = series[1]
            index = getattr(other.pages[0], "index", len(first.pages))
            raise UserError(
                f"{path}: page {index} has shape {_yx(other.shape)} but page 0 has "
                f"{_yx(first.shape)}; all pages must be 2D slices of one size"
            )
        # One leading axis of any name (tifffile calls a plain stack Q or I, ImageJ Z, C or T)
        # is the slice axis; samples per pixel (S) mean colour, not slices.
        if "S" in first.axes or len(first.shape) not in (2, 3):
            raise UserError(
                f"{path}: images of shape {first.shape} (axes {first.axes}); expected 2D grayscale "
                "pages, one per slice (is it RGB or a multi-channel stack?)"
            )
        shape = tuple(first.shape)
        self.shape = (1, *shape) if len(shape) == 2 else shape
        self.dtype = np.dtype(first.dtype)
        if min(self.shape) == 0:
            raise UserError(f"{path}: empty volume (shape {self.shape})")
        # A cut-off or damaged copy should fail here, before anything is written, not as a failed
        # read later or (worse) as a silently shorter volume when tifffile falls back to page 0.
        contiguous = first.dataoffset is not None
        end = (first.dataoffset or 0) + first.nbytes
        if contiguous and end > path.stat().st_size:
            raise UserError(
                f"{path}: truncated ({path.stat().st_size} bytes, the image data needs {end})"
            )
        pages = len(self._tif.pages)
        # ImageJ stacks over 4 GB hold one page header for all slices, their data contiguous.
        if pages != self.shape[0] and not (self._tif.is_imagej and contiguous):
            raise UserError(
                f"{path}: {pages} pages, but its metadata describes {self.shape[0]} slice(s) of "
                f"{self.shape[1:]}; a damaged or truncated file?"
            )

    def read(self, z0, z1):
        try:
            with _quiet_tifffile():
                data = self._tif.asarray(key=range(z0, z1), series=0)
        except Exception as exc:
            which = f"slice {z0}" if z1 - z0 == 1 else f"slices {z0} to {z1 - 1}"
            raise UserError(f"{self.path}: cannot read {which}, damaged file? ({exc})") from None
        return data.reshape((z1 - z0, *self.shape[1:]))

    def close(self):
        self._tif.close()


class SliceFolder(VolumeSource):
    """A folder of per-slice .tif/.tiff/.png files, in natural order (slice2 before slice10)."""

    def __init__(self, path: Path):
        self.path = path
        self.files = sorted(
            (f for f in path.iterdir()
             if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()),
            key=lambda f: _natural_key(f.name),
        )
        if not self.files:
            raise UserError(f"{path}: no .tif/.tiff/.png images in the folder")
        # Headers only: a wrong file is found before any pixel is read or written.
        shape, dtype = _image_header(self.files[0])
        for f in self.files[1:]:
            other_shape, other_dtype = _image_header(f)
            if other_shape != shape:
                raise UserError(
                    f"{f}: slice of shape {other_shape}, but {self.files[0].name} has {shape}; "
                    "all slices must be the same size"
                )
            if other_dtype != dtype:
                raise UserError(
                    f"{f}: pixels of type {other_dtype}, but {self.files[0].name} has {dtype}"
                )
        self.shape = (len(self.files), *shape)
        self.dtype = dtype

    def read(self, z0, z1):
        out = np.empty((z1 - z0, *self.shape[1:]), self.dtype)
        for z in range(z0, z1):
            out[z - z0] = _read_image(self.files[z])
        return out

    def slice_name(self, z):
        return f"{self.files[z]} (slice {z})"


class SingleImage(VolumeSource):
    """One 2D PNG: a 1-slice volume."""

    def __init__(self, path: Path):
        self.path, self.files = path, [path]
        shape, self.dtype = _image_header(path)
        self.shape = (1, *shape)

    def read(self, z0, z1):
        return _read_image(self.path)[None]


def open_volume(path) -> VolumeSource:
    """A lazy reader for a multi-page TIFF, a folder of slices or a single 2D image."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        source: VolumeSource = SliceFolder(path)
    elif path.suffix.lower() in TIFF_SUFFIXES:
        _check_readable(path)
        source = TiffStack(path)
    elif path.suffix.lower() == ".png":
        source = SingleImage(path)
    else:
        raise UserError(f"{path}: not a .tif/.tiff/.png image or a folder of slices")
    if min(source.shape) == 0:
        raise UserError(f"{path}: empty volume (shape {source.shape})")
    return source


@contextlib.contextmanager
def _quiet_tifffile():
    """tifffile logs what it finds odd; we raise a UserError instead, so the user sees one line."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_readable(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def _natural_key(name: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name)]


def _yx(shape) -> tuple:
    return tuple(shape[-2:]) if len(shape) > 2 else tuple(shape)


def _image_header(path: Path) -> tuple[tuple[int, int], np.dtype]:
    """(Y, X) and dtype of a single-slice image file, read from its header."""
    _check_readable(path)
    if path.suffix.lower() == ".png":
        try:
            with Image.open(path) as im:
                mode, (width, height) = im.mode, im.size
        except Exception as exc:
            raise UserError(f"{path}: not a readable PNG ({exc})") from None
        if mode not in PNG_MODES:
            raise UserError(f"{path}: an image in mode {mode}; expected a 2D grayscale slice")
        return (height, width), np.dtype(PNG_MODES[mode])
    try:
        with _quiet_tifffile(), tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            shape, axes, dtype, pages = series.shape, series.axes, series.dtype, len(tif.pages)
    except Exception as exc:
        raise UserError(f"{path}: not a readable TIFF ({exc})") from None
    if len(shape) != 2 or "S" in axes:
        what = f"{pages} pages" if pages > 1 else f"shape {shape}"
        raise UserError(f"{path}: has {what}; a slice folder needs one 2D grayscale image per file")
    return tuple(shape), np.dtype(dtype)


def _read_image(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".png":
            with Image.open(path) as im:
                data = np.asarray(im)
            return data.astype(np.uint8) if data.dtype == bool else data
        with _quiet_tifffile():
            return tifffile.imread(path)
    except Exception as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None


def sha256_files(files) -> str:
    """sha256 of the files' contents concatenated in order, streamed."""
    digest = hashlib.sha256()
    for f in files:
        try:
            with open(f, "rb") as fh:
                while block := fh.read(1 << 22):
                    digest.update(block)
        except OSError as exc:
            raise UserError(f"{f}: cannot read ({exc.strerror})") from None
    return digest.hexdigest()


# ---------------------------------------------------------------- slab checks and label mapping


# Checks and mapping go slice by slice: their boolean temporaries then cost O(slice), not O(slab).


def _check_finite(source: VolumeSource, slab: np.ndarray, z0: int) -> None:
    if slab.dtype.kind != "f":
        return
    for i, plane in enumerate(slab):
        if not np.isfinite(plane).all():
            raise UserError(f"{source.slice_name(z0 + i)}: NaN or infinite values")


class LabelMapper:
    """Source label values -> uint8 (1 interior, 0 membrane), checking binarity slice by slice."""

    def __init__(self, source: VolumeSource, threshold: float | None, invert: bool):
        self.source, self.threshold, self.invert = source, threshold, invert
        dtype = source.dtype
        if threshold is None and dtype.kind not in "biu":
            raise UserError(
                f"{source.path}: labels of type {dtype} are not integers; "
                "pass --label-threshold T (label = value > T)"
            )
        self.top = 1 if dtype.kind == "b" else np.iinfo(dtype).max if dtype.kind in "iu" else None
        self.seen: set[int] = set()

    def __call__(self, slab: np.ndarray, z0: int) -> np.ndarray:
        out = np.empty(slab.shape, np.uint8)
        for i, plane in enumerate(slab):
            if self.threshold is not None:
                label = plane > self.threshold
            else:
                self._check_binary(plane, z0 + i)
                label = plane != 0
            if self.invert:
                np.logical_not(label, out=label)
            out[i] = label
        return out

    def _check_binary(self, plane: np.ndarray, z: int) -> None:
        # {0, 1} or {0, max of the dtype} (e.g. 0/255); anything else needs a threshold.
        odd = (plane != 0) & (plane != 1) & (plane != self.top)
        for value in (1, self.top):
            if value not in self.seen and (plane == value).any():
                self.seen.add(value)
        if odd.any() or len(self.seen) > 1:
            bad = np.unique(plane[odd])[:5].tolist() if odd.any() else sorted(self.seen)
            where = self.source.slice_name(z) if odd.any() else str(self.source.path)
            raise UserError(
                f"{where}: labels are not binary (values {', '.join(map(str, bad))} found; "
                f"expected {{0, 1}} or {{0, {self.top}}}); "
                "pass --label-threshold T to binarise (label = value > T)"
            )


# ---------------------------------------------------------------- convert


def convert(
    raw,
    out,
    labels=None,
    resolution=(50.0, 4.0, 4.0),
    chunks="2d",
    shard=None,
    label_threshold: float | None = None,
    invert: bool = False,
    overwrite: bool = False,
    progress: st.Progress | None = None,
) -> dict:
    """Write `raw` (and `labels`) into a new Zarr v3 store at `out`; returns a summary dict."""
    started = time.perf_counter()
    out = st.check_out(out, overwrite)
    if resolution is not None:
        resolution = _check_resolution(resolution)
    raw_src = open_volume(raw)
    sources = [raw_src]
    try:
        label_src = mapper = None
        if labels is not None:
            label_src = open_volume(labels)
            sources.append(label_src)
            if label_src.shape != raw_src.shape:
                raise UserError(
                    f"{label_src.path}: labels have shape {label_src.shape} but "
                    f"{raw_src.path} has {raw_src.shape}"
                )
            mapper = LabelMapper(label_src, label_threshold, invert)
        layout = st.resolve_layout(raw_src.shape, chunks, shard)
        raw_dtype = np.uint8 if raw_src.dtype == bool else raw_src.dtype
        dtypes = {"raw": raw_dtype} | ({"labels": np.uint8} if label_src is not None else {})
        ones = 0

        def read_slab(z0, z1):
            nonlocal ones
            slab = {"raw": raw_src.read(z0, z1).astype(raw_dtype, copy=False)}
            _check_finite(raw_src, slab["raw"], z0)
            if label_src is not None:
                slab["labels"] = mapper(label_src.read(z0, z1), z0)
                ones += int(np.count_nonzero(slab["labels"]))
            return slab

        with st.atomic_store_dir(out, overwrite) as tmp:
            provenance = {"raw": _source_record(raw_src)}
            if label_src is not None:
                provenance["labels"] = _source_record(label_src)
            attrs = st.provenance(provenance, label_threshold=label_threshold, invert=invert)
            plan, pyramid_s = write_em_store(tmp, layout, resolution, raw_dtype, label_src is not None, read_slab,
                                             attrs, progress)
    finally:
        for source in sources:
            source.close()
    return _summary(out, layout, dtypes, resolution, ones if label_src is not None else None, started, plan,
                    pyramid_s)


def _check_resolution(resolution) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in resolution)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise UserError(f"resolution: expected three positive numbers z,y,x in nm, got {resolution}")
    return values  # type: ignore[return-value]


def _source_record(source: VolumeSource) -> dict:
    return {
        "path": str(source.path.resolve()),
        "sha256": sha256_files(source.files),
        "files": [f.name for f in source.files],
    }


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
                                    for prefix in ("", "labels/" + st.TARGET)),
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
    image_name = group.attrs.get("ome", {}).get("multiscales", [{}])[0].get("name", "image")
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
            ones = sum(int(np.count_nonzero(array[z0:z1])) for z0, z1 in st.iter_slabs(array))
            entry["label_fraction"] = ones / max(1, int(np.prod(array.shape)))
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
    prov = info.get("provenance")
    if prov:
        lines.append(f"created     {prov.get('created')} by unet_dist {prov.get('version')}")
        for role, src in (prov.get("sources") or {}).items():
            if "sha256" in src:
                lines.append(f"{role:<11} from {src['path']} (sha256 {src['sha256'][:16]}...)")
            else:
                lines.append(f"{role:<11} {', '.join(f'{k}={v}' for k, v in src.items())}")
        if prov.get("label_threshold") is not None or prov.get("invert"):
            lines.append(f"labels      threshold {prov.get('label_threshold')}, invert {prov.get('invert')}")
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
