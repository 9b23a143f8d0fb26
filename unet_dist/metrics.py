"""Segmentation metrics as reducible counts, and scores computed once from the summed counts.

Pure numpy/scipy. Callers on several ranks all-reduce (sum) what these functions return and call
the ``*_from_*`` function once, so N ranks report what one process would.

* Pixel metrics (Dice per class, pixel error) pool a (tp, fp, fn, tn) confusion over all voxels.
* The ISBI 2012 challenge metrics (V_rand, V_info after border thinning) follow the official Fiji
  code, fiji/Trainable_Segmentation (read at commit 41c7083, 2024-09-27):
  ``metrics/RandError.java`` (R), ``metrics/VariationOfInformation.java`` (V),
  ``metrics/ClassificationStatistics.java`` (C), ``utils/WatershedTransform2D.java`` (W),
  ``utils/PixelRecord.java``, ``utils/Neighborhood2DC4.java``, as the challenge's script calls them:
  ``getMaximalVRandAfterThinning(0.0, 1.0, 0.1, true)`` / ``getMaximalVInfoAfterThinning(0.0, 1.0, 0.1)``.
  They are per-slice F-scores averaged over slices, so the reducible quantity is the per-threshold
  SUM of per-slice scores plus the slice count (R:396-420, V:974-999), not a pooled table.

How the Java is read here (line numbers of the files above):

1. Thresholds: ``for (th = 0.0; th <= 1.0; th += 0.1)`` in doubles (R:628, V:830) gives 11 values,
   the last 0.9999999999999999, so a probability of exactly 1.0 still counts as interior there.
2. Binarisation: pixel interior iff ``value > th`` (strict, R:1036-1041, V:1300-1304) on the image
   Fiji sees, ``convertToFloat()`` (R:390, V:979): probabilities are float32 compared as doubles.
   No 0-255 scaling: the script documents proposals in [0.0, 1.0]; values outside raise here.
   A 0/1 mask works too (every threshold then gives the same binarisation, Fiji's "binary proposal").
3. Ground truth: Java also thresholds the label image with ``> th``; for 0/1 (or 0/255) labels and
   th < 1 that is ``label > 0`` at every threshold, which is what is used. Segments are its
   4-connected components (``Utils.connectedComponents(.., 4)``, R:1045-1048).
4. Thinning: the proposal is inverted (interior 0, border 255) and flooded by W with 4-connectivity.
   On a two-level image W reduces to: basins = 4-connected interior components; the border is
   flooded breadth-first in FIFO order. Queue order matters (it decides which pixel of an even-width
   gap becomes the dam), so it is reproduced exactly: level-1 pixels in PixelRecord order (value,
   then creation order = x-major, y-minor scan, W:406-411 + PixelRecord.compareTo), later pixels in
   discovery order, neighbours visited (x-1,y), (x,y-1), (x+1,y), (x,y+1) (Neighborhood2DC4).
   When a pixel is dequeued (W:266-311) it takes the single basin label among its already-labelled
   neighbours; two different labels make it a dam (WSHED, 0); dam neighbours alone make it a dam.
   The global ``flag`` (W:286-301) only lets a pixel that became a dam through a dam neighbour take a
   label seen later, so the outcome is the same whatever the neighbour order: checked in the tests
   against a literal transcription of W. Same-level neighbours dequeued earlier count, later ones
   not: solved per BFS level by iterating to the fixed point of that dependency DAG (unique).
   With no interior at all W labels the whole (connected) image as one basin (W:313-357).
   ``convertToShortProcessor(false)`` (R:1051) clamps labels above 65535 to 65535: reproduced.
5. Counts over ground-truth interior only; proposal label 0 (dams) are singletons via the ``p_i0``
   terms (R:1880-1907, V:1378-1408). V_rand: tp = sum c_ij^2 + sum c_i0, fp = sum b_j^2 - sum c_ij^2,
   fn = sum a_i^2 - tp (N^2 normalisation, R:1914-1922); precision/recall are 1 when fp/fn are 0 and
   F is 0 when p + r = 0 (C:99-112). Computed here with exact integers instead of Java's doubles
   (differences ~1e-15). V_info: prec = I/H(A), rec = I/H(B) with H(A)=0 -> (0, 1), H(B)=0 -> (1, 0)
   (V:1410-1441); these degenerate cases are tested on exact integer conditions, where Java's float
   sums give ~1e-16 instead of 0 and an F-score of ~0 either way.
6. A slice without ground-truth interior (n = 0) scores 0 for both (Java: 0/0 NaNs that end in
   F = 0 via the ``> 0`` test of C:111 and the ``ha == 0`` branch of V:1429). If I = 0 exactly,
   Java's V_info is 0/0 = NaN, which would drop that threshold from the max; here it is 0.
7. Best threshold: strict ``>`` from a best score of 0 (R:2146-2152, V:721-727): the first maximum
   wins, a volume whose scores are all 0 reports 0 at the first threshold.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def java_thresholds(lo: float = 0.0, hi: float = 1.0, step: float = 0.1) -> tuple[float, ...]:
    """The values of Java's ``for (double th = lo; th <= hi; th += step)``, rounding included."""
    out, th = [], lo
    while th <= hi:
        out.append(th)
        th += step
    return tuple(out)


