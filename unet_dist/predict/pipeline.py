"""Tiled prediction of whole volumes, on one process or N ranks, resumable.

The output (Z, Y, X) is cut into blocks, one Zarr chunk each. A block is predicted from its input
region plus a halo of context, mirrored beyond the volume's borders (the U-Net paper's overlap-tile
strategy). Tiles start on the model's pooling grid and the halo covers its receptive field, so the
tiled result equals a whole-volume pass away from the borders. Each rank takes one contiguous run of
whole shards (`block_plan.assign`), so every rank writes whole chunks that only it owns. The plan
itself is block_plan.py (pure).

Each rank runs its blocks through block_pipeline.py: reader threads, the model on batches of tiles,
writer threads that store finished blocks and then record them in the manifest
(`PRED.zarr/.manifest/`, tagged with the run key: a hash of the weights and the prediction settings;
manifest.py). A re-run with `--resume` predicts only blocks without an entry.

2D models see each z-slice of a block as its own tile; 3D models see a block (plus halo) as one tile.
A model of `target: affinities` writes its channels as one (C, Z, Y, X) image (prediction_store.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import zarr

from unet_dist import runtime
from unet_dist import __version__, checkpoint, dist
from unet_dist.config import Config, PredictConfig, to_dict
from unet_dist.data import backends
from unet_dist.predict.prediction_store import AFFINITIES, build_pyramids, create_prediction
from unet_dist.data import volumes
from unet_dist.data.intensity import check_model_input
from unet_dist.data.atomic_dir import check_out
from unet_dist.data.store import RAW, provenance, slices_within
from unet_dist.errors import UserError, write_fault
from unet_dist.metrics import scores_from_confusion
from unet_dist.predict.block_pipeline import BlockPipeline, block_crop, io_threads
from unet_dist.predict.failures import settle
from unet_dist.predict.block_plan import Plan, assign, block_core, block_order, make_plan, shard_of, whole_shards
from unet_dist.predict.manifest import Manifest, OutputLock
from unet_dist.monitor.progress import Progress
from unet_dist.predict.tilenet import TileNet

# ------------------------------------------------------------------------- settings and run key

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
            "block_size": list(plan.block), "halo": list(plan.context), "tta": p.tta,
            "probability_dtype": p.probability_dtype, "threshold": p.threshold, "precision": precision,
            "pyramid_max_side": p.pyramid_max_side,
            # only when sharded: an unsharded output keeps the key it had before shards existed
            **({"shard_blocks": list(plan.shard_blocks)} if plan.shard else {})}


def run_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------- the command

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
        before = old.get("settings", {})
        differ = [k for k in sorted(set(settings) | set(before)) if before.get(k) != settings.get(k)] or ["settings"]
        hint = (f"pass predict.shard_blocks={json.dumps(before.get('shard_blocks', [1, 1, 1])).replace(' ', '')} "
                "to continue it, or --overwrite to replace it") if differ == ["shard_blocks"] else \
            "pass --overwrite to replace it"
        raise UserError(f"{out}: was predicted with another {', '.join(differ)}; cannot resume it ({hint})")
    return True


def _create_output(out: Path, plan: Plan, attrs: dict, cfg: PredictConfig, fresh: bool, manifest: Manifest, voxel,
                   channels: int | None = None):
    if fresh and out.exists():
        shutil.rmtree(out)
    group = zarr.open_group(str(out), mode="a" if not fresh else "w", zarr_format=3, attributes=attrs)
    # levels missing after a resumed run whose creator died early are created too
    create_prediction(group, plan.shape, plan.block, cfg.probability_dtype, voxel, plan.z0, cfg.pyramid_max_side,
                      shard=plan.shard, channels=channels)
    manifest.create()


def _attrs(plan: Plan, settings: dict, key: str, cfg: Config, input_path, ckpt_path, state: dict, array=RAW) -> dict:
    step = state["step"]
    what = {"probability": "neuron interior; uint8 holds round(255 p)"}
    if _channels(cfg):  # a membrane prediction's attributes stay as they were (no `target`)
        what = {"probability": "affinities: channel c is 1 where a voxel and its neighbour at offsets[c] are one "
                               "neuron; uint8 holds round(255 a)",
                "target": AFFINITIES, "offsets": [list(o) for o in cfg.model.affinity_offsets()]}
        if state.get("segment_threshold", -1.0) >= 0:  # chosen on the validation split: `segment` takes it
            what["segment_threshold"] = float(state["segment_threshold"])
    return provenance(
        {"input": {"path": str(Path(input_path).resolve()), "array": array},
         "checkpoint": {"path": str(Path(ckpt_path).resolve()), "step": int(step),
                        "weights_sha256": settings["weights_sha256"]}},
        predict={"run_key": key, "settings": settings, "config": to_dict(cfg), "checkpoint_step": int(step),
                 "version": __version__, **what, "complete": False})


def _channels(cfg: Config) -> int | None:
    """An affinity model's output channels (one per offset); None for a membrane model."""
    return cfg.model.output_channels() if cfg.model.target == AFFINITIES else None


