"""Read the records of an offline W&B run file (`run-<id>.wandb`) back, for tests.

The file is a leveldb-style log: a 7-byte header (':W&B', magic 0xBEE1, version), then 32 KiB blocks
of records, each with a 7-byte header (crc32, length, type: full/first/middle/last) and a piece of
a serialized `wandb.proto.wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path}: not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # a block's tail too short for a header is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left_in_block
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        else:
            pending += chunk
        record = pb.Record()
        record.ParseFromString(pending)
        yield record


def history(path: Path) -> list[dict]:
    """The logged history rows: one dict of key -> value (a dict for images) per `wandb.log` call."""
    rows = []
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(_nested(record.history.item))
    return rows


def run_ids(path: Path) -> list[str]:
    return [r.run.run_id for r in iter_records(path) if r.WhichOneof("record_type") == "run"]


def of_type(path: Path, kind: str) -> list:
    """The records of one type ('run', 'metric', 'artifact', 'output_raw', ...), in order."""
    return [getattr(r, kind) for r in iter_records(path) if r.WhichOneof("record_type") == kind]


def summary(path: Path) -> dict:
    """The run summary as the file leaves it: summary updates applied in order, nested keys joined by '/'
    only below the metric name (e.g. {'val/dice_membrane': {'max': 0.8}})."""
    out: dict = {}
    for record in of_type(path, "summary"):
        _nested(record.update, out)
    return out


def _nested(items, out: dict | None = None) -> dict:
    """Items with a key, or a nested key path (a logged image: ['val/masks', 'masks', ...]), as dicts."""
    out = {} if out is None else out
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
    return out
