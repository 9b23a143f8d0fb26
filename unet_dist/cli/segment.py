"""`segment`: a prediction store -> its label image labels/neurons."""

from __future__ import annotations

import json
import sys

from unet_dist.cli.arguments import positive_ints
from unet_dist.files import write_json_atomic


def cmd_segment(args) -> int:
    from unet_dist import dist
    from unet_dist.config import load_config
    from unet_dist.segment.pipeline import segment

    threshold = threshold_for(args.pred, args.threshold, args.overrides)
    if threshold is not None and args.threshold is None and dist.detect_env().is_main:
        print(f"segment: threshold {threshold}, chosen on the training run's validation split "
              "(--threshold overrides it)", file=sys.stderr, flush=True)
    cfg = load_config(args.config, overrides_of(threshold, args.block_size, args.overrides))
    result = segment(args.pred, cfg.segment, overwrite=args.overwrite, progress=cfg.logging.progress)
    if dist.detect_env().is_main:
        if args.json:
            write_json_atomic(args.json, result)
        print(json.dumps(result), flush=True)
    return 0


def threshold_for(pred, threshold: float | None, overrides=()) -> float | None:
    """--threshold, else (unless segment.threshold is overridden) the one the training run chose on
    its validation split and predict recorded in the store; None: the config's."""
    from unet_dist.segment.pipeline import validated_threshold

    if threshold is not None or any(str(o).startswith("segment.threshold=") for o in overrides):
        return threshold
    return validated_threshold(pred)


def overrides_of(threshold: float | None, block_size: str | None, overrides=()) -> list[str]:
    """The config overrides of segment's flags, after the dotted ones: the flags win (also jobs.segment's)."""
    flags = [f"segment.threshold={threshold}"] if threshold is not None else []
    if block_size:
        flags.append(f"segment.block_size=[{','.join(map(str, positive_ints(block_size, '--block-size')))}]")
    return [*overrides, *flags]


def add_parsers(sub) -> None:
    """Register `segment` on the CLI's subparsers."""
    p = sub.add_parser("segment", help="neuron IDs from a prediction (affinities, or a membrane probability "
                                       "per slice), blockwise, into PRED.zarr's labels/neurons (one process, "
                                       "or N ranks under torchrun / srun; CPU only)")
    p.add_argument("--pred", required=True, help="the prediction store (PRED.zarr) written by `predict`")
    p.add_argument("--threshold", type=float, help="merge fragments whose edge score (segment.edge_score: the "
                                                   "75th percentile of the affinities along their contact, or "
                                                   "their mean) is at least this (default: the one the training "
                                                   "run chose on its validation split, recorded in the "
                                                   "prediction; else segment.threshold, 0.7)")
    p.add_argument("--block-size", metavar="Z,Y,X",
                   help="block (= chunk of labels/neurons) size (segment.block_size)")
    p.add_argument("--config", help="a YAML config whose segment section applies")
    p.add_argument("--overwrite", action="store_true", help="replace an existing labels/neurons")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("overrides", nargs="*", help="segment.* overrides, e.g. segment.merge=union_find segment.halo=[4,16,16]")
    p.set_defaults(func=cmd_segment)
