"""`config show`, `model`, `train`, `cv`: a configuration, its U-Net, and training it."""

from __future__ import annotations

import json
import sys

from unet_dist.cli.arguments import positive_ints, slice_range
from unet_dist.errors import writing

EXIT_DIVERGED = 3


def cmd_config_show(args) -> int:
    from unet_dist.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_model(args) -> int:
    from unet_dist.config import load_config
    from unet_dist.model import describe

    cfg = load_config(args.config, args.overrides)
    patch = tuple(positive_ints(args.patch, "--patch", cfg.model.dims)) if args.patch else tuple(cfg.data.patch_size)
    print(describe(cfg.model, patch))
    return 0


def cmd_train(args) -> int:
    from unet_dist.config import load_config
    from unet_dist.train.loop import train
    from unet_dist.train.step import TrainingDiverged

    cfg = load_config(args.config, args.overrides)
    try:
        with writing(cfg.run.dir):  # a full disk met by a write that knows no path names the run
            result = train(cfg, resume=args.resume)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DIVERGED
    if result.reports and result.metrics and result.status == "completed":
        print(json.dumps({"step": result.step, **result.metrics}), flush=True)
    return 0


def cmd_cv(args) -> int:
    from unet_dist.evaluate.cross_validation import cv

    holdout = slice_range(args.holdout) if args.holdout else None
    cv(args.config, args.overrides, folds=args.folds, only=args.only, holdout=holdout, resume=args.resume,
       tta=args.tta, checkpoint_kind=args.checkpoint)
    return 0


def add_parsers(sub) -> None:
    """Register the configuration and training commands on the CLI's subparsers."""
    _add_config(sub)
    p = sub.add_parser("model", help="parameter count, receptive field and shapes of a config's U-Net")
    p.add_argument("config", help="a config file (YAML), e.g. configs/isbi2012.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=5")
    p.add_argument("--patch", help="input patch size (default: data.patch_size)")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("train", help="train a U-Net (one process, or N ranks under torchrun / srun)")
    p.add_argument("--config", required=True, help="a config file (YAML), e.g. configs/isbi2012_cpu.yaml")
    p.add_argument("--resume", default="never",
                   help="never (default; refuses a run.dir with checkpoints), auto (newest valid), or a path")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 data.store=X.zarr")
    p.set_defaults(func=cmd_train)
    _add_cv(sub)


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="configuration tools")
    config_sub = p.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved config")
    show.add_argument("config", help="a config file (YAML)")
    show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    show.set_defaults(func=cmd_config_show)


def _add_cv(sub) -> None:
    p = sub.add_parser("cv", help="k-fold cross-validation over the labelled slices: train, predict and evaluate "
                                  "each fold (one process, or N ranks under torchrun / srun)")
    p.add_argument("--config", required=True, help="a config file (YAML) of one volume, e.g. configs/isbi2012_cpu.yaml")
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
