"""Image files: multi-page TIFF (with ImageJ or OME-TIFF voxel sizes), single PNG/JPEG/TIFF images,
and folders of per-slice images in natural order."""

from __future__ import annotations

import contextlib
import logging
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from unet_dist.errors import UserError

from unet_dist.data.sources.base import Source, check_readable, natural_key, positive_floats, to_nm

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_SUFFIXES = TIFF_SUFFIXES + PIL_SUFFIXES
# Pillow modes of single-channel images and the dtype their pixels have.
PIL_MODES = {"L": np.uint8, "1": np.uint8, "I;16": np.uint16, "I": np.int32, "F": np.float32}


class TiffStack(Source):
    """A multi-page TIFF, one 2D grayscale page per slice (or a single 2D image)."""

    format = "tiff"

    def __init__(self, path: Path):
        self.path, self.root, self.files = str(path), path, [path]
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
        self.voxel_size = _ome_voxel_size(self._tif) or _imagej_voxel_size(self._tif)

    def _read(self, z0, z1):
        with _quiet_tifffile():
            return self._tif.asarray(key=range(z0, z1), series=0)

    def close(self):
        super().close()
        self._tif.close()


def _imagej_voxel_size(tif) -> tuple[float, float, float] | None:
    """ImageJ: x and y from XResolution/YResolution (pixels per unit), z from `spacing`, in `unit`.

    Plain TIFF resolution tags are not used: writers put 72 dpi there by default, not a voxel size.
    """
    meta = tif.imagej_metadata if tif.is_imagej else None
    if not meta or "spacing" not in meta:
        return None
    tags = tif.pages[0].tags
    try:
        (xn, xd), (yn, yd) = tags["XResolution"].value, tags["YResolution"].value
        y, x = yd / yn, xd / xn
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    return to_nm((meta["spacing"], y, x), meta.get("unit"))


def _ome_voxel_size(tif) -> tuple[float, float, float] | None:
    """OME-TIFF: PhysicalSizeZ/Y/X of the first image, each in its own unit (default micrometre)."""
    if not tif.is_ome:
        return None
    try:
        root = ET.fromstring(tif.ome_metadata)
    except ET.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in "ZYX":
        value = pixels.get(f"PhysicalSize{axis}")
        nm = to_nm([value], pixels.get(f"PhysicalSize{axis}Unit", "µm")) if value else None
        if nm is None:
            return None
        sizes.append(nm[0])
    return positive_floats(sizes)


class SliceFolder(Source):
    """A folder of per-slice TIFF/PNG/JPEG files, in natural order (slice2 before slice10)."""

    format = "slices"

    def __init__(self, path: Path):
        self.path, self.root = str(path), path
        self.files = sorted(
            (f for f in path.iterdir()
             if f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith(".") and f.is_file()),
            key=lambda f: natural_key(f.name),
        )
        if not self.files:
            raise UserError(f"{path}: not a Zarr, N5 or precomputed volume, and no "
                            ".tif/.tiff/.png/.jpg images in the folder")
        # Headers only: a wrong file is found before any pixel is read or written.
        shape, dtype = image_header(self.files[0])
        for f in self.files[1:]:
            other_shape, other_dtype = image_header(f)
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

    def _read(self, z0, z1):
        out = np.empty((z1 - z0, *self.shape[1:]), self.dtype)
        for z in range(z0, z1):
            out[z - z0] = read_image(self.files[z])
        return out

    def slice_name(self, z):
        return f"{self.files[z]} (slice {z})"


class SingleImage(Source):
    """One 2D PNG or JPEG: a 1-slice volume."""

    format = "image"

    def __init__(self, path: Path):
        self.path, self.root, self.files = str(path), path, [path]
        shape, self.dtype = image_header(path)
        self.shape = (1, *shape)

    def _read(self, z0, z1):
        return read_image(self.root)[None]


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


def _yx(shape) -> tuple:
    return tuple(shape[-2:]) if len(shape) > 2 else tuple(shape)


def image_header(path: Path) -> tuple[tuple[int, int], np.dtype]:
    """(Y, X) and dtype of a single-slice image file, read from its header."""
    check_readable(path)
    if path.suffix.lower() in PIL_SUFFIXES:
        kind = "JPEG" if path.suffix.lower() != ".png" else "PNG"
        try:
            with Image.open(path) as im:
                mode, (width, height) = im.mode, im.size
        except Exception as exc:
            raise UserError(f"{path}: not a readable {kind} ({exc})") from None
        if mode not in PIL_MODES:
            raise UserError(f"{path}: an image in mode {mode}; expected a 2D grayscale slice")
        return (height, width), np.dtype(PIL_MODES[mode])
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


def read_image(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() in PIL_SUFFIXES:
            with Image.open(path) as im:
                data = np.asarray(im)
            return data.astype(np.uint8) if data.dtype == bool else data
        with _quiet_tifffile():
            return tifffile.imread(path)
    except Exception as exc:
        raise UserError(f"{path}: cannot read ({exc})") from None