ISBI_THRESHOLDS = java_thresholds(0.0, 1.0, 0.1)  # 11 values, the last 0.9999999999999999

_FOUR = ndimage.generate_binary_structure(2, 1)
_MASK, _INQUEUE, _OUTSIDE = -2, -3, -4  # flooding states; basins > 0, dams (WSHED) = 0


# ---------------------------------------------------------------------------------------------
# Pixel metrics
# ---------------------------------------------------------------------------------------------

def confusion_counts(prob_or_mask, label, threshold: float = 0.5, valid=None) -> np.ndarray:
    """(tp, fp, fn, tn) as int64 for the neuron-interior class, any shape.

    A float array is a probability of interior (predicted where ``> threshold``); a bool or integer
    array is a mask (interior where ``== 1``). Label: 1 (any value > 0) = interior, 0 = membrane.
    ``valid`` (same shape, optional): only voxels where it is true (non-zero) are counted; the
    others (unlabelled, `labels/ignore`) count nowhere, whatever their label holds.
    """
    pred_in = np.asarray(prob_or_mask)
    label = np.asarray(label)
    if pred_in.shape != label.shape:
        raise ValueError(f"prediction shape {pred_in.shape} != label shape {label.shape}")
    pred = pred_in > threshold if np.issubdtype(pred_in.dtype, np.floating) else pred_in == 1
    true = label > 0
    total = true.size
    if valid is not None:
        valid = np.asarray(valid) != 0
        if valid.shape != label.shape:
            raise ValueError(f"valid shape {valid.shape} != label shape {label.shape}")
        pred &= valid
        true &= valid
        total = int(np.count_nonzero(valid))
    tp = np.count_nonzero(pred & true)
    fp = np.count_nonzero(pred) - tp
    fn = np.count_nonzero(true) - tp
    tn = total - tp - fp - fn
    return np.array([tp, fp, fn, tn], dtype=np.int64)


def scores_from_confusion(counts) -> dict:
    """Dice of each class and pixel error from summed (tp, fp, fn, tn).

    Dice is 1.0 for a class that is absent from both prediction and truth; pixel error is 0.0 on
    an empty volume.
    """
    tp, fp, fn, tn = (int(c) for c in np.asarray(counts, dtype=np.int64).reshape(4))
    total = tp + fp + fn + tn

    def dice(hit: int, wrong: int) -> float:
        return 1.0 if 2 * hit + wrong == 0 else 2 * hit / (2 * hit + wrong)

    return {"dice_neuron": dice(tp, fp + fn), "dice_membrane": dice(tn, fp + fn),
            "pixel_error": (fp + fn) / total if total else 0.0}


# ---------------------------------------------------------------------------------------------
# The ISBI 2012 metrics
# ---------------------------------------------------------------------------------------------

def _as_fiji_float(prob) -> np.ndarray:
    """The proposal as Fiji compares it: float32 values promoted to double (interpretation 2)."""
    arr = np.asarray(prob)
    p = arr.astype(np.float32).astype(np.float64)
    if p.size and (np.nanmin(p) < 0.0 or np.nanmax(p) > 1.0):
        raise ValueError("probabilities must lie in [0, 1] (divide 0-255 images by 255 first)")
    return p


