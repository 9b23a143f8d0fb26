"""The one global step: every block's fragments and edges -> a lookup table fragment -> neuron.

An edge is a contact between two fragments; its statistics are those of the link values along it:
their sum, their count and a histogram of BINS bins over [0, 1] (uint32 counts; a uint8 affinity,
k / 255, falls in bin k // 16, so a quantized prediction loses nothing the bins keep). All three
add up exactly, so blocks, ranks and merged fragments combine them in any grouping to the same
numbers. An edge's score (`segment.edge_score`):
- `quantile` (default): the `segment.quantile` quantile of its link values, read off the histogram
  (linear within the bin), as MALA / LSD / waterz score (`OneMinus<QuantileAffinity<.., 75>>`).
  A fragment that took in some of the layer around its neuron touches its neighbour partly through
  that layer, links near 0 that pull a mean below any threshold; the 75th percentile ignores up to
  a quarter of such links and still sees a real boundary, whose links are mostly low;
- `mean`: sum / count, the mean link value along the contact.
Fragments are numbered compactly (block by block, in ID order), so the table is one uint64 per
fragment. An edge costs a, b (uint64), sum (float64), count (int64) and the histogram
(BINS x uint32): 96 bytes, in the blocks' edge files and in the global step's grouped arrays; the
`mean` rule adds a copy of the statistics it pools and a few arrays of the edges' length.
Two merge rules:
- `union_find`: every edge whose score is >= threshold joins its fragments (connected components,
  scipy.sparse.csgraph), PyTorch Connectomics' and DaCapo's stitching;
- `mean`: agglomeration as waterz / LSD: the edge of highest score merges first, the merged
  fragment's edges to a common neighbour add their statistics and are scored again, until the best
  edge is below threshold (average linkage; computed in rounds of reciprocal best pairs, see
  `mean_agglomeration`). Both depend only on the edges, not on which rank made them.
Neuron IDs are canonical: 1, 2, ... in the order of each neuron's smallest fragment ID.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

BINS = 16


def link_bins(values: np.ndarray) -> np.ndarray:
    """The histogram bin of each link value in [0, 1]: floor(v * BINS), 1.0 in the last bin."""
    return np.minimum((np.asarray(values, np.float64) * BINS).astype(np.int64), BINS - 1).clip(0)


def quantile_scores(hist: np.ndarray, quantile: float, rows_at_once: int = 1 << 18) -> np.ndarray:
    """Per row of `hist` (E, BINS), the `quantile` of its values, uniform within each bin; a slice of
    rows at a time, so the int64 working copies stay small beside the edges (10^7s of rows)."""
    if len(hist) > rows_at_once:
        return np.concatenate([quantile_scores(hist[i:i + rows_at_once], quantile, rows_at_once)
                               for i in range(0, len(hist), rows_at_once)])
    hist = np.asarray(hist, np.int64)
    if len(hist) == 0:
        return np.zeros(0)
    cum = np.cumsum(hist, axis=1)
    target = quantile * cum[:, -1].astype(np.float64)
    at = np.argmax((cum >= target[:, None]) & (hist > 0), axis=1)  # the first bin that reaches it
    rows = np.arange(len(hist))
    count = hist[rows, at]
    below = (cum[rows, at] - count).astype(np.float64)
    value = (at + (target - below) / np.maximum(count, 1)) / BINS
    return np.where(cum[:, -1] > 0, value, 0.0)


def edge_scores(edges: dict[str, np.ndarray], score: str, quantile: float) -> np.ndarray:
    if score == "quantile":
        return quantile_scores(edges["hist"], quantile)
    return edges["sum"] / np.maximum(edges["count"], 1)


def compact(ids: np.ndarray, bases: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Fragment IDs -> compact indices, from each block's first ID (`bases`, increasing) and first
    compact index (`starts`)."""
    block = np.searchsorted(bases, ids, side="right") - 1
    return starts[block] + (ids - bases[block]).astype(np.int64)


