"""`bench segment`: our blockwise segmentation against the same algorithm on the whole volume in
memory and against waterz and mwatershed, on one synthetic affinity prediction; the memory of
`segment` at two volume sizes; the global step's memory per fragment and per edge.

OURS is `unet_dist.segment.pipeline.segment` (the `unet-dist segment` command, one process):
blockwise fragments with a halo, edges across block faces, one merge, blockwise relabel into the
store's labels/neurons. WHOLE is the same functions (segment/blocks.py, segment/graph.py) on one
block that is the whole volume, read into memory: what blockwise costs in speed and what its
stitching changes (VOI between the two). WATERZ is `waterz.agglomerate` (its own watershed +
mean-affinity agglomeration, the LSD / DaCapo path) at the same threshold on the whole volume;
MWATERSHED is `mwatershed.agglom` (the mutex watershed of torch-em / elf) on the affinities less
the threshold. Each runs in its own fresh child process (OMP_NUM_THREADS as given; one process, so
one core): peak RSS is the child's, "above baseline" less its RSS just before the measured call.
Mvox/s per CPU-second is the per-core rate that holds on a machine others load.

`--sizes 1,4` (Gvox) measures `segment`'s peak RSS on volumes that repeat one tile (made chunk by
chunk, deleted after each); `--graph N` times the global step (union-find on the edges with their
histograms; the mean agglomeration on `--graph-mean` fragments) on a synthetic graph of N
fragments with about 3 N edges, and again with about N edges, to fit bytes per fragment and per edge.
"""

from __future__ import annotations

import argparse
import math

VOLUMES = {"cpu": (64, 256, 256), "tiny": (16, 64, 64)}
BLOCKS = {"cpu": ([32, 128, 128], [4, 16, 16]), "tiny": ([8, 32, 32], [2, 8, 8])}
TILES = {"cpu": (64, 512, 512), "tiny": (16, 64, 64)}  # the memory mode's repeat; multiples of BLOCKS
GRAPH = {"cpu": (10 ** 7, 10 ** 7), "tiny": (10 ** 4, 10 ** 4)}  # (union-find, mean) fragments
PEERS = ("whole", "waterz", "mwatershed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--volume", help="Z,Y,X of the synthetic volume (default 64,256,256; tiny 16,64,64)")
    p.add_argument("--block-size", help="Z,Y,X of our blocks (default 32,128,128; tiny 8,32,32)")
    p.add_argument("--peers", default=",".join(PEERS), help=f"some of {', '.join(PEERS)} (default: all)")
    p.add_argument("--sizes", help="Gvox of the memory mode's volumes, e.g. 1,4 (default: no memory mode)")
    p.add_argument("--graph", type=float, help="fragments of the global step's graph (default 1e7; tiny 1e4; "
                                               "0: none)")
    p.add_argument("--graph-mean", type=float, help="fragments of the mean agglomeration's graph (default 1e7; "
                                                    "tiny 1e4; 0: none)")
    p.add_argument("overrides", nargs="*", help="segment.* overrides, e.g. segment.merge=union_find")


# ----------------------------------------------------------------------------- in child processes

def _config(cfg: dict):
    from unet_dist.config import SegmentConfig

    return SegmentConfig(**cfg)


def run_ours(pred: str, cfg: dict) -> dict:
    from unet_dist.bench.common import measure
    from unet_dist.segment.pipeline import segment

    return measure(lambda: {"result": segment(pred, _config(cfg), overwrite=True, progress="plain")})


def _whole(pred: str, cfg) -> tuple:
    """The blockwise pipeline's functions on one block, the whole volume, in memory."""
    import numpy as np

    from unet_dist.segment.pipeline import open_input
    from unet_dist.segment.volume import InMemory

    group, stored = open_input(pred)
    offsets = group.attrs["unet_dist"]["predict"]["offsets"] if stored.kind == "affinities" else None
    volume = InMemory(np.asarray(stored.array[:]), offsets, cfg)
    ids = volume.neurons(cfg.threshold)
    return ids, {"fragments": volume.count, "edges": int(len(volume.edges["a"])), "neurons": int(ids.max(initial=0))}


def _affinities_float(pred: str):
    import numpy as np

    from unet_dist.predict.prediction_store import probability_float
    from unet_dist.segment.pipeline import open_input

    group, inp = open_input(pred)
    offsets = [[int(v) for v in o] for o in group.attrs["unet_dist"]["predict"]["offsets"]]
    return probability_float(np.asarray(inp.array[:])), offsets


