"""Tiled prediction of whole volumes, on one process or N ranks, resumable.

The output (Z, Y, X) is cut into blocks, one Zarr chunk each. A block is predicted from its input
region plus a halo of context, mirrored beyond the volume's borders (the U-Net paper's overlap-tile
strategy). Tiles start on the model's pooling grid and the halo covers its receptive field, so the
tiled result equals a whole-volume pass away from the borders. Blocks are spread round-robin over
ranks; every rank writes whole chunks that only it owns.

Pipeline per rank: reader threads load the next blocks (zarr, Blosc releases the GIL) while the
model runs batches of tiles (always `batch_size` tiles, so results do not depend on which blocks
share a batch), writer threads store finished blocks and then record them in the manifest
(`PRED.zarr/.manifest/block-<i>.json`, each tagged with the run key: a hash of the weights and the
prediction settings). A re-run with `--resume` predicts only blocks without an entry.

2D models see each z-slice of a block as its own tile; 3D models see a block (plus halo) as one tile.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zarr

from . import __version__, checkpoint, dist
from .config import Config, PredictConfig, from_dict, parse_override, to_dict, validate
from .data.patches import to_unit_float
from .data.store import (Layout, check_out, create_volume_array, ome_multiscales_attrs, open_store,
                         provenance, read_region, voxel_size)
from .errors import UserError
from .infer import padded_input_shape
from .metrics import confusion_counts, scores_from_confusion
from .model import build_model, halo, pooling_factor

ARRAYS = ("probability", "mask")
MANIFEST = ".manifest"


# ------------------------------------------------------------------------------ the plan (pure)

@dataclass(frozen=True)
class Plan:
    """Where every block reads, what the model sees, and where its output lands. Axes (Z, Y, X)."""

    in_shape: tuple[int, int, int]  # the input volume
    z0: int  # first predicted input slice: output slice z is input slice z0 + z
    shape: tuple[int, int, int]  # the output
    block: tuple[int, int, int]  # output block = output chunk
    dims: int  # 2: each slice of a block is one tile; 3: a block is one tile
    before: tuple[int, int, int]  # context read before a block's first voxel
    tile: tuple[int, int, int]  # model input extent (2D: tile[0] == 1)
    offset: tuple[int, int, int]  # where a block starts inside the model's output tile

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(-(-n // b) for n, b in zip(self.shape, self.block))

    @property
    def n_blocks(self) -> int:
        return math.prod(self.grid)

    @property
    def model_tile(self) -> tuple[int, ...]:
        return self.tile[1:] if self.dims == 2 else self.tile


def make_plan(model_cfg, pcfg: PredictConfig, in_shape, z_range: tuple[int, int]) -> Plan:
    """Blocks clamped to the volume and on the pooling grid; halo >= what the network reaches."""
    dims = model_cfg.dims
    pool = (1, *pooling_factor(model_cfg)) if dims == 2 else tuple(pooling_factor(model_cfg))
    shape = (z_range[1] - z_range[0], int(in_shape[1]), int(in_shape[2]))
    axes = (1, 2) if dims == 2 else (0, 1, 2)
    block = [min(pcfg.block_size[0], shape[0]), *pcfg.block_size[1:]]
    for a in axes:
        block[a] = min(pcfg.block_size[a], -(-shape[a] // pool[a]) * pool[a])
        if block[a] % pool[a]:
            raise UserError(f"predict.block_size: {list(pcfg.block_size)} must be a multiple of the model's "
                            f"pooling factor {list(pool)} on every axis (tiles must start on its grid)")
    if model_cfg.padding == "same":
        need = (0, *halo(model_cfg)) if dims == 2 else tuple(halo(model_cfg))
        ctx = [(-(-max(pcfg.halo[a], need[a]) // pool[a]) * pool[a]) if a in axes else 0 for a in range(3)]
        tile = [block[a] + 2 * ctx[a] if a in axes else 1 for a in range(3)]
        offset = ctx
    else:  # valid: the network itself consumes the context
        in_tile, context = padded_input_shape(model_cfg, tuple(block[a] for a in axes))
        tile, ctx, offset = [1, *in_tile], [0, *context], [0, 0, 0]
        if dims == 3:
            tile, ctx = list(in_tile), list(context)
    return Plan(tuple(int(n) for n in in_shape), int(z_range[0]), shape, tuple(block), dims, tuple(ctx),
                tuple(tile), tuple(offset))


def block_core(plan: Plan, index: int) -> tuple[tuple[int, int], ...]:
    """The output voxels of block `index` (C order over the grid), [lo, hi) per axis."""
    coords = np.unravel_index(index, plan.grid)
    return tuple((int(c) * b, min(int(c) * b + b, n)) for c, b, n in zip(coords, plan.block, plan.shape))


def input_region(plan: Plan, core) -> tuple[tuple[int, int], ...]:
    """Input voxels a block reads, [lo, hi) per axis; may reach beyond the volume (mirrored)."""
    region = []
    for a, (lo, hi) in enumerate(core):
        start = lo + (plan.z0 if a == 0 else 0) - plan.before[a]
        span = hi - lo if (plan.dims == 2 and a == 0) else plan.tile[a]
        region.append((start, start + span))
    return tuple(region)


def assign(blocks: Sequence[int], rank: int, world: int) -> list[int]:
    """Round-robin: rank r takes the r-th, (r+W)-th, ... entry. Each block has exactly one owner."""
    return list(blocks[rank::world])


def mirror_indices(lo: int, hi: int, n: int) -> np.ndarray:
    """Indices lo..hi-1 reflected into [0, n) as np.pad(mode="symmetric") would, for any reach."""
    idx = np.arange(lo, hi) % (2 * n)
    return np.where(idx < n, idx, 2 * n - 1 - idx)


def read_mirrored(array, region) -> np.ndarray:
    """The region of a (Z, Y, X) array, mirrored where it leaves the array."""
    idx = [mirror_indices(lo, hi, n) for (lo, hi), n in zip(region, array.shape)]
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in idx)
    data = read_region(array, box)
    if all(lo >= 0 and hi <= n for (lo, hi), n in zip(region, array.shape)):
        return data
    return data[np.ix_(*(i - s.start for i, s in zip(idx, box)))]


def as_slices(core) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in core)


# ----------------------------------------------------------------- settings, key and manifest

def load_model(ckpt_path, overrides: Sequence[str] = ()) -> tuple[torch.nn.Module, Config, dict]:
    """The checkpoint's model and config, `predict.*` overrides applied; mistakes are UserErrors."""
    state = checkpoint.load(ckpt_path)
    model_cfg = from_dict({"model": state["model_config"]}, f"{ckpt_path}: model_config").model
    stored = state.get("config") or {}
    if stored.get("model", state["model_config"]) != state["model_config"]:
        raise UserError(f"{ckpt_path}: its model_config and config.model disagree; not a checkpoint of one model")
    data = to_dict(from_dict(stored, str(ckpt_path)))
    for text in overrides:
        key, value = parse_override(text)
        section, _, name = key.partition(".")
        if section != "predict" or not name:
            raise UserError(f"command line: '{key}': only predict.* settings can be overridden here")
        data["predict"][name] = value
    cfg = from_dict(data, "command line")
    cfg.model = model_cfg
    validate(Config(predict=cfg.predict), "command line")
    model = build_model(model_cfg)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"{ckpt_path}: weights do not fit its model_config ({reason[:160]})") from None
    return model.eval(), cfg, state


