"""The volume store: one Zarr v3 group per volume, valid OME-Zarr 0.5, shared by every step.

Layout (ARCHITECTURE.md, Formats):
- the image at the group's root, as multiscale levels `0`, `1`, ... (the raw EM volume; in a
  prediction store, the probability);
- label images under `labels/<name>/0`, `1`, ... with `image-label` metadata and the image's
  levels: `neuron_interior` is the binary training target (1 = neuron interior, 0 = membrane);
  a prediction store's `mask` is one too; `ignore` (optional) marks unlabelled voxels (1), whose
  target is stored as 0 and must never reach a loss or a count;
- voxel size in nm in the OME coordinate transformations; our provenance under `unet_dist`.

The first layout (arrays `raw` and `labels` at the root) is not valid OME-Zarr (`labels` is
reserved for a group of label images); such a store is refused with a line that says how to
upgrade it.

A store is written into a hidden temporary sibling and renamed onto its name only when complete,
so a crash, a user's mistake or Ctrl-C never leaves a half-written store where a store is expected.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from unet_dist import __version__
from unet_dist.errors import UserError

EVERY_CHUNK_STORED = "unet_dist_every_chunk_stored"
AXES = ("z", "y", "x")
LABEL_CONVENTION = "labels: 1 = neuron interior, 0 = membrane (uint8)"
# Raw EM is mostly noise (zstd level 3 compresses it as well as level 5, ~1.5x faster); byte
# shuffle helps 16-bit data. Bitshuffle makes 0/1 labels about 1.6x smaller than byte shuffle (ISBI).
COMPRESSORS = {
    "raw": dict(cname="zstd", clevel=3, shuffle="shuffle"),
    "labels": dict(cname="zstd", clevel=3, shuffle="bitshuffle"),
    # Predictor outputs are written at GPU speed: lz4 encodes probabilities 6x and masks 2.7x faster
    # than zstd-3 for 30-50% larger files (BENCHMARKS.md, codec table).
    "probability": dict(cname="lz4", clevel=5, shuffle="shuffle"),
    "mask": dict(cname="lz4", clevel=5, shuffle="bitshuffle"),
}
Progress = Callable[[int, int], None]  # (slices done, slices total)
READ_AHEAD_BYTES = 256 << 20  # read the next slab during a write only below this slab size


# ---------------------------------------------------------------- opening and reading


RAW = "0"  # level 0 of the image at the root: the raw volume (in a prediction store, the probability)
TARGET = "neuron_interior"  # the binary training target's label image
IGNORE = "ignore"  # the unlabelled voxels' label image (uint8, 1 = unlabelled: never in a loss or a count)
OLD_LAYOUT = ("raw", "probability")  # root arrays of the first layout


def label_path(name: str, level: int = 0) -> str:
    return f"labels/{name}/{level}"


TARGET_PATH = label_path(TARGET)


def open_store(path, arrays: Sequence[str] = (RAW,), mode: str = "r") -> zarr.Group:
    """Open an existing Zarr v3 group and check that it holds `arrays` (paths); UserError if not."""
    path = Path(path)
    if (path / ".zgroup").is_file():
        raise UserError(f"{path}: a Zarr v2 store; unet_dist reads Zarr v3 (convert it again)")
    if not (path / "zarr.json").is_file():
        raise UserError(f"{path}: not a Zarr store")
    try:
        group = zarr.open_group(str(path), mode=mode)
    except Exception as exc:  # zarr raises several types for "this is not a group"
        raise UserError(f"{path}: not a Zarr store ({exc})") from None
    if group.metadata.zarr_format != 3:
        raise UserError(f"{path}: a Zarr v{group.metadata.zarr_format} store; Zarr v3 is needed")
    roots = {name for name, _ in group.arrays()}
    if RAW not in roots and roots & set(OLD_LAYOUT):
        raise UserError(f"{path}: a store in the first unet-dist layout (arrays {', '.join(sorted(roots))} at "
                        f"the root, not OME-Zarr); run `unet-dist upgrade {path}` (moves them, copies no chunk "
                        "data) or convert it again")
    for name in arrays:
        if not _is_array(group, name):
            raise UserError(f"{path}: {_missing(group, name)}")
    return group


def _is_array(group: zarr.Group, name: str) -> bool:
    try:
        return isinstance(group[name], zarr.Array)
    except KeyError:
        return False


def _missing(group: zarr.Group, name: str) -> str:
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "labels":
        names = label_names(group)
        return f"no label image '{parts[1]}' (label images: {', '.join(names) or 'none'})"
    present = sorted(n for n, _ in group.arrays())
    return f"no array '{name}' (arrays: {', '.join(present) or 'none'})"


def slices_within(slices, depth: int, source: str, first: int = 0) -> tuple[int, int]:
    """(start, stop) within slices first .. first + depth (all of them for None)."""
    if slices is None:
        return first, first + depth
    lo, hi = (int(s) for s in slices)
    if not first <= lo < hi <= first + depth:
        raise UserError(f"{source}: slices {lo}:{hi} are not within its slices {first}:{first + depth}")
    return lo, hi


def label_names(group: zarr.Group) -> list[str]:
    """The label images a store lists (OME `labels` attribute of its `labels` group)."""
    try:
        return list(group["labels"].attrs["ome"]["labels"])
    except (KeyError, TypeError):
        return []


def voxel_size(group: zarr.Group) -> tuple[float, ...] | None:
    """The voxel size in nm of level 0 from the OME metadata, or None when the store gives none."""
    try:
        multiscale = group.attrs["ome"]["multiscales"][0]
        transforms = multiscale["datasets"][0]["coordinateTransformations"]
        scale = next(t["scale"] for t in transforms if t["type"] == "scale")
    except (KeyError, IndexError, TypeError, StopIteration):
        return None
    # Axes without a unit are how we record "voxel size unknown" (scale 1 is then a placeholder).
    if not all(axis.get("unit") for axis in multiscale["axes"]):
        return None
    return tuple(float(s) for s in scale)


def provenance(sources: dict, **extra) -> dict:
    """Our attribute block: who wrote the store, when, from what."""
    return {
        "unet_dist": {
            "version": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "sources": sources,
            "label_convention": LABEL_CONVENTION,
            **extra,
        }
    }


# ---------------------------------------------------------------- chunk layout


@dataclass(frozen=True)
class Layout:
    """Chunks and optional shards of a (Z, Y, X) array; slabs are what one write (or read) covers."""

    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    shards: tuple[int, int, int] | None

    @classmethod
    def of(cls, array) -> "Layout":
        """The layout of an existing array, e.g. to stream it slab by slab."""
        return cls(tuple(array.shape), tuple(array.chunks), array.shards)

    @property
    def slab_depth(self) -> int:
        # Whole shards per write: two writes into one shard lose data (measured with zarr 3.1).
        return (self.shards or self.chunks)[0]

    def slabs(self) -> Iterator[tuple[int, int]]:
        depth = self.slab_depth
        for z0 in range(0, self.shape[0], depth):
            yield z0, min(z0 + depth, self.shape[0])


def parse_zyx(text: str, what: str) -> tuple[int, int, int]:
    """'1,512,512' -> (1, 512, 512); for CLI arguments."""
    try:
        values = tuple(int(v) for v in str(text).replace("x", ",").split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise UserError(f"{what}: expected three integers z,y,x, got '{text}'")
    return check_zyx(values, what)


def resolve_layout(shape, chunks="2d", shard=None) -> Layout:
    """Turn a preset ("2d", "3d") or explicit (z, y, x) chunks plus an optional shard into a Layout."""
    shape = tuple(int(s) for s in shape)
    z, y, x = shape
    if chunks == "2d":
        chunk_shape = (1, min(y, 1024), min(x, 1024))
    elif chunks == "3d":
        chunk_shape = (min(z, 32), min(y, 256), min(x, 256))
    elif isinstance(chunks, str):
        if chunks.replace(",", "").replace("x", "").isdigit():
            chunk_shape = parse_zyx(chunks, "chunks")
        else:
            raise UserError(f"chunks: expected '2d', '3d' or z,y,x, got '{chunks}'")
    else:
        chunk_shape = check_zyx(chunks, "chunks")
    shard_shape = None
    if shard is not None:
        shard_shape = parse_zyx(shard, "shard") if isinstance(shard, str) else check_zyx(shard, "shard")
        # A shard beyond the volume only needs to cover it: (32, ...) on 30 slices of 3d chunks
        # (30, ...) becomes 30, so presets clipped to small volumes still combine with a shard.
        shard_shape = tuple(
            min(s, -(-n // c) * c) for s, n, c in zip(shard_shape, shape, chunk_shape)
        )
        bad = [s for s, c in zip(shard_shape, chunk_shape) if s % c]
        if bad:
            raise UserError(
                f"shard: {shard_shape} is not a multiple of the chunks {chunk_shape} on every axis"
            )
    return Layout(shape, chunk_shape, shard_shape)


def check_zyx(values, what) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"{what}: expected three positive integers z,y,x, got {values!r}") from None
    if len(values) != 3 or min(values) < 1:
        raise UserError(f"{what}: expected three positive integers z,y,x, got {values}")
    return values  # type: ignore[return-value]


# ---------------------------------------------------------------- writing


def check_out(out, overwrite: bool) -> Path:
    """Refuse an existing `out` unless overwrite, and never replace something that is not a store."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise UserError(f"{out}: already exists (pass --overwrite to replace it)")
        if not (out / "zarr.json").is_file():
            # --overwrite on a typo'd path must not delete someone's data folder.
            raise UserError(f"{out}: exists and is not a Zarr store; refusing to replace it")
    return out


