"""`bench io`'s two tables, the choices behind the I/O limit: codecs and Zarr back ends.

Codecs (`codecs` table): raw, probability and mask slices encoded and decoded on one thread by
numcodecs' Blosc (zstd 1/3/5, lz4; byte shuffle, bit shuffle for masks) and no compression.
Raw is `--raw-tif` or $UNET_DIST_ISBI_DIR/train-volume.tif (the ISBI 2012 training volume) when
present, else synthetic; probability is the labels (train-labels.tif beside it, else synthetic)
blurred with a Gaussian of sigma 1.5 px and quantized, a stand-in for a trained network's output;
the mask is the labels. Back ends (`backends` table): zarr-python's default codec pipeline, the
`zarrs` pipeline and tensorstore reading the same store: whole chunks, the blocks' 576^2 regions
(uncached), and random 256^2 loader patches, on one thread (zarrs decodes in its own Rust threads).
"""

from __future__ import annotations

import time
from pathlib import Path

CODECS = (("blosc-zstd-1", "zstd", 1), ("blosc-zstd-3", "zstd", 3), ("blosc-zstd-5", "zstd", 5),
          ("blosc-lz4", "lz4", 5), ("none", None, 0))
BACKENDS = ("zarr", "zarrs", "tensorstore")


def _codec_inputs(raw_tif: str | None, tiny: bool):
    import numpy as np
    import tifffile
    from scipy.ndimage import gaussian_filter

    if raw_tif:
        raw = tifffile.imread(raw_tif)
        labels_path = Path(raw_tif).with_name("train-labels.tif")
        labels = tifffile.imread(labels_path) if labels_path.is_file() else None
        source = "tif"
    else:
        raw = labels = None
        source = "synthetic"
    if labels is None:
        from unet_dist.bench.common import synthetic_slices

        n, w = (2, 256) if tiny else (8, 1024)
        slab = synthetic_slices((n, w, w))(0, n)
        raw = slab["raw"] if raw is None else raw
        labels = slab["labels"]
    mask = (labels > 0).astype(np.uint8)
    prob = np.rint(255 * np.clip(gaussian_filter(mask.astype(np.float32), (0, 1.5, 1.5)), 0, 1)).astype(np.uint8)
    if tiny:
        raw, prob, mask = raw[:2], prob[:2], mask[:2]
    return {"raw": raw, "probability": prob, "mask": mask}, source


def run_codecs(raw_tif: str | None, tiny: bool) -> dict:
    """Ratio, encode and decode MB/s per data kind and codec, one slice per call, one thread."""
    import numcodecs.blosc
    import numpy as np
    from numcodecs import Blosc

    numcodecs.blosc.use_threads = False
    data, source = _codec_inputs(raw_tif, tiny)
    rows = []
    for kind, volume in data.items():
        slices = [np.ascontiguousarray(s) for s in volume]
        total = sum(s.nbytes for s in slices)
        for name, cname, level in CODECS:
            if cname is None:
                enc, dec = (lambda s: s.tobytes()), (lambda b: np.frombuffer(b, np.uint8).copy())
            else:
                codec = Blosc(cname, level, Blosc.BITSHUFFLE if kind == "mask" else Blosc.SHUFFLE)
                enc, dec = codec.encode, codec.decode
            reps = 1 if tiny else 3
            t0 = time.perf_counter()
            for _ in range(reps):
                encoded = [enc(s) for s in slices]
            enc_s = (time.perf_counter() - t0) / reps
            t0 = time.perf_counter()
            for _ in range(reps):
                for b in encoded:
                    dec(b)
            dec_s = (time.perf_counter() - t0) / reps
            rows.append({"data": kind, "codec": name, "ratio": total / sum(len(b) for b in encoded),
                         "encode_mb_per_s": total / 2 ** 20 / enc_s, "decode_mb_per_s": total / 2 ** 20 / dec_s})
    return {"rows": rows, "source": source, "shape": list(data["raw"].shape)}


def run_backends(store: str, block: list, halo: list, depth: int, tiny: bool) -> dict:
    """The same reads through each back end: whole chunks, block regions, 256^2 patches; one thread."""
    import numpy as np

    from unet_dist.config import ModelConfig, PredictConfig
    from unet_dist.data import backends
    from unet_dist.data.store import RAW, open_store
    from unet_dist.predict.block_plan import block_core, input_region, make_plan, mirror_box

    raw = open_store(store)[RAW]
    cz, cy, cx = raw.chunks
    depth_read = min(raw.shape[0], 4 if tiny else 32)
    chunks = [(slice(z, z + cz), slice(y, y + cy), slice(x, x + cx)) for z in range(0, depth_read, cz)
              for y in range(0, raw.shape[1], cy) for x in range(0, raw.shape[2], cx)]
    plan = make_plan(ModelConfig(depth=depth), PredictConfig(block_size=block, halo=halo), raw.shape,
                     (0, depth_read))
    blocks = [mirror_box(input_region(plan, block_core(plan, i)), raw.shape) for i in range(plan.n_blocks)]
    rng = np.random.default_rng(0)
    p = min(256, raw.shape[1])
    patches = []
    for _ in range(16 if tiny else 200):
        z, y, x = (int(rng.integers(0, n - s + 1)) for n, s in zip(raw.shape, (1, p, p)))
        patches.append((slice(z, z + 1), slice(y, y + p), slice(x, x + p)))
    readers = {}
    readers["zarr"] = raw.__getitem__
    try:
        readers["zarrs"] = backends.reopen(raw, "zarrs").__getitem__
    except Exception as exc:  # the package is in the [bench] extra
        readers["zarrs"] = exc
    try:
        import tensorstore as ts

        arr = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(Path(store) / RAW)}},
                      read=True, context=ts.Context({"data_copy_concurrency": {"limit": 1}})).result()
        readers["tensorstore"] = lambda box: arr[box].read().result()
    except Exception as exc:
        readers["tensorstore"] = exc
    rows = []
    for name in BACKENDS:
        read = readers[name]
        if isinstance(read, Exception):
            rows.append({"backend": name, "error": f"{type(read).__name__}: {str(read)[:120]}"})
            continue
        row = {"backend": name}
        for what, boxes in (("chunks", chunks), ("blocks", blocks), ("patches", patches)):
            read(boxes[0])  # first call: opening, thread pools
            t0 = time.perf_counter()
            total = sum(np.asarray(read(b)).nbytes for b in boxes)
            seconds = time.perf_counter() - t0
            row[f"{what}_mb_per_s"] = total / 2 ** 20 / seconds
            if what == "patches":
                row["patches_per_s"] = len(boxes) / seconds
        rows.append(row)
    return {"rows": rows, "chunks_read": len(chunks), "blocks_read": len(blocks), "patches_read": len(patches)}


# ------------------------------------------------------------------------------------ the parent


COLUMNS = {
    "codecs": [("data", "data"), ("codec", "codec"), ("ratio", "ratio"), ("encode_mb_per_s", "encode MB/s"),
               ("decode_mb_per_s", "decode MB/s")],
    "backends": [("backend", "back end"), ("chunks_mb_per_s", "chunks MB/s"), ("blocks_mb_per_s", "blocks MB/s"),
                 ("patches_mb_per_s", "patches MB/s"), ("patches_per_s", "patches/s"), ("error", "error")],
}
