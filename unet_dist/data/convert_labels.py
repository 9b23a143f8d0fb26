"""The label side of `convert`: binary labels mapped to the target, object IDs and the target their
boundaries give, and the unlabelled voxels (`--ignore-id`, `--ignore-value`, `--ignore-mask`).

Checks and mapping go slice by slice: their boolean temporaries then cost O(slice), not O(slab).
"""

from __future__ import annotations

import sys

import numpy as np

from unet_dist.data.instances import Rule, check_ids_dtype, looks_like_ids, target_of_slab
from unet_dist.data.sources import Source, open_source
from unet_dist.errors import UserError


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


class ConvertLabels:
    """The labels of one conversion: opens and checks their sources, gives each slab's label arrays.

    The sources it opens are appended to `sources`, so the caller closes them whatever happens.
    """

    def __init__(self, raw_src: Source, sources: list[Source], labels, instances: Rule | None,
                 threshold: float | None, invert: bool, ignore_id: int | None, ignore_value: float | None,
                 ignore_mask):
        self.instances, self.threshold, self.invert = instances, threshold, invert
        self.ignore_id, self.ignore_value, self.ignore_mask = ignore_id, ignore_value, ignore_mask
        self.with_ignore = ignore_id is not None or ignore_value is not None or ignore_mask is not None
        self.src = self.mask_src = self.mapper = self.ids_dtype = None
        self.ones = self.ignored = 0
        if ignore_mask is not None:
            self.mask_src = _open_like(ignore_mask, raw_src, sources, "the ignore mask has")
        if labels is None:
            return
        self.src = _open_like(labels, raw_src, sources, "labels have")
        if instances is None:
            self.mapper = LabelMapper(self.src, threshold, invert, ignore_value)
            return
        self.ids_dtype = check_ids_dtype(self.src.dtype, self.src.path)
        if ignore_id is not None and not _representable(ignore_id, self.ids_dtype):
            raise UserError(f"--ignore-id {ignore_id}: not a value of {self.src.path}'s IDs ({self.ids_dtype})")

    def dtypes(self) -> dict:
        """The label arrays written, by slab key."""
        dtypes = {"labels": np.uint8} if self.src is not None else {}
        if self.instances is not None:
            dtypes["ids"] = self.ids_dtype
        if self.with_ignore:
            dtypes["ignore"] = np.uint8
        return dtypes

    def _unlabelled(self, ids, a, b):
        """Instance labels' unlabelled voxels in slices a..b: the ignore ID's and the mask's."""
        out = np.zeros(ids.shape, bool) if self.ignore_id is None else ids == self.ignore_id
        if self.mask_src is not None:
            out |= self.mask_src.read(a, b) != 0
        return out

    def read(self, z0: int, z1: int, depth: int, shape) -> dict:
        """Slices z0..z1's label arrays (of `shape`): target, IDs and unlabelled voxels, as converted."""
        slab, skip = {}, None
        if self.instances is not None:  # IDs of the slab plus the rule's halo, the target cropped to the slab
            slab["ids"], slab["labels"] = target_of_slab(self.src.read, z0, z1, depth, self.instances, self.src.path,
                                                         self._unlabelled if self.with_ignore else None)
            if self.with_ignore:
                skip = self._unlabelled(slab["ids"], z0, z1).view(np.uint8)
        elif self.src is not None:
            slab["labels"], skip = self.mapper(self.src.read(z0, z1), z0)
        if self.with_ignore:
            if skip is None:
                skip = np.zeros(shape, np.uint8)
            if self.mask_src is not None and self.instances is None:
                skip |= (self.mask_src.read(z0, z1) != 0).view(np.uint8)
            slab["labels"] = np.where(skip != 0, np.uint8(0), slab["labels"])  # ignored voxels hold 0
            slab["ignore"] = skip
            self.ignored += int(np.count_nonzero(skip))
        if self.src is not None:
            self.ones += int(np.count_nonzero(slab["labels"]))
        return slab

    def source_records(self) -> dict:
        """Provenance of the label sources, by role."""
        records = {"labels": self.src.record()} if self.src is not None else {}
        if self.mask_src is not None:
            records["ignore"] = self.mask_src.record()
        return records

    def ignore_record(self) -> dict | None:
        """The `ignore` label image's attributes, or None without one."""
        if not self.with_ignore:
            return None
        record = {"meaning": "1 = unlabelled: never in a loss, a validation or an evaluation; the target holds 0 there"}
        if self.ignore_id is not None:
            record["ignore_id"] = int(self.ignore_id)
        if self.ignore_value is not None:
            record["ignore_value"] = float(self.ignore_value)
        if self.mask_src is not None:
            record["ignore_mask"] = str(self.mask_src.path)
        return record

    def summarize(self, summary: dict, voxels: int) -> None:
        """Add the unlabelled fraction to `summary`; warn when the --ignore-* options marked nothing."""
        if not self.with_ignore:
            return
        summary["ignored_fraction"] = self.ignored / max(1, voxels)
        if self.ignored == 0:  # e.g. --ignore-value 2.5 on integer labels, or the wrong --ignore-id
            flags = _ignore_flags(self.ignore_id, self.ignore_value, self.ignore_mask)
            print(f"warning: {' '.join(flags)} marked no voxel as unlabelled", file=sys.stderr, flush=True)


def _open_like(spec, raw_src: Source, sources: list[Source], what: str) -> Source:
    source = open_source(spec)
    sources.append(source)
    if source.shape != raw_src.shape:
        raise UserError(f"{source.path}: {what} shape {source.shape} but {raw_src.path} has {raw_src.shape}")
    return source


def _ignore_flags(ignore_id, ignore_value, ignore_mask) -> list[str]:
    return [flag for flag, v in (("--ignore-id", ignore_id), ("--ignore-value", ignore_value),
                                 ("--ignore-mask", ignore_mask)) if v is not None]


def check_label_options(labels, instances, label_threshold, invert, ignore_id, ignore_value, ignore_mask) -> None:
    """The --instances and --ignore-* combinations that make sense, before anything is read or written."""
    if instances is not None and (labels is None or label_threshold is not None or invert):
        raise UserError("--instances needs --labels (object IDs) and excludes --label-threshold and --invert")
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
