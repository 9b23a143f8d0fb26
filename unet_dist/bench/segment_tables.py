"""The rows of `bench segment` (bench/segment.py): the speed table (ours and peers on one volume),
the memory table (`segment` at several volume sizes) and the global step's table, each measured in
fresh child processes (common.run_child)."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np

from unet_dist.bench import common

MEMORY_COLUMNS = [("gvox", "Gvox"), ("shape", "Z,Y,X"), ("blocks", "blocks"), ("fragments", "fragments"),
                  ("edges", "edges"), ("seconds", "seconds"), ("mvox_per_s", "Mvox/s"),
                  ("peak_rss_mb", "peak RSS MB"), ("peak_rss_above_baseline_mb", "above base MB"),
                  ("write_s", "input write s")]
GRAPH_COLUMNS = [("merge", "merge"), ("fragments", "fragments"), ("edges", "edges"), ("seconds", "seconds"),
                 ("input_mb", "edges in MB"), ("step_mb", "step peak MB"), ("peak_rss_mb", "peak RSS MB")]
LABELS = ("whole volume in memory (same functions)", "waterz.agglomerate (whole volume)",
          "mwatershed.agglom (whole volume)")


def voi(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import variation_of_information

    return float(sum(variation_of_information(a.ravel(), b.ravel())))


def _rates(row: dict, voxels: int) -> dict:
    row["voxels"] = voxels
    row["mvox_per_s"] = voxels / row["seconds"] / 1e6
    row["mvox_per_s_per_core"] = row["mvox_per_s"]  # one process, OMP_NUM_THREADS threads for numpy/scipy
    row["mvox_per_cpu_s"] = voxels / row["cpu_s"] / 1e6 if row["cpu_s"] else None
    return row


def _input(work: Path, volume, cfg) -> tuple[str, np.ndarray, dict]:
    from unet_dist.bench.segment_inputs import noisy_affinities, voronoi_ids, write_affinity_store

    common.log(f"segment: synthetic neurons and affinities {volume}")
    ids = voronoi_ids(volume)
    aff = noisy_affinities(ids)
    chunk = tuple(min(b, n) for b, n in zip(cfg.block_size, volume))
    pred = write_affinity_store(work / "pred.zarr", volume, chunk, lambda box: aff[(slice(None), *box)])
    info = {"neurons": int(len(np.unique(ids)) - 1), "boundary_frac": round(float(np.mean(ids == 0)), 4),
            "affinities": "issue 24 convention, Gaussian blur 0.7 voxel + noise 0.1, uint8"}
    return str(pred), ids, info


def speed_rows(work: Path, volume, cfg, peers: list[str]) -> tuple[list[dict], dict]:
    """Ours and each peer on one volume: rates, memory, VOI against the whole-volume run and the truth."""
    import zarr

    from unet_dist.config import to_dict

    pred, truth, info = _input(work, volume, cfg)
    settings, voxels, labels, rows = to_dict(cfg), math.prod(volume), {}, []
    common.log("segment: ours (unet-dist segment, child process)")
    ours = common.run_child("unet_dist.bench.segment:run_ours", {"pred": pred, "cfg": settings})
    labels["ours"] = zarr.open_group(pred, mode="r")["labels/neurons/0"][:]
    res = ours["result"]
    rows.append(_rates({"method": "unet-dist segment (blockwise)", "role": "ours", **common.measured_row([ours]),
                        **{k: res[k] for k in ("fragments", "edges", "neurons", "blocks")},
                        "phases_s": res["seconds"]}, voxels))
    for name, label in zip(("whole", "waterz", "mwatershed"), LABELS):
        if name not in peers:
            continue
        common.log(f"segment: {name} (child process)")
        out = str(work / f"{name}.npy")
        try:
            m = common.run_child("unet_dist.bench.segment:run_peer",
                                 {"name": name, "pred": pred, "cfg": settings, "out": out})
        except RuntimeError as exc:  # a peer that does not install or build here: said, not fatal
            rows.append({"method": label, "role": "other", "error": str(exc).splitlines()[-1][:300]})
            continue
        labels[name] = np.load(out)
        rows.append(_rates({"method": label, "role": "peer" if name == "whole" else "other",
                            **common.measured_row([m]), **m["result"]}, voxels))
    keep = truth != 0
    for row, name in zip([r for r in rows if "error" not in r], labels):
        row["voi_vs_whole"] = voi(labels[name], labels["whole"]) if "whole" in labels else None
        row["voi_vs_truth"] = voi(truth[keep], labels[name][keep])
    whole = next((r for r in rows if r["role"] == "peer"), None)
    for row in rows:
        if "error" not in row and whole is not None:
            row["x_peer"] = row["mvox_per_s"] / whole["mvox_per_s"]
    return rows, info


def memory_rows(work: Path, sizes: list[float], tile, cfg) -> list[dict]:
    """`segment`'s peak RSS on volumes of each size (Gvox), repeats of one tile, each deleted after."""
    from unet_dist.bench.segment_inputs import noisy_affinities, tiled_reader, tiled_shape, voronoi_ids, \
        write_affinity_store
    from unet_dist.config import to_dict

    tile_aff = noisy_affinities(voronoi_ids(tile, seed=2))
    reader = tiled_reader(tile_aff)
    rows = []
    for gvox in sizes:
        shape = tiled_shape(gvox * 1e9, tile)
        voxels = math.prod(shape)
        common.log(f"segment: memory mode, writing {shape} ({voxels / 1e9:.3g} Gvox)")
        pred = work / f"pred-{gvox}.zarr"
        started = time.perf_counter()
        write_affinity_store(pred, shape, tuple(cfg.block_size), reader)
        write_s = time.perf_counter() - started
        common.log(f"segment: memory mode, segmenting {shape} (child process)")
        m = common.run_child("unet_dist.bench.segment:run_ours", {"pred": str(pred), "cfg": to_dict(cfg)},
                             timeout=6 * 3600)
        shutil.rmtree(pred, ignore_errors=True)
        res = m["result"]
        rows.append({"gvox": round(voxels / 1e9, 4), "shape": ",".join(map(str, shape)), **common.measured_row([m]),
                     "voxels": voxels, "mvox_per_s": voxels / m["seconds"] / 1e6, "write_s": write_s,
                     **{k: res[k] for k in ("fragments", "edges", "neurons", "blocks")}, "phases_s": res["seconds"]})
    return rows


