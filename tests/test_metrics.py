"""Metrics: hand-computed cases, and a cross-check against a literal transcription of the Fiji Java.

The ``java_*`` helpers below transcribe fiji/Trainable_Segmentation line by line (slow, for tiny
images only): WatershedTransform2D.apply, RandError.getForegroundRestrictedRandIndexStatsN2 +
ClassificationStatistics, VariationOfInformation.foregroundRestrictedFscore. They share no code
with unet_dist.metrics.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import pytest

from unet_dist.metrics import (ISBI_THRESHOLDS, confusion_counts, isbi_scores_from_sums, isbi_slice_scores,
                               isbi_sums, java_thresholds, scores_from_confusion, thin_by_watershed)

from helpers import evaluate_volume

# ---------------------------------------------------------------------------------------------
# Literal transcriptions of the Java (reference only)
# ---------------------------------------------------------------------------------------------
MASK, WSHED, INIT, INQUEUE = -2, 0, -1, -3


def java_neighbors(x, y):  # Neighborhood2DC4.getNeighbors
    return [(x - 1, y), (x, y - 1), (x + 1, y), (x, y + 1)]


def java_watershed(image):
    """WatershedTransform2D.apply(hMin=0, hMax=255) on image[y][x]; returns labels[y][x]."""
    size2, size1 = image.shape  # size1 = width (x), size2 = height (y)
    tab = [[INIT] * size2 for _ in range(size1)]
    current_label, flag = 0, False
    h_min, h_max = 0.0, 255.0
    # extractPixelValues: x outer, y inner; then Collections.sort by (value, creation order)
    records = [(float(image[y, x]), x, y) for x in range(size1) for y in range(size2)
               if h_min <= image[y, x] <= h_max]
    records = [r for _, r in sorted(enumerate(records), key=lambda e: (e[1][0], e[0]))]
    fifo = deque()
    h = h_min
    current_index = 0
    height1 = height2 = current_index
    while current_index < len(records) and h <= h_max:
        h = records[current_index][0]
        for pixel_index in range(height1, len(records)):
            value, i, j = records[pixel_index]
            if value != h:
                height1 = pixel_index
                break
            tab[i][j] = MASK
            for u, v in java_neighbors(i, j):
                if 0 <= u < size1 and 0 <= v < size2 and tab[u][v] >= WSHED:
                    fifo.append((i, j))
                    tab[i][j] = INQUEUE
                    break
        while fifo:
            i, j = fifo.popleft()
            for u, v in java_neighbors(i, j):
                if 0 <= u < size1 and 0 <= v < size2:
                    if tab[u][v] > 0:
                        if tab[i][j] == INQUEUE or (tab[i][j] == WSHED and flag):
                            tab[i][j] = tab[u][v]
                        elif tab[i][j] > 0 and tab[i][j] != tab[u][v]:
                            tab[i][j] = WSHED
                            flag = False
                    elif tab[u][v] == WSHED:
                        if tab[i][j] == INQUEUE:
                            tab[i][j] = WSHED
                            flag = True
                    elif tab[u][v] == MASK:
                        tab[u][v] = INQUEUE
                        fifo.append((u, v))
        pixel_index = height2
        while pixel_index < len(records):  # for (...; pixelIndex++, currentIndex++) with a break
            value, i, j = records[pixel_index]
            if value != h:
                height2 = pixel_index
                break
            if tab[i][j] == MASK:
                current_label += 1
                fifo.append((i, j))
                tab[i][j] = current_label
                while fifo:
                    p2 = fifo.popleft()
                    for u, v in java_neighbors(*p2):
                        if 0 <= u < size1 and 0 <= v < size2 and tab[u][v] == MASK:
                            fifo.append((u, v))
                            tab[u][v] = current_label
            pixel_index += 1
            current_index += 1
    out = np.zeros(image.shape, dtype=np.int64)
    for i in range(size1):
        for j in range(size2):
            out[j, i] = 0 if tab[i][j] == INIT else tab[i][j]
    return out


def flood_components(binary):
    """4-connected components by plain flood fill (stands in for FindConnectedRegions)."""
    out = np.zeros(binary.shape, dtype=np.int64)
    n = 0
    for y0, x0 in zip(*np.nonzero(binary)):
        if out[y0, x0]:
            continue
        n += 1
        out[y0, x0] = n
        todo = [(y0, x0)]
        while todo:
            y, x = todo.pop()
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < binary.shape[0] and 0 <= xx < binary.shape[1] and binary[yy, xx] and not out[yy, xx]:
                    out[yy, xx] = n
                    todo.append((yy, xx))
    return out


def java_pij(c1, c2):
    p1, p2 = c1.ravel(), c2.ravel()
    n = float(np.count_nonzero(p1))
    pij = [[0.0] * (int(c2.max()) + 1) for _ in range(int(c1.max()) + 1)]
    for a, b in zip(p1, p2):
        pij[a][b] += 1
    for i in range(len(pij)):
        for j in range(len(pij[0])):
            pij[i][j] /= n
    ai = [0.0] * len(pij)
    for i in range(1, len(pij)):
        for j in range(len(pij[0])):
            ai[i] += pij[i][j]
    bj = [0.0] * len(pij[0])
    for j in range(1, len(pij[0])):
        for i in range(1, len(pij)):
            bj[j] += pij[i][j]
    aux = sum(pij[i][0] for i in range(1, len(pij)))
    return n, pij, ai, bj, aux


def java_vrand(c1, c2):
    """RandError.getForegroundRestrictedRandIndexStatsN2 -> ClassificationStatistics.fScore."""
    n, pij, ai, bj, aux = java_pij(c1, c2)
    sum_a2 = sum(a * a for a in ai)
    sum_b2 = sum(b * b for b in bj) + aux / n
    sum_ab2 = sum(pij[i][j] ** 2 for i in range(1, len(pij)) for j in range(1, len(pij[0]))) + aux / n
    n2 = n * n
    tp = n2 * sum_ab2
    fp = n2 * sum_b2 - tp
    fn = n2 * sum_a2 - tp
    precision = 1.0 if fp == 0 else tp / (tp + fp)
    recall = 1.0 if fn == 0 else tp / (tp + fn)
    return 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def java_vinfo(c1, c2):
    """VariationOfInformation.foregroundRestrictedFscore."""
    n, pij, ai, bj, aux = java_pij(c1, c2)
    sum_a = sum(a * math.log(a) for a in ai if a != 0)
    sum_b = sum(b * math.log(b) for b in bj if b != 0) - aux * math.log(n)
    sum_ab = sum(pij[i][j] * math.log(pij[i][j]) for i in range(1, len(pij)) for j in range(1, len(pij[0]))
                 if pij[i][j] != 0) - aux * math.log(n)
    ha, hb, hab, hba = -sum_a, -sum_b, sum_b - sum_ab, sum_a - sum_ab
    prec = (ha - hab) / ha if ha != 0 else math.nan
    rec = (hb - hba) / hb if hb != 0 else math.nan
    if ha == 0:
        prec, rec = 0.0, 1.0
    if hb == 0:
        prec, rec = 1.0, 0.0
    return 2.0 * prec * rec / (prec + rec)


def java_slice(prob, label, th):
    gt = flood_components(label > th)
    border = np.where(prob.astype(np.float32).astype(np.float64) > th, 0, 255)
    seg = java_watershed(border)
    return java_vrand(gt, seg), java_vinfo(gt, seg)


# ---------------------------------------------------------------------------------------------
# Fixtures: small hand-made slices
# ---------------------------------------------------------------------------------------------

def stripes():
    """4 x 11 slice: cells A (cols 0-2), B (4-6), C (8-10), one-pixel membranes at cols 3 and 7."""
    label = np.ones((4, 11), dtype=np.uint8)
    label[:, [3, 7]] = 0
    return label


def random_prob(rng, shape, sigma=1.2):
    from scipy import ndimage

    return ndimage.uniform_filter(rng.random(shape), size=max(1, int(2 * sigma)))


# ---------------------------------------------------------------------------------------------
# Pixel metrics
# ---------------------------------------------------------------------------------------------

def test_confusion_counts_and_scores_by_hand():
    label = np.array([[1, 1, 0, 0]])
    prob = np.array([[0.9, 0.2, 0.7, 0.1]], dtype=np.float32)
    counts = confusion_counts(prob, label)
    assert counts.dtype == np.int64 and counts.tolist() == [1, 1, 1, 1]
    assert confusion_counts(np.array([[1, 0, 1, 0]], dtype=np.uint8), label).tolist() == [1, 1, 1, 1]
    s = scores_from_confusion(counts)
    assert s == {"dice_neuron": 0.5, "dice_membrane": 0.5, "pixel_error": 0.5}
    perfect = scores_from_confusion(confusion_counts(label.astype(float), label))
    assert perfect == {"dice_neuron": 1.0, "dice_membrane": 1.0, "pixel_error": 0.0}


def test_dice_of_empty_classes():
    all_in = np.ones((3, 3), np.uint8)
    s = scores_from_confusion(confusion_counts(all_in.astype(np.float32), all_in))
    assert s["dice_membrane"] == 1.0 and s["dice_neuron"] == 1.0 and s["pixel_error"] == 0.0
    s = scores_from_confusion(confusion_counts(np.zeros((3, 3)), all_in))
    assert s["dice_neuron"] == 0.0 and s["dice_membrane"] == 0.0 and s["pixel_error"] == 1.0
    assert scores_from_confusion(np.zeros(4, np.int64))["pixel_error"] == 0.0


# ---------------------------------------------------------------------------------------------
# ISBI metrics: thresholds, thinning, hand-computed scores
# ---------------------------------------------------------------------------------------------

def test_threshold_loop_as_java_runs_it():
    assert len(ISBI_THRESHOLDS) == 11
    assert ISBI_THRESHOLDS[0] == 0.0 and ISBI_THRESHOLDS[3] == 0.30000000000000004
    assert ISBI_THRESHOLDS[-1] == 0.9999999999999999 < 1.0
    assert java_thresholds(0.0, 0.0, 0.1) == (0.0,)  # the script's "binary proposal" setting


def test_thinning_leaves_one_pixel_dams():
    interior = np.ones((5, 12), dtype=bool)
    interior[:, 3:5] = False  # even gap: 2 columns
    interior[:, 7:10] = False  # odd gap: 3 columns
    seg = thin_by_watershed(interior)
    assert np.array_equal(seg, java_watershed(np.where(interior, 0, 255)))
    assert (seg[:, 4] == 0).all() and (seg[:, 8] == 0).all()  # Java's FIFO order picks these
    assert (seg == 0).sum() == 10  # exactly one dam pixel per row per gap
    assert len(np.unique(seg[:, 3])) == 1 and seg[0, 3] == seg[0, 0]
    assert seg[0, 7] == seg[0, 5] and seg[0, 9] == seg[0, 11] != seg[0, 5]
    horizontal = thin_by_watershed(interior.T)
    assert np.array_equal(horizontal, java_watershed(np.where(interior.T, 0, 255)))
    assert (horizontal[4, :] == 0).all()


def test_thinning_edge_cases():
    assert (thin_by_watershed(np.zeros((3, 4), bool)) == 1).all()  # no interior: one basin
    full = thin_by_watershed(np.ones((3, 4), bool))
    assert (full == 1).all()


def test_perfect_prediction():
    label = stripes()
    scores = isbi_slice_scores(label.astype(np.float32), label)
    assert scores.shape == (11, 2) and np.all(scores == 1.0)
    out = evaluate_volume(label[None].astype(np.float32), label[None])
    assert out["v_rand"] == out["v_info"] == 1.0 and out["v_rand_threshold"] == 0.0
    assert out["dice_neuron"] == out["dice_membrane"] == 1.0 and out["pixel_error"] == 0.0


def test_merge_by_hand():
    label = stripes()
    prob = label.astype(np.float32)
    prob[:, 3] = 1.0  # membrane between A and B missed: A+B one segment, C alone
    v_rand, v_info = isbi_slice_scores(prob, label, [0.5])[0]
    # c = [[12], [12], [0, 12]]: tp = 3*144, sum b^2 = 24^2 + 12^2, fn = 0
    precision = 432 / 720
    assert v_rand == pytest.approx(2 * precision / (precision + 1), abs=1e-15) == pytest.approx(0.75)
    h_a = math.log(3)
    h_b = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    prec = h_b / h_a  # I = H(B) since B coarsens A; recall I / H(B) = 1
    assert v_info == pytest.approx(2 * prec / (prec + 1), abs=1e-12)


def test_split_by_hand_with_dam_singletons():
    label = stripes()
    prob = label.astype(np.float32)
    prob[2, 4:7] = 0.0  # a false membrane across B: B = 6 + 3 pixels + 3 dam singletons
    seg = thin_by_watershed(prob > 0.5)
    assert (seg[2, 4:7] == 0).all()
    v_rand, v_info = isbi_slice_scores(prob, label, [0.5])[0]
    tp = 144 + 36 + 9 + 144 + 3  # sum c_ij^2 + singletons; fp = 0; fn = 432 - tp
    assert v_rand == pytest.approx(2 * (tp / 432) / (1 + tp / 432), abs=1e-15) == pytest.approx(0.875)
    sizes = np.array([12, 6, 3, 1, 1, 1, 12]) / 36
    h_b = -(sizes * np.log(sizes)).sum()
    rec = math.log(3) / h_b  # B refines A: I = H(A), precision 1
    assert v_info == pytest.approx(2 * rec / (1 + rec), abs=1e-12)


def test_empty_cases_score_as_java_does():
    label = stripes()
    nothing = np.zeros(label.shape, np.float32)  # no interior predicted: one segment over all
    v_rand, v_info = isbi_slice_scores(nothing, label, [0.5])[0]
    assert v_rand == pytest.approx(2 * (432 / 1296) / (1 + 432 / 1296)) and v_info == 0.0
    no_gt = np.zeros(label.shape, np.uint8)
    assert np.all(isbi_slice_scores(label.astype(np.float32), no_gt) == 0.0)
    one_cell = np.ones((4, 5), np.uint8)  # H(A) = 0: Java's V_info is 0 even when perfect
    assert isbi_slice_scores(one_cell.astype(np.float32), one_cell, [0.5])[0].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError):
        isbi_slice_scores(label * 255, label)


def test_threshold_maximisation_picks_first_best():
    label = stripes()
    prob = np.where(label > 0, 0.75, 0.35).astype(np.float32)
    prob[:2, 3] = 0.55  # half of the A|B membrane looks like interior up to th 0.5
    per_threshold = isbi_slice_scores(prob, label)
    assert np.all(per_threshold[:6, 0] < 1.0) and np.all(per_threshold[6:8] == 1.0)
    assert np.all(per_threshold[8:, 1] == 0.0)  # th >= 0.8: nothing interior, one segment
    s = isbi_sums(prob[None], label[None])
    best = isbi_scores_from_sums(s["sums"], s["n_slices"])
    assert best["v_rand"] == best["v_info"] == 1.0
    assert best["v_rand_threshold"] == best["v_info_threshold"] == ISBI_THRESHOLDS[6] == 0.6
    zero = isbi_scores_from_sums(np.zeros((11, 2)), 0)
    assert zero["v_rand"] == 0.0 and zero["v_rand_threshold"] == 0.0


def test_float32_promotion_like_fiji():
    label = stripes()
    prob = np.where(label > 0, 1.0, 0.0).astype(np.float32)
    assert np.all(isbi_slice_scores(prob, label, ISBI_THRESHOLDS[-1:]) == 1.0)  # 1.0 > 0.99..9
    prob = np.where(label > 0, np.float32(0.1), 0.0).astype(np.float32)  # 0.10000000149 > 0.1
    assert np.all(isbi_slice_scores(prob, label, [0.1]) == 1.0)


def test_sums_over_ranks_reduce_exactly():
    rng = np.random.default_rng(3)
    label = (random_prob(rng, (5, 20, 24)) > 0.45).astype(np.uint8)
    prob = np.clip(label * 0.6 + 0.5 * random_prob(rng, label.shape), 0, 1).astype(np.float32)
    whole = isbi_sums(prob, label)
    parts = [isbi_sums(prob[0:2], label[0:2]), isbi_sums(prob[2], label[2]), isbi_sums(prob[3:], label[3:])]
    sums = sum(p["sums"] for p in parts)
    n = sum(p["n_slices"] for p in parts)
    assert n == whole["n_slices"] == 5
    np.testing.assert_allclose(sums, whole["sums"], rtol=0, atol=1e-12)
    a, b = isbi_scores_from_sums(sums, n), isbi_scores_from_sums(whole["sums"], 5)
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-12) for k in a)


# ---------------------------------------------------------------------------------------------
# Cross-check against the literal Java transcription
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(12))
def test_watershed_matches_java_transcription(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(6, 17, size=2))
    field = random_prob(rng, shape, sigma=rng.choice([0.5, 1.0, 2.0]))
    for th in (0.3, 0.5, 0.7):
        interior = field > np.quantile(field, th)
        assert np.array_equal(thin_by_watershed(interior), java_watershed(np.where(interior, 0, 255)))
    noise = rng.random(shape) > 0.5  # many equal-distance fronts
    assert np.array_equal(thin_by_watershed(noise), java_watershed(np.where(noise, 0, 255)))


@pytest.mark.parametrize("seed", range(6))
def test_slice_scores_match_java_transcription(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (int(rng.integers(10, 20)), int(rng.integers(10, 20)))
    label = (random_prob(rng, shape) > 0.45).astype(np.uint8)
    prob = np.clip(0.5 * label + 0.6 * random_prob(rng, shape, sigma=0.5), 0, 1).astype(np.float32)
    ours = isbi_slice_scores(prob, label)
    for k, th in enumerate(ISBI_THRESHOLDS):
        ref = java_slice(prob, label, th)
        assert ours[k] == pytest.approx(ref, abs=1e-9), (th, ours[k], ref)


def test_real_isbi_crops_match_java_transcription(isbi_dir):
    folder = isbi_dir
    import tifffile
    from scipy import ndimage

    labels = tifffile.imread(folder / "train-labels.tif")  # 0/255, as the challenge ships them
    rng = np.random.default_rng(7)
    for z, y, x in ((3, 40, 200), (25, 400, 10)):
        label = labels[z, y:y + 40, x:x + 40]
        prob = ndimage.gaussian_filter((label > 0).astype(np.float32), 1.5) + rng.normal(0, 0.2, label.shape)
        prob = np.clip(prob, 0, 1).astype(np.float32)
        ours = isbi_slice_scores(prob, label)
        ref = [java_slice(prob, label, th) for th in ISBI_THRESHOLDS]
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-9)
