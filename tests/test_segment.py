"""`unet-dist segment`: perfect affinities give the true neurons across block faces, the same IDs on
1, 2 and 3 ranks and after kill -9 + resume, a block-size change moves little, OME validity, the
2D membrane path, bad inputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.ndimage as ndi
import zarr
from skimage.metrics import variation_of_information

from unet_dist.config import SegmentConfig
from unet_dist.data.affinities import affinities as data_affinities
from unet_dist.files import FAULT_ENV
from unet_dist.segment.pipeline import segment

from helpers import ENV, ROOT, check_ome, run_cli, torchrun_cmd

NEAREST = [(-1, 0, 0), (0, -1, 0), (0, 0, -1)]
SHAPE = (16, 64, 64)
BLOCK = "8,24,24"  # 2 x 3 x 3 blocks, the last ones partial


def affinities(ids: np.ndarray, offsets=NEAREST) -> np.ndarray:
    """The issue's convention (data/affinities.py, tested against plain loops), as floats."""
    return data_affinities(ids, offsets, np.float32)


def neurons(shape=SHAPE, n=12, seed=0) -> np.ndarray:
    """Voronoi cells separated by a one-voxel layer of 0 (as in the FIB-SEM volume), plus a snake
    through every block: a tube winding through the volume."""
    rng = np.random.default_rng(seed)
    points = rng.uniform(0, 1, (n, 3)) * shape
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    ids = np.argmin(((grid[..., None, :] - points) ** 2).sum(-1), -1).astype(np.int64) + 1
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    snake = (y - (shape[1] / 2 + shape[1] / 3 * np.sin(x / shape[2] * 2 * np.pi))) ** 2 + (z - shape[0] / 2) ** 2 < 9
    ids[snake] = n + 1
    edge = np.zeros(shape, bool)
    for a in range(3):
        diff = np.diff(ids, axis=a) != 0
        edge |= np.pad(diff, [(0, 1) if i == a else (0, 0) for i in range(3)])
    ids[edge] = 0
    # the one-sided layer can cut a sliver off a neuron (the snake loses 8 voxels at x = 0 with seed 0);
    # such a sliver is a neuron no nearest-neighbour affinity reaches, so it becomes layer too
    for i in range(1, n + 2):
        pieces, count = ndi.label(ids == i)
        if count > 1:
            ids[(pieces != 0) & (pieces != np.argmax(np.bincount(pieces.ravel())[1:]) + 1)] = 0
    return ids


