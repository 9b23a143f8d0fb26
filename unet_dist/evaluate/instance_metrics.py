"""Instance segmentation metrics (neurons) from a sparse contingency table; pure numpy.

The table holds, for every pair (true ID, predicted ID) that meets on a scored voxel, its voxel
count. Scored voxels: true ID != 0 and not in the ignore mask, as scikit-image's
``ignore_labels=(0,)``, gala and the SNEMI3D / CREMI scripts leave out the boundary layer. A
predicted ID of 0 is one segment like any other (scikit-image and CREMI count it so), but it is
in no split or merge count: it means "no neuron here".

Tables are reducible exactly: pairs are integers and their counts add up, so tables of slabs,
blocks or ranks are merged by summing counts per pair (`merge_tables`), kept sorted by
(true, pred). Scores are computed once from the merged table, and every sum in them is
`math.fsum` (correctly rounded, so independent of order): any split of a volume into pieces gives
the same floats.

Definitions (n scored voxels; c_ij pair counts; a_i = sum_j c_ij true sizes; b_j predicted sizes):

* VOI split = H(pred | true) = (sum_ij c log c - sum_i a log a) / -n, merge = H(true | pred)
  likewise with b; logarithms base 2, as scikit-image's ``variation_of_information`` and the CREMI
  / gala code (whose ``xlogx`` is ``x log2 x``). skimage returns them in this order (split, merge).
* Adapted Rand error (SNEMI3D, CREMI, scikit-image ``adapted_rand_error`` with alpha 0.5): over
  pairs of distinct voxels, S = sum c(c-1), A = sum a(a-1), B = sum b(b-1); precision S / B,
  recall S / A, error = 1 - F = 1 - 2S / (A + B). With A + B = 0 (every segment one voxel on both
  sides: the same partition) the error is 0.
* CREMI score = sqrt(VOI * adapted Rand error), the challenge's ranking (geometric mean).
* A predicted segment j != 0 *covers* neuron i when c_ij >= f a_i (f = `fraction`, default 0.05).
  A neuron is split when more than one segment covers it; a segment is a merge when it covers more
  than one neuron. Small pieces (< f of a neuron) count in VOI and Rand only.

Besides: `neurons` (true IDs scored), `segments` (predicted IDs != 0 on scored voxels), `voxels`
(n), `unsegmented_voxels` (scored voxels predicted 0). scikit-image names S / A "precision" and
S / B "recall"; here, as in CREMI's code, precision is S / B (pairs joined by the prediction that
are truly joined). CREMI's own script counts a predicted 0 as single voxels and pairs with
themselves (sums of c^2, not c(c-1)): the two differ by about n / sum a^2, one over a mean neuron
size (measured 4e-9 on the 1 Mvox flyem-fib volume, 87 neurons, with one merge).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FRACTION = 0.05  # the default share of a neuron a segment must hold to count in split / merge
LOG_BASE = 2


@dataclass(frozen=True)
class Table:
    """Pairs (true ID, predicted ID) as uint64, sorted by (true, pred), unique; int64 voxel counts."""

    true: np.ndarray
    pred: np.ndarray
    count: np.ndarray

    @classmethod
    def empty(cls) -> "Table":
        return cls(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64))

    def __len__(self) -> int:
        return int(self.count.size)


def _as_ids(values) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    if values.dtype.kind not in "biu":
        raise ValueError(f"label IDs must be integers, got {values.dtype}")
    return values.astype(np.uint64, copy=False)


def _reduce(true: np.ndarray, pred: np.ndarray, count: np.ndarray | None = None) -> Table:
    """Pairs summed: one entry per distinct (true, pred), sorted; `count` None: one per voxel."""
    if true.size == 0:
        return Table.empty()
    order = np.lexsort((pred, true))
    true, pred = true[order], pred[order]
    starts = np.flatnonzero(np.r_[True, (true[1:] != true[:-1]) | (pred[1:] != pred[:-1])])
    counts = np.diff(np.r_[starts, true.size]) if count is None else np.add.reduceat(count[order], starts)
    return Table(true[starts], pred[starts], counts.astype(np.int64))


def contingency(true_ids, pred_ids, ignore=None) -> Table:
    """The table of two label volumes of one shape; voxels of true ID 0, or where `ignore` is
    non-zero (unlabelled), are left out."""
    true, pred = _as_ids(true_ids), _as_ids(pred_ids)
    if true.size != pred.size or np.shape(true_ids) != np.shape(pred_ids):
        raise ValueError(f"true IDs {np.shape(true_ids)} and predicted IDs {np.shape(pred_ids)} differ in shape")
    keep = true != 0
    if ignore is not None:
        if np.shape(ignore) != np.shape(true_ids):
            raise ValueError(f"ignore mask {np.shape(ignore)} and IDs {np.shape(true_ids)} differ in shape")
        keep &= np.asarray(ignore).reshape(-1) == 0
    return _reduce(true[keep], pred[keep])


def merge_tables(*tables: Table) -> Table:
    """One table from several (slabs, blocks, ranks): counts summed per pair."""
    tables = [t for t in tables if len(t)]
    if not tables:
        return Table.empty()
    if len(tables) == 1:
        return tables[0]
    return _reduce(*(np.concatenate([getattr(t, f) for t in tables]) for f in ("true", "pred", "count")))


def _sizes(ids: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Summed counts per distinct ID (any order of `ids`)."""
    _, inverse = np.unique(ids, return_inverse=True)
    return np.bincount(inverse.reshape(-1), weights=count).astype(np.int64) if ids.size else np.zeros(0, np.int64)