def _waterz(pred: str, cfg) -> tuple:
    import numpy as np
    import waterz

    affs, _ = _affinities_float(pred)
    # waterz merges while 1 - mean affinity < its threshold: ours merges at mean >= threshold
    ids = next(waterz.agglomerate(np.ascontiguousarray(affs), [1 - cfg.threshold]))
    return ids, {"neurons": int(len(np.unique(ids)) - (ids.min() == 0))}


def _mwatershed(pred: str, cfg) -> tuple:
    import numpy as np
    import mwatershed

    affs, offsets = _affinities_float(pred)
    # attractive above the threshold, repulsive below: the mutex watershed's bias
    ids = mwatershed.agglom((affs - cfg.threshold).astype(np.float64), offsets)
    return ids, {"neurons": int(len(np.unique(ids)))}


def run_peer(name: str, pred: str, cfg: dict, out: str) -> dict:
    """One peer on the whole volume; its labels saved to `out` (.npy) for the VOI."""
    import numpy as np

    from unet_dist.bench.common import measure

    import importlib

    method = {"whole": _whole, "waterz": _waterz, "mwatershed": _mwatershed}[name]
    config = _config(cfg)
    for module in ("unet_dist.segment.pipeline", *([name] if name != "whole" else [])):
        importlib.import_module(module)  # imports before the clock, as run_ours has them
    if name == "waterz":  # compiled on first use: before the clock, as a user's second call
        _warm_waterz()

    def go():
        ids, info = method(pred, config)
        np.save(out, ids)
        return {"result": info}

    return measure(go)


def _warm_waterz() -> None:
    import numpy as np
    import waterz

    next(waterz.agglomerate(np.ones((3, 4, 4, 4), np.float32), [0.5]))


def run_graph(fragments: int, keep: float, merge: str, threshold: float) -> dict:
    """The global step on a synthetic graph, held as the pipeline's global step holds it (compact
    fragment indices and the histograms the default score reads; pipeline._load_graph), merged into
    a lookup table."""
    import numpy as np
    import torch  # noqa: F401  (measure imports it: before the empty process's RSS, not inside the input's)

    from unet_dist.bench.common import measure, reset_peak_rss, rss_bytes
    from unet_dist.bench.segment_inputs import planar_graph
    from unet_dist.segment.graph import solve

    reset_peak_rss()
    empty = rss_bytes()
    g = planar_graph(fragments, keep=keep)
    n, edges = g.pop("fragments"), len(g["a"])
    graph = {"lo": g.pop("a").astype(np.int64) - 1, "hi": g.pop("b").astype(np.int64) - 1, "hist": g.pop("hist")}
    del g

    def go():
        lut = solve(n, graph, threshold, merge, "quantile")
        return {"neurons": int(lut.max(initial=0))}

    out = measure(go)
    return {**out, "fragments": n, "edges": edges, "rss_empty_bytes": empty}


# ------------------------------------------------------------------------------------ the parent

def run(args) -> dict:
    from unet_dist.bench import common
    from unet_dist.bench.segment_tables import graph_rows, memory_rows, speed_rows

    device = common.resolve_device("cpu")
    profile = "tiny" if args.tiny else "cpu"
    cfg, settings = _settings(args, profile)
    peers = _peers(args.peers)
    sizes = _sizes(args.sizes)
    graph, graph_mean = (GRAPH[profile][0] if args.graph is None else int(args.graph),
                         GRAPH[profile][1] if args.graph_mean is None else int(args.graph_mean))
    _check_disk(args.workdir, sizes, TILES[profile])
    with common.workdir(args.workdir) as work:
        rows, truth_info = speed_rows(work, settings["volume"], cfg, peers)
        memory = memory_rows(work, sizes, TILES[profile], cfg) if sizes else []
    graphs = graph_rows(graph, graph_mean, cfg.threshold) if graph > 0 else []
    return _report(args, device, cfg, settings, rows, truth_info, memory, graphs)


def _settings(args, profile: str):
    from unet_dist.config import load_config, to_dict
    from unet_dist.data.layout import parse_zyx
    from unet_dist.errors import UserError

    volume = parse_zyx(args.volume, "--volume") if args.volume else VOLUMES[profile]
    block, halo = BLOCKS[profile]
    block = list(parse_zyx(args.block_size, "--block-size")) if args.block_size else block
    wrong = [o for o in args.overrides if not o.startswith("segment.")]
    if wrong:
        raise UserError(f"bench segment takes segment.* overrides only, got {', '.join(wrong)}")
    flags = [f"segment.block_size=[{','.join(map(str, block))}]", f"segment.halo=[{','.join(map(str, halo))}]"]
    cfg = load_config(None, [*flags, *args.overrides]).segment
    if args.graph is not None and args.graph < 0 or args.graph_mean is not None and args.graph_mean < 0:
        raise UserError("--graph and --graph-mean must be >= 0")
    return cfg, {"volume": tuple(volume), "segment": to_dict(cfg)}