def graph_rows(fragments: int, mean_fragments: int, threshold: float) -> list[dict]:
    """The global step on graphs of about 3 n and about n edges per merge rule (two points to fit)."""
    rows = []
    for merge, n in (("union_find", fragments), ("mean", mean_fragments)):
        if n <= 0:
            continue
        for keep in (1.0, 1 / 3):
            common.log(f"segment: global step, {merge} on {n:.3g} fragments, {keep:.2g} of 3 n edges (child)")
            m = common.run_child("unet_dist.bench.segment:run_graph",
                                 {"fragments": n, "keep": keep, "merge": merge, "threshold": threshold})
            rows.append({"merge": merge, "fragments": m["fragments"], "edges": m["edges"], "seconds": m["seconds"],
                         "cpu_s": m["cpu_s"], "neurons": m["neurons"],
                         "input_mb": (m["rss_before_bytes"] - m["rss_empty_bytes"]) / common.MB,
                         "step_mb": (m["peak_rss_bytes"] - m["rss_before_bytes"]) / common.MB,
                         "peak_rss_mb": m["peak_rss_bytes"] / common.MB})
    return rows


def graph_summary(rows: list[dict]) -> dict:
    """Bytes per fragment and per edge of the global step (edges held + the step's peak above them),
    fitted through each merge rule's two graphs: total = per_fragment * n + per_edge * e."""
    out = {}
    for merge in ("union_find", "mean"):
        pair = [r for r in rows if r["merge"] == merge]
        if len(pair) != 2 or pair[0]["edges"] == pair[1]["edges"]:
            continue
        totals = [(r["input_mb"] + r["step_mb"]) * common.MB for r in pair]
        per_edge = (totals[0] - totals[1]) / (pair[0]["edges"] - pair[1]["edges"])
        per_fragment = (totals[1] - per_edge * pair[1]["edges"]) / pair[1]["fragments"]
        out[f"{merge}_bytes_per_edge"] = round(per_edge, 1)
        out[f"{merge}_bytes_per_fragment"] = round(per_fragment, 1)
        out[f"{merge}_seconds_at_{pair[0]['fragments']:.0e}_fragments"] = round(pair[0]["seconds"], 2)
    return out