def _sum_xlogx(counts: np.ndarray) -> float:
    x = counts[counts > 0].astype(np.float64)
    return math.fsum(x * np.log2(x))


def _sum_pairs(counts: np.ndarray) -> float:
    x = counts.astype(np.float64)
    return math.fsum(x * (x - 1))


def _covering(table: Table, fraction: float) -> tuple[int, int]:
    """(split neurons, merged segments): see the module's rule."""
    true_sizes = _sizes(table.true, table.count)
    _, first = np.unique(table.true, return_index=True)  # the table is sorted by true ID
    size_of_pair = np.repeat(true_sizes, np.diff(np.r_[first, len(table)]))
    covers = (table.pred != 0) & (table.count >= fraction * size_of_pair)
    per_true = np.unique(table.true[covers], return_counts=True)[1]
    per_pred = np.unique(table.pred[covers], return_counts=True)[1]
    return int(np.count_nonzero(per_true > 1)), int(np.count_nonzero(per_pred > 1))


def scores(table: Table, fraction: float = FRACTION) -> dict:
    """The metrics of a (merged) table; see the module docstring for each definition."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    n = int(table.count.sum())
    a, b = _sizes(table.true, table.count), _sizes(table.pred, table.count)
    split = merge = 0.0
    if n:
        joint = _sum_xlogx(table.count)
        split = max(0.0, (joint - _sum_xlogx(a)) / -n)  # H(pred | true) = H(true, pred) - H(true)
        merge = max(0.0, (joint - _sum_xlogx(b)) / -n)
    s, pairs_true, pairs_pred = _sum_pairs(table.count), _sum_pairs(a), _sum_pairs(b)
    error = 1.0 - 2 * s / (pairs_true + pairs_pred) if pairs_true + pairs_pred else 0.0
    split_neurons, merged = _covering(table, fraction)
    return {
        "voi_split": split, "voi_merge": merge, "voi": split + merge,
        "adapted_rand_error": error,
        "rand_precision": s / pairs_pred if pairs_pred else 1.0,
        "rand_recall": s / pairs_true if pairs_true else 1.0,
        "cremi_score": math.sqrt((split + merge) * error),
        "split_neurons": split_neurons, "merged_neurons": merged,
        "neurons": int(a.size), "segments": int(np.count_nonzero(np.unique(table.pred))),
        "voxels": n, "unsegmented_voxels": int(table.count[table.pred == 0].sum()),
        "log_base": LOG_BASE, "overlap_fraction": fraction, "split_merge_rule": rule(fraction),
    }


def rule(fraction: float = FRACTION) -> str:
    pct = f"{100 * fraction:g}%"
    return (f"a predicted segment (ID != 0) covers a neuron when it holds >= {pct} of the neuron's scored voxels; "
            "a neuron is split when more than one segment covers it, a segment is merged when it covers more "
            "than one neuron")


def segmentation_scores(true_ids, pred_ids, ignore=None, fraction: float = FRACTION) -> dict:
    """The metrics of two label volumes in memory (one process; ranks merge tables instead)."""
    return scores(contingency(true_ids, pred_ids, ignore), fraction)