def thin_by_watershed(interior) -> np.ndarray:
    """Labels of the binary proposal after WatershedTransform2D flooding (0 = one-pixel dams).

    ``interior`` is a 2D bool array (y, x). Returns int64 labels, same shape. See interpretation 4.
    """
    t = np.ascontiguousarray(np.asarray(interior, dtype=bool).T)  # t[x, y]: C order = Java's scan
    width, height = t.shape
    basins, n_basins = ndimage.label(t, structure=_FOUR)  # numbered in Java's creation order
    if n_basins == 0:
        return np.ones(t.T.shape, dtype=np.int64)  # one basin: the whole image (W:313-357)
    stride = height + 2
    state = np.full((width + 2, stride), _OUTSIDE, dtype=np.int64)
    state[1:-1, 1:-1] = np.where(t, basins, _MASK)
    touching = np.zeros(state.shape, dtype=bool)  # border pixels next to a basin: the first level
    touching[1:-1, 1:-1] = ndimage.binary_dilation(t, structure=_FOUR) & ~t
    level = np.flatnonzero(touching)  # flat order = PixelRecord order
    state = state.ravel()
    offsets = np.array([-stride, -1, stride, 1])  # (x-1,y), (x,y-1), (x+1,y), (x,y+1)
    pos = np.zeros(state.size, dtype=np.int64)  # queue position within the current level
    while level.size:
        n = level.size
        order = np.arange(n)
        state[level] = _INQUEUE
        pos[level] = order
        nbr = level[:, None] + offsets
        s = state[nbr]
        hi = np.where(s > 0, s, 0).max(axis=1)
        lo = np.where(s > 0, s, np.iinfo(np.int64).max).min(axis=1)
        clash = (hi > 0) & (lo != hi)  # two basins among the lower neighbours: a dam, whatever else
        label = np.where(clash, 0, hi)
        earlier = (s == _INQUEUE) & (pos[nbr] < order[:, None])  # same level, dequeued before
        rows = np.flatnonzero(earlier.any(axis=1) & ~clash)
        if rows.size:
            mask, own = earlier[rows], hi[rows, None]
            which = np.where(mask, pos[nbr[rows]], 0)  # stale positions elsewhere
            while True:  # fixed point of the "dequeued before" DAG: unique, reached in <= depth steps
                cand = np.concatenate([own, np.where(mask, label[which], 0)], axis=1)
                top = cand.max(axis=1)
                bottom = np.where(cand > 0, cand, np.iinfo(np.int64).max).min(axis=1)
                new = np.where((top > 0) & (bottom == top), top, 0)
                if np.array_equal(new, label[rows]):
                    break
                label[rows] = new
        state[level] = label
        found = nbr.ravel()  # discovery order: by dequeuing pixel, then by neighbour order
        found = found[state[found] == _MASK]
        _, first = np.unique(found, return_index=True)
        level = found[np.sort(first)]

    out = state.reshape(width + 2, stride)[1:-1, 1:-1].T
    return np.minimum(out, 65535)  # convertToShortProcessor(false) clamps (interpretation 4)


def _f_scores(gt: np.ndarray, seg: np.ndarray) -> tuple[float, float]:
    """(V_rand, V_info) of one slice from GT components ``gt`` (0 = membrane) and thinned ``seg``."""
    fg = gt > 0
    n = int(np.count_nonzero(fg))
    if n == 0:
        return 0.0, 0.0  # interpretation 6
    g, s = gt[fg].astype(np.int64), seg[fg].astype(np.int64)
    keys, c = np.unique(g * 65536 + s, return_counts=True)  # labels < 65536: GT rows x seg columns
    in_seg = (keys % 65536) > 0
    cij, singles = c[in_seg], int(c[~in_seg].sum())  # dam pixels inside GT: singletons
    a = np.bincount(g)[1:]
    a = a[a > 0]
    b = np.bincount(s)[1:]
    b = b[b > 0]

    # V_rand (R:1853-1926 with C:99-112), in exact integers
    sum_c2 = int((cij * cij).sum())
    tp = sum_c2 + singles
    fp = int((b * b).sum()) - sum_c2
    fn = int((a * a).sum()) - tp
    prec = 1.0 if fp == 0 else tp / (tp + fp)
    rec = 1.0 if fn == 0 else tp / (tp + fn)
    v_rand = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0

    # V_info (V:1329-1442); entropies in nats, p = count / n
    def plogp(counts):
        p = counts / n
        return float((p * np.log(p)).sum())

    singles_term = singles / n * np.log(n)
    sum_a = plogp(a)
    sum_b = plogp(b) - singles_term
    sum_ab = plogp(cij) - singles_term
    ha, hb = -sum_a, -sum_b
    info = ha - (sum_b - sum_ab)  # I(A;B) = H(A) - H(A|B)
    prec, rec = (info / ha if ha else 0.0), (info / hb if hb else 0.0)
    if a.size == 1:  # H(A) == 0
        prec, rec = 0.0, 1.0
    if (b.size == 1 and singles == 0) or n == 1:  # H(B) == 0
        prec, rec = 1.0, 0.0
    v_info = 2 * prec * rec / (prec + rec) if prec + rec != 0 else 0.0
    return v_rand, v_info


