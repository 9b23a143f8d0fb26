"""Training: `train(cfg)` checks every input, joins the process group and runs the loop. The loop
reads like single-process code (as torchtitan's and nanoGPT's do): each component decides for
itself when it acts: the step (`train_step`), the throughput and loss log (`throughput`),
validation (`validation`), checkpoints (`checkpointing`), the non-finite guard (`train_step.Health`)
and the stop flag (`signals`); `dist` hides the ranks.

Order matters for a distributed job: everything a user can get wrong (config, store, slice ranges,
patch size) is checked on every rank BEFORE the process group exists, so a mistake ends every
rank with the same one-line error instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from unet_dist import runtime
from unet_dist import checkpoint, dist, rundir
from unet_dist.train.batch_wait import BatchWaiter, LoaderStalled, StopWhileWaiting
from unet_dist.train.checkpointing import Checkpointer
from unet_dist.train.global_batch import fit_accumulate, world_change
from unet_dist.config import Config, dump_yaml, model_config_from_dict, to_dict
from unet_dist.data.patches import PatchSpec, PatchStream, make_loader, patch_z_starts
from unet_dist.data.training_set import Volume, volumes_of
from unet_dist.data.volumes import open_ids, open_ignore, open_training
from unet_dist.errors import UserError, warn_once
from unet_dist.model import check_patch_shape, output_shape
from unet_dist.predict.block_plan import make_plan
from unet_dist.monitor.training import Monitor, NullMonitor
from unet_dist.train.signals import StopFlag, ignore_stop_signals
from unet_dist.train.throughput import ThroughputLog
from unet_dist.train.state import TrainState
from unet_dist.train.step import Health, TrainStep
from unet_dist.train.validation import Validator


@dataclass
class TrainResult:
    step: int
    status: str  # completed | interrupted
    metrics: dict
    checkpoint: str | None
    reports: bool = True  # rank 0: the one that prints the result


def check_inputs(cfg: Config) -> tuple[int, ...]:
    """Every user-fixable problem of the config and its stores, before any process group; returns the
    label crop. (The run directory is checked after the checkpoint to resume, so a mistake creates nothing.)"""
    patch = tuple(cfg.data.patch_size)
    check_patch_shape(cfg.model, patch)
    affinity = cfg.model.target == "affinities"
    if affinity and cfg.train.weight_map:
        raise UserError("train.weight_map: the U-Net weight map weighs membrane pixels; it has no meaning for "
                        "model.target=affinities (set it false)")
    for volume in volumes_of(cfg.data):
        shape = _check_volume(volume, patch, cfg.data.max_files_per_patch, several=bool(cfg.data.volumes),
                              ids=cfg.data.ids if affinity else None)
        if volume.val_slices:  # validation's block plan: a wrong predict.block_size would end the run at its first validation
            make_plan(cfg.model, cfg.predict, shape, volume.val_slices)
    out = output_shape(cfg.model, patch)
    crop = tuple((p - o) // 2 for p, o in zip(patch, out))
    return crop


def _check_volume(volume: Volume, patch: tuple[int, ...], max_files: int, several: bool,
                  ids: str | None) -> tuple[int, ...]:
    """The arrays, slice ranges and patch size of one training volume (`ids`: the instance IDs that
    affinity targets come from, which stand in for the binary labels); returns its shape."""
    full = (1, *patch) if len(patch) == 2 else patch
    raw, _, _, _ = open_training(volume.store, volume.raw_array, None if ids else volume.labels, full, max_files)
    if ids:
        open_ids(volume.store, ids, raw.shape, full, max_files)
    open_ignore(volume.store, volume.ignore, raw.shape)  # a wrong data.ignore: one line, before the group
    depth = raw.shape[0]
    for key in ("train_slices", "val_slices"):
        lo_hi = getattr(volume, key)
        if lo_hi and lo_hi[1] > depth:
            where = f"data.volumes '{volume.name}'.{key}" if several else f"data.{key}"
            raise UserError(f"{where}: [{lo_hi[0]}, {lo_hi[1]}) is outside the store's {depth} slices ({volume.store})")
    if volume.weight == 0:  # validation only: no patch comes from it
        return raw.shape
    lo, hi = volume.train_range(depth)
    limits = (hi - lo, raw.shape[1], raw.shape[2])
    if any(p > n for p, n in zip(full, limits)) or not len(patch_z_starts((lo, hi), full[0], volume.exclude)):
        without = f", without slices {list(volume.exclude)}" if volume.exclude else ""
        raise UserError(f"data.patch_size: {list(patch)} does not fit in the training "
                        f"volume ({volume.store}: {limits[0]} slices of {limits[1]} x {limits[2]}{without})")
    return raw.shape


def deterministic_problem(cfg: Config, device_type: str) -> str | None:
    """train.deterministic on a GPU needs a deterministic backward for every layer; torch raises at the
    first step for those CUDA lacks (torch.use_deterministic_algorithms lists them): interpolation
    (model.upsample=interp) and 3D max pooling (every 3D model)."""
    if not (cfg.train.deterministic and device_type == "cuda"):
        return None
    if cfg.model.upsample == "interp":
        return ("train.deterministic: model.upsample=interp has no deterministic CUDA backward; use "
                "model.upsample=transpose, or train.deterministic=false")
    if cfg.model.dims == 3:
        return ("train.deterministic: 3D max pooling (model.dims=3) has no deterministic CUDA backward; "
                "set train.deterministic=false")
    return None


def _resume_state(cfg: Config, resume: str) -> dict | None:
    if resume == "never":
        rundir.refuse_earlier_run(cfg.run.dir)
        return None
    if resume == "auto":
        found = checkpoint.load_latest(rundir.checkpoint_dir(cfg.run.dir))
        state, path = found if found else (None, None)
    else:
        state, path = checkpoint.load(Path(resume)), Path(resume)
    if state is not None:
        _refuse_another_model(state, path, cfg)
    return state


def _refuse_another_model(state: dict, path: Path, cfg: Config) -> None:
    """A checkpoint continues only the model it holds: the line names the file and each key that differs."""
    saved = model_config_from_dict(state["model_config"], f"{path}: model_config")
    differ = [f"model.{k}: {v!r} in the checkpoint, {getattr(cfg.model, k)!r} now"
              for k, v in to_dict(saved).items() if getattr(cfg.model, k) != v]
    if differ:
        raise UserError(f"{path}: trained with another model config ({'; '.join(differ)}); use the same "
                        "model.* settings, or another run.dir to start afresh")


def train(cfg: Config, resume: str = "never") -> TrainResult:
    env = dist.detect_env()
    if cfg.train.deterministic:
        runtime.make_deterministic()  # before CUDA is first used (cuBLAS reads its setting then)
    device = dist.choose_device(cfg.train.device, env.local_rank, env.local_world_size)
    precision = runtime.resolve_precision(cfg.train.precision, device)
    if cfg.train.sync_batchnorm and device.type != "cuda" and env.world_size > 1:
        raise UserError("train.sync_batchnorm: SyncBatchNorm runs on GPUs only; set it false on the CPU")
    if problem := deterministic_problem(cfg, device.type):
        raise UserError(problem)
    runtime.tune_for_fixed_shapes(device)
    label_crop = check_inputs(cfg)
    fit_accumulate(cfg, env.world_size)
    notes = []
    if env.restart_count and resume == "never":
        # torchrun restarted the workers after a failure (--max-restarts): the command is the one
        # that started the run, so it carries no --resume; the run continues from its own checkpoints.
        resume = "auto"
        notes.append(f"torchrun restart {env.restart_count}: resuming {cfg.run.dir} from its latest checkpoint")
    state = _resume_state(cfg, resume)
    checkpoint.check_writable(rundir.checkpoint_dir(cfg.run.dir))  # last: nothing is created for a mistake
    if state is not None:
        note, warning = world_change(state, cfg, env.world_size)
        notes += [note] if note else []
        if warning and env.is_main:
            warn_once(warning)
    with dist.process_group(env, device, cfg.train.dist_timeout_s):
        return _train(cfg, env, device, precision, label_crop, state, notes)


def _train(cfg: Config, env, device, precision, label_crop, saved, notes: list[str]) -> TrainResult:
    state = TrainState.build(cfg, device, precision)
    notes = notes + (state.load_state_dict(saved) if saved is not None else [])
    ddp = dist.world_size() > 1
    net = DDP(state.model, device_ids=[device.index] if device.type == "cuda" else None) if ddp else state.model
    net = torch.compile(net) if cfg.train.compile else net
    main = dist.is_main()
    monitor = _open_monitor(cfg, state, device, precision, notes) if main else NullMonitor()
    state.run_id = monitor.run_id

    memory_format = ((torch.channels_last if cfg.model.dims == 2 else torch.channels_last_3d)
                     if cfg.train.channels_last else torch.contiguous_format)
    autocast_ctx = runtime.autocast(device, precision)
    stop = StopFlag()
    start_batch = state.step * cfg.train.accumulate
    batches = BatchWaiter(_loader(cfg, env, device, label_crop, start_batch), stop, cfg.data.loader_timeout_s,
                          start_batch, env.rank)
    health = Health(device, cfg.train.max_nonfinite_steps, precision)
    train_step = TrainStep(state, net, ddp, device, precision, autocast_ctx, memory_format)
    throughput = ThroughputLog(cfg, device, monitor, health)
    validator = Validator(cfg, device, autocast_ctx, memory_format, monitor, health, main)
    checkpointer = Checkpointer(cfg, monitor, health, main)

    net.train()
    try:
        status = _steps(state, stop, batches, train_step, health, throughput, validator, checkpointer, monitor)
    except StopWhileWaiting:
        # The other ranks may wait in a collective this rank never reaches: rank 0 saves alone
        # (every rank holds the last finished step's model) and no rank waits for another.
        _stopping(monitor, state.step)
        checkpointer.save(state)
        status = "interrupted"
    except LoaderStalled as stalled:
        saved = checkpointer.save(state)
        raise LoaderStalled(f"{stalled}; " + (f"checkpoint of step {state.step} written ({saved}): run again "
                                              "with --resume auto" if saved else "no checkpoint from this rank"))
    finally:
        batches.close()  # they ignore the stop signals, a stalled one never ends: see compat/dataloader.py

    if main:
        # Launchers (sbatch scripts, submitit) read this to decide between requeue and done; it is
        # written before W&B closes, which can be slow or fail on a node that is being shut down.
        rundir.write_status(cfg.run.dir, status, state.step, cfg.train.steps, checkpointer.last, validator.metrics)
    monitor.close()
    return TrainResult(state.step, status, validator.metrics, checkpointer.last, reports=main)


def _steps(state, stop, batches, train_step, health, throughput, validator, checkpointer, monitor) -> str:
    """The loop until the last step ("completed") or a stop signal ("interrupted")."""
    while state.step < state.cfg.train.steps:
        if dist.any_rank(stop.raised):  # host values only: no wait for the GPU
            _stopping(monitor, state.step)
            checkpointer.save(state)
            dist.barrier()
            return "interrupted"
        finite, loss, grad_norm = train_step(throughput.timed(batches))
        health.update(finite)
        throughput.add(loss, finite)
        throughput.maybe_log(state.step, state.scheduler, grad_norm)
        validated = validator.maybe_run(state, throughput)
        checkpointer.maybe_save(state, validated, throughput)
    return "completed"


def _stopping(monitor, step: int) -> None:
    monitor.message(f"stop signal received: checkpointing at step {step} and exiting; "
                    "run again with --resume auto to continue")


def _open_monitor(cfg: Config, state: TrainState, device, precision: str, notes: list[str]) -> Monitor:
    rundir.write_config(cfg.run.dir, dump_yaml(cfg))
    monitor = Monitor(Path(cfg.run.dir), cfg, state.step, state.run_id)
    monitor.message(f"training {cfg.train.steps} steps on {dist.world_size()} rank(s), device {device.type}, "
                    f"precision {precision}" + (f", resumed at step {state.step}" if state.step else ""))
    if cfg.data.volumes:
        spec = PatchSpec.from_config(cfg, 0, ())
        monitor.message("volumes: " + "; ".join(
            f"{v.name} ({v.store}, train {_slices(v.train_slices, 'all but validation')}, validate "
            f"{_slices(v.val_slices, 'none')}, patch probability {p:.3g})"
            for v, p in zip(spec.volumes, spec.volume_probabilities())))
    for note in notes:
        monitor.message(f"note: {note}")
    return monitor


def _slices(lo_hi, otherwise: str) -> str:
    return f"{lo_hi[0]}:{lo_hi[1]}" if lo_hi else otherwise


def _loader(cfg: Config, env, device, label_crop, start_batch: int):
    """This rank's patches from batch `start_batch` on (the stream depends on the batch index alone)."""
    spec = PatchSpec.from_config(cfg, env.rank, label_crop)
    stream = PatchStream(spec, cfg.data.augment, start_batch=start_batch)
    return make_loader(stream, dist.loader_workers(cfg.data.num_workers, env), cfg.data.start_method,
                       pin_memory=device.type == "cuda", prefetch_factor=cfg.data.prefetch_factor,
                       worker_init_fn=ignore_stop_signals)
