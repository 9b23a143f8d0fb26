"""`evaluate --seg`: a label image of neurons (`segment`'s `labels/neurons`) scored against a
store's `labels/neuron_ids`, slab by slab, over ranks.

Each rank builds the contingency table of its slabs (round-robin, one slab of the segmentation's
chunk depth at a time: memory is a slab plus the table, never the volume); the tables are gathered
and merged on every rank (`reduce_table`), and the scores are computed once from the merged table
(evaluate/instance_metrics.py), so N ranks report bit for bit what one does. Voxels of true ID 0
and of the store's `labels/ignore` are in no score.
"""

from __future__ import annotations

import numpy as np

from unet_dist import dist
from unet_dist.data import volumes
from unet_dist.data.damaged_chunks import read_region
from unet_dist.data.instances import IDS
from unet_dist.data.store import IGNORE, label_names, label_path, slices_within
from unet_dist.errors import UserError
from unet_dist.evaluate.instance_metrics import FRACTION, Table, contingency, merge_tables, scores
from unet_dist.files import write_json_atomic
from unet_dist.monitor.progress import Progress
from unet_dist.predict.prediction_store import NEURONS, open_prediction



def reduce_table(table: Table, patient: bool = False) -> Table:
    """Every rank's table merged, on every rank (a no-op without a process group)."""
    parts = [dist.all_gather_arrays(getattr(table, f), patient) for f in ("true", "pred", "count")]
    return merge_tables(*(Table(t, p, c) for t, p, c in zip(*parts)))


def _id_array(store, name: str, what: str):
    array, path = volumes.open_array(store, volumes.label_array_path(name), what)
    volumes.check_volume(array, f"{store}:{path}")
    if np.dtype(array.dtype).kind not in "biu":
        raise UserError(f"{store}:{path}: {what} of type {array.dtype}; expected integer IDs")
    return array, path


def _open(seg_spec, labels_spec):
    """(segmentation, its path, its first slice in the labels' numbering, true IDs, ignore or None)."""
    seg_store, seg_name = volumes.split_store_spec(seg_spec, NEURONS)
    _, z0 = open_prediction(seg_store, arrays=(), target=None)  # neurons of either target's prediction
    if seg_name == NEURONS and NEURONS not in label_names(volumes.open_group(seg_store)):
        raise UserError(f"{seg_store}: no label image '{NEURONS}' (run unet-dist segment --pred {seg_store} first, "
                        "or name the array: --seg STORE:ARRAY)")
    seg, seg_path = _id_array(seg_store, seg_name, "segmentation")
    store, ids_name = volumes.split_store_spec(labels_spec, IDS)
    if ids_name == IDS and IDS not in label_names(volumes.open_group(store)):
        raise UserError(f"{store}: no label image '{IDS}' (the true neuron IDs; unet-dist convert --instances "
                        "keeps them)")
    ids, _ = _id_array(store, ids_name, "neuron IDs")
    ignore, _ = volumes.open_ignore(store, IGNORE, ids.shape)
    depth = seg.shape[0]
    if tuple(seg.shape[1:]) != tuple(ids.shape[1:]) or z0 + depth > ids.shape[0]:
        raise UserError(f"{labels_spec}: neuron IDs {tuple(ids.shape)} do not cover the segmentation "
                        f"{tuple(seg.shape)} of slices {z0}:{z0 + depth} ({seg_store}:{seg_path})")
    return seg, f"{seg_store}:{seg_path}", z0, ids, ignore


SORT_VOXELS = 1 << 24  # voxels per sort: the sort's index arrays stay ~0.5 GB on a wide slab


def slab_table(seg, ids, ignore, z: int, z1: int, z0: int) -> Table:
    """The table of slices z:z1 (labels' numbering) of a segmentation starting at slice z0."""
    box = (slice(z, z1),)
    true, pred = read_region(ids, box), read_region(seg, (slice(z - z0, z1 - z0),))
    mask = None if ignore is None else read_region(ignore, box)
    per = max(1, SORT_VOXELS // max(1, true[0].size))
    return merge_tables(*(contingency(true[i:i + per], pred[i:i + per], None if mask is None else mask[i:i + per])
                          for i in range(0, len(true), per)))


def evaluate_segmentation(seg_spec, labels_spec, slices=None, json_out=None,
                          fraction: float = FRACTION) -> dict | None:
    """Metrics of the segmentation `seg_spec` (PRED.zarr[:ARRAY]) against `labels_spec`'s neuron IDs
    over `slices` (labels' numbering); rank 0 returns them, other ranks None."""
    if not 0 < fraction <= 1:
        raise UserError(f"--overlap-fraction {fraction}: must lie in (0, 1]")
    seg, seg_where, z0, ids, ignore = _open(seg_spec, labels_spec)
    lo, hi = slices_within(slices, seg.shape[0], seg_where, z0)
    step = max(1, int(seg.chunks[0]))
    env = dist.detect_env()
    with dist.process_group(env, dist.choose_device("cpu", env.local_rank)):
        starts = range(lo, hi, step)
        mine = starts[dist.rank()::dist.world_size()]
        progress = Progress("evaluate", len(mine), "slabs") if dist.is_main() else None
        table = Table.empty()
        for done, z in enumerate(mine, 1):
            table = merge_tables(table, slab_table(seg, ids, ignore, z, min(z + step, hi), z0))
            if progress is not None:
                progress.update(done)
        table = reduce_table(table)
        if not dist.is_main():
            return None
    if not len(table):
        raise UserError(f"{labels_spec}: no voxel to score in slices {lo}:{hi} (every true ID is 0 or ignored)")
    result = {**scores(table, fraction), **({"ignored": label_path(IGNORE)} if ignore is not None else {}),
              "slices": [lo, hi], "n_slices": hi - lo, "seg": seg_where, "labels": str(labels_spec)}
    if json_out:
        write_json_atomic(json_out, result)
    return result

