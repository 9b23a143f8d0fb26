"""The rules of the configuration beyond each key's type: ranges and agreements between keys.

One home for each rule: `load_config` applies them to a YAML file and overrides, `from_dict` and
`model_config_from_dict` to what a checkpoint stores, and the model and the augmenter to sections
built in code, so a value is refused the same way wherever it comes from.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from unet_dist.config.loading import check_types
from unet_dist.config.sections import AugmentConfig, Config, ModelConfig
from unet_dist.errors import UserError

Check = Callable[[bool, str, str], None]


def _checker(source) -> Check:
    """`source` names where the settings came from: a string, or a function of the key (a config
    file's key that an override replaced is the command line's)."""
    def check(ok: bool, key: str, problem: str) -> None:
        if not ok:
            raise UserError(f"{source(key) if callable(source) else source}: {key}: {problem}")
    return check


def validate(cfg: Config, source: str) -> None:
    """Cross-field checks that single-key types cannot express."""
    check = _checker(source)
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
    check(cfg.data.loader_timeout_s >= 0, "data.loader_timeout_s", "must be >= 0 (0: wait forever)")
    validate_model(cfg.model, source)
    validate_augment(cfg.data.augment, source)
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
    validate_segment(cfg.segment, source)


def validate_segment(seg, source) -> None:
    """Every segment.* rule; `segment` applies them to its command-line flags too."""
    check = _checker(source)
    check(len(seg.block_size) == 3 and all(b > 0 for b in seg.block_size), "segment.block_size",
          "expected 3 positive sizes (Z, Y, X)")
    check(len(seg.halo) == 3 and all(h >= 0 for h in seg.halo), "segment.halo", "expected 3 non-negative sizes (Z, Y, X)")
    for key in ("threshold", "quantile", "seed_boundary", "background"):
        value = getattr(seg, key)
        check(math.isfinite(value) and 0.0 <= value <= 1.0, f"segment.{key}", f"must be within [0, 1], got {value}")
    check(seg.seed_spacing >= 1, "segment.seed_spacing", "must be >= 1")
    check(math.isfinite(seg.smooth_sigma) and seg.smooth_sigma >= 0, "segment.smooth_sigma", "must be >= 0")


def _validate_volumes(cfg: Config, check: Check) -> None:
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


def validate_model(model: ModelConfig, source: str) -> None:
    """Every model.* rule (types too, for a section built in code)."""
    check = _checker(source)
    check_types(model, "model.", source)
    for key in ("depth", "base_channels", "in_channels", "out_channels"):
        check(getattr(model, key) >= 1, f"model.{key}", f"must be >= 1, got {getattr(model, key)}")
    offsets = model.affinity_offsets()
    for i, offset in enumerate(offsets):
        check(len(offset) == 3 and any(offset), f"model.offsets[{i}]",
              f"must be a nonzero (z, y, x) voxel offset, got {list(offset)}")
        check(model.dims == 3 or len(offset) != 3 or offset[0] == 0, f"model.offsets[{i}]",
              f"{list(offset)} has a z step; a 2D model's offsets are (0, y, x)")
    check(len(set(offsets)) == len(offsets), "model.offsets", "lists an offset twice")
    check(model.target != "affinities" or model.out_channels in (1, len(offsets)), "model.out_channels",
          f"{model.out_channels} differs from the {len(offsets)} affinity offsets (leave it at 1: one channel per offset)")
    aniso = model.anisotropic_levels
    check(aniso >= 0, "model.anisotropic_levels", f"must be >= 0, got {aniso}")
    check(not aniso or model.dims == 3, "model.anisotropic_levels", f"{aniso} needs model.dims 3 (got {model.dims})")
    check(aniso <= model.depth, "model.anisotropic_levels", f"{aniso} exceeds model.depth ({model.depth})")


def validate_augment(augment: AugmentConfig, source: str, dims: int | None = None) -> None:
    """Every data.augment.* rule (types too, for a section built in code). With `dims` 2 the
    3D-only augmentations must be off; without it they are skipped on 2D patches."""
    check = _checker(source)
    prefix = "data.augment."
    check_types(augment, prefix, source)
    for key in ("missing_section_p", "misalign_p"):
        p = getattr(augment, key)
        check(0 <= p <= 1, prefix + key, f"must be a probability in [0, 1], got {p!r}")
        check(dims != 2 or p == 0, prefix + key, f"{p} applies to 3D patches only (model.dims is 2)")
    for key in ("elastic_sigma", "noise_std"):
        value = getattr(augment, key)
        check(math.isfinite(value) and value >= 0, prefix + key, f"must be a number >= 0, got {value!r}")
    check(augment.elastic_grid >= 2, prefix + "elastic_grid", f"must be >= 2, got {augment.elastic_grid}")
    check(augment.misalign_max_px >= 0, prefix + "misalign_max_px", f"must be >= 0, got {augment.misalign_max_px}")
