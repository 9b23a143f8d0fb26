"""`unet-dist segment`: a prediction store -> the label image `labels/neurons` in it, blockwise.

The field's pipeline (DaCapo, volara, LSD): (1) fragments per block, a watershed with a halo,
IDs unique across blocks; (2) edges per block, between fragments within it and across its lower
faces, with the sum, count and histogram of the link values along each contact (graph.py); (3) one
global step on rank 0, a merge of the edges, scored by `segment.edge_score`, at `segment.threshold`
into a lookup table fragment -> neuron; (4) every block
relabelled through the table into labels/neurons (uint64, chunks = blocks), then its coarser levels
(mode). Ranks (torchrun / srun, dist.py) take contiguous runs of blocks (`block_plan.assign`) and
write whole chunks only. Each phase records its finished blocks in a manifest
(`PRED.zarr/.segment/<phase>/.manifest`, under a run key hashing the settings), so a run stopped
anywhere, even by kill -9, continues where it stopped and gives the same IDs; every block's result
depends on the block alone and the global step on all edges, so 1, 2 or 3 ranks give the same IDs.
`.segment/` (fragments, edges, table) is removed when labels/neurons is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import zarr

from unet_dist import __version__, dist
from unet_dist.config import SegmentConfig, to_dict, validate_segment
from unet_dist.data import pyramid
from unet_dist.data.damaged_chunks import read_region, writing_every_chunk
from unet_dist.data.layout import Layout, create_volume_array
from unet_dist.data.ome import Pyramid, create_label_image, image_levels
from unet_dist.data.ome_metadata import read_multiscale
from unet_dist.data.store import RAW, open_store
from unet_dist.errors import UserError
from unet_dist.monitor.progress import Progress
from unet_dist.predict.block_plan import assign, block_core
from unet_dist.predict.failures import in_block, settle
from unet_dist.predict.manifest import Manifest, OutputLock
from unet_dist.predict.prediction_store import NEURONS
from unet_dist.segment.blocks import Input, Plan, block_edges, block_fragments, nearest_channels
from unet_dist.segment.graph import STATS, block_starts, compact, solve

STATE = ".segment"
PHASES = ("fragments", "edges", "relabel")


def open_input(pred) -> tuple[zarr.Group, Input]:
    """The prediction's level 0 as affinities or a membrane probability; anything else refused."""
    path = Path(pred)
    if not path.exists():
        raise UserError(f"{path}: no such prediction store")
    group = open_store(path, arrays=(RAW,))
    array = group[RAW]
    info = group.attrs.get("unet_dist", {}).get("predict", {})
    target = info.get("target", "membrane") if isinstance(info, dict) else None
    if target == "affinities":
        offsets = info.get("offsets") or []
        if array.ndim != 4 or len(offsets) != array.shape[0]:
            raise UserError(f"{path}: affinities of shape {list(array.shape)} do not match their "
                            f"{len(offsets)} offsets (unet_dist.predict.offsets)")
        links = nearest_channels(offsets)
        if all(c is None for c in links):
            raise UserError(f"{path}: no nearest-neighbour affinity among the offsets {offsets}")
        return group, Input(array, "affinities", links)
    if target == "membrane" and info and array.ndim == 3:
        return group, Input(array, "membrane", (None, None, None))
    raise UserError(f"{path}: not a prediction of affinities or of a membrane probability (level 0 of shape "
                    f"{list(array.shape)}, target {target!r}); segment reads the output of `unet-dist predict`")


def validated_threshold(pred) -> float | None:
    """The merge threshold the training run chose on its validation split, as predict recorded it."""
    try:
        info = zarr.open_group(str(pred), mode="r").attrs.get("unet_dist", {}).get("predict", {})
    except Exception:  # not a store: open_input says so in its own words
        return None
    value = info.get("segment_threshold") if isinstance(info, dict) else None
    return float(value) if isinstance(value, (int, float)) else None


def run_settings(path: Path, group, inp: Input, plan: Plan, cfg: SegmentConfig) -> dict:
    """Everything that changes labels/neurons; its hash is the key a continued run must match."""
    predicted = group.attrs.get("unet_dist", {}).get("predict", {}).get("run_key")
    return {"input": str(path.resolve()), "prediction_key": predicted, "kind": inp.kind, "links": list(inp.links),
            "shape": list(plan.shape), **to_dict(cfg), "block_size": list(plan.block)}