def write_prediction(path, values: np.ndarray, target="affinities", offsets=NEAREST, dtype="uint8"):
    """A prediction store as `predict` writes it (level 0 only), chunks (C, 8, 32, 32)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    data = np.rint(values * 255).astype(np.uint8) if dtype == "uint8" else values.astype(np.float16)
    chunks = (*data.shape[:-3], 8, 32, 32)
    group.create_array("0", shape=data.shape, dtype=data.dtype, chunks=chunks,
                       dimension_names=["c", "z", "y", "x"][4 - data.ndim:])[:] = data
    axes = [{"name": "c", "type": "channel"}] * (data.ndim == 4) + [
        {"name": n, "type": "space", "unit": "nanometer"} for n in "zyx"]
    predict = {"run_key": "test", "target": target, **({"offsets": [list(o) for o in offsets]} if offsets else {})}
    group.attrs.update({"ome": {"version": "0.5", "multiscales": [{"name": target, "axes": axes, "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * (data.ndim - 3) + [10.0] * 3}]}]}]},
        "unet_dist": {"predict": predict}})
    return path


def noisy(ids, seed=1, blur=0.5, noise=0.1):
    a = ndi.gaussian_filter(affinities(ids), (0, blur, blur, blur))
    return np.clip(a + np.random.default_rng(seed).normal(0, noise, a.shape), 0, 1)


def labels_of(path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["labels/neurons/0"][:]


def voi(ids, seg) -> float:
    keep = ids != 0
    return float(sum(variation_of_information(ids[keep], seg[keep])))


def test_perfect_affinities_give_one_id_per_neuron_across_block_faces(tmp_path):
    ids = neurons()
    pred = write_prediction(tmp_path / "pred.zarr", affinities(ids))
    result = segment(pred, SegmentConfig(block_size=[8, 24, 24], halo=[2, 8, 8]))
    seg = labels_of(pred)
    assert result["blocks"] == 18 and seg.dtype == np.uint64
    # the truth up to a relabel but for a few thin-process voxels left background (0)
    assert voi(ids, seg) < 0.01 and np.mean(seg[ids != 0] == 0) < 0.002
    snake = np.unique(seg[(ids == ids.max()) & (seg != 0)])  # through 9 blocks, one ID
    assert len(snake) == 1 and result["fragments"] > result["neurons"]
    assert not (pred / ".segment").exists()


def test_every_fragment_pair_is_an_edge_of_one_block_only():
    """The global step takes the blocks' rows as the graph's edges, ungrouped."""
    from unet_dist.predict.block_plan import block_core
    from unet_dist.segment.blocks import Input, Plan, block_edges, block_fragments

    ids = neurons()
    inp = Input(affinities(ids), "affinities", (0, 1, 2))
    plan = Plan(SHAPE, (5, 24, 17), (2, 8, 8))  # 4 x 3 x 4 blocks, partial ones on every axis
    cfg = SegmentConfig()
    frags = np.zeros(SHAPE, np.uint64)
    for index in range(plan.n_blocks):
        core = block_core(plan, index)
        frags[tuple(slice(lo, hi) for lo, hi in core)] = block_fragments(inp, plan, index, core, cfg)
    pairs = []
    for index in range(plan.n_blocks):
        core = block_core(plan, index)
        lows = tuple(lo > 0 for lo, _ in core)
        below = frags[tuple(slice(lo - low, hi) for (lo, hi), low in zip(core, lows))]
        edges = block_edges(inp, below, core, lows)
        pairs += list(zip(edges["a"].tolist(), edges["b"].tolist()))
    assert len(pairs) == len(set(pairs)) > 100
    # and every contact of two fragments anywhere in the volume is one of them
    touching = set()
    for a in range(3):
        here, back = [slice(None)] * 3, [slice(None)] * 3
        here[a], back[a] = slice(1, None), slice(None, -1)
        u, v = frags[tuple(here)], frags[tuple(back)]
        ok = (u != v) & (u != 0) & (v != 0)
        touching |= set(zip(np.minimum(u[ok], v[ok]).tolist(), np.maximum(u[ok], v[ok]).tolist()))
    assert touching == set(pairs)


def test_more_blocks_than_the_process_may_open_files(tmp_path):
    """The global step reads every block's edges file: one open at a time, as a cluster's
    `ulimit -n` of 1024 is less than a large volume's blocks."""
    ids = neurons()
    pred = write_prediction(tmp_path / "pred.zarr", affinities(ids))
    limit = 200  # the interpreter, torch and zarr hold fewer; the blocks' files are 256
    done = subprocess.run(["prlimit", f"--nofile={limit}", sys.executable, "-m", "unet_dist", "segment", "--pred",
                           str(pred), "--block-size", "4,8,8"], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"blocks": 256' in done.stdout and voi(ids, labels_of(pred)) < 0.05


def test_a_block_of_background_only_is_written_and_read_as_zeros(tmp_path):
    """A block with no neuron (all affinities 0) is all the fill value: its chunks must still be
    written, since a missing chunk of our arrays reads as damage (a real first run hit this)."""
    ids = neurons()
    ids[:8, :24, :24] = 0
    pred = write_prediction(tmp_path / "pred.zarr", affinities(ids))
    result = segment(pred, SegmentConfig(block_size=[8, 24, 24], halo=[2, 8, 8]))
    seg = labels_of(pred)
    assert result["blocks"] == 18 and not seg[:8, :24, :24].any() and seg.max() > 5
    assert (pred / "labels" / "neurons" / "0" / "c" / "0" / "0" / "0").is_file()


def test_block_size_moves_the_result_little_and_ids_are_canonical(tmp_path):
    ids = neurons(seed=3)
    values = noisy(ids)
    results = []
    for block in ([8, 24, 24], [16, 64, 64], [5, 40, 17]):
        pred = write_prediction(tmp_path / f"pred{block[2]}.zarr", values)
        segment(pred, SegmentConfig(block_size=block))
        results.append(labels_of(pred))
    for seg, block in zip(results, ([8, 24, 24], [16, 64, 64], [5, 40, 17])):
        assert voi(ids, seg) < 0.15
        values = np.unique(seg)
        assert list(values[1:]) == list(range(1, len(values))) and values[0] == 0
        # numbered by smallest fragment: block 0's fragments come first, in order of first appearance
        # there, so the neurons in block 0 are 1..k in their order of first appearance in it
        seen, first = np.unique(seg[:block[0], :block[1], :block[2]].ravel(), return_index=True)
        order = seen[seen != 0][np.argsort(first[seen != 0])]
        assert list(order) == list(range(1, len(order) + 1)), order
    for seg in results[1:]:
        assert voi(results[0], seg) <= 0.05, voi(results[0], seg)


@pytest.mark.parametrize("merge", ["mean", "union_find"])
@pytest.mark.parametrize("edge_score", ["quantile", "mean"])
def test_the_global_step_from_files_equals_the_graph_in_memory(tmp_path, merge, edge_score):
    """One block over the whole volume: the pipeline's global step (edges read back from the block's
    file, only the score's statistics, consumed as it merges) gives the IDs of the same functions on
    the array in memory (segment/volume.py, edges left as they are)."""
    from unet_dist.segment.volume import InMemory

    ids = neurons(seed=4)
    pred = write_prediction(tmp_path / "pred.zarr", noisy(ids))
    cfg = SegmentConfig(block_size=list(ids.shape), merge=merge, edge_score=edge_score, threshold=0.6)
    result = segment(pred, cfg)
    memory = InMemory(zarr.open_group(str(pred), mode="r")["0"][:], NEAREST, cfg)
    expected = memory.neurons(0.6)
    assert np.array_equal(labels_of(pred), expected) and np.array_equal(memory.neurons(0.6), expected)
    assert result["blocks"] == 1 and 1 < result["neurons"] < result["fragments"]


def test_edge_histograms_add_up_exactly_and_their_quantile_is_the_merge_score():
    from unet_dist.segment.blocks import link_edges
    from unet_dist.segment.graph import BINS, link_bins, lookup_table, quantile_scores

    levels = np.arange(256)  # a uint8 affinity k / 255 (as the reader decodes it) falls in bin k // 16
    assert BINS == 16 and np.array_equal(link_bins((levels / 255).astype(np.float32)), levels // 16)
    rng = np.random.default_rng(0)
    pairs = np.sort(rng.integers(1, 30, (5000, 2)), 1).astype(np.uint64)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    values = rng.random(len(pairs))
    whole = link_edges(pairs, values)
    pieces = [link_edges(pairs[i::3], values[i::3]) for i in (2, 0, 1)]  # blocks' rows, in any order
    rows = {k: np.concatenate([p[k] for p in pieces]) for k in ("a", "b", "sum", "count", "hist")}
    pair_keys, row_of = np.unique(rows["a"] * 100 + rows["b"], return_inverse=True)  # sorted by (a, b)
    joined = {"a": pair_keys // 100, "b": pair_keys % 100}
    for key in ("sum", "count", "hist"):
        joined[key] = np.zeros((len(pair_keys), *rows[key].shape[1:]), rows[key].dtype)
        np.add.at(joined[key], row_of, rows[key])
    for key in ("a", "b", "count", "hist"):
        assert np.array_equal(whole[key], joined[key]), key
    assert np.allclose(whole["sum"], joined["sum"]) and whole["hist"].sum() == len(pairs)
    scores = quantile_scores(whole["hist"], 0.75)
    assert np.array_equal(quantile_scores(whole["hist"], 0.75, rows_at_once=7), scores)  # in slices of rows
    assert np.array_equal(scores, [quantile_of(h, 0.75) for h in whole["hist"].tolist()])
    assert quantile_of([0] * 12 + [4, 0, 0, 0], 0.75) == (12 + 3 / 4) / 16 and quantile_of([0] * 16, 0.75) == 0
    # 0-1: links mostly high, 0-2 mostly high on few links, 1-2 mostly low on many: once 0 and 1 merge,
    # their edges to 2 add their histograms, and the sum's 75th percentile is low, so 2 stays apart
    hist = np.zeros((3, BINS), np.uint32)
    hist[0, 15], hist[1, 14], hist[1, 0], hist[2, 1] = 10, 4, 1, 40
    edges = {"a": np.array([1, 1, 2], np.uint64), "b": np.array([2, 3, 3], np.uint64), "sum": np.zeros(3),
             "count": hist.sum(1).astype(np.int64), "hist": hist}
    table = {merge: lookup_table(np.array([3]), np.array([1], np.uint64), edges, 0.7, merge, "quantile")[0]
             for merge in ("mean", "union_find")}
    assert table["mean"].tolist() == [1, 1, 2] and table["union_find"].tolist() == [1, 1, 1]


def quantile_of(row: list[int], quantile: float) -> float:
    """A histogram's quantile, uniform within each bin, one bin at a time."""
    target, below = quantile * sum(row), 0
    for i, count in enumerate(row):
        if count and below + count >= target:
            return (i + (target - below) / count) / 16
        below += count
    return 0.0


def sequential_average_linkage(n, edges, threshold, score):
    """The textbook order: merge the best edge (ties by the pair, a cluster named by its smallest
    fragment), pool the merged clusters' edges to each neighbour, score again, until the best is
    below threshold. Quadratic; for small graphs."""
    label = list(range(n))
    pooled = {}
    for i, (u, v) in enumerate(zip(edges["a"].tolist(), edges["b"].tolist())):
        pooled[(min(u, v) - 1, max(u, v) - 1)] = [edges["sum"][i], edges["count"][i], edges["hist"][i].astype(np.int64)]

    def value(stat):
        return quantile_of(stat[2].tolist(), 0.75) if score == "quantile" else stat[0] / stat[1]

    while pooled:
        (u, v), stat = min(pooled.items(), key=lambda kv: (-value(kv[1]), kv[0]))
        if value(stat) < threshold:
            break
        label = [u if x == v else x for x in label]
        moved = {}
        for (p, q), st in pooled.items():
            p, q = (u if p == v else p), (u if q == v else q)
            if p == q:
                continue
            key = (min(p, q), max(p, q))
            if key in moved:
                moved[key] = [moved[key][0] + st[0], moved[key][1] + st[1], moved[key][2] + st[2]]
            else:
                moved[key] = st
        pooled = moved
    return np.array(label)


@pytest.mark.parametrize("score", ["mean", "quantile"])
def test_agglomeration_in_rounds_equals_the_sequential_order(score):
    from unet_dist.segment.graph import BINS, canonical, edge_scores, lookup_table

    rng = np.random.default_rng(3)
    for trial in range(6):
        n = 60
        pairs = {tuple(sorted(p)) for p in rng.integers(1, n + 1, (150, 2)).tolist() if p[0] != p[1]}
        a, b = (np.array(x, np.uint64) for x in zip(*sorted(pairs)))
        hist = rng.integers(0, 6, (len(a), BINS)).astype(np.uint32)
        hist[:, 0] += 1
        edges = {"a": a, "b": b, "count": hist.sum(1).astype(np.int64), "hist": hist,
                 "sum": rng.random(len(a)) * hist.sum(1)}
        for threshold in np.quantile(edge_scores(edges, score, 0.75), [0.7, 0.85, 0.95]):
            table = lookup_table(np.array([n]), np.array([1], np.uint64), edges, threshold, "mean", score)[0]
            expected = canonical(sequential_average_linkage(n, edges, threshold, score))
            assert np.array_equal(table, expected), (trial, threshold)
            assert 1 < table.max() < n, "the case merges some fragments and not all"


def test_agglomeration_with_equal_scores_depends_on_the_edges_not_their_order():
    """Single-link contacts score one of a few values, so equal edges are common: which merges first
    must follow from the edges alone (blocks' files may come in any order), and a rescored edge must
    still see the threshold."""
    from unet_dist.segment.graph import BINS, edge_scores, lookup_table

    rng = np.random.default_rng(5)
    for trial in range(6):
        n = 80
        pairs = {tuple(sorted(p)) for p in rng.integers(1, n + 1, (200, 2)).tolist() if p[0] != p[1]}
        a, b = (np.array(x, np.uint64) for x in zip(*sorted(pairs)))
        hist = np.zeros((len(a), BINS), np.uint32)
        hist[np.arange(len(a)), rng.choice([6, 9, 12, 14], len(a))] = 1  # four scores
        edges = {"a": a, "b": b, "count": hist.sum(1).astype(np.int64), "hist": hist, "sum": hist.sum(1) * 0.5}
        threshold = 12.75 / 16  # the score of a bin-12 link: equal to the threshold
        table = lookup_table(np.array([n]), np.array([1], np.uint64), edges, threshold, "mean", "quantile")[0]
        for _ in range(3):
            order = rng.permutation(len(a))
            shuffled = {k: v[order] for k, v in edges.items()}
            again = lookup_table(np.array([n]), np.array([1], np.uint64), shuffled, threshold, "mean", "quantile")[0]
            assert np.array_equal(table, again), trial
        assert 1 < table.max() < n
        strong = edge_scores(edges, "quantile", 0.75) >= threshold
        joined = table[(a - 1).astype(np.int64)] == table[(b - 1).astype(np.int64)]
        assert joined[strong].mean() > 0.5 and not joined[~strong].all()


def test_labels_are_a_valid_ome_label_image_and_overwrite_replaces_them(tmp_path):
    ids = neurons()
    pred = write_prediction(tmp_path / "pred.zarr", affinities(ids), dtype="float16")
    segment(pred, SegmentConfig(block_size=[16, 32, 32]))
    check_ome(pred, "affinities", ["neurons"], levels=1)
    again = run_cli("segment", "--pred", pred, "--block-size", BLOCK, "--threshold", "0.6", "--overwrite",
                    env={"OMP_NUM_THREADS": "1"})
    assert again.code == 0, again.err
    assert voi(ids, labels_of(pred)) < 0.01


def slice_truth(ids: np.ndarray) -> np.ndarray:
    """Each slice's neurons as a per-slice segmentation can know them: the 2D pieces of every ID (a
    neuron that leaves a slice and comes back is two pieces there)."""
    truth, plane = np.zeros_like(ids), ndi.generate_binary_structure(2, 1)
    for z in range(ids.shape[0]):
        for i in np.unique(ids[z])[1:]:
            pieces, _ = ndi.label(ids[z] == i, structure=plane)
            truth[z][pieces > 0] = pieces[pieces > 0] + truth.max()
    return truth


def per_slice_voi(truth, seg) -> float:
    return float(np.mean([voi(t, s) for t, s in zip(truth, seg)]))


def test_membrane_prediction_is_segmented_slice_by_slice(tmp_path):
    ids = neurons(n=8, seed=5)
    truth, interior = slice_truth(ids), (ids != 0).astype(np.float32)
    noisy_p = np.clip(interior + np.random.default_rng(2).normal(0, 0.2, ids.shape), 0, 1)
    plane = ndi.generate_binary_structure(2, 1)
    scores = []
    for name, p in (("perfect", interior), ("noisy", noisy_p)):
        pred = write_prediction(tmp_path / f"{name}.zarr", p, target="membrane", offsets=None)
        segment(pred, SegmentConfig(block_size=[4, 32, 32], halo=[0, 8, 8]), progress="off")
        seg = labels_of(pred)
        assert not set(np.unique(seg[0])[1:]) & set(np.unique(seg[1])[1:])  # no ID shared across slices
        # the baseline the issue replaces: connected components of a threshold on the same input
        threshold = np.stack([ndi.label(s > 0.5, structure=plane)[0] for s in p])
        scores.append((per_slice_voi(truth, seg), per_slice_voi(truth, threshold)))
    (perfect, _), (ours, baseline) = scores
    # perfect input: the slices' pieces; noise of 0.2 breaks the one-pixel membrane for a threshold
    # (VOI ~0.23) but not for watershed + mean-boundary merge (~0.01)
    assert perfect < 0.01 and ours < 0.05 and ours < baseline / 3, scores


@pytest.mark.slow  # six CLI runs, each importing torch
def test_bad_inputs_are_one_line_and_write_nothing(tmp_path):
    ids = neurons()
    pred = write_prediction(tmp_path / "pred.zarr", affinities(ids))
    raw = tmp_path / "raw.zarr"
    zarr.open_group(str(raw), mode="w", zarr_format=3).create_array("0", shape=(4, 8, 8), dtype="uint8")
    cases = [(["--pred", tmp_path / "missing.zarr"], "no such prediction store"),
             (["--pred", raw], "not a prediction of affinities or of a membrane probability"),
             (["--pred", pred, "--threshold", "1.5"], "segment.threshold: must be within [0, 1]"),
             (["--pred", pred, "--block-size", "0,8,8"], "--block-size")]
    for args, message in cases:
        r = run_cli("segment", *args, env={"OMP_NUM_THREADS": "1"})
        assert r.code == 2 and message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not (pred / ".segment").exists() and not (pred / "labels").exists()
    assert run_cli("segment", "--pred", pred, "--block-size", BLOCK, env={"OMP_NUM_THREADS": "1"}).code == 0
    before = labels_of(pred)
    r = run_cli("segment", "--pred", pred, env={"OMP_NUM_THREADS": "1"})
    assert r.code == 2 and "labels/neurons already exists (pass --overwrite" in r.err
    assert np.array_equal(before, labels_of(pred))


@pytest.mark.slow
def test_one_two_and_three_ranks_give_identical_ids(tmp_path, free_port):
    values = noisy(neurons(seed=7))
    outputs = []
    for ranks in (1, 2, 3):
        pred = write_prediction(tmp_path / f"pred{ranks}.zarr", values)
        cmd = torchrun_cmd(ranks, free_port + ranks, "segment", "--pred", pred, "--block-size", BLOCK)
        done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(labels_of(pred))
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])


@pytest.mark.slow
def test_killed_during_fragments_then_resumed_equals_uninterrupted(tmp_path, free_port):
    values = noisy(neurons(seed=9))
    reference = write_prediction(tmp_path / "reference.zarr", values)
    assert run_cli("segment", "--pred", reference, "--block-size", BLOCK, env={"OMP_NUM_THREADS": "1"}).code == 0
    pred = write_prediction(tmp_path / "pred.zarr", values)
    args = ["segment", "--pred", pred, "--block-size", BLOCK]
    # paused at its third manifest write of the fragments phase: two blocks recorded, the rest not
    proc = subprocess.Popen([sys.executable, "-m", "unet_dist", *map(str, args)], cwd=ROOT,
                            env={**ENV, FAULT_ENV: "block-mark@3"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    manifest = pred / ".segment" / "fragments" / ".manifest"
    deadline = time.monotonic() + 120
    while not list(manifest.glob("*.paused")):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(manifest.glob("blocks-*/zarr.json"))) == 2
    assert not list((pred / ".segment" / "edges" / ".manifest").glob("blocks-*/zarr.json"))
    resumed = subprocess.run(torchrun_cmd(2, free_port, *args), cwd=ROOT, env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Warning" not in resumed.stderr, resumed.stderr[-3000:]  # zarr listed the state's phase folders once
    assert np.array_equal(labels_of(reference), labels_of(pred))


SBATCH = ROOT / "slurm" / "segment.sbatch"


def test_sbatch_script_parses_and_refuses_to_run_outside_slurm(tmp_path):
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(SBATCH), "--pred", "x.zarr"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 2 and "submit it with sbatch" in done.stderr
    usage = subprocess.run(["bash", str(SBATCH)], env={**env, "SLURM_JOB_ID": "1"}, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage:" in usage.stderr and "--pred PRED.zarr" in usage.stderr


def test_job_launcher_checks_before_submitting_and_builds_the_cli_overrides(tmp_path):
    from jobs.segment import blocks_done, submit
    from unet_dist.cli.segment import overrides_of
    from unet_dist.errors import UserError

    assert overrides_of(0.7, "4,8,8", ["segment.merge=union_find", "segment.threshold=0.2"]) == [
        "segment.merge=union_find", "segment.threshold=0.2", "segment.threshold=0.7", "segment.block_size=[4,8,8]"]
    pred = write_prediction(tmp_path / "pred.zarr", affinities(neurons()))
    for kwargs, message in (({"threshold": 1.5}, "segment.threshold: must be within [0, 1]"),
                            ({"block_size": "0,8,8"}, "--block-size")):
        with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
            submit(pred, cluster="local", **kwargs)
    with pytest.raises(UserError, match="no such prediction store"):
        submit(tmp_path / "missing.zarr", cluster="local")
    assert blocks_done(pred) == 0 and not list(tmp_path.glob("*.segment-jobs"))


@pytest.mark.slow
def test_local_job_on_two_tasks_equals_a_single_process(tmp_path, monkeypatch):
    """submitit's local executor: two CPU tasks, ranks from its environment, the same IDs as one process."""
    from jobs.segment import submit

    values = noisy(neurons(seed=11))
    single = write_prediction(tmp_path / "single.zarr", values)
    assert run_cli("segment", "--pred", single, "--block-size", BLOCK, env={"OMP_NUM_THREADS": "1"}).code == 0
    pred = write_prediction(tmp_path / "job.zarr", values)
    for key in [k for k in os.environ if k.startswith(("SLURM_", "SUBMITIT_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job = submit(pred, block_size=BLOCK, cluster="local", tasks_per_node=2, time_min=10)
    assert job.cluster == "local" and job.folder == tmp_path / "job.zarr.segment-jobs" / job.job_id
    result = job.result()
    assert result["blocks"] == 18 and np.array_equal(labels_of(single), labels_of(pred))


@pytest.mark.slow
def test_a_damaged_chunk_mid_phase_is_one_line_and_the_same_command_continues(tmp_path):
    values = noisy(neurons(seed=13))
    reference = write_prediction(tmp_path / "reference.zarr", values)
    assert run_cli("segment", "--pred", reference, "--block-size", BLOCK, env={"OMP_NUM_THREADS": "1"}).code == 0
    pred = write_prediction(tmp_path / "pred.zarr", values)
    chunk = pred / "0" / "c" / "0" / "1" / "1" / "1"  # read by blocks in the middle of the volume
    good = chunk.read_bytes()
    chunk.write_bytes(b"not a chunk")
    failed = run_cli("segment", "--pred", pred, "--block-size", BLOCK, env={"OMP_NUM_THREADS": "1"})
    lines = [line for line in failed.err.strip().splitlines() if not line.startswith("segment fragments:")]
    assert failed.code == 2 and len(lines) == 1, failed.err
    assert "block" in lines[0] and "of the fragments phase are done" in lines[0] and "same command continues" in lines[0]
    chunk.write_bytes(good)
    again = run_cli("segment", "--pred", pred, "--block-size", BLOCK, env={"OMP_NUM_THREADS": "1"})
    assert again.code == 0, again.err
    assert np.array_equal(labels_of(reference), labels_of(pred))
