"""What a run reports: progress on the console, `metrics.jsonl`, and Weights & Biases.

Only the main rank builds a real `Monitor`; the others get one that does nothing, so the trainer
calls it unconditionally. W&B is imported lazily and only when enabled.
"""

from __future__ import annotations

import json
import netrc
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from unet_dist.config import Config, to_dict
from unet_dist.data.training_set import volumes_of
from unet_dist.visualize.overlay import CLASS_LABELS, CLASS_LABELS_WITH_UNLABELLED, error_panel, truth_classes
from unet_dist.monitor.progress import Progress
from unet_dist.rundir import METRICS, wandb_sync_command

PUBLIC_WANDB = "https://api.wandb.ai"
SUMMARIES = {"train/loss": "min", "val/dice_membrane": "max", "val/dice_neuron": "max", "val/pixel_error": "min"}


def resolve_wandb_mode(mode: str, environ=os.environ) -> str:
    """`auto`: online with an API key for the W&B server, offline without one (the usual case on
    compute nodes). The server is $WANDB_BASE_URL (a self-hosted one) or the public one; its key is
    $WANDB_API_KEY or, as wandb itself looks it up, the password of that host's `machine` entry in
    $NETRC or ~/.netrc. `disabled` in the config wins over $WANDB_MODE (a run the user turned W&B off
    for stays off); otherwise $WANDB_MODE wins, as wandb's own settings give way to it."""
    if mode == "disabled":
        return mode
    if environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if environ.get("WANDB_API_KEY"):
        return "online"
    host = urlsplit(environ.get("WANDB_BASE_URL") or PUBLIC_WANDB).netloc
    path = environ.get("NETRC") or Path(environ.get("HOME") or Path.home()) / ".netrc"
    try:
        entry = netrc.netrc(path).authenticators(host) if host else None
    except (OSError, netrc.NetrcParseError):
        entry = None
    return "online" if entry and entry[2] else "offline"