def _check_target(cfg: Config, labels) -> None:
    """What a membrane prediction offers that affinities do not have, refused before anything is written."""
    if not _channels(cfg):
        return
    if labels is not None:
        raise UserError("--labels scores a membrane prediction; this model predicts affinities: run `unet-dist "
                        "segment --pred OUT`, then `unet-dist evaluate --seg OUT --labels STORE`")
    if cfg.predict.tta:
        # flipping y or x turns an affinity to the previous voxel into one to the next: not a plain mean
        raise UserError("predict.tta: test-time flips do not apply to affinities (a flip changes which "
                        "neighbour a channel looks at); set predict.tta=false")


def predict(ckpt, input, out, labels=None, slices=None, overrides: Sequence[str] = (), resume: bool = False,
            overwrite: bool = False, device: str = "auto", precision: str = "auto", readers: int | None = None,
            writers: int | None = None) -> dict:
    """Predict `input`'s `raw` into `out`; with `labels`, Dice and pixel error over the predicted slices.
    `readers`/`writers` (threads) default to predict.readers/writers."""
    if resume and overwrite:
        raise UserError("--resume and --overwrite exclude each other")
    env = dist.detect_env()
    out = Path(out)
    model, cfg, state = checkpoint.load_model(ckpt, overrides)
    _check_target(cfg, labels)
    # STORE[:ARRAY] and STORE[:LABEL]: a store made by another tool is read as it is (data/volumes.py)
    input, raw_path = volumes.split_store_spec(input, RAW)
    raw, raw_path = volumes.open_array(input, raw_path)
    volumes.check_volume(raw, f"{input}:{raw_path}")
    check_model_input(raw, f"{input}:{raw_path}", state.get("normalisation"))
    z_range = slices_within(slices, raw.shape[0], str(input))
    label_arr = ignore_arr = None
    if labels is not None:
        labels, label_arr, _, ignore_arr = volumes.open_labels(labels, raw.shape)
    # No files-per-patch check here: the chunk cache reads each input chunk once, so small chunks
    # cost file opens, not the repeated reads that random training patches make.
    plan = make_plan(cfg.model, cfg.predict, raw.shape, z_range)
    torch_device = dist.choose_device(device, env.local_rank, env.local_world_size)
    precision = runtime.resolve_precision(precision, torch_device)
    runtime.tune_for_fixed_shapes(torch_device)
    runtime.keep_freed_memory()
    settings = run_settings(plan, cfg, weights_digest(state["model"]), precision, input)
    if raw_path != RAW:  # another array of the same store is another input
        settings["input_array"] = raw_path
    key = run_key(settings)
    _check_ranks(env.world_size, plan)
    lock = OutputLock(out)
    if held_by := lock.holder():  # every rank sees this before any collective
        raise UserError(f"{out}: another prediction ({held_by}) is writing it; wait for it, "
                        f"or delete {lock.path} if it is gone")
    created = not (out.exists() or out.is_symlink())  # only an output this run made is removed on failure
    continuing = _check_output(out, key, settings, resume, overwrite)
    if cfg.model.norm in ("group", "instance"):
        print(f"warning: model.norm {cfg.model.norm}: tiles normalise by their own statistics, so blocks "
              "differ slightly from a whole-volume pass", file=sys.stderr)
    with dist.process_group(env, torch_device, cfg.train.dist_timeout_s):
        try:
            _acquire_on_main(lock)
            manifest = Manifest(out, key, dist.rank())
            error = None
            if dist.is_main():
                try:
                    _create_output(out, plan, _attrs(plan, settings, key, cfg, input, ckpt, state, raw_path),
                                   cfg.predict, not continuing, manifest, volumes.voxel_size_of(input, raw_path),
                                   _channels(cfg))
                except Exception as exc:  # a full or read-only disk: every rank says so, and stops
                    error = exc
            settle(error, out, plan.n_blocks, len(manifest.done()) if error and continuing else 0, created)
            done = dist.broadcast_object(manifest.done() if dist.is_main() else None)
            return _predict(plan, cfg, model, torch_device, precision, raw, label_arr, out, manifest, done,
                            readers, writers, ignore_arr, created)
        finally:
            lock.release()


