"""`unet-dist`: argparse subcommands, each parsing its arguments and calling one function.

A `UserError` becomes one line on stderr and exit code 2; anything else keeps its traceback.
Heavy modules (torch, zarr) are imported inside the commands so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys

from unet_dist import __version__
from unet_dist.bench import add_bench_parser
from unet_dist.cli.arguments import slice_range
from unet_dist.errors import run_command
from unet_dist.errors import UserError
from unet_dist.files import write_json_atomic

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
    """Progress with rate and ETA for long conversions (stderr, so stdout stays the result)."""
    from unet_dist.monitor.progress import Progress

    return Progress(label, 0, "slices")


def cmd_convert(args) -> int:
    from unet_dist.data.convert import convert, format_info, store_info

    convert(
        raw=args.raw, out=args.out, labels=args.labels,
        resolution=_floats(args.resolution, "--resolution") if args.resolution else None,
        chunks=_chunks(args.chunks), shard=_ints(args.shard, "--shard") if args.shard else None,
        label_threshold=args.label_threshold, invert=args.invert, overwrite=args.overwrite,
        progress=_progress("convert"), instances=_rule(args) if args.instances else None,
        ignore_id=args.ignore_id, ignore_value=args.ignore_value, ignore_mask=args.ignore_mask,
    )
    print(format_info(store_info(args.out)))
    return 0


def _rule(args):
    from unet_dist.data.instances import Rule

    return Rule(args.boundary_width, args.boundary_3d, args.background_interior)


def _add_rule_options(p, what: str) -> None:
    p.add_argument("--boundary-width", type=int, default=1, metavar="N",
                   help=f"{what}: membrane where a voxel within N pixels (in its slice) has another ID (default 1)")
    p.add_argument("--boundary-3d", action="store_true", help="look for other IDs within N voxels in 3D "
                   "(a cube; for near-isotropic volumes) instead of in the slice")
    p.add_argument("--background-interior", action="store_true",
                   help="ID 0 is interior (one more segment) instead of membrane")


def cmd_relabel(args) -> int:
    from unet_dist.data.convert import format_info, store_info
    from unet_dist.data.relabel import relabel

    done = relabel(args.store, _rule(args))
    print(f"relabelled {done['store']}: boundary width {args.boundary_width}, label fraction "
          f"{done['label_fraction']:.4f}", file=sys.stderr)
    print(format_info(store_info(args.store)))
    return 0


def cmd_synth(args) -> int:
    from unet_dist.data.convert import format_info, store_info
    from unet_dist.data.synth import synthesize

    synthesize(args.out, shape=_ints(args.shape, "--shape"), seed=args.seed, chunks=_chunks(args.chunks),
               shard=_ints(args.shard, "--shard") if args.shard else None, overwrite=args.overwrite,
               progress=_progress("synth"))
    print(format_info(store_info(args.out)))
    return 0


def cmd_info(args) -> int:
    from unet_dist.data.convert import format_info, store_info

    info = store_info(args.store)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


def cmd_upgrade(args) -> int:
    from unet_dist.data.convert import format_info, store_info
    from unet_dist.data.ome import upgrade

    done = upgrade(args.store)
    print(f"upgraded {done['path']}: image '{done['image']}', label images {done['labels'] or 'none'}, "
          f"{done['levels']} level(s)", file=sys.stderr)
    print(format_info(store_info(args.store)))
    return 0


def cmd_config_show(args) -> int:
    from unet_dist.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_model(args) -> int:
    from unet_dist.config import load_config
    from unet_dist.model import describe

    cfg = load_config(args.config, args.overrides)
    patch = tuple(_ints(args.patch, "--patch", cfg.model.dims)) if args.patch else tuple(cfg.data.patch_size)
    print(describe(cfg.model, patch))
    return 0


def cmd_train(args) -> int:
    from unet_dist.config import load_config
    from unet_dist.train.loop import train
    from unet_dist.train.step import TrainingDiverged

    cfg = load_config(args.config, args.overrides)
    try:
        result = train(cfg, resume=args.resume)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    if result.reports and result.metrics and result.status == "completed":
        print(json.dumps({"step": result.step, **result.metrics}), flush=True)
    return 0


def cmd_predict(args) -> int:
    from unet_dist import dist
    from unet_dist.predict.pipeline import predict

    result = predict(args.checkpoint, args.input, args.out, labels=args.labels, slices=slice_range(args.slices),
                     overrides=args.overrides, resume=args.resume, overwrite=args.overwrite, device=args.device,
                     precision=args.precision)
    if dist.detect_env().is_main:
        if args.json:
            write_json_atomic(args.json, result)
        print(json.dumps(result), flush=True)
    return 0


def cmd_evaluate(args) -> int:
    from unet_dist.evaluate.scoring import evaluate

    result = evaluate(args.pred, args.labels, slices=slice_range(args.slices), json_out=args.json)
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


def cmd_export(args) -> int:
    from unet_dist.evaluate.scoring import export_tiff

    print(json.dumps(export_tiff(args.pred, args.out, array=args.array, slices=slice_range(args.slices),
                                 overwrite=args.overwrite)))
    return 0


def cmd_report(args) -> int:
    from unet_dist.visualize.report import report

    for path in report(args.run_dir, pred=args.pred, store=args.store, slices=slice_range(args.slices),
                       max_rows=args.max_rows, panel=args.panel):
        print(path)
    return 0


def cmd_cv(args) -> int:
    from unet_dist.evaluate.cross_validation import cv

    holdout = slice_range(args.holdout) if args.holdout else None
    cv(args.config, args.overrides, folds=args.folds, only=args.only, holdout=holdout, resume=args.resume,
       tta=args.tta, checkpoint_kind=args.checkpoint)
    return 0


def cmd_view(args) -> int:
    from unet_dist.visualize.view import view

    size = _ints(args.size, "--size", 2) if args.size else None
    result = view([args.store, *args.pred], slices=slice_range(args.slices), port=args.port, bind=args.bind,
                  screenshot_out=args.screenshot, timeout=args.timeout,
                  **({"size": size} if size else {}))
    if args.screenshot:
        print(json.dumps(result), flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unet-dist", description="Distributed U-Net training and tiled prediction for EM volumes in Zarr.")
    parser.add_argument("--version", action="version", version=f"unet-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="EM volume (TIFF, HDF5, Zarr, N5, precomputed, slices) to a chunked Zarr store")
    p.add_argument("--raw", required=True, help="PATH or PATH:INNER: multi-page TIFF, PNG/JPEG, HDF5 file, Zarr v2/v3 "
                   "or OME-Zarr, N5, neuroglancer precomputed folder, or folder of TIFF/PNG/JPEG slices")
    p.add_argument("--labels", help="labels in any of those forms (white = neuron interior)")
    p.add_argument("--out", required=True, help="the Zarr store to write (STORE.zarr)")
    p.add_argument("--resolution", help="voxel size Z,Y,X in nm; needed when the source records none, "
                   "overrides it (with a warning) when it does")
    p.add_argument("--chunks", default="2d", help="2d (one slice per chunk), 3d, or Z,Y,X")
    p.add_argument("--shard", help="Zarr v3 shard shape Z,Y,X (a multiple of the chunks)")
    p.add_argument("--label-threshold", type=float, help="label = value > T (for non-binary labels)")
    p.add_argument("--invert", action="store_true", help="flip labels (for white-membrane conventions)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--instances", action="store_true",
                   help="--labels are object IDs (one per neuron, 0 = background): keep them as labels/neuron_ids "
                        "and derive the training target from their boundaries")
    _add_rule_options(p, "with --instances")
    p.add_argument("--ignore-id", type=int, metavar="N",
                   help="with --instances: voxels of ID N are unlabelled (CREMI's reserved ID): labels/ignore, "
                        "never in a loss or a count")
    p.add_argument("--ignore-value", type=float, metavar="V",
                   help="binary labels: voxels of value V (e.g. 2 or 127) are unlabelled (labels/ignore)")
    p.add_argument("--ignore-mask", metavar="PATH[:INNER]",
                   help="a volume of the same shape whose non-zero voxels are unlabelled (labels/ignore)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("relabel", help="derive the training target again from the store's labels/neuron_ids "
                                       "with another boundary rule (replaces labels/neuron_interior)")
    p.add_argument("store")
    _add_rule_options(p, "the rule")
    p.set_defaults(func=cmd_relabel)

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

    p = sub.add_parser("upgrade", help="move a store of the first layout (arrays raw/labels or probability/mask "
                                       "at the root) into the OME-Zarr layout, without copying chunk data")
    p.add_argument("store")
    p.set_defaults(func=cmd_upgrade)

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

    p = sub.add_parser("predict", help="tiled prediction of a whole volume (one process, or N ranks under "
                                       "torchrun / srun)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint (e.g. RUN_DIR/checkpoints/best.pt)")
    p.add_argument("--input", required=True, help="the store whose 'raw' array to predict (STORE.zarr)")
    p.add_argument("--out", required=True, help="the prediction store to write (PRED.zarr)")
    p.add_argument("--labels", help="a store with 'labels': report Dice and pixel error")
    p.add_argument("--slices", help="START:STOP, predict only these slices (e.g. 25:30)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue an interrupted prediction (same model and settings), or start one")
    again.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto: bf16 on GPUs that have it, fp32 on the CPU")
    p.add_argument("--json", help="also write the result (and metrics) to this JSON file")
    p.add_argument("overrides", nargs="*",
                   help="predict.* overrides, e.g. predict.block_size=[1,256,256] predict.tta=true")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="Dice, pixel error and the ISBI V_rand / V_info of a prediction")
    p.add_argument("--pred", required=True, help="the prediction store (PRED.zarr)")
    p.add_argument("--labels", required=True,
                   help="STORE[:LABEL]: the binary labels (default: the store's label image neuron_interior; "
                        "another label image name or an array path, e.g. volumes/labels/membrane)")
    p.add_argument("--slices", help="START:STOP in the labels' slice numbers (default: all predicted slices)")
    p.add_argument("--json", help="write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="a prediction as a multi-page TIFF (ISBI submission: float32 "
                                      "interior probabilities)")
    p.add_argument("pred", help="the prediction store (PRED.zarr)")
    p.add_argument("--out", required=True, help="the TIFF file to write")
    p.add_argument("--array", default="probability", choices=("probability", "mask"),
                   help="probability: float32 in [0, 1]; mask: uint8 0/255")
    p.add_argument("--slices", help="START:STOP in input slice numbers (default: all)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="PNGs of a run: raw | label | prediction | errors, and training curves")
    p.add_argument("run_dir", help="the run directory (config.yaml, metrics.jsonl, checkpoints/)")
    p.add_argument("--pred", help="a prediction store (default: predict the slices with the run's best checkpoint)")
    p.add_argument("--store", help="the store with raw and labels (default: data.store of config.yaml)")
    p.add_argument("--slices", help="START:STOP (default: data.val_slices of config.yaml)")
    p.add_argument("--max-rows", type=int, default=6, help="at most this many slices in the grid")
    p.add_argument("--panel", type=int, default=384, help="panel size in pixels (longest side)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("cv", help="k-fold cross-validation over the labelled slices: train, predict and evaluate "
                                  "each fold (one process, or N ranks under torchrun / srun)")
    p.add_argument("--config", required=True)
    p.add_argument("--folds", type=int, default=5, help="folds of consecutive slices (default 5)")
    p.add_argument("--only", type=int, help="run only fold K (0-based); cv.json sums up every fold on disk")
    p.add_argument("--holdout", help="START:STOP: one run holding out these slices instead of the folds "
                                     "(e.g. 25:30, the classic split)")
    p.add_argument("--resume", default="never", choices=("never", "auto"),
                   help="auto: skip folds whose training completed (status.json), continue interrupted ones")
    p.add_argument("--tta", action="store_true", help="also evaluate with 8-fold test-time augmentation")
    p.add_argument("--checkpoint", default="best", choices=("best", "last"),
                   help="predict with best.pt (by validation membrane Dice) or the last step checkpoint")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=1000 data.store=X.zarr")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser("view", help="raw, label images, probability and mask in neuroglancer (a local web "
                                    "server; --screenshot renders a PNG headless and exits)")
    p.add_argument("store", help="a store (STORE.zarr or PRED.zarr)")
    p.add_argument("pred", nargs="*", help="more stores shown aligned on the first, e.g. predictions")
    p.add_argument("--slices", help="START:STOP: open at slice START (default: the first predicted slice)")
    p.add_argument("--port", type=int, default=0, help="port to serve on (default 0: any free port)")
    p.add_argument("--bind", default="127.0.0.1",
                   help="address to serve on (default 127.0.0.1: only this machine, e.g. through ssh -L)")
    p.add_argument("--screenshot", metavar="OUT.png", help="render in headless Chromium, write a PNG, exit")
    p.add_argument("--size", help="screenshot size W,H in pixels (default 1280,1040)")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the data to be drawn")
    p.set_defaults(func=cmd_view)
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
