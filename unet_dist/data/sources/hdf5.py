"""HDF5 datasets (CREMI, SNEMI3D, ilastik exports), read with h5py.

The voxel size is the dataset's `resolution` attribute (z, y, x in nm) and the offset its `offset`
attribute (nm), CREMI's convention; a file without them has no voxel size.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from unet_dist.errors import UserError

from unet_dist.data.sources.base import ArraySource, finite_floats, listing, positive_floats


class Hdf5Source(ArraySource):
    format = "hdf5"

    def __init__(self, root: Path, inner: str | None):
        self.root, self.files = root, [root]
        self.path = f"{root}:{inner}" if inner else str(root)
        try:
            self._file = h5py.File(root, "r")
        except OSError as exc:
            raise UserError(f"{root}: not a readable HDF5 file ({exc})") from None
        try:
            self._open(inner)
        except BaseException:
            self._file.close()
            raise

    def _open(self, inner):
        datasets = _datasets(self._file)
        if not inner:
            if len(datasets) != 1:
                raise UserError(f"{self.root}: holds {len(datasets)} arrays; name one as "
                                f"{self.root}:INNER ({listing(datasets)})")
            inner = datasets[0]
            self.path = f"{self.root}:{inner}"
        self.inner = inner
        node = self._file.get(inner)
        if node is None:
            raise UserError(f"{self.path}: no '{inner}' in the file (arrays: {listing(datasets)})")
        if not isinstance(node, h5py.Dataset):
            inside = [d for d in datasets if d.startswith(node.name.strip("/") + "/")]
            raise UserError(f"{self.path}: a group, not an array (arrays in it: {listing(inside)})")
        self._set_array(node, node.shape, node.dtype, node.chunks)
        self.voxel_size = positive_floats(node.attrs.get("resolution", ()))
        self.offset = finite_floats(node.attrs.get("offset", ()))

    def close(self):
        super().close()
        self._file.close()


def _datasets(f: h5py.File) -> list[str]:
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names
