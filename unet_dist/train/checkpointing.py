"""When training checkpoints: every `train.ckpt_every` steps, at the last step, on a stop signal,
and `best.pt` whenever validation improves; never past a divergence."""

from __future__ import annotations

from unet_dist import checkpoint, rundir
from unet_dist.train.state import TrainState
from unet_dist.train.step import Health


class Checkpointer:
    def __init__(self, cfg, monitor, health: Health, main: bool):
        self.cfg, self.monitor, self.health, self.main = cfg, monitor, health, main
        self.dir = rundir.checkpoint_dir(cfg.run.dir)
        self.last: str | None = None  # the newest checkpoint written (rank 0)

    def maybe_save(self, state: TrainState, validated: bool | None, clock) -> None:
        """After a step; `validated` is None without a validation at this step, else whether it
        was the best so far."""
        step = state.step
        if step % self.cfg.train.ckpt_every == 0 or (validated is not None and step == self.cfg.train.steps):
            with clock.paused():
                self.save(state, is_best=bool(validated))
        elif validated and self.main:
            with clock.paused():
                path = checkpoint.save_best(self.dir, state.state_dict())
                self.monitor.log_checkpoint(path, step, ["best", f"step-{step}"])

    def save(self, state: TrainState, is_best: bool = False) -> str | None:
        """A step checkpoint now (rank 0 writes it); every rank first checks the run has not diverged."""
        self.health.check(state.step)
        if self.main:
            path = str(checkpoint.save(self.dir, state.state_dict(), self.cfg.train.keep_last, is_best))
            self.monitor.log_checkpoint(path, state.step,
                                        ["latest", f"step-{state.step}"] + (["best"] if is_best else []))
            self.last = self.health.last_checkpoint = path
        return self.last