def _check_output(path: Path, key: str, settings: dict, overwrite: bool) -> bool:
    """Whether an unfinished segmentation is continued; refuses anything else before a byte is written."""
    if overwrite:
        return False
    try:
        state = json.loads((path / STATE / "zarr.json").read_text())["attributes"]
    except (OSError, ValueError, KeyError):
        state = None
    state = state if state and "key" in state else None
    if state is not None and state.get("key") == key:
        return True
    if state is not None:
        old = state.get("settings", {})
        differ = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        raise UserError(f"{path}: holds an unfinished segmentation with other settings{' (' + ', '.join(differ) + ')' if differ else ''}; "
                        "pass --overwrite to start again")
    if (path / "labels" / NEURONS).exists():
        raise UserError(f"{path}: labels/{NEURONS} already exists (pass --overwrite to replace it)")
    return False


def segment(pred, cfg: SegmentConfig | None = None, overwrite: bool = False, progress: str = "auto") -> dict:
    """Segment the prediction `pred` into its labels/neurons; returns counts and timings."""
    cfg = cfg or SegmentConfig()
    validate_segment(cfg, "segment")
    env = dist.detect_env()
    path = Path(pred)
    group, inp = open_input(path)
    plan = Plan(inp.shape, tuple(min(b, n) for b, n in zip(cfg.block_size, inp.shape)), tuple(cfg.halo))
    settings = run_settings(path, group, inp, plan, cfg)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
    lock = OutputLock(path, "segmentation")
    if held_by := lock.holder():
        raise UserError(lock.refusal(held_by))
    continuing = _check_output(path, key, settings, overwrite)
    with dist.process_group(env, torch.device("cpu")):
        refused = None
        if dist.is_main():
            try:
                lock.acquire()
                _prepare(path, group, plan, key, settings, continuing)
            except UserError as exc:
                refused = str(exc)
        if refused := dist.broadcast_object(refused):
            raise UserError(refused)
        try:
            return _segment(path, inp, plan, key, cfg, progress)
        finally:
            lock.release()


def _prepare(path: Path, group, plan: Plan, key: str, settings: dict, continuing: bool) -> None:
    """The state folder and the arrays (rank 0). Safe to repeat: a run killed here is continued."""
    state = path / STATE
    if not continuing:
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(path / "labels" / NEURONS, ignore_errors=True)
    # the run key as the state group's attributes: what a continued run must match
    work = zarr.open_group(str(state), mode="a", zarr_format=3)
    work.attrs.update({"key": key, "settings": settings})
    if not (state / "fragments" / "zarr.json").exists():  # not work.arrays(): zarr warns of the phase folders
        create_volume_array(work, "fragments", Layout(plan.shape, plan.block, None), np.uint64, "labels")
    for phase in PHASES:
        (state / phase).mkdir(exist_ok=True)
        Manifest(state / phase, key).create()
    (state / "edges-of-blocks").mkdir(exist_ok=True)
    multiscale = read_multiscale(group.attrs)
    space = [i for i, axis in enumerate(multiscale.axes) if axis.is_space] if multiscale else []
    steps = [s[-3:] for s in pyramid.steps_of(group)] if multiscale else []
    levels = Pyramid(Layout(plan.shape, plan.block, None), tuple(tuple(s) for s in steps),
                     multiscale.voxel_size(0) if multiscale else None)
    translation = [multiscale.levels[0].translation[i] for i in space] if len(space) == 3 else None
    writable = zarr.open_group(str(path), mode="r+")
    create_label_image(writable, NEURONS, levels, np.uint64, translation)


