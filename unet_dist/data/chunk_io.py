"""Whole chunks of a Zarr v3 array read and written as files, encoded and decoded here.

zarr-python spends about 1-2 ms of Python per array call beyond the codec (asyncio, selections,
many small objects for the garbage collector): more than decoding a 1 MB chunk or encoding a 512^2
block costs (BENCHMARKS.md, io). The predictor reads and writes whole chunks only, so where this
module can show that its bytes are zarr's bytes it does the work itself: the chunk's file read and
Blosc-decoded by numcodecs, configured from the array's own metadata; a whole chunk encoded the
same way and written as zarr's LocalStore writes it (a temporary sibling, then a rename, so a
reader never sees half a chunk). Where the array's codecs end with zarr's `crc32c` (the project's
arrays since issue 22), each chunk's bytes are followed by the crc32c of the Blosc frame, uint32
little endian, as zarr appends it; it is checked on every read, so a flipped bit is one line naming
the chunk's file instead of wrong voxels. `ChunkFiles.of` says None for anything else (sharded
arrays: shard_io.py, other codecs or stores, another byte order), and the caller goes through zarr.

Writes keep every chunk, an all-fill one too (zarr's `write_empty_chunks=True`): the project's
arrays are created that way and say so (`EVERY_CHUNK_STORED`), so a missing file means damage.
Equal bytes to zarr's own reads and writes, edge chunks included: tests/test_chunk_io.py.
"""

from __future__ import annotations

import contextlib
import os
import sys
import uuid
from pathlib import Path

import google_crc32c
import numcodecs.blosc
import numpy as np
import zarr
from zarr.storage import LocalStore

from unet_dist.compat.zarr_internals import CHECKSUM_CODEC, codec_pairs, files_match_zarr
from unet_dist.errors import UserError
from unet_dist.data.damaged_chunks import EVERY_CHUNK_STORED, damaged_chunk, missing_chunk
SHUFFLES = {"noshuffle": numcodecs.blosc.NOSHUFFLE, "shuffle": numcodecs.blosc.SHUFFLE,
            "bitshuffle": numcodecs.blosc.BITSHUFFLE}
BLOSC_HEADER = 16  # version, versionlz, flags, typesize, then nbytes, blocksize, cbytes (uint32 LE)
CRC32C = 4  # bytes of zarr's crc32c checksum after a chunk's (or a shard index's) bytes


def blosc_of(codecs: list, dtype: np.dtype) -> numcodecs.blosc.Blosc | None | bool:
    """The Blosc codec that `codecs` (metadata JSON) amount to; None for plain bytes; False when we
    cannot tell that our bytes would equal zarr's."""
    if not codecs or codecs[0].get("name") != "bytes" or len(codecs) > 2:
        return False
    endian = (codecs[0].get("configuration") or {}).get("endian")
    if dtype.itemsize > 1 and endian != sys.byteorder:
        return False
    if len(codecs) == 1:
        return None
    name, config = codecs[1].get("name"), codecs[1].get("configuration") or {}
    if name != "blosc" or config.get("shuffle") not in SHUFFLES or "typesize" not in config:
        return False
    return numcodecs.blosc.Blosc(cname=config["cname"], clevel=int(config["clevel"]),
                                 shuffle=SHUFFLES[config["shuffle"]], blocksize=int(config.get("blocksize", 0)),
                                 typesize=int(config["typesize"]))


def chunk_codecs(codecs: list, dtype: np.dtype) -> tuple[numcodecs.blosc.Blosc | None, bool] | None:
    """(`blosc_of` the codecs, whether zarr's crc32c checksum follows the frame) that `codecs`
    (metadata JSON) amount to; None when we cannot tell that our bytes would equal zarr's."""
    checksum = bool(codecs) and codec_pairs(codecs[-1:]) == [CHECKSUM_CODEC]
    blosc = blosc_of(codecs[:-1] if checksum else codecs, dtype)
    return None if blosc is False else (blosc, checksum)


def with_checksum(encoded) -> bytes:
    """`encoded` (a byte-like) followed by its crc32c, as zarr's `crc32c` codec writes it."""
    body = np.frombuffer(encoded, np.uint8)
    return b"".join((body, google_crc32c.value(body).to_bytes(CRC32C, "little")))


def checked(frame: bytes, where):
    """`frame` without its trailing crc32c (a view, not a copy); a UserError naming `where` when the
    checksum does not match: a bit flipped on disk or in transit, or a torn write."""
    body = np.frombuffer(frame, np.uint8)[:-CRC32C]
    if len(frame) < CRC32C or google_crc32c.value(body).to_bytes(CRC32C, "little") != frame[-CRC32C:]:
        raise damaged_chunk(where, ValueError("its bytes do not match their crc32c checksum"))
    return body


def local_array(array, sharded: bool) -> tuple[Path, list[dict], np.dtype] | None:
    """(folder, codecs as the metadata lists them, dtype) of a Zarr v3 array in a local store, sharded or not as asked, of a
    native-order number type and without storage transformers, on a zarr whose bytes we know; None
    for anything else."""
    if not files_match_zarr():
        return None
    if not isinstance(array, zarr.Array) or array.metadata.zarr_format != 3 or (array.shards is not None) != sharded:
        return None
    store = array.store_path.store
    if type(store) is not LocalStore:
        return None
    meta = array.metadata.to_dict()
    dtype = np.dtype(array.dtype)
    if meta.get("storage_transformers") or dtype.kind not in "biuf" or not dtype.isnative:
        return None
    return Path(store.root) / array.store_path.path, list(meta.get("codecs", ())), dtype