def weights_digest(state_dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(state_dict[name].shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def run_settings(plan: Plan, cfg: Config, weights: str, precision: str, input_path) -> dict:
    """Everything that changes the output; its hash is the run key a resume must match."""
    p = cfg.predict
    return {"weights_sha256": weights, "model": to_dict(cfg.model), "input": str(Path(input_path).resolve()),
            "input_shape": list(plan.in_shape), "slices": [plan.z0, plan.z0 + plan.shape[0]],
            "block_size": list(plan.block), "halo": list(plan.before), "tta": p.tta,
            "probability_dtype": p.probability_dtype, "threshold": p.threshold, "precision": precision}


def run_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


def write_json(path, obj) -> None:
    """Atomic: a temporary sibling renamed into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class Manifest:
    """One small JSON per finished block; an entry counts only with the current run key."""

    def __init__(self, out: Path, key: str):
        self.dir, self.key = Path(out) / MANIFEST, key

    def create(self) -> None:
        self.dir.mkdir(exist_ok=True)
        # A group marker, so zarr sees a node here rather than warning about a stray folder.
        (self.dir / "zarr.json").write_text(json.dumps(
            {"zarr_format": 3, "node_type": "group", "attributes": {"unet_dist": "finished prediction blocks"}}))

    def done(self) -> set[int]:
        found = set()
        for path in self.dir.glob("block-*.json"):
            try:
                entry = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if entry.get("key") == self.key:
                found.add(int(entry["block"]))
        return found

    def mark(self, index: int, core) -> None:
        write_json(self.dir / f"block-{index}.json",
                   {"block": index, "key": self.key, "core": list(core), "rank": dist.rank()})


# ------------------------------------------------------------------------------ the model side

def _dihedral(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def _undo(y: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    y = torch.flip(y, dims=(-1,)) if flip else y
    return torch.rot90(y, -k, dims=(-2, -1))


def tta_average(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The mean of fn over the 8 flips/rotations of the (y, x) plane, each mapped back."""
    total = None
    for k in range(4):
        for flip in (False, True):
            y = _undo(fn(_dihedral(x, k, flip)), k, flip)
            total = y if total is None else total + y
    return total / 8


class TileNet:
    """Batches of tiles (n, *tile) in [0, 1] -> interior probabilities (n, *out), float32.

    Every forward pass has exactly `batch_size` tiles (short batches repeat their last tile): the
    kernels, and so the numbers, are then the same whichever blocks share a batch."""

    def __init__(self, model, device: torch.device, precision: str, batch_size: int, tta: bool, dims: int = 2):
        # channels_last: 1.5x fewer CPU seconds per tile in the predict benchmark, and the layout
        # tensor cores want; it changes no number beyond float rounding.
        self.memory_format = torch.channels_last if dims == 2 else torch.channels_last_3d
        self.model = model.to(device).to(memory_format=self.memory_format)
        self.device, self.batch_size, self.tta = device, batch_size, tta
        self.autocast = dist.autocast(device, precision)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast:
            return torch.sigmoid(self.model(x).float())[:, :1]

    @torch.inference_mode()
    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        n = len(tiles)
        if n < self.batch_size:
            tiles = np.concatenate([tiles, np.repeat(tiles[-1:], self.batch_size - n, axis=0)])
        x = torch.from_numpy(np.ascontiguousarray(tiles[:, None]))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = x.contiguous(memory_format=self.memory_format)
        prob = tta_average(self._forward, x) if self.tta else self._forward(x)
        return prob[:n, 0].cpu().numpy()


# ---------------------------------------------------------------------- read -> compute -> write

def prefetch(fn: Callable, items: Iterable, pool: ThreadPoolExecutor, depth: int) -> Iterator:
    """fn(item) for each item, in order, computed up to `depth` items ahead in `pool`."""
    items, pending = iter(items), deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            break
    while pending:
        result = pending.popleft().result()
        nxt = next(items, None)
        if nxt is not None:
            pending.append(pool.submit(fn, nxt))
        yield result


@dataclass
class _Block:
    index: int
    core: tuple
    tiles: np.ndarray | None  # (n, *model tile): 2D, one per slice; 3D, one
    label: np.ndarray | None
    out: np.ndarray | None = None  # (n, *core of one tile)
    remaining: int = 0


def quantize(prob: np.ndarray, dtype: str) -> np.ndarray:
    return np.rint(prob * 255).astype(np.uint8) if dtype == "uint8" else prob.astype(np.float16)


def probability_float(values: np.ndarray) -> np.ndarray:
    """Stored probabilities as float32 in [0, 1] (uint8 holds round(255 p))."""
    values = np.asarray(values)
    if values.dtype == np.uint8:
        return values.astype(np.float32) / np.float32(255)
    return values.astype(np.float32)


class _Runner:
    def __init__(self, plan: Plan, net: TileNet, raw, labels, out_group, manifest: Manifest, cfg: PredictConfig):
        self.plan, self.net, self.raw, self.labels, self.cfg = plan, net, raw, labels, cfg
        self.prob, self.mask, self.manifest = out_group["probability"], out_group["mask"], manifest

    def read(self, index: int) -> _Block:
        core = block_core(self.plan, index)
        tiles = to_unit_float(read_mirrored(self.raw, input_region(self.plan, core)))
        tiles = tiles if self.plan.dims == 2 else tiles[None]
        label = None
        if self.labels is not None:
            label = read_region(self.labels, as_slices(self._input_core(core)))
        return _Block(index, core, tiles, label)

    def _input_core(self, core):
        return ((core[0][0] + self.plan.z0, core[0][1] + self.plan.z0), *core[1:])

    def write(self, block: _Block) -> np.ndarray:
        """Store a finished block, then record it; returns its confusion counts (zeros without labels)."""
        region = as_slices(block.core)
        prob = block.out.reshape(tuple(hi - lo for lo, hi in block.core))
        mask = (prob > self.cfg.threshold).astype(np.uint8)
        self.prob[region] = quantize(prob, self.cfg.probability_dtype)
        self.mask[region] = mask
        self.manifest.mark(block.index, block.core)
        return np.zeros(4, np.int64) if block.label is None else confusion_counts(mask, block.label)

    def recount(self, index: int) -> np.ndarray:
        """Counts of a block finished earlier, from its stored mask."""
        core = block_core(self.plan, index)
        mask = np.asarray(self.mask[as_slices(core)])
        return confusion_counts(mask, read_region(self.labels, as_slices(self._input_core(core))))

    def run(self, todo: list[int], readers: int, writers: int, on_block: Callable[[], None]) -> np.ndarray:
        """Predict and store the blocks `todo`; returns the summed confusion counts of their cores."""
        counts = np.zeros(4, np.int64)
        batch, refs, inflight = [], [], deque()
        offset = self.plan.offset[1:] if self.plan.dims == 2 else self.plan.offset

        def drain(keep: int) -> None:
            nonlocal counts
            while len(inflight) > keep:
                counts += inflight.popleft().result()
                on_block()

        def flush() -> None:
            for (block, t), p in zip(refs, self.net(np.stack(batch))):
                block.out[t] = p[tuple(slice(o, o + m) for o, m in zip(offset, block.out.shape[1:]))]
                block.remaining -= 1
                if block.remaining == 0:
                    block.tiles = None
                    inflight.append(write_pool.submit(self.write, block))
            batch.clear()
            refs.clear()
            drain(keep=2 * writers)  # bounded: at most this many finished blocks wait in memory

        with ThreadPoolExecutor(readers, "predict-read") as read_pool, \
                ThreadPoolExecutor(writers, "predict-write") as write_pool:
            for block in prefetch(self.read, todo, read_pool, depth=2 * readers + self.cfg.batch_size):
                shape = tuple(hi - lo for lo, hi in block.core)
                block.out = np.empty((len(block.tiles), *shape[3 - len(offset):]), np.float32)
                block.remaining = len(block.tiles)
                for t in range(len(block.tiles)):
                    batch.append(block.tiles[t])
                    refs.append((block, t))
                    if len(batch) == self.cfg.batch_size:
                        flush()
            if batch:
                flush()
            drain(keep=0)
        return counts


# ---------------------------------------------------------------------------------- the command

def parse_slices(slices, depth: int, source: str, first: int = 0) -> tuple[int, int]:
    """(start, stop) within slices first .. first + depth (all of them for None)."""
    if slices is None:
        return first, first + depth
    lo, hi = (int(s) for s in slices)
    if not first <= lo < hi <= first + depth:
        raise UserError(f"{source}: slices {lo}:{hi} are not within its slices {first}:{first + depth}")
    return lo, hi


def _check_output(out: Path, key: str, settings: dict, resume: bool, overwrite: bool) -> bool:
    """Whether an existing output is continued; refuses anything else before a byte is written."""
    if not (out.exists() or out.is_symlink()):
        return False
    if overwrite:
        check_out(out, overwrite=True)  # refuses to delete something that is not a Zarr store
        return False
    if not resume:
        raise UserError(f"{out}: already exists (pass --resume to continue it or --overwrite to replace it)")
    try:
        old = zarr.open_group(str(out), mode="r").attrs.get("unet_dist", {}).get("predict", {})
    except Exception:
        old = {}
    if not old.get("run_key"):
        raise UserError(f"{out}: exists but is not a unet_dist prediction; pass --overwrite to replace it")
    if old["run_key"] != key:
        differ = [k for k in settings if old.get("settings", {}).get(k) != settings[k]] or ["settings"]
        raise UserError(f"{out}: was predicted with another {', '.join(differ)}; cannot resume it "
                        "(pass --overwrite to replace it)")
    return True


class OutputLock:
    """`.PRED.zarr.lock` beside the output: one prediction writes an output at a time.

    A lock left by a process that died on this host is stale and taken over (kill -9 then resume);
    one held by a live process, or by another host, is respected.
    """

    def __init__(self, out: Path):
        self.path = out.parent / f".{out.name}.lock"
        self.mine = False

    def holder(self) -> str | None:
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if info.get("host") == socket.gethostname():
            try:
                os.kill(int(info["pid"]), 0)
            except ProcessLookupError:
                return None  # its owner is gone
            except (PermissionError, KeyError, ValueError):
                pass
        return f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')}"

    def acquire(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held_by = self.holder()
                if held_by:
                    raise UserError(f"{self.path.parent / self.path.name[1:-5]}: another prediction ({held_by}) "
                                    f"is writing it; wait for it, or delete {self.path} if it is gone") from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": socket.gethostname(), "pid": os.getpid(),
                           "since": time.strftime("%Y-%m-%dT%H:%M:%S")}, f)
            self.mine = True
            return

    def release(self) -> None:
        if self.mine:
            self.path.unlink(missing_ok=True)
            self.mine = False


def _create_output(out: Path, plan: Plan, attrs: dict, dtype: str, fresh: bool, manifest: Manifest):
    if fresh and out.exists():
        shutil.rmtree(out)
    group = zarr.open_group(str(out), mode="a" if not fresh else "w", zarr_format=3, attributes=attrs)
    layout = Layout(plan.shape, plan.block, None)
    present = {name for name, _ in group.arrays()}
    for name, dt, kind in (("probability", dtype, "raw"), ("mask", np.uint8, "labels")):
        if name not in present:  # a resumed run whose creator died early gets the rest
            create_volume_array(group, name, layout, dt, kind)
    manifest.create()


def _attrs(plan: Plan, settings: dict, key: str, cfg: Config, in_group, input_path, ckpt_path, step) -> dict:
    attrs = ome_multiscales_attrs({name: name for name in ARRAYS}, voxel_size(in_group))
    if plan.z0:
        for ms in attrs["ome"]["multiscales"]:
            scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
            ms["datasets"][0]["coordinateTransformations"].append(
                {"type": "translation", "translation": [plan.z0 * scale[0], 0.0, 0.0]})
    return attrs | provenance(
        {"input": {"path": str(Path(input_path).resolve()), "array": "raw"},
         "checkpoint": {"path": str(Path(ckpt_path).resolve()), "step": int(step),
                        "weights_sha256": settings["weights_sha256"]}},
        predict={"run_key": key, "settings": settings, "config": to_dict(cfg), "checkpoint_step": int(step),
                 "version": __version__, "probability": "neuron interior; uint8 holds round(255 p)",
                 "complete": False})


def predict(ckpt, input, out, labels=None, slices=None, overrides: Sequence[str] = (), resume: bool = False,
            overwrite: bool = False, device: str = "auto", precision: str = "auto", readers: int = 2,
            writers: int = 2) -> dict:
    """Predict `input`'s `raw` into `out`; with `labels`, Dice and pixel error over the predicted slices."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    env = dist.detect_env()
    out = Path(out)
    model, cfg, state = load_model(ckpt, overrides)
    in_group = open_store(input, arrays=("raw",))
    raw = in_group["raw"]
    if raw.ndim != 3:
        raise UserError(f"{input}: 'raw' has {raw.ndim} axes; expected (Z, Y, X)")
    z_range = parse_slices(slices, raw.shape[0], str(input))
    label_arr = None
    if labels is not None:
        label_arr = open_store(labels, arrays=("labels",))["labels"]
        if tuple(label_arr.shape) != tuple(raw.shape):
            raise UserError(f"{labels}: labels {tuple(label_arr.shape)} differ in shape from raw {tuple(raw.shape)}")
    plan = make_plan(cfg.model, cfg.predict, raw.shape, z_range)
    torch_device = dist.choose_device(device, env.local_rank, env.local_world_size)
    precision = dist.resolve_precision(precision, torch_device)
    dist.tune_for_fixed_shapes(torch_device)
    if torch_device.type == "cpu":
        dist.keep_freed_memory()
    settings = run_settings(plan, cfg, weights_digest(state["model"]), precision, input)
    key = run_key(settings)
    if env.world_size > plan.n_blocks:
        raise UserError(f"{env.world_size} ranks but only {plan.n_blocks} block(s) to predict: use fewer ranks "
                        "or a smaller predict.block_size")
    lock = OutputLock(out)
    if held_by := lock.holder():  # every rank sees this before any collective
        raise UserError(f"{out}: another prediction ({held_by}) is writing it; wait for it, "
                        f"or delete {lock.path} if it is gone")
    continuing = _check_output(out, key, settings, resume, overwrite)
    if cfg.model.norm in ("group", "instance"):
        print(f"warning: model.norm {cfg.model.norm}: tiles normalise by their own statistics, so blocks "
              "differ slightly from a whole-volume pass", file=sys.stderr)
    with dist.process_group(env, torch_device, cfg.train.dist_timeout_s):
        try:
            # Two predictions started at once: the lock file decides, and rank 0 tells its ranks.
            refused = None
            if dist.is_main():
                try:
                    lock.acquire()
                except UserError as exc:
                    refused = str(exc)
            if refused := dist.broadcast_object(refused):
                raise UserError(refused)
            manifest = Manifest(out, key)
            if dist.is_main():
                _create_output(out, plan, _attrs(plan, settings, key, cfg, in_group, input, ckpt, state["step"]),
                               cfg.predict.probability_dtype, not continuing, manifest)
            dist.barrier()
            done = dist.broadcast_object(manifest.done() if dist.is_main() else None)
            return _predict(plan, cfg, model, torch_device, precision, raw, label_arr, out, manifest, done,
                            readers, writers)
        finally:
            lock.release()


def _predict(plan, cfg, model, device, precision, raw, labels, out, manifest, done, readers, writers) -> dict:
    rank, world = dist.rank(), dist.world_size()
    todo = assign([i for i in range(plan.n_blocks) if i not in done], rank, world)
    finished = assign(sorted(done), rank, world)
    main = dist.is_main()
    if main:
        print(f"predict: {plan.n_blocks} blocks of {list(plan.block)} (tiles {list(plan.model_tile)}, "
              f"context {list(plan.before)}), {len(done)} already done, on {world} rank(s), device {device.type}, "
              f"precision {precision}, tta {'on' if cfg.predict.tta else 'off'}", file=sys.stderr, flush=True)
    group = zarr.open_group(str(out), mode="r+")
    runner = _Runner(plan, TileNet(model, device, precision, cfg.predict.batch_size, cfg.predict.tta, plan.dims),
                     raw, labels, group, manifest, cfg.predict)
    started, count = time.perf_counter(), 0

    def on_block():
        nonlocal count
        count += 1
        if main and (count == len(todo) or count % max(1, len(todo) // 10) == 0):
            print(f"predict: rank 0 {count}/{len(todo)} blocks, {time.perf_counter() - started:.1f} s",
                  file=sys.stderr, flush=True)

    counts = runner.run(todo, readers, writers, on_block)
    times = np.zeros(world)
    times[rank] = time.perf_counter() - started
    if labels is not None:
        for index in finished:
            counts += runner.recount(index)
    predicted = np.array([sum(math.prod(hi - lo for lo, hi in block_core(plan, i)) for i in todo)], np.int64)
    # Ranks arrive here as far apart as their shares of the volume take (hours on a big one): this
    # meeting has no job timeout, or the fastest rank's would expire before the output is complete.
    counts, predicted = dist.all_reduce_sum(counts, patient=True), int(dist.all_reduce_sum(predicted, patient=True)[0])
    seconds = float(dist.all_reduce_sum(times, patient=True).max())  # wall time: the slowest rank
    result = {"out": str(out), "blocks": plan.n_blocks, "blocks_predicted": plan.n_blocks - len(done),
              "blocks_skipped": len(done), "voxels_predicted": predicted, "seconds": round(seconds, 3),
              "voxels_per_s": round(predicted / seconds) if seconds > 0 else None}
    if labels is not None:
        result |= scores_from_confusion(counts)
    dist.barrier(patient=True)
    if main:
        attrs = dict(group.attrs["unet_dist"])
        attrs["predict"] = {**attrs["predict"], "complete": True,
                            "metrics": {k: result[k] for k in ("dice_neuron", "dice_membrane", "pixel_error")
                                        if k in result}}
        group.attrs["unet_dist"] = attrs
    return result


# ------------------------------------------------------------------------- reading predictions

def open_prediction(path, arrays: Sequence[str] = ARRAYS):
    """A prediction store and the first input slice it covers."""
    group = open_store(path, arrays=arrays)
    settings = group.attrs.get("unet_dist", {}).get("predict", {}).get("settings", {})
    return group, int(settings.get("slices", [0])[0])