def _segment(path: Path, inp: Input, plan: Plan, key: str, cfg: SegmentConfig, progress: str) -> dict:
    state = path / STATE
    # a block of background only is all zeros, the fill value: its chunk is written all the same, as
    # readers take a missing chunk of our arrays for damage
    fragments = writing_every_chunk(zarr.open_group(str(state), mode="r+")["fragments"])
    neurons_group = zarr.open_group(str(path), mode="r+")["labels"][NEURONS]
    neurons = writing_every_chunk(neurons_group["0"])
    seconds = {}

    def frag_work(index: int) -> None:
        core = block_core(plan, index)
        fragments[tuple(slice(lo, hi) for lo, hi in core)] = block_fragments(inp, plan, index, core, cfg)

    def edge_work(index: int) -> None:
        core = block_core(plan, index)
        lows = tuple(lo > 0 for lo, _ in core)
        grown = tuple(slice(lo - low, hi) for (lo, hi), low in zip(core, lows))
        below = read_region(fragments, grown)
        edges = block_edges(inp, below, core, lows)
        own = below[tuple(slice(int(low), None) for low in lows)]
        edges["n"] = np.array([max(int(own.max()) - plan.base(index) + 1, 0)])  # 0: all background
        _save_npz(state / "edges-of-blocks" / f"{index}.npz", edges)

    for phase, work in (("fragments", frag_work), ("edges", edge_work)):
        seconds[phase] = _run_phase(phase, plan, Manifest(state / phase, key, dist.rank()), work, progress)
    started = time.perf_counter()
    table = _table(state, plan, cfg)
    seconds["merge"] = time.perf_counter() - started
    starts, block_lut = table["starts"], _block_lookup(state / "lut.npy")

    def relabel_work(index: int) -> None:
        box = tuple(slice(lo, hi) for lo, hi in block_core(plan, index))
        frags = read_region(fragments, box)
        fragment = frags != 0
        ids = np.zeros(frags.shape, np.uint64)
        lut = block_lut(int(starts[index]), int(starts[index + 1]))
        ids[fragment] = lut[(frags[fragment] - np.uint64(plan.base(index))).astype(np.int64)]
        neurons[box] = ids

    seconds["relabel"] = _run_phase("relabel", plan, Manifest(state / "relabel", key, dist.rank()), relabel_work,
                                    progress)
    started = time.perf_counter()
    levels = image_levels(neurons_group)
    pyramid.build(levels, [s[-3:] for s in pyramid.steps_of(neurons_group)], "mode", dist.rank(),
                  dist.world_size(), barrier=lambda: dist.barrier(patient=True))
    dist.barrier(patient=True)
    seconds["pyramid"] = time.perf_counter() - started
    result = {"out": f"{path}:labels/{NEURONS}", "blocks": plan.n_blocks, "block_size": list(plan.block),
              "fragments": int(table["fragments"]), "edges": int(table["edges"]), "neurons": int(table["neurons"]),
              "voxels": math.prod(plan.shape), "seconds": {k: round(v, 3) for k, v in seconds.items()}}
    total = sum(seconds.values())
    result["mvox_per_s"] = round(result["voxels"] / total / 1e6, 3) if total > 0 else None
    if dist.is_main():
        neurons_group.attrs["unet_dist"] = {"segment": {"run_key": key, "complete": True, "version": __version__,
                                                        **{k: result[k] for k in ("fragments", "edges", "neurons")},
                                                        "settings": fragments_settings(state)}}
        shutil.rmtree(state)
    dist.barrier(patient=True)
    return result


def fragments_settings(state: Path) -> dict:
    return json.loads((state / "zarr.json").read_text())["attributes"]["settings"]


def _run_phase(phase: str, plan: Plan, manifest: Manifest, work: Callable[[int], None], mode: str) -> float:
    """This rank's share of the blocks no earlier run finished; every rank meets at the end."""
    started = time.perf_counter()
    done = dist.broadcast_object(manifest.done() if dist.is_main() else None)
    todo = assign([i for i in range(plan.n_blocks) if i not in done], dist.rank(), dist.world_size())
    world = dist.world_size()
    label = f"segment {phase}" + (f" (rank 0 of {world})" if world > 1 else "")
    progress = Progress(label, len(todo), "blocks", mode=mode) if dist.is_main() else None
    error = None
    try:
        for count, index in enumerate(todo, 1):
            with in_block(plan, index, manifest.dir.parent, doing=f"segmenting ({phase})"):
                work(index)
            manifest.mark(index)
            if progress is not None:
                progress.update(count)
        manifest.flush()
    except Exception as exc:  # a damaged input chunk, a full disk: every rank stops, then says what is left
        error = exc
        with contextlib.suppress(Exception):
            manifest.flush()  # the blocks stored before it stay done
    state = manifest.dir.parent.parent
    settle(error, state, plan.n_blocks, (len(done) if dist.is_main() else 0) + manifest.recorded, False, patient=True,
           outcome=lambda finished: f"{finished} of {plan.n_blocks} blocks of the {phase} phase are done (kept in "
                                    f"{state}): the same command continues")
    return time.perf_counter() - started


