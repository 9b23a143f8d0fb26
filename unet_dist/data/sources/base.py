"""What every source reader shares: the Source interface, slab reads, units, squeezing to (Z, Y, X).

A Source knows its shape, dtype and voxel size from headers and metadata alone; pixels are read
only by `read(z0, z1)`, one slab at a time, so convert's memory stays O(slab) for any volume.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path

import numpy as np

from unet_dist.data.ome_metadata import nm_per
from unet_dist.errors import UserError

# A source chunked deeper than one slice is read a chunk-row at a time and the row is kept for the
# next slabs (below), unless that row would be larger than this.
BLOCK_CACHE_BYTES = 256 << 20


class Source:
    """A (Z, Y, X) volume on disk: shape, dtype and voxel size from metadata, pixels on read()."""

    path: str  # what messages name: the file or folder, with ":INNER" inside a container
    root: Path  # the file or folder on disk
    inner: str | None = None
    format: str = ""
    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size: tuple[float, float, float] | None = None  # nm, z, y, x
    offset: tuple[float, float, float] | None = None  # nm, z, y, x: where voxel (0, 0, 0) lies
    files: list[Path] = []  # the files whose sha256 provenance records (not for containers)
    read_depth: int = 1  # the source's chunk depth in z
    _block: tuple[int, np.ndarray] | None = None

    def read(self, z0: int, z1: int) -> np.ndarray:
        """Slices z0..z1-1 as a (z1 - z0, Y, X) array of `dtype` (native byte order)."""
        if not 0 <= z0 < z1 <= self.shape[0]:
            raise ValueError(f"slab {z0}:{z1} outside 0:{self.shape[0]}")
        depth = self.read_depth
        plane = math.prod(self.shape[1:]) * self.dtype.itemsize
        # Reading 1 slice of 64-deep chunks decodes each chunk 64 times; keeping the current chunk
        # row costs one row of memory and decodes each chunk once.
        if 1 < depth and depth * plane <= BLOCK_CACHE_BYTES and z0 // depth == (z1 - 1) // depth:
            b0 = z0 - z0 % depth
            if self._block is None or self._block[0] != b0:
                self._block = None  # free the old row before reading the next
                self._block = (b0, self._checked_read(b0, min(b0 + depth, self.shape[0])))
            return self._block[1][z0 - b0:z1 - b0].copy()
        return self._checked_read(z0, z1)

    def _checked_read(self, z0: int, z1: int) -> np.ndarray:
        try:
            data = np.asarray(self._read(z0, z1))
        except UserError:
            raise
        except Exception as exc:  # each library has its own errors for a damaged file or chunk
            which = f"slice {z0}" if z1 - z0 == 1 else f"slices {z0} to {z1 - 1}"
            raise UserError(f"{self.path}: cannot read {which}, damaged file? ({exc})") from None
        return data.reshape((z1 - z0, *self.shape[1:])).astype(self.dtype, copy=False)

    def _read(self, z0: int, z1: int) -> np.ndarray:
        raise NotImplementedError

    def slice_name(self, z: int) -> str:
        return f"{self.path} slice {z}"

    def record(self) -> dict:
        """What convert records about the source as provenance."""
        out = {"path": str(self.root.resolve()), "format": self.format}
        if self.inner:
            out["inner"] = self.inner
        if self.files:
            out["sha256"] = sha256_files(self.files)
            out["files"] = [f.name for f in self.files]
        if self.voxel_size:
            out["voxel_size_nm"] = list(self.voxel_size)
        if self.offset:
            out["offset_nm"] = list(self.offset)
        return out

    def close(self) -> None:
        self._block = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class ArraySource(Source):
    """A source over an n-D array object (h5py, zarr, tensorstore) read by numpy-style indexing.

    Leading axes of length 1 (OME's t and c, a channel of one) are indexed away; a 2D array is a
    single slice.
    """

    def _set_array(self, array, shape, dtype, chunks=None) -> None:
        dtype = np.dtype(dtype)
        if dtype.kind not in "biuf":
            raise UserError(f"{self.path}: an array of type {dtype}; expected numbers (integers or floats)")
        shape = tuple(int(n) for n in shape)
        self._lead = 0
        while len(shape) - self._lead > 3 and shape[self._lead] == 1:
            self._lead += 1
        zyx = shape[self._lead:]
        if len(zyx) not in (2, 3):
            raise UserError(f"{self.path}: an array of shape {shape}; expected a 3D (z, y, x) volume "
                            "or a 2D image")
        self._array, self._flat = array, len(zyx) == 2
        self.shape = (1, *zyx) if self._flat else zyx
        self.dtype = dtype.newbyteorder("=")  # N5 and some HDF5 files are big-endian
        if min(self.shape) == 0:
            raise UserError(f"{self.path}: empty volume (shape {self.shape})")
        if chunks and not self._flat:
            self.read_depth = max(1, int(chunks[self._lead]))

    def _read(self, z0, z1):
        index = (0,) * self._lead + ((slice(None), slice(None)) if self._flat else (slice(z0, z1),))
        return self._fetch(index)

    def _fetch(self, index) -> np.ndarray:
        return np.asarray(self._array[index])


def to_nm(values, unit) -> tuple[float, ...] | None:
    """`values` in `unit` as nanometres; None when the unit is unknown or a value is not positive."""
    factor = nm_per(unit)
    if factor is None:
        return None
    try:
        return positive_floats([float(v) * factor for v in values], n=len(values))
    except (TypeError, ValueError):
        return None


def positive_floats(values, n: int = 3) -> tuple[float, ...] | None:
    """n finite positive numbers as floats, or None (a placeholder such as 0 or 1 pixel is not a size)."""
    out = finite_floats(values, n)
    return out if out is not None and all(v > 0 for v in out) else None


def finite_floats(values, n: int = 3) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def find_arrays(root: Path, is_array, limit: int = 200) -> list[str]:
    """Paths (relative to root) of the arrays in a container folder, for "what is there" messages.

    Does not descend into arrays (their chunk folders can be millions) and stops after `limit`.
    """
    found: list[str] = []
    for folder, dirs, _ in os.walk(root):
        here = Path(folder)
        if here != root and is_array(here):
            found.append(here.relative_to(root).as_posix())
            dirs.clear()
            if len(found) >= limit:
                break
        dirs.sort(key=natural_key)
    return sorted(found, key=natural_key)


def read_json(path: Path) -> dict:
    """A metadata JSON file as a dict; {} when absent, a UserError when damaged."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def listing(names, limit: int = 8) -> str:
    """'a, b, c' with at most `limit` names, for 'what is there' in an error message."""
    names = list(names)
    if not names:
        return "none"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_readable(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def natural_key(name: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower()) for t in re.split(r"(\d+)", name)]


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