def ground_truth_segments(label2d, segments2d=None) -> np.ndarray:
    """Ground-truth segments of one slice, numbered 1.. (0 = membrane): the 4-connected components
    of the interior (interpretation 3), or, given instance IDs, the IDs restricted to the interior
    (so two touching neurons stay two segments even where the binary label does not separate them;
    an ID in several pieces stays one segment)."""
    interior = np.asarray(label2d) > 0
    if segments2d is None:
        return ndimage.label(interior, structure=_FOUR)[0]
    segments = np.asarray(segments2d)
    if segments.shape != interior.shape:
        raise ValueError(f"segments shape {segments.shape} != label shape {interior.shape}")
    gt = np.zeros(interior.shape, np.int64)
    _, inverse = np.unique(segments[interior], return_inverse=True)
    gt[interior] = inverse.reshape(-1) + 1  # consecutive: _f_scores packs labels below 65536
    return gt


def isbi_segmentation_scores(seg2d, label2d, segments2d=None) -> tuple[float, float]:
    """(V_rand, V_info) of one slice's segmentation (`segment`'s neuron IDs, 0 = no neuron) as the
    challenge scores a thinned threshold: the same F-scores, without a threshold to sweep."""
    seg = np.asarray(seg2d)
    _, inverse = np.unique(seg, return_inverse=True)
    consecutive = inverse.reshape(seg.shape).astype(np.int64) + (1 if seg.min(initial=1) > 0 else 0)
    return _f_scores(ground_truth_segments(label2d, segments2d), consecutive)


def isbi_slice_scores(prob2d, label2d, thresholds=ISBI_THRESHOLDS, segments2d=None) -> np.ndarray:
    """Per-threshold (V_rand, V_info) of one 2D slice, shape (len(thresholds), 2), float64.

    ``prob2d``: probability of neuron interior in [0, 1] (or a 0/1 mask); ``label2d``: 1 (> 0) =
    interior, 0 = membrane; ``segments2d``: instance IDs, when known (`ground_truth_segments`).
    """
    prob = _as_fiji_float(prob2d)
    label = np.asarray(label2d)
    if prob.ndim != 2 or prob.shape != label.shape:
        raise ValueError(f"need two 2D arrays of one shape, got {prob.shape} and {label.shape}")
    gt = ground_truth_segments(label, segments2d)
    out = np.zeros((len(thresholds), 2), dtype=np.float64)
    for k, th in enumerate(thresholds):
        out[k] = _f_scores(gt, thin_by_watershed(prob > float(th)))
    return out


def isbi_sums(prob3d, label3d, thresholds=ISBI_THRESHOLDS, segments3d=None) -> dict:
    """Reducible ISBI counts of a stack (Z, Y, X) (a 2D array is one slice).

    Returns ``sums``: (T, 2) float64, per threshold the sum over slices of per-slice (V_rand,
    V_info); ``n_slices``: int. Sum both across ranks, then call :func:`isbi_scores_from_sums`.
    """
    prob, label = np.asarray(prob3d), np.asarray(label3d)
    if prob.ndim == 2:
        prob, label = prob[None], label[None]
    if prob.ndim != 3 or prob.shape != label.shape:
        raise ValueError(f"need two (Z, Y, X) arrays of one shape, got {prob.shape} and {label.shape}")
    segments = None if segments3d is None else np.asarray(segments3d).reshape(label.shape)
    sums = np.zeros((len(thresholds), 2), dtype=np.float64)
    for z in range(prob.shape[0]):
        sums += isbi_slice_scores(prob[z], label[z], thresholds, None if segments is None else segments[z])
    return {"sums": sums, "n_slices": int(prob.shape[0])}


def isbi_scores_from_sums(sums, n_slices: int, thresholds=ISBI_THRESHOLDS) -> dict:
    """V_rand and V_info: the per-slice mean at each threshold, maximised over thresholds.

    Ties keep the first threshold, as the Java's strict ``>`` does (interpretation 7).
    """
    sums = np.asarray(sums, dtype=np.float64).reshape(len(thresholds), 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / float(n_slices)
    out = {}
    for col, name in enumerate(("v_rand", "v_info")):
        best, best_th = 0.0, float(thresholds[0])
        for th, score in zip(thresholds, means[:, col]):
            if score > best:  # NaN never wins, as in Java
                best, best_th = float(score), float(th)
        out[name], out[f"{name}_threshold"] = best, best_th
    return out

