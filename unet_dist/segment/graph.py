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
(BINS x uint32): 96 bytes in the blocks' edge files; the global step holds what its score reads:
compact lo, hi (int64) and the histogram (80 bytes; the mean: lo, hi, sum, count, 32 bytes), once
(`solve` consumes it), plus a few arrays of the edges' length while it merges.
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


def block_starts(counts: np.ndarray) -> np.ndarray:
    """Each block's first compact fragment index, from the blocks' fragment counts."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def union_find(n: int, lo: np.ndarray, hi: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    keep = scores >= threshold
    graph = coo_matrix((np.ones(int(keep.sum()), np.int8), (lo[keep], hi[keep])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


STATS = {"quantile": ("hist",), "mean": ("sum", "count")}  # the statistics each edge score reads


def mean_agglomeration(n: int, graph: dict[str, np.ndarray], threshold: float, score: str = "mean",
                       quantile: float = 0.75) -> np.ndarray:
    """Average linkage down to `threshold` (the best edge merges first; merged fragments pool their
    edges to a common neighbour), in rounds of whole-array numpy work instead of a heap.

    `graph`: lo < hi (compact fragment indices) and the score's statistics (`STATS`), one row per
    fragment pair; consumed: its arrays are taken out, changed in place and shrunk as fragments drop out.

    Each round merges every pair whose best edge is the same edge (reciprocal best; edges ordered by
    score, then by the pair, a fragment standing for its smallest member), then pools the statistics
    of the edges that now join the same pair and scores them again. Where no two edges score the same,
    this is the sequential order's answer: a pooled score (a mean, or a quantile of pooled histograms)
    lies between the scores pooled, so no merge makes a better edge appear, and a reciprocal best pair
    is one that the sequential order merges too (the reducibility of Murtagh's reciprocal-nearest-
    neighbour clustering). Equal scores (common: a one-link contact scores one of BINS values) are
    ordered by the pairs at the start of the round, where a sequential order that renames clusters
    after each merge may take another of them first; either way the result follows from the edges
    alone, whatever order their rows come in. A fragment whose edges all score below threshold never
    merges and neither do its pooled edges, so its edges leave the arrays. Only the rows at a merged
    fragment change in a round, and only those that come to share a pair are pooled and scored again:
    memory is the input rows and a few arrays of their length (no sorted copies of the statistics)."""
    lo, hi = graph.pop("lo"), graph.pop("hi")
    stats = {k: graph.pop(k) for k in STATS[score]}
    graph.clear()
    scores = edge_scores(stats, score, quantile)
    parent = np.arange(n, dtype=np.int64)
    while True:
        mergeable = scores >= threshold
        if not mergeable.any():
            break
        active = np.zeros(n, bool)
        active[lo[mergeable]] = active[hi[mergeable]] = True
        del mergeable
        live = active[lo] & active[hi]
        if not live.all():
            lo, hi, scores, stats = _rows(live, lo, hi, scores, stats)
        del live, active
        merged = _reciprocal_best(n, lo, hi, scores, threshold)
        roots, gone = lo[merged], hi[merged]
        parent[gone] = roots  # reciprocal pairs are disjoint: one step joins each
        lo, hi, scores, stats = _pool(n, lo, hi, scores, stats, parent, roots, gone, score, quantile)
    return _roots(parent)


def _rows(keep: np.ndarray, lo, hi, scores, stats: dict) -> tuple:
    """The rows where `keep`, one array at a time (each old array is freed before the next is copied)."""
    lo, hi, scores = lo[keep], hi[keep], scores[keep]
    for k in list(stats):
        stats[k] = stats[k][keep]
    return lo, hi, scores, stats


def _reciprocal_best(n: int, lo: np.ndarray, hi: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """The rows that are the best edge of both their fragments (highest score, ties to the smallest
    pair (lo, hi)) and reach `threshold`."""
    best = np.full(n, -np.inf)
    np.maximum.at(best, lo, scores)
    np.maximum.at(best, hi, scores)
    key = lo * n + hi  # orders the pairs as (lo, hi) does: hi < n
    at_lo, at_hi = scores == best[lo], scores == best[hi]
    del best
    first = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(first, lo[at_lo], key[at_lo])
    np.minimum.at(first, hi[at_hi], key[at_hi])
    return at_lo & at_hi & (key == first[lo]) & (key == first[hi]) & (scores >= threshold)


def _pool(n: int, lo, hi, scores, stats: dict, parent, roots, gone, score: str, quantile: float) -> tuple:
    """After a round's merges: the rows at a merged fragment move to its root; rows that now join the
    same pair are pooled into the first of them and scored again; rows inside a fragment drop out.
    Rows at no merged fragment keep their pair, distinct from every moved row's new pair, and a moved
    row alone on its new pair keeps its statistics and score: only pooled rows are gathered."""
    moved = np.zeros(n, bool)
    moved[roots] = moved[gone] = True
    rows = np.flatnonzero(moved[lo] | moved[hi])
    del moved
    a, b = parent[lo[rows]], parent[hi[rows]]
    lo[rows], hi[rows] = np.minimum(a, b), np.maximum(a, b)
    del a, b
    key = lo[rows] * n + hi[rows]
    order = np.argsort(key, kind="stable")
    rows, key = rows[order], key[order]
    del order
    same = key[1:] == key[:-1]  # row i + 1 joins the pair of row i
    del key
    pooled = np.zeros(len(rows), bool)
    pooled[1:] |= same
    pooled[:-1] |= same
    head = np.ones(len(rows), bool)
    head[1:] = ~same
    drop = np.zeros(len(lo), bool)
    drop[rows[lo[rows] == hi[rows]]] = True
    rows, head = rows[pooled], head[pooled]
    if len(rows):
        heads, starts = rows[head], np.flatnonzero(head)
        for k, s in stats.items():
            s[heads] = np.add.reduceat(s[rows], starts, axis=0)
        scores[heads] = edge_scores({k: s[heads] for k, s in stats.items()}, score, quantile)
        drop[rows[~head]] = True
    return _rows(~drop, lo, hi, scores, stats) if drop.any() else (lo, hi, scores, stats)


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


def solve(n: int, graph: dict[str, np.ndarray], threshold: float, merge: str, score: str,
          quantile: float = 0.75) -> np.ndarray:
    """The neuron ID of each of `n` fragments from `graph` (lo < hi: compact fragment indices, and the
    score's statistics, `STATS`), which it consumes: the global step holds one copy of the edges."""
    if merge == "union_find":
        scores = edge_scores({k: graph.pop(k) for k in STATS[score]}, score, quantile)
        components = union_find(n, graph.pop("lo"), graph.pop("hi"), scores, threshold)
    else:
        components = mean_agglomeration(n, graph, threshold, score, quantile)
    return canonical(components)


def lookup_table(counts: np.ndarray, bases: np.ndarray, edges: dict[str, np.ndarray], threshold: float,
                 merge: str, score: str | None = None, quantile: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """(table: compact fragment index -> neuron ID, starts: each block's first compact index) of
    edges with fragment IDs, which it leaves as they are. `score` None: the quantile where the edges
    carry histograms, else the mean."""
    score = score or ("quantile" if "hist" in edges else "mean")
    starts = block_starts(counts)
    a, b = compact(edges["a"], bases, starts), compact(edges["b"], bases, starts)
    graph = {"lo": np.minimum(a, b), "hi": np.maximum(a, b), **{k: np.array(edges[k]) for k in STATS[score]}}
    return solve(int(np.sum(counts)), graph, threshold, merge, score, quantile), starts
