"""`evaluate`, `export`, `report`, `view`: scoring, exporting and looking at predictions."""

from __future__ import annotations

import json

from unet_dist.cli.arguments import positive_ints, slice_range
from unet_dist.errors import writing


def cmd_evaluate(args) -> int:
    if args.seg:
        from unet_dist.evaluate.segmentation import evaluate_segmentation

        result = evaluate_segmentation(args.seg, args.labels, slices=slice_range(args.slices),
                                       json_out=args.json, fraction=args.overlap_fraction)
    else:
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

    with writing(args.run_dir):  # the report is written into the run directory
        paths = report(args.run_dir, pred=args.pred, store=args.store, slices=slice_range(args.slices),
                       max_rows=args.max_rows, panel=args.panel)
    for path in paths:
        print(path)
    return 0


def cmd_view(args) -> int:
    from unet_dist.visualize.view import view

    size = positive_ints(args.size, "--size", 2) if args.size else None
    result = view([args.store, *args.pred], slices=slice_range(args.slices), port=args.port, bind=args.bind,
                  screenshot_out=args.screenshot, timeout=args.timeout,
                  **({"size": size} if size else {}))
    if args.screenshot:
        print(json.dumps(result), flush=True)
    return 0


def add_parsers(sub) -> None:
    """Register the commands that score, export and show predictions on the CLI's subparsers."""
    p = sub.add_parser("evaluate", help="Dice, pixel error and the ISBI V_rand / V_info of a prediction; with "
                                        "--seg, VOI, adapted Rand error and split / merged neurons of a segmentation")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--pred", help="the prediction store (PRED.zarr)")
    what.add_argument("--seg", metavar="PRED.zarr[:ARRAY]",
                      help="a segmentation: the label image neurons of PRED.zarr (unet-dist segment), or "
                           "another label image name or array path")
    p.add_argument("--labels", required=True,
                   help="STORE[:LABEL]: the binary labels (default: the store's label image neuron_interior; "
                        "another label image name or an array path, e.g. volumes/labels/membrane); "
                        "with --seg the true neuron IDs (default: the label image neuron_ids)")
    p.add_argument("--slices", help="START:STOP in the labels' slice numbers (default: all predicted slices)")
    p.add_argument("--overlap-fraction", type=float, default=0.05,
                   help="with --seg: the share of a neuron's voxels a segment must hold to count in the split / "
                        "merged neuron counts (default 0.05)")
    p.add_argument("--json", help="write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="a prediction as a multi-page TIFF (ISBI submission: float32 "
                                      "interior probabilities)")
    p.add_argument("pred", help="the prediction store (PRED.zarr)")
    p.add_argument("--out", required=True, help="the TIFF file to write")
    p.add_argument("--array", default="probability", choices=("probability", "mask"),
                   help="probability: float32 in [0, 1]; mask: uint8 0/255")
    p.add_argument("--slices", help="START:STOP in input slice numbers (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing TIFF")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="PNGs of a run: raw | label | prediction | errors, and training curves")
    p.add_argument("run_dir", help="the run directory (config.yaml, metrics.jsonl, checkpoints/)")
    p.add_argument("--pred", help="a prediction store (default: predict the slices with the run's best checkpoint)")
    p.add_argument("--store", help="the store with raw and labels (default: data.store of config.yaml)")
    p.add_argument("--slices", help="START:STOP (default: data.val_slices of config.yaml)")
    p.add_argument("--max-rows", type=int, default=6, help="at most this many slices in the grid")
    p.add_argument("--panel", type=int, default=384, help="panel size in pixels (longest side)")
    p.set_defaults(func=cmd_report)
    _add_view(sub)


def _add_view(sub) -> None:
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
