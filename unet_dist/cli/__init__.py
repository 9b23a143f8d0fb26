"""`unet-dist`: argparse subcommands, each parsing its arguments and calling one function.

Each group module (`data`, `train`, `predict`, `results`; `bench` in its own package) defines its
commands' parsers beside the functions that run them and registers both in `add_parsers`.
A `UserError` becomes one line on stderr and exit code 2; anything else keeps its traceback.
Heavy modules (torch, zarr) are imported inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from unet_dist import __version__
from unet_dist.bench import add_bench_parser
from unet_dist.cli import data, predict, results, segment, train
from unet_dist.errors import run_command


class OneLineParser(argparse.ArgumentParser):
    """A bad option value (`--port abc`, `--boundary-width -1`) is the project's one line and exit 2,
    like any other mistake, instead of argparse's usage block; `--help` still shows the usage.
    Subcommands' parsers are of this class too (argparse makes them with the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="unet-dist", description="Distributed U-Net training and tiled prediction for EM volumes in Zarr.")
    parser.add_argument("--version", action="version", version=f"unet-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (data, train, predict, segment, results):
        group.add_parsers(sub)
    add_bench_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Dotted overrides may come after options too (`model CFG --patch 572,572 model.padding=valid`).
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return run_command(lambda: args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
