"""`unet-dist`: argparse subcommands, each parsing its arguments and calling one function.

A `UserError` becomes one line on stderr and exit code 2; anything else keeps its traceback.
Heavy modules (torch, zarr) are imported inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


def _ints(text: str, name: str, count: int = 3) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{name} '{text}': expected {count} comma-separated integers") from None
    if len(values) != count or any(v <= 0 for v in values):
        raise UserError(f"{name} '{text}': expected {count} comma-separated positive integers")
    return values


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"{name} '{text}': expected 3 comma-separated numbers (Z,Y,X in nm)") from None
    if len(values) != 3 or any(v <= 0 for v in values):
        raise UserError(f"{name} '{text}': expected 3 comma-separated positive numbers (Z,Y,X in nm)")
    return values


def _chunks(text: str):
    return text if text in ("2d", "3d") else _ints(text, "--chunks")


def _progress(label: str):
    """Progress lines for long conversions (stderr, so stdout stays the result)."""
    def report(done: int, total: int) -> None:
        if total and (done == total or done % max(1, total // 20) == 0):
            print(f"{label}: {done}/{total} slices", file=sys.stderr, flush=True)
    return report


def cmd_convert(args) -> int:
    from .data.convert import convert, format_info, store_info

    convert(
        raw=args.raw, out=args.out, labels=args.labels,
        resolution=_floats(args.resolution, "--resolution") if args.resolution else None,
        chunks=_chunks(args.chunks), shard=_ints(args.shard, "--shard") if args.shard else None,
        label_threshold=args.label_threshold, invert=args.invert, overwrite=args.overwrite,
        progress=_progress("convert"),
    )
    print(format_info(store_info(args.out)))
    return 0


def cmd_synth(args) -> int:
    from .data.convert import format_info, store_info
    from .data.synth import synthesize

    synthesize(args.out, shape=_ints(args.shape, "--shape"), seed=args.seed, chunks=_chunks(args.chunks),
               shard=_ints(args.shard, "--shard") if args.shard else None, overwrite=args.overwrite,
               progress=_progress("synth"))
    print(format_info(store_info(args.out)))
    return 0


def cmd_info(args) -> int:
    from .data.convert import format_info, store_info

    info = store_info(args.store)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


def cmd_config_show(args) -> int:
    from .config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_model(args) -> int:
    from .config import load_config
    from .model import describe

    cfg = load_config(args.config, args.overrides)
    patch = tuple(_ints(args.patch, "--patch", cfg.model.dims)) if args.patch else tuple(cfg.data.patch_size)
    print(describe(cfg.model, patch))
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .train import TrainingDiverged, train

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    if result.metrics and result.status == "completed":
        print(json.dumps({"step": result.step, **result.metrics}), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unet-dist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"unet-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="EM volume (TIFF stack or slice folder) to a chunked Zarr store")
    p.add_argument("--raw", required=True, help="multi-page TIFF or folder of per-slice TIFF/PNG files")
    p.add_argument("--labels", help="labels in the same form (white = neuron interior)")
    p.add_argument("--out", required=True, help="the Zarr store to write (STORE.zarr)")
    p.add_argument("--resolution", default="50,4,4", help="voxel size Z,Y,X in nm (default: ISBI's 50,4,4)")
    p.add_argument("--chunks", default="2d", help="2d (one slice per chunk), 3d, or Z,Y,X")
    p.add_argument("--shard", help="Zarr v3 shard shape Z,Y,X (a multiple of the chunks)")
    p.add_argument("--label-threshold", type=float, help="label = value > T (for non-binary labels)")
    p.add_argument("--invert", action="store_true", help="flip labels (for white-membrane conventions)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("synth", help="an EM-like synthetic volume with exact labels")
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="32,512,512", help="Z,Y,X")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunks", default="2d", help="2d, 3d, or Z,Y,X")
    p.add_argument("--shard", help="Zarr v3 shard shape Z,Y,X")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("info", help="shapes, chunks, codecs, compression and voxel size of a store")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("config", help="configuration tools")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved config")
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    show.set_defaults(func=cmd_config_show)

    p = sub.add_parser("model", help="parameter count, receptive field and shapes of a config's U-Net")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--patch", help="input patch size (default: data.patch_size)")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("train", help="train a U-Net (one process, or N ranks under torchrun / srun)")
    p.add_argument("--config", required=True)
    p.add_argument("--resume", default="never",
                   help="never (default; refuses a run.dir with checkpoints), auto (newest valid), or a path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 data.store=X.zarr")
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
