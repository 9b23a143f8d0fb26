"""Typed run configuration: dataclasses loaded from YAML with dotted command-line overrides.

The dataclasses below are the one source of truth for defaults. A YAML file sets any subset of the
keys; `section.key=value` overrides (values parsed as YAML) apply on top. Unknown keys and wrong types
are rejected with a `UserError` that names the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from unet_dist.errors import UserError


@dataclass
class AugmentConfig:
    flip: bool = True
    rot90: bool = True
    elastic: bool = True
    elastic_grid: int = 3  # control points per axis of the coarse displacement grid
    elastic_sigma: float = 10.0  # displacement std in pixels at the control points
    intensity: bool = True  # brightness, contrast, gamma
    noise_std: float = 0.03
    missing_section_p: float = 0.0  # 3D only
    misalign_p: float = 0.0  # 3D only
    misalign_max_px: int = 8


@dataclass
class VolumeConfig:
    """One of several training volumes (`data.volumes`, e.g. CREMI's samples A, B and C).

    "" takes the data section's value (`data.raw_array`, `data.labels`, `data.ignore`)."""

    store: str = ""
    name: str = ""  # in metric names (val/<name>/dice_membrane); "": the store's folder name without suffix
    raw_array: str = ""
    labels: str = ""
    ignore: str = ""
    train_slices: list[int] = field(default_factory=list)  # [start, stop); []: every slice outside val_slices
    val_slices: list[int] = field(default_factory=list)  # [start, stop); []: not validated
    weight: float = 1.0  # a patch comes from this volume with probability weight / sum of weights; 0: none


@dataclass
class DataConfig:
    store: str = "runs/isbi2012.zarr"  # ours, or any Zarr v2/v3 (OME-Zarr) store, read as it is
    # The arrays inside `store` (data/volumes.py): a path, or an OME multiscale group (its level 0).
    # The defaults are the layout `convert` writes; `labels` without a "/" names a label image.
    raw_array: str = "0"
    labels: str = "neuron_interior"
    # Unlabelled voxels (1 = never in the loss or a count): the label image `convert --ignore-*` writes,
    # used when the store has it; a label image name or a path; "" ignores nothing.
    ignore: str = "ignore"
    # A patch is drawn again (from the same random stream) while less than this fraction of the voxels
    # that reach the loss is labelled; only stores with an ignore mask have unlabelled voxels.
    min_labelled_fraction: float = 0.5
    # Refuse a chunk layout where a random patch would read more chunk files than this (convert it).
    max_files_per_patch: int = 256
    train_slices: list[int] = field(default_factory=lambda: [0, 25])  # [start, stop)
    val_slices: list[int] = field(default_factory=lambda: [25, 30])
    holdout_slices: list[int] = field(default_factory=list)  # [start, stop) kept out of training (CV folds)
    patch_size: list[int] = field(default_factory=lambda: [256, 256])  # (Y, X) or (Z, Y, X)
    batch_size: int = 4  # per rank
    num_workers: int = 2
    start_method: Literal["fork", "forkserver", "spawn"] = "fork"
    prefetch_factor: int = 4
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Several volumes in one run (data/training_set.py); when set, data.store, data.train_slices and
    # data.val_slices are not used. Validation reports each volume (val/<name>/...) and all pooled (val/...).
    volumes: list[VolumeConfig] = field(default_factory=list)


@dataclass
class ModelConfig:
    dims: Literal[2, 3] = 2
    in_channels: int = 1
    out_channels: int = 1
    depth: int = 4
    base_channels: int = 64
    norm: Literal["batch", "group", "instance", "none"] = "batch"
    upsample: Literal["transpose", "interp"] = "transpose"
    padding: Literal["same", "valid"] = "same"
    anisotropic_levels: int = 0  # 3D: the first levels pool only in y, x (thick sections)


@dataclass
class TrainConfig:
    steps: int = 2000
    lr: float = 1e-3
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # 0 disables
    accumulate: int = 1  # micro-batches per optimizer step
    # Patches per optimizer step over all ranks; when set (> 0), train.accumulate is chosen from it
    # and the ranks at hand, so a run resumed on another number of ranks keeps its global batch.
    global_batch: int = 0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    loss: Literal["bce", "bce_dice"] = "bce"
    weight_map: bool = False  # the U-Net paper's class balance + border weights
    weight_map_w0: float = 10.0
    weight_map_sigma: float = 5.0
    max_nonfinite_steps: int = 20  # consecutive non-finite losses before the run stops
    seed: int = 0
    deterministic: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sync_batchnorm: bool = False
    channels_last: bool = False
    compile: bool = False
    val_every: int = 200
    ckpt_every: int = 200
    keep_last: int = 3
    log_every: int = 10
    dist_timeout_s: int = 600  # collective timeout: a dead rank ends the job instead of hanging it


@dataclass
class PredictConfig:
    block_size: list[int] = field(default_factory=lambda: [1, 512, 512])  # output block (Z, Y, X)
    halo: list[int] = field(default_factory=lambda: [0, 32, 32])  # context per side (Z, Y, X)
    # Blocks per output shard (Z, Y, X): each shard is one file holding that many blocks (Zarr v3
    # sharding), so a volume has that many times fewer files for Lustre/GPFS and the kernel to create.
    # Each rank writes whole shards. [1, 1, 1]: a file per block (unsharded).
    shard_blocks: list[int] = field(default_factory=lambda: [1, 4, 4])
    batch_size: int = 4
    tta: bool = False
    probability_dtype: Literal["uint8", "float16"] = "uint8"
    threshold: float = 0.5
    # coarser levels (for viewers) halve y, x (and z when near-isotropic) down to this largest side
    pyramid_max_side: int = 256
    # Threads that read (decode) block inputs and write (encode) finished blocks; 0: from the cores
    # this process may use (predict.io_threads). Neither changes a number of the output.
    readers: int = 0
    writers: int = 0
    # Decoded input chunks shared by neighbouring blocks (each chunk is decoded once and dropped after
    # its last block); the cap only matters for layouts whose chunks span many block rows. 0: no cache.
    chunk_cache_mb: int = 1024
    # zarr-python's codec pipeline ("zarr") or the Rust one from the `zarrs` package ("zarrs").
    codec_pipeline: Literal["zarr", "zarrs"] = "zarr"


@dataclass
class LoggingConfig:
    wandb: Literal["auto", "online", "offline", "disabled"] = "auto"  # auto: online with a key
    project: str = "unet_dist"
    entity: str = ""
    progress: Literal["auto", "bar", "plain"] = "auto"  # auto: a bar on a TTY, lines otherwise
    images: bool = True  # raw with prediction / ground-truth masks and the error overlay at each validation
    tags: list[str] = field(default_factory=list)
    group: str = ""  # W&B group: cv puts its folds in one ("cv-<run dir name>" unless set)
    job_type: str = "train"
    # checkpoints as W&B artifacts (aliases latest, best): auto = only when a checkpoint file is at
    # most artifact_max_mb (each upload is a full copy; large models would flood the project)
    checkpoint_artifacts: Literal["auto", "always", "never"] = "auto"
    artifact_max_mb: float = 100.0


@dataclass
class LaunchConfig:
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    partition: str = ""
    time_min: int = 240
    mem_gb: int = 0  # 0: the partition's default
    max_requeues: int = 3


@dataclass
class RunConfig:
    dir: str = "runs/default"
    name: str = ""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return f"list of {'mappings of ' if dataclasses.is_dataclass(item) else ''}{item.__name__}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""

    def bad() -> UserError:
        return UserError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise bad()
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad()
        if dataclasses.is_dataclass(item_tp):
            return [_section(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return [_coerce(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation for {key}")  # keep the schema simple
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # YAML reads `data.raw_array=1` (a pyramid level) as a number
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _section(tp: type, value: Any, key: str, source: str) -> Any:
    """A list item that is itself a section (data.volumes[i]): its defaults, then `value`'s keys."""
    if not isinstance(value, dict):
        raise UserError(f"{source}: {key}: expected a mapping of {tp.__name__} keys, got {value!r}")
    item = tp()
    _merge(item, value, f"{key}.", source)
    return item


def _unknown_key(key: str, known: list[str], source: str) -> UserError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
    return UserError(f"{source}: unknown key '{key}'{hint}")


def _merge(obj: Any, updates: dict, prefix: str, source: str) -> None:
    """Apply a nested dict of updates onto dataclass `obj`, validating every key and type."""
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown_key(key, names, source)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{source}: {key}: expected a mapping of {tp.__name__} keys, got {value!r}")
            _merge(getattr(obj, name), value, f"{key}.", source)
        else:
            setattr(obj, name, _coerce(value, tp, key, source))


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{text}': expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _nest(key: str, value: Any) -> dict:
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Defaults, then the YAML file, then the dotted overrides; every step validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise UserError(f"{path}: cannot read config ({exc.strerror or exc})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a mapping of sections at the top level")
        _merge(cfg, data, "", str(path))
    for text in overrides:
        key, value = parse_override(text)
        _merge(cfg, _nest(key, value), "", "command line")
    validate(cfg, str(path) if path else "command line")
    return cfg


def validate(cfg: Config, source: str) -> None:
    """Cross-field checks that single-key types cannot express."""

    def check(ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise UserError(f"{source}: {key}: {problem}")

    for key in ("train_slices", "val_slices"):
        lo_hi = getattr(cfg.data, key)
        check(len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1], f"data.{key}",
              f"expected [start, stop) with 0 <= start < stop, got {lo_hi}")
    holdout = cfg.data.holdout_slices
    check(not holdout or (len(holdout) == 2 and 0 <= holdout[0] < holdout[1]), "data.holdout_slices",
          f"expected [] or [start, stop) with 0 <= start < stop, got {holdout}")
    check(len(cfg.data.patch_size) == cfg.model.dims, "data.patch_size",
          f"has {len(cfg.data.patch_size)} axes but model.dims is {cfg.model.dims}")
    check(all(p > 0 for p in cfg.data.patch_size), "data.patch_size", "sizes must be positive")
    check(cfg.data.batch_size >= 1, "data.batch_size", "must be >= 1")
    for key in ("raw_array", "labels"):
        check(bool(getattr(cfg.data, key).strip("/ ")), f"data.{key}", "must name an array in data.store")
    check(0.0 <= cfg.data.min_labelled_fraction <= 1.0, "data.min_labelled_fraction", "must be within [0, 1]")
    _validate_volumes(cfg, check)
    check(cfg.data.max_files_per_patch >= 1, "data.max_files_per_patch", "must be >= 1")
    check(cfg.data.num_workers >= 0, "data.num_workers", "must be >= 0")
    check(cfg.model.depth >= 1, "model.depth", "must be >= 1")
    check(cfg.model.base_channels >= 1, "model.base_channels", "must be >= 1")
    check(cfg.train.steps >= 1, "train.steps", "must be >= 1")
    check(cfg.train.lr > 0, "train.lr", "must be > 0")
    check(cfg.train.accumulate >= 1, "train.accumulate", "must be >= 1")
    check(cfg.train.global_batch >= 0, "train.global_batch", "must be >= 0 (0: data.batch_size x ranks x train.accumulate)")
    for key in ("val_every", "ckpt_every", "log_every", "keep_last"):
        check(getattr(cfg.train, key) >= 1, f"train.{key}", "must be >= 1")
    check(len(cfg.predict.block_size) == 3 and all(b > 0 for b in cfg.predict.block_size),
          "predict.block_size", "expected 3 positive sizes (Z, Y, X)")
    check(len(cfg.predict.halo) == 3 and all(h >= 0 for h in cfg.predict.halo),
          "predict.halo", "expected 3 non-negative sizes (Z, Y, X)")
    check(len(cfg.predict.shard_blocks) == 3 and all(k > 0 for k in cfg.predict.shard_blocks),
          "predict.shard_blocks", "expected 3 positive block counts (Z, Y, X); [1, 1, 1]: unsharded")
    check(0.0 <= cfg.predict.threshold <= 1.0, "predict.threshold", "must be within [0, 1]")
    check(cfg.predict.pyramid_max_side >= 8, "predict.pyramid_max_side", "must be >= 8")
    for key in ("readers", "writers"):
        check(getattr(cfg.predict, key) >= 0, f"predict.{key}", "must be >= 0 (0: from the cores)")
    check(cfg.predict.chunk_cache_mb >= 0, "predict.chunk_cache_mb", "must be >= 0 (0: no cache)")


def _validate_volumes(cfg: Config, check) -> None:
    volumes = cfg.data.volumes
    for i, vol in enumerate(volumes):
        key = f"data.volumes[{i}]"
        check(bool(vol.store.strip()), f"{key}.store", "must name the volume's store")
        for name in ("train_slices", "val_slices"):
            lo_hi = getattr(vol, name)
            check(not lo_hi or (len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1]), f"{key}.{name}",
                  f"expected [] or [start, stop) with 0 <= start < stop, got {lo_hi}")
        check(math.isfinite(vol.weight) and vol.weight >= 0, f"{key}.weight", f"must be >= 0, got {vol.weight}")
    if not volumes:
        return
    check(any(v.weight > 0 for v in volumes), "data.volumes", "every weight is 0: no volume to draw patches from")
    check(any(v.val_slices for v in volumes), "data.volumes",
          "no volume has val_slices (validation, and best.pt, needs at least one)")
    check(not cfg.data.holdout_slices, "data.holdout_slices", "folds (cv) take one volume, not data.volumes")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict, source: str = "checkpoint") -> Config:
    """Rebuild a Config from `to_dict` output (e.g. the copy stored in a checkpoint)."""
    cfg = Config()
    _merge(cfg, data, "", source)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
