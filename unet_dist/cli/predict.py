"""`predict`: tiled prediction of a whole volume."""

from __future__ import annotations

import json

from unet_dist.cli.arguments import slice_range
from unet_dist.files import write_json_atomic


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


def add_parsers(sub) -> None:
    """Register `predict` on the CLI's subparsers."""
    p = sub.add_parser("predict", help="tiled prediction of a whole volume (one process, or N ranks under "
                                       "torchrun / srun)")
    p.add_argument("--checkpoint", required=True, help="a checkpoint (e.g. RUN_DIR/checkpoints/best.pt)")
    p.add_argument("--input", required=True, help="STORE[:ARRAY]: the volume to predict (default: the store's image, level 0; or an array path "
                        "inside any Zarr store, e.g. volumes/raw)")
    p.add_argument("--out", required=True, help="the prediction store to write (PRED.zarr)")
    p.add_argument("--labels", help="STORE[:LABEL]: binary labels of the same volume (default label image neuron_interior): "
                        "report Dice and pixel error")
    p.add_argument("--slices", help="START:STOP, predict only these slices (e.g. 25:30)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue an interrupted prediction (same model and settings), or start one")
    again.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: this rank's GPU when there is one, else the CPU")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto: bf16 on GPUs that have it, fp32 on the CPU")
    p.add_argument("--json", help="also write the result (and metrics) to this JSON file")
    p.add_argument("overrides", nargs="*",
                   help="predict.* overrides, e.g. predict.block_size=[1,256,256] predict.tta=true")
    p.set_defaults(func=cmd_predict)
