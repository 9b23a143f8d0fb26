"""`bench view`: what a viewer's plane reads cost for each chunk layout: chunk files touched, bytes
decoded per byte shown, and milliseconds per view.

Training and prediction read slabs (all of y and x for a few z); a viewer such as neuroglancer
reads planes in three orientations (its 4-panel layout: xy, xz, yz through one point). For each
layout a synthetic store is written (`--shape`, 50 x 4 x 4 nm), then each panel of `--screen`
pixels is read at level 0 through the centre, as the viewer fetches it: whole chunks. In the
cross-sections the viewer stretches z by the voxel's aspect (50 / 4 = 12.5 pixels a slice), so a
panel spans screen / 12.5 slices. "overview" reads the coarsest level whole (the zoomed-out view).
Reads go through zarr from the page cache (the store was just written): file counts are exact,
times are the decode cost, not the disk's. OURS is the first layout of `--layouts` (default 2d, what
`convert` writes), the PEER the second; speedup = the peer's time per 4-panel view / ours.
"""

from __future__ import annotations

import argparse
import math
import time

DEFAULT_SHAPE = {"cpu": (64, 2048, 2048), "tiny": (16, 512, 512)}
VOXEL_NM = (50.0, 4.0, 4.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", help="volume Z,Y,X (default 64,2048,2048; tiny 16,512,512)")
    p.add_argument("--layouts", default="2d,3d", help="chunk choices to compare, comma-separated (default 2d,3d)")
    p.add_argument("--screen", type=int, default=1024, help="panel size in screen pixels (default 1024)")
    p.add_argument("--rounds", type=int, default=3, help="reads of each panel; the median is reported")


def panels(shape, screen: int, voxel=VOXEL_NM) -> dict[str, tuple[slice, ...]]:
    """Regions of level 0 that the three panels through the centre show at one voxel per pixel in y, x."""
    z, y, x = shape
    cz, cy, cx = z // 2, y // 2, x // 2
    span_z = max(1, round(screen * voxel[1] / voxel[0]))  # slices a cross-section panel covers

    def around(c, n, span):
        lo = max(0, min(c - span // 2, n - span))
        return slice(lo, min(n, lo + span))

    return {"xy": (slice(cz, cz + 1), around(cy, y, screen), around(cx, x, screen)),
            "xz": (around(cz, z, span_z), slice(cy, cy + 1), around(cx, x, screen)),
            "yz": (around(cz, z, span_z), around(cy, y, screen), slice(cx, cx + 1))}


def touched(unit: tuple[int, ...], region: tuple[slice, ...]) -> int:
    """How many grid cells of size `unit` a region overlaps."""
    return math.prod(len(range(r.start // u, (r.stop - 1) // u + 1)) for r, u in zip(region, unit))


def read_panels(store: str, screen: int, rounds: int) -> dict:
    """Chunk files, decoded MB per shown MB and median ms for each panel and the overview."""
    import zarr

    from unet_dist.data.ome import image_levels
    from unet_dist.bench.common import median

    group = zarr.open_group(store, mode="r")
    levels = image_levels(group)
    level0 = levels[0]
    out = {}
    views = {**panels(level0.shape, screen), "overview": (slice(None),) * 3}
    for name, region in views.items():
        array = levels[-1] if name == "overview" else level0
        if name == "overview":  # the middle slice of the coarsest level, whole
            mid = array.shape[0] // 2
            region = (slice(mid, mid + 1), slice(0, array.shape[1]), slice(0, array.shape[2]))
        files = touched(array.shards or array.chunks, region)
        # a shard's index lets a reader decode only the inner chunks it needs
        decoded = touched(array.chunks, region) * math.prod(array.chunks) * array.dtype.itemsize
        shown = math.prod(r.stop - r.start for r in region) * array.dtype.itemsize
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            array[region]
            times.append(time.perf_counter() - t0)
        out[name] = {"files": files, "ms": median(times) * 1e3, "read_amplification": decoded / shown}
    return out


def run(args) -> dict:
    from unet_dist.data.layout import parse_zyx, resolve_layout
    from unet_dist.errors import UserError
    from unet_dist.bench import common

    device = common.resolve_device("cpu")
    shape = parse_zyx(args.shape, "--shape") if args.shape else DEFAULT_SHAPE["tiny" if args.tiny else "cpu"]
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    if len(names) < 2:
        raise UserError(f"--layouts: expected at least two chunk choices to compare, got '{args.layouts}'")
    if args.screen < 16 or args.rounds < 1:
        raise UserError("--screen must be >= 16 and --rounds >= 1")
    layouts = {n: resolve_layout(shape, n if n in ("2d", "3d") else parse_zyx(n, "--layouts")) for n in names}
    rows = []
    with common.workdir(args.workdir) as work:
        for name, layout in layouts.items():
            common.log(f"view: writing a {shape} store with {name} chunks {layout.chunks}")
            store = work / f"{name.replace(',', 'x')}.zarr"
            common.make_volume_store(store, shape, chunks=layout.chunks)
            measured = read_panels(str(store), args.screen, args.rounds)
            four = [measured[k] for k in ("xy", "xz", "yz")]
            rows.append({"layout": name, "chunks": list(layout.chunks), **{
                f"{k}_{what}": v[what] for k, v in measured.items() for what in ("files", "ms", "read_amplification")},
                "view_files": sum(p["files"] for p in four), "view_ms": sum(p["ms"] for p in four),
                "role": "ours" if not rows else "peer"})
    for row in rows:
        row["x_peer"] = rows[1]["view_ms"] / row["view_ms"] if row["view_ms"] else None
    speedup = rows[0]["x_peer"]
    config = {"shape": list(shape), "voxel_nm": list(VOXEL_NM), "screen": args.screen, "rounds": args.rounds,
              "layouts": {n: list(l.chunks) for n, l in layouts.items()}}
    report = common.make_report(
        "view", args, device, config, rows, speedup,
        f"ms per 4-panel view (xy + xz + yz through the centre) with {rows[1]['layout']} chunks / with "
        f"{rows[0]['layout']} chunks", rows[0], rows[1],
        notes=["files = chunk files (shards when sharded) a panel touches; read_amplification = bytes decoded "
               "/ bytes shown; reads from the page cache through zarr-python",
               "xz and yz panels span screen * 4 / 50 slices (the viewer stretches z by the voxel aspect)"])
    report["summary"] = {f"{r['layout']}_files_per_view": r["view_files"] for r in rows}
    return report


COLUMNS = [("layout", "chunks"), ("xy_files", "xy files"), ("xz_files", "xz files"), ("yz_files", "yz files"),
           ("view_files", "4-panel files"), ("xy_read_amplification", "xy ampl."),
           ("xz_read_amplification", "xz ampl."), ("view_ms", "4-panel ms"), ("overview_files", "overview files"),
           ("overview_ms", "overview ms"), ("x_peer", "x peer")]