class Monitor:
    """Built from the config: `logging.*` (W&B mode, project, tags, group, images, artifacts),
    `train.steps` for the ETA and `run.name`; `run_id` continues an earlier W&B run."""

    def __init__(self, run_dir: Path, cfg: Config, start_step: int, run_id: str | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS
        self.logging = cfg.logging
        bar = sys.stderr.isatty() if cfg.logging.progress == "auto" else cfg.logging.progress == "bar"
        # The bar is redrawn on stderr; plain lines are the run's record, on stdout with the rest of it.
        # Every logged step gets its line (train.log_every already spaces them), hence every_s=0.
        self.progress = Progress("step", cfg.train.steps, "steps", mode="bar" if bar else "plain", every_s=0,
                                 stream=sys.stderr if bar else sys.stdout, start=start_step)
        self.wandb_mode = resolve_wandb_mode(cfg.logging.wandb)
        self.wandb_run = None
        self.run_id = run_id
        # several volumes: each volume's membrane Dice on the console and in the summaries too
        self.volume_names = [v.name for v in volumes_of(cfg.data) if v.val_slices] if cfg.data.volumes else []
        if self.wandb_mode != "disabled":
            self._start_wandb(to_dict(cfg), cfg.run.name, run_id)

    def _start_wandb(self, config: dict, run_name: str, run_id: str | None) -> None:
        try:
            import wandb
        except ImportError:
            print("warning: wandb is not installed; logging to metrics.jsonl only", file=sys.stderr)
            self.wandb_mode = "disabled"
            return
        log = self.logging
        self.run_id = run_id or uuid.uuid4().hex[:8]
        # resume="allow" with a fixed id: a requeued or resumed job continues the same W&B run.
        # console="wrap" keeps the console log in the run (W&B's Logs tab), as users of a job expect.
        self.wandb_run = wandb.init(
            project=log.project, entity=log.entity or None, name=run_name or None, id=self.run_id,
            resume="allow", mode=self.wandb_mode, dir=str(self.run_dir), config=config,
            tags=list(log.tags) or None, group=log.group or None, job_type=log.job_type or None,
            settings=wandb.Settings(console="wrap", silent=True),
        )
        # the run summary shows the best validation Dice and the lowest loss, not the last values
        for key, summary in SUMMARIES.items():
            self.wandb_run.define_metric(key, summary=summary)
            for name in self.volume_names if key.startswith("val/") else ():
                self.wandb_run.define_metric(key.replace("val/", f"val/{name}/"), summary=summary)

    def log(self, step: int, values: dict[str, float], console: bool = True) -> None:
        """One line of metrics.jsonl, the console and W&B for this step."""
        record = {"step": step, "time": round(time.time(), 3), **values}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self._wandb(lambda run: run.log(values, step=step))
        if console:
            self._print(step, values)

    def _print(self, step: int, values: dict[str, float]) -> None:
        shown = "  ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in values.items()
                          if isinstance(v, (int, float)) and k in _CONSOLE_KEYS)
        by_volume = [f"{name} {values[key]:.4g}" for name in self.volume_names
                     if (key := f"val/{name}/dice_membrane") in values]
        if by_volume:
            shown += f"  (membrane Dice by volume: {', '.join(by_volume)})"
        self.progress.update(step, shown, keep=any(k.startswith("val/") for k in values))

    def log_images(self, step: int, raw: np.ndarray, label: np.ndarray, prob: np.ndarray,
                   threshold: float, valid: np.ndarray | None = None) -> None:
        """A validation slice to W&B: raw with the prediction and ground truth as toggleable masks,
        the probability, and the error overlay that `report` draws. `valid` False: unlabelled voxels,
        a class of their own in the ground truth and never an error."""
        if self.wandb_run is None or not self.logging.images:
            return
        import wandb

        mask = (prob > threshold).astype(np.uint8)
        grey = (np.clip(raw, 0, 1) * 255).astype(np.uint8)
        truth_labels = CLASS_LABELS if valid is None else CLASS_LABELS_WITH_UNLABELLED
        masks = {"prediction": {"mask_data": mask, "class_labels": CLASS_LABELS},
                 "ground_truth": {"mask_data": truth_classes(label, valid), "class_labels": truth_labels}}
        images = {
            "val/masks": wandb.Image(grey, masks=masks, caption=f"step {step}: toggle prediction / ground truth"),
            "val/probability": wandb.Image((np.clip(prob, 0, 1) * 255).astype(np.uint8),
                                           caption="probability of neuron interior"),
            "val/errors": wandb.Image(error_panel(raw, label, mask, valid),
                                      caption="red: missed membrane (merges), blue: invented membrane (splits)"
                                              + ("" if valid is None else ", ochre: unlabelled (not counted)")),
        }
        self._wandb(lambda run: run.log(images, step=step))

    def log_checkpoint(self, path: str | Path | None, step: int, aliases: list[str]) -> None:
        """A checkpoint as a version of the run's `model-<id>` artifact (see logging.checkpoint_artifacts)."""
        if self.wandb_run is None or path is None or not self._artifact_wanted(Path(path)):
            return
        import wandb

        def log(run):
            artifact = wandb.Artifact(f"model-{self.run_id}", type="model", metadata={"step": step})
            artifact.add_file(str(path), name="checkpoint.pt")
            run.log_artifact(artifact, aliases=aliases)

        self._wandb(log)

    def _artifact_wanted(self, path: Path) -> bool:
        policy = self.logging.checkpoint_artifacts
        if policy == "never":
            return False
        if policy == "always":
            return True
        size_mb = path.stat().st_size / 1e6
        if size_mb > self.logging.artifact_max_mb and not getattr(self, "_told_artifact_size", False):
            self._told_artifact_size = True
            self.message(f"checkpoints of {size_mb:.0f} MB are not uploaded as W&B artifacts "
                         f"(over logging.artifact_max_mb={self.logging.artifact_max_mb:g}; "
                         "logging.checkpoint_artifacts=always uploads them)")
        return size_mb <= self.logging.artifact_max_mb

    def _wandb(self, call) -> None:
        """W&B is a side channel: if its service dies (SLURM's SIGTERM reaches it too), training
        goes on, so the checkpoint that the signal asks for is still written."""
        if self.wandb_run is None:
            return
        try:
            call(self.wandb_run)
        except Exception as exc:  # wandb raises many types once its service is gone
            print(f"warning: W&B logging stopped ({type(exc).__name__}: {exc}); metrics.jsonl continues",
                  file=sys.stderr, flush=True)
            self.wandb_run = None

    def message(self, text: str) -> None:
        self.progress.end_bar()
        print(text, flush=True)

    def close(self) -> None:
        self.progress.end_bar()
        if self.wandb_run is None:
            return
        run_dir = getattr(self.wandb_run, "dir", None)
        self._wandb(lambda run: run.finish())
        if self.wandb_mode == "offline":
            print(f"W&B offline run {self.run_id}: upload with\n  {wandb_sync_command(self.run_dir, self.run_id)}",
                  flush=True)
        elif run_dir:
            print(f"W&B run {self.run_id} finished", flush=True)


class NullMonitor:
    """What non-main ranks get: every call is accepted and does nothing."""

    run_id = None

    def log(self, *args: Any, **kwargs: Any) -> None: ...
    def log_images(self, *args: Any, **kwargs: Any) -> None: ...
    def log_checkpoint(self, *args: Any, **kwargs: Any) -> None: ...
    def message(self, *args: Any, **kwargs: Any) -> None: ...
    def close(self) -> None: ...


_CONSOLE_KEYS = {
    "train/loss", "train/lr", "train/images_per_s", "train/data_wait_frac",
    "val/dice_neuron", "val/dice_membrane", "val/pixel_error",
}
