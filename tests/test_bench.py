"""The bench suites: each runs through the real command in --tiny mode and writes a well-formed report.

No timing assertions: only that every suite finishes, prints its table, and that the JSON has the
machine, versions, config, a finite positive `speedup` and finite positive raw numbers beside it.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest

from helpers import Completed, require_module, run_cli

SUITES = ("train", "loader", "predict", "convert", "load", "view", "io", "segment")


def bench(*args, timeout: float = 600) -> Completed:
    """`unet-dist bench ...` as a user runs it."""
    return run_cli("bench", *args, timeout=timeout)


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# the raw numbers every row of a suite carries, finite and > 0
NUMBERS = {
    "train": ("images_per_s", "voxels_per_s", "step_s", "tflops", "cpu_s_per_image"),
    "loader": ("patches_per_s", "batch_s"),
    "predict": ("voxels_per_s", "seconds", "peak_rss_mb", "cpu_s"),
    "convert": ("mb_per_s", "seconds", "peak_rss_mb", "cpu_s"),
    "load": ("files", "stored_mb", "write_mb_per_s", "write_peak_rss_mb", "train_images_per_s", "train_peak_rss_mb",
             "train_tree_peak_rss_mb", "read_mb_per_s", "read_s", "predict_voxels_per_s", "predict_peak_rss_mb",
             "predict_tree_peak_rss_mb"),
    "view": ("xy_files", "xz_files", "yz_files", "view_files", "view_ms", "xy_read_amplification"),
    "io": ("input_mb_per_s", "seconds"),
    "segment": ("mvox_per_s", "mvox_per_s_per_core", "mvox_per_cpu_s", "seconds", "peak_rss_mb", "cpu_s"),
}
# the memory figures every row of a suite carries, finite and >= 0 (a child can peak at its baseline)
MEMORY = {
    "train": ("peak_mem_mb",),
    "predict": ("peak_rss_above_baseline_mb",),
    "convert": ("peak_rss_above_baseline_mb",),
    "segment": ("peak_rss_above_baseline_mb",),
}


def run_tiny(suite: str, tmp_path, *flags) -> dict:
    """Run one suite in --tiny mode and check what every report holds; return the report."""
    out = tmp_path / "report" / f"{suite}.json"
    work = tmp_path / "work"
    work.mkdir()
    device = [] if suite in ("convert", "view", "io", "segment") else ["--device", "cpu"]
    done = bench(suite, "--tiny", "--json", out, "--workdir", work, *device, *flags)
    assert done.code == 0, done.err
    assert "speedup" in done.out and any(f"x {p}" in done.out for p in ("peer", "consumption", "small-chunks"))
    report = json.loads(out.read_text())

    assert report["suite"] == suite and report["tiny"] is True and report["schema"] == 1
    assert report["command"].startswith(f"unet-dist bench {suite} --tiny")
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    assert report["versions"]["torch"] and report["versions"]["zarr"] and report["versions"]["unet_dist"]
    assert isinstance(report["config"], dict) and report["config"]
    assert positive(report["speedup"]) and report["speedup_means"]
    roles = [row["role"] for row in report["results"]]
    assert "ours" in roles and "peer" in roles
    assert report["ours"] in report["results"] and report["peer"] in report["results"]
    for row in report["results"]:
        if row["role"] == "other" and "error" in row:  # an optional peer that does not build here, said why
            assert row["error"]
            continue
        for key in NUMBERS[suite]:
            assert positive(row.get(key)), (key, row)
        for key in MEMORY.get(suite, ()):
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
    assert list(work.iterdir()) == [], "temporary files were left behind"
    return report


@pytest.mark.slow
def test_train_suite(tmp_path):
    report = run_tiny("train", tmp_path)
    assert report["results"][0]["role"] == "peer" and report["results"][0]["variant"] == "peer fp32 eager"
    assert report["config"]["tf32_convolutions"] is None  # said on GPUs, where fp32 convs run in TF32
    assert report["config"]["flops_per_image"] > 0
    assert all(row["mfu"] is None for row in report["results"])  # no bf16 peak on a CPU


@pytest.mark.slow
def test_loader_suite(tmp_path):
    report = run_tiny("loader", tmp_path)
    workers = [row["workers"] for row in report["results"] if row["role"] == "ours"]
    assert workers == [0, 1]
    fed = next(row for row in report["results"] if row["role"] == "fed")
    assert 0 <= fed["data_wait_frac"] <= 1


@pytest.mark.slow
def test_predict_suite(tmp_path):
    report = run_tiny("predict", tmp_path)
    diff = report["comparison"]
    assert 0 <= diff["max_abs_diff_interior"] <= diff["max_abs_diff"] <= 1
    assert 0 <= diff["mask_differs_frac"] <= 1
    assert report["config"]["monai_mode"] == "gaussian"


@pytest.mark.slow
def test_convert_suite(tmp_path):
    report = run_tiny("convert", tmp_path)
    assert positive(report["ours"]["compression_ratio"])
    assert report["config"]["shape"][0] * report["config"]["shape"][1] ** 2 >= 8 << 20


@pytest.mark.slow
def test_view_suite(tmp_path):
    report = run_tiny("view", tmp_path)
    # 16 x 512 x 512: an xz panel spans all 16 slices, xy one slice
    rows = {row["layout"]: row for row in report["results"]}
    assert (rows["2d"]["xy_files"], rows["2d"]["xz_files"], rows["2d"]["yz_files"]) == (1, 16, 16)
    assert (rows["3d"]["xy_files"], rows["3d"]["xz_files"], rows["3d"]["yz_files"]) == (4, 2, 2)
    assert rows["2d"]["xz_read_amplification"] == 512  # each 512 x 512 chunk for one row of it


@pytest.mark.slow
def test_io_suite(tmp_path):
    report = run_tiny("io", tmp_path)
    # byte counts, not timings: the cache decodes each chunk once, halos make that less than delivered
    assert 0 < report["read_amplification"] <= 1.2
    no_cache = next(row for row in report["results"] if row.get("variant") == "no_cache")
    assert no_cache["read_amplification"] > 2 * report["read_amplification"]
    # our chunk files and zarr-python's I/O read the same chunks through the cache
    assert report["peer"]["read_amplification"] == report["read_amplification"]
    assert positive(report["fraction_of_decode_limit"])
    # the crc32c checksum's cost: the same volume and outputs without it, beside the rows with it
    assert set(report["checksum_cost"]) == {"decode_limit", "decode_limit_cpu", "pipeline", "pipeline_cpu"}
    assert all(math.isfinite(v) and v > -1 for v in report["checksum_cost"].values())
    # the limits beyond decoding were measured (tiny: blocks of 64 inside chunks of 128)
    assert positive(report["fraction_of_io_limit"]) and positive(report["io_limit_of_decode_limit"])
    limits = {row["what"] for row in report["results"] if row["role"] == "limit"}
    assert {"decode + encode limit (no files written)", "decode + encode + write limit, a file per block (tight loop)",
            "decode + encode + write limit, shard files (tight loop)"} <= limits
    # ours writes shards (the default predict.shard_blocks), the row before it a file per block
    by_variant = {row["variant"]: row for row in report["results"] if row.get("variant")}
    assert set(by_variant) == {"ours", "chunk_files", "zarr", "no_cache"}
    # level 0 of 4 x 384 x 384 in blocks of 64: 4 x 6 x 6 blocks, in shards of 4 x 4 (edge shards 2)
    assert by_variant["chunk_files"]["output_files"] == 2 * 4 * 36
    assert by_variant["ours"]["output_files"] == 2 * 4 * 4
    codecs = report["codecs"]["rows"]
    assert {row["codec"] for row in codecs} >= {"blosc-zstd-1", "blosc-zstd-3", "blosc-zstd-5", "blosc-lz4", "none"}
    assert {row["data"] for row in codecs} == {"raw", "probability", "mask"}
    assert all(positive(row["ratio"]) and positive(row["decode_mb_per_s"]) for row in codecs)
    zarr_row = next(row for row in report["backends"]["rows"] if row["backend"] == "zarr")
    assert positive(zarr_row["patches_per_s"]) and positive(zarr_row["chunks_mb_per_s"])


@pytest.mark.slow
def test_load_suite(tmp_path):
    report = run_tiny("load", tmp_path)
    rows = {row["layout"]: row for row in report["results"]}
    assert list(rows) == ["small-chunks", "sharded", "default"]
    assert rows["small-chunks"]["files"] > rows["default"]["files"] > rows["sharded"]["files"]
    volume = math.prod(report["config"]["volume"])
    for row in rows.values():
        assert row["predict_voxels"] == volume  # every slice predicted
        assert row["train_steps"] == report["config"]["train_steps"]
        assert row["train_tree_peak_rss_mb"] >= row["train_peak_rss_mb"] * 0.9  # a sum with the workers


@pytest.mark.slow
def test_segment_suite(tmp_path):
    report = run_tiny("segment", tmp_path, "--sizes", "0.0002,0.0008")
    rows = {row["method"].split(" ")[0]: row for row in report["results"]}
    assert set(rows) == {"unet-dist", "whole", "waterz.agglomerate", "mwatershed.agglom"}
    ours, whole = report["ours"], report["peer"]
    assert ours["blocks"] == 2 * 2 * 2 and whole["voi_vs_whole"] < 1e-9
    # blockwise stitching moves the result little, and both find the synthetic neurons
    # (counts of neurons mean little here: the blockwise run leaves specks of a few voxels at block faces)
    assert ours["voi_vs_whole"] < 0.1 and ours["voi_vs_truth"] < 0.1 and whole["voi_vs_truth"] < 0.1
    memory = report["memory"]
    assert [m["gvox"] for m in memory] == report["config"]["sizes_gvox"] and len(memory) == 2
    assert memory[1]["voxels"] == 4 * memory[0]["voxels"] and memory[1]["fragments"] > 2 * memory[0]["fragments"]
    assert all(positive(m["peak_rss_mb"]) and positive(m["seconds"]) for m in memory)
    assert report["summary"]["peak_rss_ratio_largest_over_smallest"] < 1.5  # flat in the volume
    graph = report["graph"]
    assert [g["merge"] for g in graph] == ["union_find"] * 2 + ["mean"] * 2
    for big, small in (graph[:2], graph[2:]):
        assert big["fragments"] == small["fragments"] and 2.5 < big["edges"] / small["edges"] < 3.5
        assert positive(big["input_mb"]) and big["input_mb"] >= small["input_mb"] and positive(big["neurons"])
    assert {"union_find_bytes_per_edge", "union_find_bytes_per_fragment", "mean_bytes_per_edge"} <= set(report["summary"])


@pytest.mark.parametrize("flags, names", [(["--sizes", "1"], "--sizes"), (["--sizes", "1,x"], "--sizes"),
                                          (["--peers", "waterz"], "--peers"), (["--sizes", "1e6,2e6"], "GB"),
                                          (["model.depth=2"], "segment.* overrides"),
                                          (["segment.threshold=2"], "segment.threshold")])
def test_bench_segment_refuses_bad_flags_before_writing_anything(flags, names, tmp_path):
    work, report = tmp_path / "work", tmp_path / "segment.json"
    done = bench("segment", "--tiny", "--workdir", work, "--json", report, *flags)
    assert done.code == 2 and names in done.err, done.err
    assert done.err.strip().startswith("error:") and len(done.err.strip().splitlines()) == 1
    assert not work.exists() or list(work.iterdir()) == []
    assert not report.exists()


def test_bench_segment_inputs_follow_the_affinity_convention_and_repeat():
    from unet_dist.bench.segment_inputs import NEAREST, planar_graph, tiled_reader, tiled_shape, voronoi_ids
    from unet_dist.data.affinities import affinities

    ids = voronoi_ids((12, 20, 24), cell=6)
    assert ids.min() == 0 and ids.max() > 10 and 0.1 < np.mean(ids == 0) < 0.7
    aff = affinities(ids, NEAREST)
    z, y, x = 5, 7, 9
    assert aff[0, z, y, x] == (ids[z, y, x] != 0 and ids[z, y, x] == ids[z - 1, y, x])
    assert aff[2, z, y, x] == (ids[z, y, x] != 0 and ids[z, y, x] == ids[z, y, x - 1])
    assert not aff[1, :, 0].any()  # the link back out of the volume does not exist
    tile = np.arange(2 * 4 * 6 * 6, dtype=np.uint8).reshape(2, 4, 6, 6)
    read = tiled_reader(tile)
    assert np.array_equal(read((slice(6, 8), slice(12, 15), slice(3, 6))), tile[:, 2:4, 0:3, 3:6])
    assert tiled_shape(1e9, (64, 512, 512)) == (256, 2048, 2048)
    g = planar_graph(1000)
    assert g["fragments"] == 1000 and len(g["a"]) == 3 * 10 * 10 * 9 and np.all(g["a"] < g["b"])
    assert np.all((g["sum"] >= 0) & (g["sum"] <= g["count"]))


def test_a_bad_override_is_one_line_and_exit_2(tmp_path):
    done = bench("train", "--tiny", "--device", "cpu", "model.depth=-1")
    assert done.code == 2
    assert done.err.strip().startswith("error:") and len(done.err.strip().splitlines()) == 1


@pytest.mark.parametrize("flags, names", [(["--layouts", "small-chunks,tiles"], "tiles"),
                                          (["--size", "-1"], "--size"), (["--chunk", "0"], "--chunk")])
def test_bench_load_refuses_bad_flags_before_writing_anything(flags, names, tmp_path):
    work = tmp_path / "work"
    done = bench("load", "--device", "cpu", "--workdir", work, *flags)
    assert done.code == 2 and names in done.err
    assert done.err.strip().startswith("error:") and len(done.err.strip().splitlines()) == 1
    assert not work.exists() or list(work.iterdir()) == []


@pytest.mark.parametrize("flags, names", [(["--size", "0"], "--size"), (["--cores", "0"], "--cores"),
                                          (["--cores", "1,x"], "--cores"), (["--skip", "disks"], "--skip"),
                                          (["--raw-tif", "no/such.tif"], "no/such.tif")])
def test_bench_io_refuses_bad_flags_before_writing_anything(flags, names, tmp_path):
    work, report = tmp_path / "work", tmp_path / "io.json"
    done = bench("io", "--tiny", "--workdir", work, "--json", report, *flags)
    assert done.code == 2 and names in done.err
    assert done.err.strip().startswith("error:") and len(done.err.strip().splitlines()) == 1
    assert not work.exists() or list(work.iterdir()) == []
    assert not report.exists()


def test_add_bench_parser_registers_every_suite():
    from unet_dist.bench import add_bench_parser, cmd_bench

    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "train", "--tiny", "--json", "x.json", "model.base_channels=8"])
    assert args.func is cmd_bench and args.suite == "train" and args.tiny and args.json == "x.json"
    assert args.overrides == ["model.base_channels=8"]
    for suite in SUITES:
        assert parser.parse_args(["bench", suite]).suite == suite
    assert parser.parse_args(["bench", "convert", "--size", "64"]).size == 64


# ------------------------------------------------------------------------------ pieces, pure

def test_peak_table_matches_device_names():
    from unet_dist.bench.machine import peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H200 NVL") == 835e12  # not the SXM module's 989
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops(None) is None and peak_bf16_flops("Some GPU") is None


def test_monai_overlap_gives_our_block_as_its_scan_interval():
    require_module("monai", "pip install -e '.[bench]'")
    from monai.inferers.utils import _get_scan_interval

    from unet_dist.bench.predict import _overlap

    for tile, block in (([736, 736], [512, 512]), ([1248, 1248], [1024, 1024]), ([144, 144], [64, 64]),
                        ([300, 301], [256, 255])):
        overlap = _overlap(tile, block)
        image = [3 * t for t in tile]
        assert list(_get_scan_interval(image, tile, 2, overlap)) == block


def test_synthetic_slices_repeat_and_match_synth():
    from unet_dist.bench.common import synthetic_slices
    from unet_dist.data.synth import SynthVolume

    read = synthetic_slices((20, 64, 80), distinct=4, seed=3)
    slab = read(2, 11)
    assert slab["raw"].shape == (9, 64, 80) and slab["raw"].dtype == np.uint8
    assert set(np.unique(slab["labels"])) <= {0, 1}
    np.testing.assert_array_equal(slab["raw"][0], slab["raw"][4])  # slice 2 == slice 6
    np.testing.assert_array_equal(read(3, 4)["raw"][0], SynthVolume((4, 64, 80), 3).slice(3)[0])


def test_format_table_aligns_and_shows_missing_values():
    from unet_dist.bench.common import format_table

    text = format_table([{"a": "x", "b": 1234.5}, {"a": "longer", "b": None}], [("a", "name"), ("b", "value")])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert "1,234" in lines[2] or "1,235" in lines[2]
    assert lines[3].rstrip().endswith("-")


def test_variants_parse_and_reject_nonsense():
    import torch

    from unet_dist.bench.train import parse_variants
    from unet_dist.errors import UserError

    cpu = torch.device("cpu")
    names = [v.name for v in parse_variants(None, cpu, "fp32")]
    assert names == ["peer fp32 eager", "ours fp32", "ours fp32+cl"]
    v = parse_variants("bf16+cl+compile", cpu, "fp32")[1]
    assert (v.precision, v.channels_last, v.compile) == ("bf16", True, True)
    v = parse_variants("bf16+cl", cpu, "fp32")[1]
    assert v.nosync and v.autotune  # ours is the trainer: no host sync per step, cuDNN autotuner on GPUs
    w = parse_variants("fp32+sync+noautotune", cpu, "fp32")[1]
    assert not w.nosync and not w.autotune and not w.channels_last
    with pytest.raises(UserError):
        parse_variants("fp8", cpu, "fp32")
    with pytest.raises(UserError):
        parse_variants("bf16+fast", cpu, "fp32")
    with pytest.raises(UserError):
        parse_variants("fp16", cpu, "fp32")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("suite", ("train", "predict"))
def test_gpu_suites_run_tiny(suite, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / f"{suite}.json"
    done = bench(suite, "--tiny", "--device", "cuda", "--json", out, "--workdir", tmp_path / "work")
    assert done.code == 0, done.err
    report = json.loads(out.read_text())
    assert positive(report["speedup"]) and report["machine"]["gpu"]["name"]
    if suite == "train":
        assert any(row["mfu"] is not None for row in report["results"]) or \
            report["machine"]["gpu"]["peak_bf16_dense_tflops"] is None


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hdf5", "n5", "zarr", "precomputed"])
def test_bench_convert_from_each_source(source, tmp_path):
    out, work = tmp_path / "convert.json", tmp_path / "work"
    work.mkdir()
    done = bench("convert", "--tiny", "--source", source, "--json", out, "--workdir", work)
    assert done.code == 0, done.err
    report = json.loads(out.read_text())
    assert report["config"]["source"] == source and report["config"]["voxel_size"] == [50, 4, 4]
    assert report["ours"]["what"] == f"unet_dist convert ({source})"
    for row in report["results"]:
        for key in NUMBERS["convert"]:
            assert positive(row[key]), (key, row)
    assert list(work.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("source", ["hdf5", "n5"])
def test_bench_convert_memory_does_not_grow_with_the_volume(source, tmp_path):
    # 160 MB of source in 512 x 512 slices; the n5 source's chunk rows are 32 slices (8 MB). A
    # converter that held the volume would sit 160 MB above its baseline. tensorstore itself takes
    # ~100-130 MB to read (its threads' buffers; measured the same at 160 MB and at 1 GB, see
    # BENCHMARKS.md), so for N5 convert is held to what merely reading with tensorstore costs, plus
    # the pyramid pass (two threads downsampling a chunk each, and their malloc arenas): at most half
    # of what holding the volume would add.
    out = tmp_path / "convert.json"
    done = bench("convert", "--source", source, "--size", "160", "--width", "512", "--json", out,
                 "--workdir", tmp_path)
    assert done.code == 0, done.err
    report = json.loads(out.read_text())
    ours, peer = report["ours"]["peak_rss_above_baseline_mb"], report["peer"]["peak_rss_above_baseline_mb"]
    assert ours < (80 if source == "hdf5" else peer + 80), (ours, peer)


def test_bench_predict_tile_runner_lays_out_a_3d_model_in_5d(tmp_path):
    """The warm-up's tile runner once ignored the model's dims: channels_last (4D) on a 3D model's
    5D weights raises, on the CPU as on a GPU."""
    import torch

    from unet_dist import checkpoint
    from unet_dist.bench.predict import tile_runner
    from unet_dist.config import Config, to_dict
    from unet_dist.model import build_model, valid_input_shape

    cfg = Config()
    cfg.model.dims, cfg.model.depth, cfg.model.base_channels = 3, 2, 4
    ckpt = checkpoint.save(tmp_path, {"model": build_model(cfg.model).state_dict(), "model_config": to_dict(cfg.model),
                                      "config": to_dict(cfg), "step": 0}, keep_last=1)
    net = tile_runner(str(ckpt), torch.device("cpu"), "fp32", batch=2)
    assert net.memory_format == torch.channels_last_3d
    tile = valid_input_shape(cfg.model, (8, 24, 24))
    prob = net(np.zeros((1, *tile), np.float32))
    assert prob.shape == (1, *tile) and np.isfinite(prob).all()
