"""`unet-dist bench SUITE`: benchmark suites, each measuring ours against a peer in one run.

    unet-dist bench train   [--json FILE] [--tiny] [overrides...]   training step vs a plain fp32 loop
    unet-dist bench loader  [--json FILE] [--tiny] [overrides...]   DataLoader patches/s vs what a step consumes
    unet-dist bench predict [--json FILE] [--tiny] [overrides...]   our predictor vs MONAI sliding_window_inference
    unet-dist bench convert [--json FILE] [--tiny] [--size MB] [--source tiff|hdf5|n5|zarr|precomputed]
                                                                    source -> Zarr vs merely reading the source
    unet-dist bench load    [--json FILE] [--tiny] [--size GB]      train + predict a GB volume: memory, layouts
    unet-dist bench view    [--json FILE] [--tiny] [--layouts 2d,3d] a viewer's plane reads per chunk layout
    unet-dist bench io      [--json FILE] [--tiny] [--size GB]      predictor I/O vs decode limit, codecs, back ends
    unet-dist bench segment [--json FILE] [--tiny] [--sizes 1,4]    blockwise segmentation vs in memory, waterz,
                                                                    mwatershed; RSS by volume; the global step

Each prints a table on stdout (progress on stderr) and, with --json, writes the report: machine,
versions, config, the raw numbers per row, and a top-level `speedup` (ours over the peer). `--tiny`
runs in seconds (CI). Heavy modules are imported inside the suites, so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUITES = {
    "train": "images/s, voxels/s, MFU and peak memory of our training step vs a plain fp32 eager loop",
    "loader": "patches/s the DataLoader delivers (with augmentation) per worker count vs what a step consumes",
    "predict": "voxels/s, peak memory and max |difference| of our predictor vs MONAI's sliding_window_inference",
    "convert": "MB/s and peak RSS converting a TIFF, HDF5, N5, Zarr or precomputed source to Zarr vs merely "
               "reading it with its own library",
    "load": "training and whole-volume prediction on a volume of several GB: peak RSS, small chunks vs shards",
    "view": "chunk files, read amplification and ms of a viewer's plane reads (xy, xz, yz) per chunk layout",
    "io": "the predictor's read -> identity -> write pipeline vs the decode limit; codecs and zarr back ends",
    "segment": "Mvox/s, peak RSS and VOI of our blockwise segmentation vs the same on the whole volume in memory, "
               "waterz and mwatershed; RSS by volume size (--sizes); the global step's bytes per fragment and edge",
}


# A suite whose module is named apart from it: `load.py` read as a sibling of `loader.py`.
MODULES = {"load": "big_volume"}


def _suite(name: str):
    return importlib.import_module(f"{__name__}.{MODULES.get(name, name)}")


def _common_arguments(p: argparse.ArgumentParser, overrides: bool) -> None:
    p.add_argument("--json", metavar="FILE", help="also write the report (machine, versions, config, numbers) here")
    p.add_argument("--tiny", action="store_true",
                   help="seconds, not a minute: a smoke run for CI (its numbers mean little)")
    if overrides:  # convert runs on the CPU only
        p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                       help="auto: the GPU when there is one, else the CPU")
    p.add_argument("--workdir", help="folder for temporary files (default: the system's temp folder); "
                                     "they are deleted afterwards")
    if overrides:
        p.add_argument("--config", help="a config file instead of the suite's size profile")
        p.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.base_channels=32")


def add_bench_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` (with one sub-command per suite) on the CLI's subparsers."""
    p = subparsers.add_parser("bench", help="benchmark suites: ours against a peer, in one run",
                              description=__doc__.split("\n\n")[0])
    suites = p.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, help_text in SUITES.items():
        sp = suites.add_parser(name, help=help_text, description=help_text)
        _common_arguments(sp, overrides=name not in ("convert", "view", "io", "segment"))
        _suite(name).add_arguments(sp)
        sp.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args) -> int:
    from unet_dist.files import write_json_atomic
    from unet_dist.bench.common import format_table, log

    suite = _suite(args.suite)
    report = suite.run(args)
    print(f"bench {args.suite}: {report['machine']['cpu']} ({report['machine']['cores']} cores)"
          + (f", {report['machine']['gpu']['name']}" if report["machine"]["gpu"] else "")
          + (", TINY" if report["tiny"] else ""))
    print(format_table(report["results"], suite.COLUMNS))
    speedup = report["speedup"]
    print(f"speedup {speedup:.3g} ({report['speedup_means']})" if speedup is not None else "speedup -")
    for name, (rows, columns) in report.pop("tables", {}).items():
        print(f"\n{name}\n{format_table(rows, columns)}")
    for key, value in report.get("summary", {}).items():
        print(f"{key}: {value}")
    if args.json:
        write_json_atomic(args.json, report)
        log(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m unet_dist.bench SUITE ...`: the same as `unet-dist bench SUITE ...`."""
    from unet_dist.errors import run_command

    parser = argparse.ArgumentParser(prog="unet-dist")
    add_bench_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return run_command(lambda: args.func(args))


__all__ = ["SUITES", "add_bench_parser", "cmd_bench", "main"]