@contextlib.contextmanager
def atomic_store_dir(out, overwrite: bool) -> Iterator[Path]:
    """Yield a hidden temporary sibling of `out`; rename it onto `out` on success, delete it on failure.

    With overwrite the old store is moved aside, the new one renamed in, then the old deleted, so
    a failure at any point leaves either the old store or the new one at `out`.
    """
    out = check_out(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create its folder ({exc.strerror})") from None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an earlier process with our pid, killed -9
    try:
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"{out}: cannot write there ({exc.strerror})") from None
    try:
        with _sigterm_raises():
            yield tmp
            _replace(tmp, out, overwrite)
    except BaseException:
        _remove_settled(tmp)
        raise


def _remove_settled(path: Path, quiet: float = 0.2, patience: float = 10.0) -> None:
    """Delete a store whose writes may still be finishing.

    An interrupted `array[...] = data` returns at once, but zarr's I/O thread completes the chunk
    writes already in flight, and recreates the folders it needs: remove, wait a moment, and
    repeat until the folder stays gone.
    """
    deadline = time.monotonic() + patience
    while True:
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(quiet)
        if not path.exists() or time.monotonic() > deadline:
            return


def _replace(tmp: Path, out: Path, overwrite: bool) -> None:
    check_out(out, overwrite)  # someone may have created it while we were writing
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_raises():
    """While writing, let SIGTERM (the default `kill`, SLURM's cancel) unwind like Ctrl-C does,
    so the cleanup runs. Only where nobody installed a handler already, and only in the main thread."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def _raise(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def create_volume_array(group: zarr.Group, name: str, layout: Layout, dtype, kind: str = "raw"):
    """An empty (Z, Y, X) array with our codecs and OME dimension names."""
    return group.create_array(
        name,
        shape=layout.shape,
        dtype=np.dtype(dtype),
        chunks=layout.chunks,
        shards=layout.shards,
        compressors=BloscCodec(**COMPRESSORS[kind]),
        fill_value=0,
        dimension_names=AXES,
        # Every chunk is stored, even an all-zero one, so a missing chunk file means damage.
        config={"write_empty_chunks": True},
        attributes={EVERY_CHUNK_STORED: True},
    )


def writing_every_chunk(array):
    """`array` writing every chunk, an all-fill one too, where it promises that (EVERY_CHUNK_STORED):
    zarr forgets the `write_empty_chunks` of `create_volume_array` when an array is opened again."""
    if isinstance(array, zarr.Array) and array.attrs.get(EVERY_CHUNK_STORED):
        return array.with_config({"write_empty_chunks": True})
    return array


def _chunk_file(array, coords) -> Path | None:
    """The file that holds the chunk (the shard, when sharded) at `coords`, for local stores."""
    root = getattr(array.store_path.store, "root", None)
    if root is None:
        return None
    return Path(root) / array.store_path.path / array.metadata.encode_chunk_key(tuple(coords))


def _chunks_of(array, region: tuple[slice, ...]) -> list[tuple[int, ...]]:
    unit = array.shards or array.chunks
    ranges = []
    for sl, n, u in zip(region, array.shape, unit):
        start, stop, _ = sl.indices(n)
        ranges.append(range(start // u, (max(stop, start + 1) - 1) // u + 1))
    return list(itertools.product(*ranges))


def damaged_chunk(where, exc: BaseException) -> UserError:
    """The one line for a chunk that does not decode (here and in `chunk_io`)."""
    return UserError(f"{where}: damaged chunk, cannot be decoded ({type(exc).__name__}: {str(exc)[:120]})")


def missing_chunk(path) -> UserError:
    return UserError(f"{path}: chunk file is missing (deleted?); the store is damaged")


def read_region(array, region: tuple[slice, ...]) -> np.ndarray:
    """`array[region]`, with a damaged store named down to the chunk instead of a codec traceback.

    A chunk that does not decode is a UserError naming its file; in arrays written by this project
    (every chunk stored) a missing chunk file is one too, instead of silently reading zeros.
    """
    if not isinstance(array, zarr.Array):  # in-memory arrays cannot be damaged
        return np.asarray(array[region])
    region = tuple(region) + (slice(None),) * (array.ndim - len(region))
    try:
        data = np.asarray(array[region])
    except Exception as exc:
        for coords in _chunks_of(array, region):
            unit = array.shards or array.chunks
            box = tuple(slice(c * u, (c + 1) * u) for c, u in zip(coords, unit))
            try:
                array[box]
            except Exception:
                raise damaged_chunk(_chunk_file(array, coords) or f"{array.store_path} chunk {coords}",
                                    exc) from None
        raise
    if array.attrs.get(EVERY_CHUNK_STORED):
        for coords in _chunks_of(array, region):
            path = _chunk_file(array, coords)
            if path is not None and not path.exists():
                raise missing_chunk(path)
    return data


def write_volumes(
    arrays: Mapping[str, zarr.Array],
    layout: Layout,
    read_slab: Callable[[int, int], Mapping[str, np.ndarray]],
    progress: Progress | None = None,
) -> dict[str, float]:
    """Fill `arrays` slab by slab from read_slab(z0, z1) -> {name: slab}; returns the seconds spent
    writing each array. Every array spans the same slices (z) as `layout`; y, x may be coarser.

    While one slab is compressed and written, the next is read (or generated) in a thread: Blosc
    and numpy release the GIL, so the two overlap (10-25% faster). That holds two slabs, so it is
    done only for slabs under READ_AHEAD_BYTES; peak memory stays O(slab) for any volume size.
    """
    slabs = list(layout.slabs())
    spent = dict.fromkeys(arrays, 0.0)
    slab_bytes = sum(nbytes((layout.slab_depth, *a.shape[1:]), a.dtype) for a in arrays.values())
    read_ahead = slab_bytes <= READ_AHEAD_BYTES
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slab-reader") as reader:
        pending = reader.submit(read_slab, *slabs[0]) if read_ahead else None
        for i, (z0, z1) in enumerate(slabs):
            if pending is None:
                slab = read_slab(z0, z1)
            else:
                slab = pending.result()  # re-raises the reader's error here, in our thread
                if i + 1 < len(slabs):
                    pending = reader.submit(read_slab, *slabs[i + 1])
            for name, array in arrays.items():
                started = time.perf_counter()
                array[z0:z1] = slab[name]
                spent[name] += time.perf_counter() - started
            del slab
            if progress is not None:
                progress(z1, layout.shape[0])
    return spent


def stored_bytes(path) -> int:
    """Bytes on disk under `path` (file sizes), i.e. what the array really costs."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


def nbytes(shape, dtype) -> int:
    return math.prod(shape) * np.dtype(dtype).itemsize
