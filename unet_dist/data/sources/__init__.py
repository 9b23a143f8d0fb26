"""Lazy readers of the volumes convert takes, behind one interface: `open_source(spec) -> Source`.

SPEC is a path, or `PATH:INNER` for an array inside a container (`sample_A.hdf:volumes/raw`,
`vol.n5:setup0/timepoint0/s0`, `seg.zarr:labels/neurons/0`, `em/:8_8_40` for a precomputed
scale). What PATH is decides the reader:

| PATH | reader |
| --- | --- |
| `.tif`/`.tiff` file | `images.TiffStack` (multi-page; ImageJ or OME-TIFF voxel size) |
| `.png`/`.jpg`/`.jpeg` file | `images.SingleImage` (one slice) |
| an HDF5 file (any suffix) | `hdf5.Hdf5Source` |
| folder with `zarr.json`, `.zarray` or `.zgroup` | `zarr_arrays.ZarrSource` (v2, v3, OME-Zarr) |
| folder with `attributes.json` | `tensorstore_formats.N5Source` |
| folder with an `info` file listing scales | `tensorstore_formats.PrecomputedSource` |
| any other folder | `images.SliceFolder` (TIFF/PNG/JPEG slices) |
"""

from __future__ import annotations

from pathlib import Path

import h5py

from unet_dist.errors import UserError

from .base import Source, check_readable, sha256_files
from .images import IMAGE_SUFFIXES, PIL_SUFFIXES, TIFF_SUFFIXES, SingleImage, SliceFolder, TiffStack

__all__ = ["Source", "open_source", "split_spec", "sha256_files"]

HDF5_SUFFIXES = (".h5", ".hdf", ".hdf5", ".he5")
FORMATS = ("TIFF, PNG, JPEG and HDF5 files; Zarr, N5 and neuroglancer precomputed folders; "
           "folders of TIFF/PNG/JPEG slices")


def split_spec(spec) -> tuple[Path, str | None]:
    """'a.hdf:volumes/raw' -> (Path('a.hdf'), 'volumes/raw'); a path that exists is never split."""
    text = str(spec)
    if Path(text).exists() or ":" not in text:
        return Path(text), None
    # The first colon after which the path before it exists (a path may hold colons too).
    parts = text.split(":")
    for i in range(1, len(parts)):
        head = ":".join(parts[:i])
        if head and Path(head).exists():
            return Path(head), ":".join(parts[i:]).strip("/") or None
    return Path(parts[0]), ":".join(parts[1:]).strip("/") or None


def open_source(spec) -> Source:
    """A lazy reader for `spec` (PATH or PATH:INNER); UserError naming it if it cannot be one.

    A Source passes through, so a caller can hand convert a reader of its own.
    """
    if isinstance(spec, Source):
        return spec
    path, inner = split_spec(spec)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    source = _open(path, inner)
    if min(source.shape) == 0:
        source.close()
        raise UserError(f"{source.path}: empty volume (shape {source.shape})")
    return source


def _open(path: Path, inner: str | None) -> Source:
    from . import hdf5, tensorstore_formats as tsf, zarr_arrays

    if path.is_dir():
        if zarr_arrays.is_zarr(path):
            return zarr_arrays.ZarrSource(path, inner)
        if tsf.is_precomputed(path):
            return tsf.PrecomputedSource(path, inner)
        if tsf.is_n5(path):
            return tsf.N5Source(path, inner)
        if inner:  # e.g. a zarr v3 store whose root has no zarr.json: look at the inner node
            if zarr_arrays.is_zarr(path / inner):
                return zarr_arrays.ZarrSource(path, inner)
            if tsf.is_n5(path / inner):
                return tsf.N5Source(path, inner)
            raise UserError(f"{path}:{inner}: {path} is not a Zarr, N5 or precomputed container")
        return SliceFolder(path)
    check_readable(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES and h5py.is_hdf5(path):
        return hdf5.Hdf5Source(path, inner)
    if inner:
        raise UserError(f"{path}:{inner}: {path} is not a container (HDF5, Zarr, N5, precomputed); "
                        "only those take an inner path")
    if suffix in TIFF_SUFFIXES:
        return TiffStack(path)
    if suffix in PIL_SUFFIXES:
        return SingleImage(path)
    if suffix in HDF5_SUFFIXES:
        raise UserError(f"{path}: not a readable HDF5 file (no HDF5 signature)")
    raise UserError(f"{path}: unsupported format; convert reads {FORMATS}")
