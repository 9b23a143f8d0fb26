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

from unet_dist.errors import UserError

from unet_dist.data.sources.base import Source, check_readable, read_json, sha256_files
from unet_dist.data.sources.images import IMAGE_SUFFIXES, PIL_SUFFIXES, TIFF_SUFFIXES, SingleImage, SliceFolder, TiffStack

__all__ = ["Source", "open_source", "split_spec", "sha256_files"]

HDF5_SUFFIXES = (".h5", ".hdf", ".hdf5", ".he5")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
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
    # Each reader's module (h5py, zarr, tensorstore) is imported only when its format is met:
    # tensorstore starts thread pools on import, which a TIFF conversion should not pay for.
    if path.is_dir():
        for folder in (path, path / inner) if inner else (path,):
            # a container is known by its root, or (a zarr v3 root may have no zarr.json) its node
            if _is_zarr(folder):
                from unet_dist.data.sources.zarr_arrays import ZarrSource
                return ZarrSource(path, inner)
            if folder == path and _is_precomputed(path):
                from unet_dist.data.sources.tensorstore_formats import PrecomputedSource
                return PrecomputedSource(path, inner)
            if (folder / "attributes.json").is_file():
                from unet_dist.data.sources.tensorstore_formats import N5Source
                return N5Source(path, inner)
        if inner:
            raise UserError(f"{path}:{inner}: {path} is not a Zarr, N5 or precomputed container")
        return SliceFolder(path)
    check_readable(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES and _is_hdf5(path):
        from unet_dist.data.sources.hdf5 import Hdf5Source
        return Hdf5Source(path, inner)
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


def _is_zarr(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("zarr.json", ".zarray", ".zgroup"))


def _is_precomputed(folder: Path) -> bool:
    try:  # a slice folder may hold a text file called info
        return (folder / "info").is_file() and "scales" in read_json(folder / "info")
    except UserError:
        return False


def _is_hdf5(path: Path) -> bool:
    """The HDF5 signature, at offset 0 or after a user block (512, 1024, 2048, ... bytes)."""
    with open(path, "rb") as f:
        for offset in (0, 512, 1024, 2048, 4096, 8192, 16384):
            f.seek(offset)
            if f.read(8) == HDF5_SIGNATURE:
                return True
    return False
