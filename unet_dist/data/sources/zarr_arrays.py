"""Zarr v2 and v3 arrays and OME-Zarr images, read with zarr-python.

An OME-Zarr image group (0.4: zarr v2 `.zattrs` `multiscales`; 0.5: zarr v3 `attributes.ome.
multiscales`) stands for its level 0; a level named by path (`img.zarr:1`, `seg.zarr:labels/
neurons/0`) is that level. The voxel size and offset come from the coordinate transformations of
the multiscale that lists the array, in the axes' units; an array no multiscale lists has the
`resolution` (z, y, x nm) and `offset` attributes of CREMI's HDF5 convention when it carries them
(a Zarr copy of a CREMI file), else none.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import zarr
from zarr.storage import LocalStore

from unet_dist.errors import UserError

from unet_dist.data.ome_metadata import Multiscale, multiscales
from unet_dist.data.sources.base import ArraySource, finite_floats, find_arrays, listing, positive_floats, read_json


def _is_array(folder: Path) -> bool:
    return (folder / ".zarray").is_file() or read_json(folder / "zarr.json").get("node_type") == "array"


def _attrs(folder: Path) -> dict:
    v3 = read_json(folder / "zarr.json")
    return v3.get("attributes", {}) if v3 else read_json(folder / ".zattrs")


def _multiscales(folder: Path) -> list[Multiscale]:
    return multiscales(_attrs(folder))


class ZarrSource(ArraySource):
    format = "zarr"

    def __init__(self, root: Path, inner: str | None):
        self.root, self.inner = root, inner or None
        self.path = f"{root}:{inner}" if inner else str(root)
        arrays = lambda: find_arrays(root, _is_array)  # noqa: E731
        folder = root / inner if inner else root
        if not any((folder / n).is_file() for n in ("zarr.json", ".zarray", ".zgroup")):
            raise UserError(f"{self.path}: no '{inner}' in the store (arrays: {listing(arrays())})")
        if not _is_array(folder):
            folder = self._pick_array(folder, arrays)
        try:
            array = zarr.open_array(store=LocalStore(root, read_only=True), path=self.inner or "", mode="r")
        except Exception as exc:
            raise UserError(f"{self.path}: not a readable Zarr array ({exc})") from None
        self.format = f"zarr v{array.metadata.zarr_format}"
        self._set_array(array, array.shape, array.dtype, array.chunks)
        self._ome_transform(folder)
        if self.voxel_size is None:  # no OME metadata: a Zarr copy of CREMI's HDF5 keeps its attributes
            attrs = _attrs(folder)
            self.voxel_size = positive_floats(attrs.get("resolution", ()))
            self.offset = finite_floats(attrs.get("offset", ())) if self.voxel_size else self.offset

    def _pick_array(self, group: Path, arrays) -> Path:
        """A group means its OME level 0, or the only array in the store."""
        listed = _multiscales(group)
        if listed:
            rel = (group / listed[0].levels[0].path).relative_to(self.root).as_posix()
        else:
            inside = [a for a in arrays() if not self.inner or a.startswith(self.inner.rstrip("/") + "/")]
            if len(inside) != 1:
                raise UserError(f"{self.path}: a group holding {len(inside)} arrays; name one as "
                                f"{self.root}:INNER ({listing(inside)})")
            rel = inside[0]
        self.inner = rel
        self.path = f"{self.root}:{rel}"
        if not _is_array(self.root / rel):
            raise UserError(f"{self.path}: listed in the OME metadata, but no array is there")
        return self.root / rel

    def _ome_transform(self, folder: Path) -> None:
        """Voxel size and offset from the multiscale (in this folder's ancestors) that lists it."""
        for ancestor in (folder, *folder.parents):
            rel = PurePosixPath(folder.relative_to(ancestor).as_posix())
            for multiscale in _multiscales(ancestor):
                for index, level in enumerate(multiscale.levels):
                    if PurePosixPath(level.path) == rel:
                        self.voxel_size = multiscale.voxel_size(index)
                        self.offset = multiscale.offset(index)
                        return
            if ancestor == self.root:
                return
