"""The blockwise segmentation's own functions on one block that is the whole array, in memory.

For arrays that fit in memory: training's validation region (its thresholds chosen on the
validation split) and `bench segment`'s in-memory peer. Fragments and edges are computed once;
the merge, which alone depends on the threshold, runs per threshold.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from unet_dist.config import SegmentConfig
from unet_dist.segment.blocks import Input, Plan, block_edges, block_fragments, nearest_channels
from unet_dist.segment.graph import lookup_table


class InMemory:
    """An array's fragments and edges; `neurons(threshold)` the IDs a merge at `threshold` gives."""

    def __init__(self, values: np.ndarray, offsets: Sequence[Sequence[int]] | None, cfg: SegmentConfig):
        """`values`: affinities (C, Z, Y, X) for `offsets`, or with `offsets` None a membrane
        probability (Z, Y, X); float in [0, 1] or uint8 = round(255 v)."""
        if offsets is None:
            inp = Input(values, "membrane", (None, None, None))
        else:
            inp = Input(values, "affinities", nearest_channels(offsets))
        self.cfg = cfg
        self.plan = Plan(inp.shape, inp.shape, tuple(cfg.halo))
        core = tuple((0, n) for n in inp.shape)
        self.fragments = block_fragments(inp, self.plan, 0, core, cfg)
        self.edges = block_edges(inp, self.fragments, core, (False, False, False))
        self.base = np.uint64(self.plan.base(0))
        self.count = max(int(self.fragments.max(initial=0)) - int(self.base) + 1, 0)

    def neurons(self, threshold: float) -> np.ndarray:
        """Neuron IDs (uint64, 0 = no neuron) after the merge at `threshold`, numbered canonically."""
        table, _ = lookup_table(np.array([self.count]), np.array([self.base], np.uint64), self.edges,
                                threshold, self.cfg.merge, self.cfg.edge_score, self.cfg.quantile)
        ids = np.zeros(self.fragments.shape, np.uint64)
        inside = self.fragments != 0
        ids[inside] = table[(self.fragments[inside] - self.base).astype(np.int64)]
        return ids

    def sweep(self, thresholds: Iterable[float]) -> dict[float, np.ndarray]:
        return {float(t): self.neurons(t) for t in thresholds}


# The thresholds training's validation tries; the one of lowest VOI is reported with its scores and
# recorded in the checkpoint, so `segment` uses a threshold chosen on the validation split.
THRESHOLDS = tuple(round(0.05 * i, 2) for i in range(1, 20))
SCORES = ("voi_split", "voi_merge", "voi", "adapted_rand_error", "cremi_score", "split_neurons",
          "merged_neurons", "segment_threshold")


def best_threshold(values: np.ndarray, offsets, true_ids: np.ndarray, unlabelled: np.ndarray | None,
                   cfg: SegmentConfig, thresholds: Iterable[float] = THRESHOLDS) -> dict[str, float]:
    """The segmentation scores (evaluate/instance_metrics.py) at the threshold of lowest VOI."""
    from unet_dist.evaluate.instance_metrics import segmentation_scores

    volume = InMemory(values, offsets, cfg)
    best = None
    for threshold in thresholds:
        scores = segmentation_scores(true_ids, volume.neurons(threshold), unlabelled)
        if best is None or scores["voi"] < best["voi"]:
            best = {**scores, "segment_threshold": float(threshold)}
    return {key: float(best[key]) for key in SCORES}
