"""A prediction store for the ISBI challenge: its scores against labels, and the submission TIFF.

`evaluate`: Dice, pixel error and the ISBI 2012 V_rand / V_info.

Slices are spread round-robin over ranks. Dice and pixel error pool integer confusion counts (exact
under any reduction). The ISBI scores are means over slices of per-slice F-scores, so each rank fills
its rows of a (slices, thresholds, 2) table, zeros elsewhere, and the tables are summed across ranks:
adding zeros is exact, and rank 0 then sums the rows in slice order, so N ranks give bit for bit
what one process gives. Memory: one slice at a time.

`export_tiff`: the challenge's submission format, a multi-page float32 TIFF of probabilities.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from pathlib import Path

import numpy as np

from unet_dist import dist
from unet_dist.data.damaged_chunks import read_region
from unet_dist.data.instances import IDS
from unet_dist.data import volumes
from unet_dist.data.store import IGNORE, label_names, label_path, slices_within
from unet_dist.monitor.progress import Progress
from unet_dist.errors import UserError, writing
from unet_dist.metrics import (ISBI_THRESHOLDS, confusion_counts, isbi_scores_from_sums, isbi_segmentation_scores,
                               isbi_sums, scores_from_confusion)
from unet_dist.predict.prediction_store import MASK, NEURONS, NEURONS_PATH, PROBABILITY, open_prediction, probability_float
from unet_dist.files import write_json_atomic


def _open(pred, labels, slices):
    group, z0 = open_prediction(pred)
    # STORE[:LABEL]: a store made by another tool is read as it is (data/volumes.py); its unlabelled
    # voxels (labels/ignore, convert --ignore-*) count in no metric.
    store, label_arr, _, ignore = volumes.open_labels(labels)
    # Instance labels, when the store keeps them, are the true segments for V_rand / V_info.
    label_group = volumes.open_group(store)
    ids = label_group[label_path(IDS)] if IDS in label_names(label_group) else None
    if ids is not None and tuple(ids.shape) != tuple(label_arr.shape):
        raise UserError(f"{store}: {label_path(IDS)} {tuple(ids.shape)} and the labels "
                        f"{tuple(label_arr.shape)} differ in shape")
    prob, mask = group[PROBABILITY], group[MASK]
    depth = prob.shape[0]
    if tuple(label_arr.shape[1:]) != tuple(prob.shape[1:]) or z0 + depth > label_arr.shape[0]:
        raise UserError(f"{labels}: labels {tuple(label_arr.shape)} do not cover the prediction "
                        f"{tuple(prob.shape)} of slices {z0}:{z0 + depth} ({pred})")
    lo, hi = slices_within(slices, depth, str(pred), z0)
    # `segment`'s neurons, when the prediction has them: scored per slice by the same V_rand / V_info
    neurons = group[NEURONS_PATH] if NEURONS in label_names(group) else None
    return prob, mask, label_arr, ids, ignore, neurons, z0, (lo, hi)


def slice_scores(prob2d: np.ndarray, mask2d: np.ndarray, label2d: np.ndarray,
                 ids2d: np.ndarray | None = None, valid2d: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(confusion counts, per-threshold (V_rand, V_info)) of one slice; `ids2d`: the true segments;
    `valid2d`: the labelled voxels (None: all). Unlabelled voxels are in no confusion count and not in
    the true foreground of V_rand / V_info (the F-scores count pairs of foreground voxels only)."""
    if valid2d is not None:
        label2d = np.where(valid2d, label2d, 0)
    return (confusion_counts(mask2d, label2d, valid=valid2d),
            isbi_sums(prob2d, label2d, segments3d=ids2d)["sums"])


def _slice(array, z: int) -> np.ndarray:
    """Slice `z` of `array`; a damaged chunk (a flipped bit: its checksum) is one line naming its file."""
    return read_region(array, (slice(z, z + 1),))[0]


def _neuron_scores(neurons, z: int, z0: int, label_arr, ids, ignore) -> tuple[float, float]:
    label = _slice(label_arr, z)
    if ignore is not None:
        label = np.where(_slice(ignore, z) == 0, label, 0)
    return isbi_segmentation_scores(_slice(neurons, z - z0), label, None if ids is None else _slice(ids, z))