class ChunkFiles:
    """The chunks of one zarr array as files; see the module doc."""

    def __init__(self, array: zarr.Array, folder: Path, blosc: numcodecs.blosc.Blosc | None, checksum: bool = False):
        self.array, self.folder, self.blosc, self.checksum = array, folder, blosc, checksum
        self.shape = tuple(int(n) for n in array.shape)
        self.chunks = tuple(int(c) for c in array.chunks)
        self.dtype = np.dtype(array.dtype)
        self.fill = np.asarray(array.metadata.fill_value, self.dtype)
        self.chunk_nbytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        self.every_stored = bool(array.attrs.get(EVERY_CHUNK_STORED))
        self.read_only = bool(array.store_path.store.read_only)
        self._folders: set[Path] = set()  # made already: one mkdir per folder, not per chunk

    @classmethod
    def of(cls, array) -> ChunkFiles | None:
        """Files of `array`'s chunks, or None where only zarr knows how to read and write them."""
        found = local_array(array, sharded=False)
        codecs = found and chunk_codecs(found[1], found[2])
        return cls(array, found[0], *codecs) if codecs else None

    def path(self, coords) -> Path:
        return self.folder / self.array.metadata.encode_chunk_key(tuple(int(c) for c in coords))

    def box(self, coords) -> tuple[slice, ...]:
        """The chunk's voxels inside the array."""
        return tuple(slice(c * u, min((c + 1) * u, n)) for c, u, n in zip(coords, self.chunks, self.shape))

    def chunk_of(self, region) -> tuple[int, ...] | None:
        """The chunk whose in-array part `region` (slices) is exactly; None if it is not one."""
        coords = []
        for sl, u, n in zip(region, self.chunks, self.shape):
            start, stop, step = sl.indices(n)
            if step != 1 or start % u or stop != min(start + u, n):
                return None
            coords.append(start // u)
        return tuple(coords)

    def read(self, coords) -> np.ndarray:
        """The chunk's voxels inside the array, as `array[box]` returns them."""
        path = self.path(coords)
        try:
            with open(path, "rb") as f:
                frame = f.read()
        except FileNotFoundError:
            if self.every_stored:
                raise missing_chunk(path) from None
            return np.full(tuple(s.stop - s.start for s in self.box(coords)), self.fill, self.dtype)
        return self.decode(coords, frame, path)

    def decode(self, coords, frame, where) -> np.ndarray:
        """The voxels inside the array of the chunk at `coords` from its encoded bytes `frame`; a
        UserError naming `where` if they do not decode to a whole chunk."""
        box = self.box(coords)
        chunk = np.empty(self.chunks, self.dtype)
        if self.checksum:
            frame = checked(frame, where)
        try:
            if self.blosc is None:
                if len(frame) != self.chunk_nbytes:
                    raise ValueError(f"{len(frame)} bytes, expected {self.chunk_nbytes}")
                chunk.reshape(-1).view(np.uint8)[:] = np.frombuffer(frame, np.uint8)
            else:
                # The header's sizes first: a valid frame of another size would decode into part of
                # the chunk and leave the rest uninitialised.
                nbytes, cbytes = ((int.from_bytes(frame[i:i + 4], "little") for i in (4, 12))
                                  if len(frame) >= BLOSC_HEADER else (-1, -1))
                if nbytes != self.chunk_nbytes or cbytes != len(frame):
                    raise ValueError(f"Blosc header says {nbytes} bytes from {cbytes}; expected "
                                     f"{self.chunk_nbytes} from the file's {len(frame)}")
                numcodecs.blosc.decompress(frame, chunk)
        except (ValueError, RuntimeError) as exc:
            raise damaged_chunk(where, exc) from None
        if all(s.stop - s.start == u for s, u in zip(box, self.chunks)):
            return chunk
        return chunk[tuple(slice(0, s.stop - s.start) for s in box)]

    def write(self, coords, data: np.ndarray) -> None:
        """Store the chunk at `coords` from its voxels inside the array (`data`, that shape)."""
        self.store(coords, self.encode(coords, data))

    def encode(self, coords, data: np.ndarray):
        """The bytes of the chunk at `coords` holding `data` (its voxels inside the array), as zarr encodes them."""
        if self.read_only:
            raise UserError(f"{self.folder}: opened read-only, cannot write chunk {tuple(coords)}")
        box = self.box(coords)
        inside = tuple(s.stop - s.start for s in box)
        if tuple(data.shape) != inside:
            raise ValueError(f"chunk {tuple(coords)}: data of shape {data.shape}, expected {inside}")
        if inside == self.chunks:
            chunk = np.ascontiguousarray(data, self.dtype)
        else:  # an edge chunk is stored whole, the part beyond the array holding the fill value
            chunk = np.full(self.chunks, self.fill, self.dtype)
            chunk[tuple(slice(0, n) for n in inside)] = data
        encoded = chunk.reshape(-1).view(np.uint8) if self.blosc is None else self.blosc.encode(chunk)
        return with_checksum(encoded) if self.checksum else encoded

    def store(self, coords, encoded) -> None:
        """Write a chunk's encoded bytes to its file, as zarr's LocalStore does."""
        replace_file(self.path(coords), [encoded], self._folders)


def replace_file(path: Path, parts, folders: set[Path]) -> None:
    """Write the file at `path` from the byte-likes `parts`, as zarr's LocalStore writes a key: a
    temporary sibling, then a rename, so a reader never sees half a file. `folders`: the parents
    made already (one mkdir per folder, not per file), `path`'s added."""
    if path.parent not in folders:
        path.parent.mkdir(parents=True, exist_ok=True)
        folders.add(path.parent)
    tmp = f"{path}.{uuid.uuid4().hex}.partial"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for part in parts:
                view = memoryview(part).cast("B")
                while view:  # a regular file takes it in one write; a short one is not an error
                    view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