def union_find(n: int, a: np.ndarray, b: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    keep = scores >= threshold
    graph = coo_matrix((np.ones(int(keep.sum()), np.int8), (a[keep], b[keep])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def mean_agglomeration(n: int, a: np.ndarray, b: np.ndarray, edges: dict[str, np.ndarray], threshold: float,
                       score: str = "mean", quantile: float = 0.75) -> np.ndarray:
    """Average linkage down to `threshold` (the best edge merges first; merged fragments pool their
    edges to a common neighbour), in rounds of whole-array numpy work instead of a heap.

    Each round merges every pair whose best edge is the same edge (reciprocal best; edges ordered by
    score, then by the pair, a fragment standing for its smallest member), then pools the statistics
    of the edges that now join the same pair and scores them again. This is the sequential order's
    answer: a pooled score (a mean, or a quantile of pooled histograms) lies between the scores pooled,
    so no merge makes a better edge appear, and a reciprocal best pair is one that the sequential order
    merges too (the reducibility of Murtagh's reciprocal-nearest-neighbour clustering). A fragment
    whose edges all score below threshold never merges and neither do its pooled edges, so its edges
    leave the arrays; memory is that of the input edges and a few arrays of their length."""
    lo, hi = np.minimum(a, b).astype(np.int64), np.maximum(a, b).astype(np.int64)
    if score == "quantile":
        stats = {"hist": np.asarray(edges["hist"], np.uint32)}
    else:
        stats = {"sum": np.asarray(edges["sum"], np.float64), "count": np.asarray(edges["count"], np.int64)}
    scores = edge_scores(stats, score, quantile)
    parent = np.arange(n, dtype=np.int64)
    while True:
        mergeable = scores >= threshold
        if not mergeable.any():
            break
        active = np.zeros(n, bool)
        active[lo[mergeable]] = active[hi[mergeable]] = True
        live = active[lo] & active[hi]
        lo, hi, scores = lo[live], hi[live], scores[live]
        stats = {k: s[live] for k, s in stats.items()}
        order = np.lexsort((hi, lo, -scores))  # best first; ties by the pair
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(len(order))
        best = np.full(n, len(order), np.int64)
        np.minimum.at(best, lo, rank)
        np.minimum.at(best, hi, rank)
        merged = (best[lo] == rank) & (best[hi] == rank) & (scores >= threshold)
        parent[hi[merged]] = lo[merged]  # reciprocal pairs are disjoint: one step joins each
        lo, hi = parent[lo], parent[hi]
        lo, hi = np.minimum(lo, hi), np.maximum(lo, hi)
        kept = lo != hi
        lo, hi = lo[kept], hi[kept]
        stats = {k: s[kept] for k, s in stats.items()}
        key = lo * n + hi
        order = np.argsort(key, kind="stable")
        key = key[order]
        first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if len(key) else key
        lo, hi = lo[order][first], hi[order][first]
        stats = {k: np.add.reduceat(s[order], first, axis=0) if len(first) else s for k, s in stats.items()}
        scores = edge_scores(stats, score, quantile)
    return _roots(parent)


def _roots(parent: np.ndarray) -> np.ndarray:
    while True:  # every fragment to its root
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def canonical(components: np.ndarray) -> np.ndarray:
    """Component labels -> neuron IDs 1..N, numbered by each component's first (smallest) fragment."""
    _, first, inverse = np.unique(components, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.uint64)
    rank[np.argsort(first, kind="stable")] = np.arange(1, len(first) + 1, dtype=np.uint64)
    return rank[inverse]


def lookup_table(counts: np.ndarray, bases: np.ndarray, edges: dict[str, np.ndarray], threshold: float,
                 merge: str, score: str | None = None, quantile: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """(table: compact fragment index -> neuron ID, starts: each block's first compact index).
    `score` None: the quantile where the edges carry histograms, else the mean."""
    score = score or ("quantile" if "hist" in edges else "mean")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n = int(np.sum(counts))
    a, b = compact(edges["a"], bases, starts), compact(edges["b"], bases, starts)
    if merge == "union_find":
        components = union_find(n, a, b, edge_scores(edges, score, quantile), threshold)
    else:
        components = mean_agglomeration(n, a, b, edges, threshold, score, quantile)
    return canonical(components), starts