def _check_ranks(world_size: int, plan: Plan) -> None:
    if world_size > plan.n_shards:  # a rank writes whole shards (a shard: one block when unsharded)
        unit = "shard(s)" if plan.shard else "block(s)"
        raise UserError(f"{world_size} ranks but only {plan.n_shards} {unit} to predict: use fewer ranks, "
                        f"a smaller predict.block_size{' or predict.shard_blocks' if plan.shard else ''}")


def _acquire_on_main(lock: OutputLock) -> None:
    """Two predictions started at once: the lock file decides, and rank 0 tells its ranks."""
    refused = None
    if dist.is_main():
        try:
            lock.acquire()
        except UserError as exc:
            refused = str(exc)
    if refused := dist.broadcast_object(refused):
        raise UserError(refused)


def _predict(plan, cfg, model, device, precision, raw, labels, out, manifest, done, readers, writers,
             ignore=None, created=False) -> dict:
    rank, world = dist.rank(), dist.world_size()
    auto_readers, auto_writers = io_threads(cfg.predict)
    readers, writers = readers or auto_readers, writers or auto_writers
    raw = backends.reopen(raw, cfg.predict.codec_pipeline)
    labels = labels if labels is None else backends.reopen(labels, cfg.predict.codec_pipeline)
    ignore = ignore if ignore is None else backends.reopen(ignore, cfg.predict.codec_pipeline)
    done = whole_shards(plan, done)  # a shard some of whose blocks a stopped run had not recorded is redone
    todo = assign(block_order(plan, [i for i in range(plan.n_blocks) if i not in done], raw.chunks), rank, world,
                  unit=lambda index: shard_of(plan, index))
    finished = assign(sorted(done), rank, world)
    if dist.is_main():
        print(f"predict: {plan.n_blocks} blocks of {list(plan.block)} (tiles {list(plan.model_tile)}, "
              f"context {list(plan.context)}), {len(done)} already done, on {world} rank(s), device {device.type}, "
              f"precision {precision}, tta {'on' if cfg.predict.tta else 'off'}, {readers} readers, "
              f"{writers} writers", file=sys.stderr, flush=True)
    with backends.codec_pipeline(cfg.predict.codec_pipeline):
        group = zarr.open_group(str(out), mode="r+")
    p = cfg.predict
    net = TileNet(model, device, precision, p.batch_size, p.tta, plan.dims, crop=block_crop(plan),
                  threshold=p.threshold, probability_dtype=p.probability_dtype, channels=_channels(cfg))
    pipeline = BlockPipeline(plan, net, raw, labels, group, manifest, p, ignore)
    pipeline.plan_reads(todo)
    started = time.perf_counter()
    error, counts = None, np.zeros(4, np.int64)
    try:
        counts = pipeline.run(todo, readers, writers, _block_progress(len(todo), world, cfg.logging.progress))
    except Exception as exc:  # a damaged input, a full disk: every rank stops, then says what is left
        error = exc
    # blocks finished for good: those of earlier runs (counted once, on rank 0) and this run's recorded ones
    settle(error, out, plan.n_blocks, (len(done) if rank == 0 else 0) + manifest.recorded, created, patient=True)
    times = np.zeros(world)
    times[rank] = time.perf_counter() - started
    if labels is not None:
        for index in finished:
            counts += pipeline.recount(index)
    result = _gather_result(plan, out, todo, done, counts, times, scored=labels is not None)
    try:
        _finish_output(group, result, rank, world)
    except OSError as exc:
        if (fault := write_fault(exc, exc.filename or out)) is None:
            raise
        raise UserError(f"{fault}; all {plan.n_blocks} blocks are done: run again with --resume to write "
                        "the coarser levels") from None
    return result


