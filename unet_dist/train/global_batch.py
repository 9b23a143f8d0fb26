"""The global batch: patches per optimizer step over all ranks (data.batch_size x ranks x
train.accumulate), and what becomes of it when a run resumes on another number of ranks.

A run stopped on 2 ranks and continued on 1 (a requeue onto fewer GPUs, a torchrun restart with fewer
nodes) would otherwise halve its global batch without a word. `train.global_batch` fixes the global
batch and lets the trainer choose `train.accumulate` for the ranks at hand; without it, a changed
global batch is a `warning:` line that names the old and new values and the setting that keeps it.
"""

from __future__ import annotations

from unet_dist.config import Config
from unet_dist.errors import UserError


def global_batch(batch_size: int, accumulate: int, world: int) -> int:
    return batch_size * accumulate * world


def fit_accumulate(cfg: Config, world: int) -> None:
    """With `train.global_batch` set, the `train.accumulate` that gives it on `world` ranks (in place)."""
    wanted = cfg.train.global_batch
    if not wanted:
        return
    per_pass = cfg.data.batch_size * world
    if wanted % per_pass:
        raise UserError(f"train.global_batch: {wanted} is not a multiple of data.batch_size x ranks = "
                        f"{cfg.data.batch_size} x {world} = {per_pass}; choose a multiple, or another data.batch_size")
    cfg.train.accumulate = wanted // per_pass


def world_change(saved: dict, cfg: Config, world: int) -> tuple[str | None, str | None]:
    """(note, warning) for resuming `saved` on `world` ranks: a note when the world size changed and
    the global batch was kept, a warning when the global batch changed; (None, None) otherwise."""
    old_world = int((saved.get("sampler") or {}).get("rank_streams", world))
    old_cfg = saved.get("config") or {}
    old_batch = int(old_cfg.get("data", {}).get("batch_size", cfg.data.batch_size))
    old_accumulate = int(old_cfg.get("train", {}).get("accumulate", cfg.train.accumulate))
    old = global_batch(old_batch, old_accumulate, old_world)
    new = global_batch(cfg.data.batch_size, cfg.train.accumulate, world)
    if old == new:
        if old_world == world:
            return None, None
        return (f"the checkpoint was trained on {old_world} rank(s), this run has {world}: train.accumulate "
                f"{old_accumulate} -> {cfg.train.accumulate} keeps the global batch at {new}"), None
    return None, (f"the checkpoint was trained on {old_world} rank(s) with a global batch of {old} "
                  f"({old_batch} x {old_world} rank(s) x accumulate {old_accumulate}); this run has {world} "
                  f"rank(s) and a global batch of {new}; set train.global_batch={old} to keep it")
