"""N5 containers and neuroglancer precomputed volumes (local folders), read with tensorstore.

Both list axes x, y, z (fastest first) in their metadata, and tensorstore keeps that order, so the
arrays are transposed to (z, y, x) here, and their resolutions reversed.
- N5: a dataset's `resolution` (nm) or `pixelResolution` ({"dimensions", "unit"}) attribute, else
  its groups' (n5-viewer puts it on the multiscale group, times each level's
  `downsamplingFactors`). BigDataViewer keeps its voxel size in the XML beside the N5, not in it.
- precomputed: the scale's `resolution` (nm) and `voxel_offset` in the `info` file.
"""

from __future__ import annotations

import math
from pathlib import Path

import tensorstore as ts

from unet_dist.errors import UserError

from unet_dist.data.sources.base import ArraySource, find_arrays, listing, natural_key, positive_floats, read_json, to_nm


class TensorstoreSource(ArraySource):
    def _open(self, spec: dict):
        try:
            return ts.open(spec, read=True).result()
        except Exception as exc:
            raise UserError(f"{self.path}: not a readable {self.format} volume ({exc})") from None

    def _fetch(self, index):
        return self._array[index].read().result()


def _n5_is_dataset(folder: Path) -> bool:
    return "dimensions" in read_json(folder / "attributes.json")


class N5Source(TensorstoreSource):
    format = "n5"

    def __init__(self, root: Path, inner: str | None):
        self.root, self.inner = root, inner or None
        self.path = f"{root}:{inner}" if inner else str(root)
        folder = root / inner if inner else root
        if not (folder / "attributes.json").is_file():
            raise UserError(f"{self.path}: no '{inner}' in the N5 container "
                            f"(datasets: {listing(find_arrays(root, _n5_is_dataset))})")
        if not _n5_is_dataset(folder):
            folder = self._pick_dataset(folder)
        store = self._open({"driver": "n5", "kvstore": {"driver": "file", "path": str(folder)}})
        view = store.T  # x, y, z -> z, y, x
        chunks = tuple(reversed(store.chunk_layout.read_chunk.shape))
        self._set_array(view, view.shape, store.dtype.numpy_dtype, chunks)
        self.voxel_size = self._resolution(folder)

    def _pick_dataset(self, group: Path) -> Path:
        """A group means its level s0 (n5-viewer, BigDataViewer), or its only dataset."""
        inside = find_arrays(group, _n5_is_dataset)
        if "s0" not in inside and len(inside) != 1:
            raise UserError(f"{self.path}: a group holding {len(inside)} datasets; name one as "
                            f"{self.root}:INNER ({listing(inside)})")
        folder = group / ("s0" if "s0" in inside else inside[0])
        self.inner = folder.relative_to(self.root).as_posix()
        self.path = f"{self.root}:{self.inner}"
        return folder

    def _resolution(self, folder: Path):
        attrs = read_json(folder / "attributes.json")
        factors = attrs.get("downsamplingFactors") or [1, 1, 1]
        for ancestor in (folder, *folder.parents):
            found = _n5_resolution(read_json(ancestor / "attributes.json"))
            if found is not None:
                if ancestor != folder:  # the group's resolution is level 0's
                    found = [r * f for r, f in zip(found, factors)]
                return positive_floats(reversed(found))
            if ancestor == self.root:
                return None
        return None


def _n5_resolution(attrs: dict) -> list[float] | None:
    """x, y, z in nm from `pixelResolution` ({"dimensions", "unit"} or a list) or `resolution`."""
    value, unit = attrs.get("pixelResolution"), "nm"
    if isinstance(value, dict):
        value, unit = value.get("dimensions"), value.get("unit", "nm")
    if value is None:
        value = attrs.get("resolution")
    if not isinstance(value, list) or len(value) != 3:
        return None
    nm = to_nm(value, unit)
    return list(nm) if nm else None


class PrecomputedSource(TensorstoreSource):
    format = "neuroglancer precomputed"

    def __init__(self, root: Path, inner: str | None):
        self.root, self.inner = root, inner or None
        self.path = f"{root}:{inner}" if inner else str(root)
        info = read_json(root / "info")
        scales = info.get("scales") or []
        keys = [str(s.get("key")) for s in scales]
        if inner and inner not in keys:
            raise UserError(f"{self.path}: no scale '{inner}' in {root / 'info'} "
                            f"(scales: {listing(sorted(keys, key=natural_key))})")
        index = keys.index(inner) if inner else 0
        if not inner:
            self.inner, self.path = keys[0], f"{root}:{keys[0]}"
        if info.get("num_channels", 1) != 1:
            raise UserError(f"{self.path}: {info['num_channels']} channels; expected one (grayscale)")
        store = self._open({"driver": "neuroglancer_precomputed",
                            "kvstore": {"driver": "file", "path": str(root)}, "scale_index": index})
        # Domain x, y, z, channel, starting at voxel_offset: drop the channel, start at 0, reverse.
        view = store[ts.d["channel"][0]][ts.d[:].translate_to[0]].T
        scale = scales[index]
        chunk_x_y_z = (scale.get("chunk_sizes") or [[1, 1, 1]])[0]
        self._set_array(view, view.shape, store.dtype.numpy_dtype, tuple(reversed(chunk_x_y_z)))
        resolution = positive_floats(scale.get("resolution", ()))
        if resolution:
            self.voxel_size = tuple(reversed(resolution))
            offset = scale.get("voxel_offset") or [0, 0, 0]
            self.offset = tuple(float(o) * r for o, r in zip(reversed(offset), self.voxel_size))
        if not all(math.isfinite(o) for o in (self.offset or ())):
            self.offset = None