def _block_progress(n_blocks: int, world: int, mode) -> Callable[[], None]:
    """Called once per finished block; rank 0 draws the progress of its own share."""
    count = 0
    # rank 0's share stands for all: shares differ by less than one shard, so every rank has about as many
    progress = Progress("predict" if world == 1 else f"predict (rank 0 of {world})", n_blocks, "blocks", mode=mode)
    main = dist.is_main()

    def on_block():
        nonlocal count
        count += 1
        if main:
            progress.update(count)

    return on_block


def _gather_result(plan: Plan, out: Path, todo, done, counts: np.ndarray, times: np.ndarray, scored: bool) -> dict:
    """Every rank's counts and voxels summed, the slowest rank's time: the run's result (`scored`: with
    the scores of the summed confusion counts)."""
    predicted = np.array([sum(math.prod(hi - lo for lo, hi in block_core(plan, i)) for i in todo)], np.int64)
    # Ranks arrive here as far apart as their shares of the volume take (hours on a big one): this
    # meeting has no job timeout, or the fastest rank's would expire before the output is complete.
    counts, predicted = dist.all_reduce_sum(counts, patient=True), int(dist.all_reduce_sum(predicted, patient=True)[0])
    seconds = float(dist.all_reduce_sum(times, patient=True).max())  # wall time: the slowest rank
    result = {"out": str(out), "blocks": plan.n_blocks, "blocks_predicted": plan.n_blocks - len(done),
              "blocks_skipped": len(done), "voxels_predicted": predicted, "seconds": round(seconds, 3),
              "voxels_per_s": round(predicted / seconds) if seconds > 0 else None}
    return result | scores_from_confusion(counts) if scored else result


def _finish_output(group, result: dict, rank: int, world: int) -> None:
    """The coarser levels, then (rank 0) the output marked complete with its metrics."""
    # every block of level 0 is written before a coarser level reads it; ranks may arrive hours apart
    dist.barrier(patient=True)
    started = time.perf_counter()
    build_pyramids(group, rank, world, barrier=lambda: dist.barrier(patient=True))
    result["pyramid_seconds"] = round(time.perf_counter() - started, 3)
    if dist.is_main():
        print(f"predict: coarser levels written in {result['pyramid_seconds']:.1f} s", file=sys.stderr, flush=True)
        attrs = dict(group.attrs["unet_dist"])
        attrs["predict"] = {**attrs["predict"], "complete": True,
                            "metrics": {k: result[k] for k in ("dice_neuron", "dice_membrane", "pixel_error")
                                        if k in result}}
        group.attrs["unet_dist"] = attrs
