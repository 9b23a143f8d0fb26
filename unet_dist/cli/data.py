"""`fetch`, `convert`, `relabel`, `synth`, `info`, `upgrade`: getting data, making and inspecting stores."""

from __future__ import annotations

import json
import os
import sys

from unet_dist.cli.arguments import chunk_shape, positive_ints, voxel_size
from unet_dist.errors import writing


def _progress(label: str):
    """Progress with rate and ETA for long conversions (stderr, so stdout stays the result)."""
    from unet_dist.monitor.progress import Progress

    return Progress(label, 0, "slices")


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


def _print_store(path) -> None:
    from unet_dist.data.convert import format_info, store_info

    print(format_info(store_info(path)))


def cmd_fetch(args) -> int:
    from unet_dist.data.fetch import fetch_isbi2012, read_checksums

    sums = read_checksums(args.checksums) if args.checksums else None
    fetch_isbi2012(args.dir, url=args.url, checksums=sums)
    return 0


def _add_fetch(sub) -> None:
    from unet_dist.data.fetch import ISBI_URL

    p = sub.add_parser("fetch", help="download a public data set, SHA-256 checked and resumable (isbi2012)")
    p.add_argument("dataset", choices=("isbi2012",), help="isbi2012: train-volume.tif, train-labels.tif, "
                   "test-volume.tif of the ISBI 2012 challenge")
    p.add_argument("--dir", default=os.environ.get("UNET_DIST_ISBI_DIR") or "data/isbi2012",
                   help="the folder to put them in (default: $UNET_DIST_ISBI_DIR, else data/isbi2012)")
    p.add_argument("--url", default=os.environ.get("UNET_DIST_ISBI_URL") or ISBI_URL,
                   help=f"the challenge's zip (default: $UNET_DIST_ISBI_URL, else {ISBI_URL})")
    p.add_argument("--checksums", default=os.environ.get("UNET_DIST_ISBI_CHECKSUMS"),
                   help="a sha256sum file to check against instead of the recorded checksums (another copy "
                        "of the data; default: $UNET_DIST_ISBI_CHECKSUMS)")
    p.set_defaults(func=cmd_fetch)


def cmd_convert(args) -> int:
    from unet_dist.data.convert import convert
    from unet_dist.data.intensity import parse_range

    convert(
        raw=args.raw, out=args.out, labels=args.labels,
        resolution=voxel_size(args.resolution, "--resolution") if args.resolution else None,
        chunks=chunk_shape(args.chunks), shard=positive_ints(args.shard, "--shard") if args.shard else None,
        label_threshold=args.label_threshold, invert=args.invert, overwrite=args.overwrite,
        progress=_progress("convert"), instances=_rule(args) if args.instances else None,
        ignore_id=args.ignore_id, ignore_value=args.ignore_value, ignore_mask=args.ignore_mask,
        intensity_range=parse_range(args.intensity_range),
    )
    _print_store(args.out)
    return 0


def cmd_relabel(args) -> int:
    from unet_dist.data.relabel import relabel

    with writing(args.store):  # changed in place: a full disk names the store
        done = relabel(args.store, _rule(args))
    print(f"relabelled {done['store']}: boundary width {args.boundary_width}, label fraction "
          f"{done['label_fraction']:.4f}", file=sys.stderr)
    _print_store(args.store)
    return 0


def cmd_synth(args) -> int:
    from unet_dist.data.synth import synthesize

    synthesize(args.out, shape=positive_ints(args.shape, "--shape"), seed=args.seed,
               chunks=chunk_shape(args.chunks), shard=positive_ints(args.shard, "--shard") if args.shard else None,
               overwrite=args.overwrite, progress=_progress("synth"))
    _print_store(args.out)
    return 0


def cmd_info(args) -> int:
    from unet_dist.data.convert import format_info, store_info

    info = store_info(args.store)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))
    return 0


def cmd_upgrade(args) -> int:
    from unet_dist.data.ome import upgrade

    with writing(args.store):
        done = upgrade(args.store)
    print(f"upgraded {done['path']}: image '{done['image']}', label images {done['labels'] or 'none'}, "
          f"{done['levels']} level(s)", file=sys.stderr)
    _print_store(args.store)
    return 0


def _add_convert(sub) -> None:
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
    p.add_argument("--intensity-range", metavar="LO,HI",
                   help="a float raw volume's values LO..HI become 0..1 (default: its measured range, with a "
                        "warning); integer types are scaled by their type's range")
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


def add_parsers(sub) -> None:
    """Register the data commands on the CLI's subparsers."""
    _add_fetch(sub)
    _add_convert(sub)

    p = sub.add_parser("relabel", help="derive the training target again from the store's labels/neuron_ids "
                                       "with another boundary rule (replaces labels/neuron_interior)")
    p.add_argument("store", help="a store written by convert --instances (STORE.zarr)")
    _add_rule_options(p, "the rule")
    p.set_defaults(func=cmd_relabel)

    p = sub.add_parser("synth", help="an EM-like synthetic volume with exact labels")
    p.add_argument("--out", required=True, help="the Zarr store to write (STORE.zarr)")
    p.add_argument("--shape", default="32,512,512", help="Z,Y,X")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same volume (default 0)")
    p.add_argument("--chunks", default="2d", help="2d, 3d, or Z,Y,X")
    p.add_argument("--shard", help="Zarr v3 shard shape Z,Y,X")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("info", help="shapes, chunks, codecs, compression and voxel size of a store")
    p.add_argument("store", help="a store (STORE.zarr or PRED.zarr)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("upgrade", help="move a store of the first layout (arrays raw/labels or probability/mask "
                                       "at the root) into the OME-Zarr layout, without copying chunk data")
    p.add_argument("store", help="a store of the first layout, upgraded in place")
    p.set_defaults(func=cmd_upgrade)