def _peers(text: str) -> list[str]:
    from unet_dist.errors import UserError

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PEERS]
    if unknown or "whole" not in names:
        raise UserError(f"--peers: expected some of {', '.join(PEERS)} including whole, got '{text}'")
    return names


def _sizes(text: str | None) -> list[float]:
    from unet_dist.errors import UserError

    if not text:
        return []
    try:
        sizes = [float(v) for v in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) < 2 or not all(math.isfinite(s) and s > 0 for s in sizes):
        raise UserError(f"--sizes: expected at least two positive Gvox, e.g. 1,4, got '{text}'")
    return sizes


def _check_disk(folder: str | None, sizes: list[float], tile) -> None:
    """The largest memory-mode input fits where it is written (its stores are made one at a time)."""
    import os
    import shutil
    import tempfile

    from unet_dist.bench.segment_inputs import tiled_shape
    from unet_dist.errors import UserError

    if not sizes:
        return
    voxels = max(math.prod(tiled_shape(s * 1e9, tile)) for s in sizes)
    where = folder or tempfile.gettempdir()
    free = shutil.disk_usage(where if os.path.exists(where) else ".").free
    # uint8 affinities (noise compresses little) + fragments and labels (compress well)
    if free < 4 * voxels:
        raise UserError(f"--sizes: {voxels / 1e9:.3g} Gvox needs about {4 * voxels / 1e9:.1f} GB in {where}, "
                        f"{free / 1e9:.1f} GB free (pass --workdir elsewhere or smaller --sizes)")


def _peer_versions() -> dict:
    from importlib import metadata

    found = {}
    for name in ("waterz", "mwatershed", "scikit-image"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _report(args, device, cfg, settings, rows, truth_info, memory, graphs) -> dict:
    from unet_dist.bench import common
    from unet_dist.bench.segment_tables import GRAPH_COLUMNS, MEMORY_COLUMNS, graph_summary

    ours = next(r for r in rows if r["role"] == "ours")
    whole = next(r for r in rows if r["method"].startswith("whole"))
    config = {"volume": list(settings["volume"]), "segment": settings["segment"], "truth": truth_info,
              "processes": 1, "sizes_gvox": [m["gvox"] for m in memory], "peer_versions": _peer_versions()}
    report = common.make_report(
        "segment", args, device, config, rows, ours["mvox_per_s"] / whole["mvox_per_s"],
        "Mvox/s of unet-dist segment (blockwise, one process) / the same functions on the whole volume in memory",
        ours, whole, notes=[
            "each method ran in a fresh child process (one core); peak RSS is that process's peak during the "
            "measured call, above baseline less its RSS just before it",
            "voi_vs_ours: VOI (split + merge) between that method's IDs and ours over the whole volume; "
            "voi_vs_truth: against the synthetic neuron IDs, leaving out their ID 0",
            "waterz's threshold is 1 - ours (it merges while 1 - mean affinity is below it); mwatershed gets the "
            "affinities less ours (attractive above it)"])
    report["memory"], report["graph"] = memory, graphs
    report["summary"] = {"voi_ours_vs_whole": ours.get("voi_vs_whole")}
    if len(memory) >= 2:
        report["summary"]["peak_rss_ratio_largest_over_smallest"] = round(
            memory[-1]["peak_rss_mb"] / memory[0]["peak_rss_mb"], 3)
        report["summary"]["volume_ratio_largest_over_smallest"] = round(memory[-1]["voxels"] / memory[0]["voxels"], 2)
    report["summary"].update(graph_summary(graphs))
    report["tables"] = {"memory of segment by volume size": (memory, MEMORY_COLUMNS),
                        "global step (grouping + merge)": (graphs, GRAPH_COLUMNS)}
    return report


COLUMNS = [("method", "method"), ("mvox_per_s", "Mvox/s"), ("mvox_per_s_per_core", "Mvox/s/core"),
           ("mvox_per_cpu_s", "Mvox/CPU-s"), ("seconds", "seconds"), ("peak_rss_mb", "peak RSS MB"),
           ("peak_rss_above_baseline_mb", "above base MB"), ("neurons", "neurons"), ("voi_vs_whole", "VOI vs whole"),
           ("voi_vs_truth", "VOI vs truth"), ("x_peer", "x peer")]