def evaluate(pred, labels, slices=None, json_out=None) -> dict | None:
    """Metrics of `pred` over the slices (labels' numbering); rank 0 returns them, others None."""
    prob, mask, label_arr, ids, ignore, neurons, z0, (lo, hi) = _open(pred, labels, slices)
    env = dist.detect_env()
    with dist.process_group(env, dist.choose_device("cpu", env.local_rank)):
        counts = np.zeros(4, np.int64)
        table = np.zeros((hi - lo, len(ISBI_THRESHOLDS), 2), np.float64)
        segmented = np.zeros((hi - lo, 2), np.float64)  # (V_rand, V_info) of the neurons per slice
        mine = range(lo + dist.rank(), hi, dist.world_size())
        progress = Progress("evaluate", len(mine), "slices") if dist.is_main() else None
        for done, z in enumerate(mine, 1):
            c, table[z - lo] = slice_scores(probability_float(_slice(prob, z - z0)), _slice(mask, z - z0),
                                            _slice(label_arr, z), None if ids is None else _slice(ids, z),
                                            None if ignore is None else _slice(ignore, z) == 0)
            counts += c
            if neurons is not None:
                segmented[z - lo] = _neuron_scores(neurons, z, z0, label_arr, ids, ignore)
            if progress is not None:
                progress.update(done)
        counts, table, segmented = (dist.all_reduce_sum(a) for a in (counts, table, segmented))
        if not dist.is_main():
            return None
    sums = np.zeros(table.shape[1:], np.float64)
    for row in table:  # slice order, as one process adds them up
        sums += row
    result = {**scores_from_confusion(counts), **isbi_scores_from_sums(sums, hi - lo),
              **({"v_rand_neurons": math.fsum(segmented[:, 0]) / (hi - lo),
                  "v_info_neurons": math.fsum(segmented[:, 1]) / (hi - lo)} if neurons is not None else {}),
              "segments": "neuron_ids" if ids is not None else "binary target",
              **({"ignored": label_path(IGNORE)} if ignore is not None else {}),
              "slices": [lo, hi], "n_slices": hi - lo, "pred": str(Path(pred)), "labels": str(labels)}
    if json_out:
        write_json_atomic(json_out, result)
    return result


def export_tiff(pred, out, array: str = "probability", slices=None, overwrite: bool = False) -> dict:
    """A multi-page TIFF, one page per slice: float32 probabilities of neuron interior (the ISBI
    submission format), or the mask as uint8 0/255. Written slice by slice, then renamed into place."""
    import tifffile

    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
    path = PROBABILITY if array == "probability" else MASK
    group, z0 = open_prediction(pred, arrays=(path,))
    arr = group[path]
    lo, hi = (z - z0 for z in slices_within(slices, arr.shape[0], str(pred), z0))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    dtype = np.float32 if array == "probability" else np.uint8
    big = (hi - lo) * arr.shape[1] * arr.shape[2] * np.dtype(dtype).itemsize > 2**31
    try:
        # a full disk: one line, no partial file
        with writing(out), io.BufferedWriter(_FileWithoutFd(tmp, "wb")) as file, \
                tifffile.TiffWriter(file, bigtiff=big) as tif:
            progress = Progress("export", hi - lo, "slices")
            for z in range(lo, hi):
                progress.update(z - lo)
                page = np.asarray(arr[z])
                page = probability_float(page) if array == "probability" else (page > 0).astype(np.uint8) * 255
                tif.write(page, contiguous=True, photometric="minisblack")
            progress.update(hi - lo)
        with writing(out):
            os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this
            tmp.unlink(missing_ok=True)
        raise
    return {"out": str(out), "array": array, "slices": [z0 + lo, z0 + hi], "dtype": np.dtype(dtype).name}


class _FileWithoutFd(io.FileIO):
    """A file tifffile writes through Python's `write`: on a real file it uses numpy's `tofile`, whose
    full disk is an OSError without errno (`12000 requested and 4028 written`), not ENOSPC."""

    def fileno(self):
        raise io.UnsupportedOperation("fileno")
