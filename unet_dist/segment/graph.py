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
`mean` rule adds a copy of the statistics it updates, a score, its adjacency dicts and heap.
Two merge rules:
- `union_find`: every edge whose score is >= threshold joins its fragments (connected components,
  scipy.sparse.csgraph), PyTorch Connectomics' and DaCapo's stitching;
- `mean`: agglomeration as waterz / LSD: the edge of highest score merges first, the merged
  fragment's edges to a common neighbour add their statistics and are scored again, until the best
  edge is below threshold. Both depend only on the edges, not on which rank made them.
Neuron IDs are canonical: 1, 2, ... in the order of each neuron's smallest fragment ID.
"""

from __future__ import annotations

import heapq

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

BINS = 16


def link_bins(values: np.ndarray) -> np.ndarray:
    """The histogram bin of each link value in [0, 1]: floor(v * BINS), 1.0 in the last bin."""
    return np.minimum((np.asarray(values, np.float64) * BINS).astype(np.int64), BINS - 1).clip(0)


def quantile_scores(hist: np.ndarray, quantile: float) -> np.ndarray:
    """Per row of `hist` (E, BINS), the `quantile` of its values, uniform within each bin; the same
    floating-point steps as `quantile_of`, so both give identical numbers."""
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


def quantile_of(row: list[int], quantile: float) -> float:
    """`quantile_scores` of one histogram row (a list), for the agglomeration's inner loop."""
    target, below = quantile * sum(row), 0
    for i, count in enumerate(row):
        if count and below + count >= target:
            return (i + (target - below) / count) / BINS
        below += count
    return 0.0


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
    """Best edge first down to `threshold`; ties go to the smaller pair, so the result is fixed.
    Each contact is one row of the statistics; a merge adds the gone fragment's rows into the kept
    one's (or hands them over), so memory stays that of the input edges."""
    sums, counts = edges["sum"].astype(np.float64), edges["count"].astype(np.int64)
    hist = np.array(edges["hist"], np.uint32) if score == "quantile" else None
    scores = edge_scores(edges, score, quantile).astype(np.float64)

    def rescore(r: int) -> float:
        return quantile_of(hist[r].tolist(), quantile) if hist is not None else float(sums[r] / counts[r])

    parent = np.arange(n)
    adjacency: list[dict[int, int]] = [{} for _ in range(n)]
    for r, (u, v) in enumerate(zip(a.tolist(), b.tolist())):
        adjacency[u][v] = adjacency[v][u] = r
    heap = [(-s, u, v) for s, u, v in zip(scores.tolist(), a.tolist(), b.tolist())]
    heapq.heapify(heap)
    while heap:
        best, u, v = heapq.heappop(heap)
        if -best < threshold:
            break
        r = adjacency[u].get(v)
        if parent[u] != u or parent[v] != v or r is None or scores[r] != -best:
            continue  # a stale entry: one side merged since, or the edge's score changed
        keep, gone = (u, v) if len(adjacency[u]) >= len(adjacency[v]) else (v, u)
        parent[gone] = keep
        del adjacency[keep][gone]
        for w, r in adjacency[gone].items():  # the smaller side's edges move to the kept one
            if w == keep:
                continue
            del adjacency[w][gone]
            into = adjacency[keep].get(w)
            if into is None:
                adjacency[keep][w] = adjacency[w][keep] = into = r
            else:
                sums[into] += sums[r]
                counts[into] += counts[r]
                if hist is not None:
                    hist[into] += hist[r]
                scores[into] = rescore(into)
            heapq.heappush(heap, (-float(scores[into]), min(keep, w), max(keep, w)))
        adjacency[gone] = {}
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