def _table(state: Path, plan: Plan, cfg: SegmentConfig):
    """The global step's outcome, made once (rank 0): lut.npy, then table.npz (its presence says both are whole)."""
    error = None
    # state from a version that kept the table inside table.npz has no lut.npy: made again
    if dist.is_main() and not ((state / "table.npz").exists() and (state / "lut.npy").exists()):
        try:
            table = _global_step(state, plan, cfg)
            _save_atomically(state / "lut.npy", lambda f: np.save(f, table.pop("lut")))
            _save_npz(state / "table.npz", table)
        except Exception as exc:  # a full disk, a damaged edges file: every rank says so, and stops
            error = exc
    settle(error, state, plan.n_blocks, 0, False, patient=True,
           outcome=lambda _: f"the blocks' fragments and edges are kept in {state}: the same command continues")
    return np.load(state / "table.npz")


def _global_step(state: Path, plan: Plan, cfg: SegmentConfig) -> dict:
    """Rank 0: all blocks' edges -> the lookup table (graph.py)."""
    counts, starts, graph = _load_graph(state, plan, STATS[cfg.edge_score])
    edges = len(graph["lo"])
    lut = solve(int(counts.sum()), graph, cfg.threshold, cfg.merge, cfg.edge_score, cfg.quantile)
    score = f"{cfg.quantile:g} quantile" if cfg.edge_score == "quantile" else "mean"
    print(f"segment: {int(counts.sum())} fragments, {edges} edges -> {int(lut.max(initial=0))} neurons "
          f"({cfg.merge} at {cfg.threshold}, edges scored by their {score})", file=sys.stderr, flush=True)
    return {"lut": lut, "starts": np.append(starts, counts.sum()), "fragments": np.int64(counts.sum()),
            "edges": np.int64(edges), "neurons": np.uint64(lut.max(initial=0))}


def _block_lookup(path: Path) -> Callable[[int, int], np.ndarray]:
    """lut[start:stop] read from the file per block: a block's fragments have consecutive compact
    indices, so a rank holds one block's share of the table, not the table (8 B per fragment of the volume)."""
    with open(path, "rb") as f:  # read, not mapped: a map would keep every page a rank touched resident
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, _, dtype = read_header(f)
        offset = f.tell()

    def read(start: int, stop: int) -> np.ndarray:
        return np.fromfile(path, dtype=dtype, count=stop - start, offset=offset + start * dtype.itemsize)

    return read


def _load_graph(state: Path, plan: Plan, stats: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(fragments per block, each block's first compact index, the graph `graph.solve` takes): every block's edge rows with compact
    fragment indices and the statistics the score reads. A fragment pair is an edge of one block only
    (the block that owns the links between them, blocks.block_edges), so the rows are the graph's edges
    as they are. Two passes, one file open at a time (a volume has more blocks than a process may open
    files): sizes first, then the rows into arrays made once (no lists of parts to concatenate)."""
    files = [state / "edges-of-blocks" / f"{i}.npz" for i in range(plan.n_blocks)]
    counts, rows = np.zeros(plan.n_blocks, np.int64), np.zeros(plan.n_blocks, np.int64)
    for i, path in enumerate(files):
        with np.load(path) as block:
            counts[i], rows[i] = int(block["n"][0]), len(block["a"])
    bases = np.array([plan.base(i) for i in range(plan.n_blocks)], np.uint64)
    starts = block_starts(counts)
    graph, end = {}, np.cumsum(rows)
    for i, path in enumerate(files):
        with np.load(path) as block:
            part = {"lo": compact(block["a"], bases, starts), "hi": compact(block["b"], bases, starts),
                    **{k: block[k] for k in stats}}
        for key, values in part.items():
            if key not in graph:
                graph[key] = np.empty((int(end[-1]), *values.shape[1:]), values.dtype)
            graph[key][end[i] - rows[i]:end[i]] = values
    return counts, starts, graph


def _save_npz(path: Path, arrays: dict) -> None:
    _save_atomically(path, lambda f: np.savez(f, **arrays))


def _save_atomically(path: Path, write: Callable) -> None:
    """Written whole or not at all: a reader (or a resumed run) never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)
