"""The one global step: every block's fragments and edges -> a lookup table fragment -> neuron.

Fragments are numbered compactly (block by block, in ID order), so the table is one uint64 per
fragment and an edge costs (a, b, sum, count): 32 bytes. Two merge rules:
- `union_find`: every edge whose mean link value is >= threshold joins its fragments (connected
  components, scipy.sparse.csgraph), PyTorch Connectomics' and DaCapo's stitching;
- `mean`: average linkage, as waterz / LSD agglomerate: the edge of highest mean merges first, the
  merged fragment's edges are summed (sum and count, so means stay exact), until the best edge is
  below threshold. Both depend only on the edges, not on which rank made them.
Neuron IDs are canonical: 1, 2, ... in the order of each neuron's smallest fragment ID.
"""

from __future__ import annotations

import heapq

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def compact(ids: np.ndarray, bases: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Fragment IDs -> compact indices, from each block's first ID (`bases`, increasing) and first
    compact index (`starts`)."""
    block = np.searchsorted(bases, ids, side="right") - 1
    return starts[block] + (ids - bases[block]).astype(np.int64)


def union_find(n: int, a: np.ndarray, b: np.ndarray, mean: np.ndarray, threshold: float) -> np.ndarray:
    keep = mean >= threshold
    graph = coo_matrix((np.ones(int(keep.sum()), np.int8), (a[keep], b[keep])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def mean_agglomeration(n: int, a: np.ndarray, b: np.ndarray, sums: np.ndarray, counts: np.ndarray,
                       threshold: float) -> np.ndarray:
    """Average linkage down to `threshold`; ties go to the smaller pair, so the result is fixed."""
    parent = np.arange(n)
    adjacency: list[dict[int, list]] = [{} for _ in range(n)]
    for u, v, s, c in zip(a.tolist(), b.tolist(), sums.tolist(), counts.tolist()):
        adjacency[u][v] = adjacency[v][u] = [s, c]
    heap = [(-s / c, u, v) for u, v, s, c in zip(a.tolist(), b.tolist(), sums.tolist(), counts.tolist())]
    heapq.heapify(heap)
    while heap:
        score, u, v = heapq.heappop(heap)
        if -score < threshold:
            break
        stats = adjacency[u].get(v)
        if parent[u] != u or parent[v] != v or stats is None or stats[0] / stats[1] != -score:
            continue  # a stale entry: one side merged since, or the edge's mean changed
        keep, gone = (u, v) if len(adjacency[u]) >= len(adjacency[v]) else (v, u)
        parent[gone] = keep
        del adjacency[keep][gone]
        for w, (s, c) in adjacency[gone].items():  # the smaller side's edges move to the kept one
            if w == keep:
                continue
            del adjacency[w][gone]
            merged = adjacency[keep].get(w)
            merged = [merged[0] + s, merged[1] + c] if merged else [s, c]
            adjacency[keep][w] = adjacency[w][keep] = merged
            heapq.heappush(heap, (-merged[0] / merged[1], min(keep, w), max(keep, w)))
        adjacency[gone] = {}
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
                 merge: str) -> tuple[np.ndarray, np.ndarray]:
    """(table: compact fragment index -> neuron ID, starts: each block's first compact index)."""
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    n = int(np.sum(counts))
    a, b = compact(edges["a"], bases, starts), compact(edges["b"], bases, starts)
    mean = edges["sum"] / np.maximum(edges["count"], 1)
    if merge == "union_find":
        components = union_find(n, a, b, mean, threshold)
    else:
        components = mean_agglomeration(n, a, b, edges["sum"], edges["count"], threshold)
    return canonical(components), starts
