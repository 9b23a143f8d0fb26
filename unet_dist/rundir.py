"""The run directory: the names and small files a training run leaves, in one place and without torch,
so the trainer, cv, report and the launchers (sbatch scripts, submitit jobs) agree on them.

    RUN_DIR/config.yaml            the resolved config
    RUN_DIR/checkpoints/step-<9 digits>.pt, best.pt
    RUN_DIR/metrics.jsonl          one JSON object per logged step
    RUN_DIR/status.json            {"status": "completed" | "interrupted", "step", "total_steps", "checkpoint", "metrics"}
    RUN_DIR/requeues               one line per requeue: <job id> <step> <UTC time> <reason>
    RUN_DIR/wandb/offline-run-<time>-<id>/   one folder per start of an offline W&B run
"""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path

from unet_dist.errors import UserError
from unet_dist.files import write_json_atomic

CHECKPOINTS = "checkpoints"
BEST = "best.pt"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
STATUS = "status.json"
REQUEUES = "requeues"
STEP_FILE = re.compile(r"^step-(\d{9})\.pt$")


def step_file(step: int) -> str:
    return f"step-{step:09d}.pt"


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / CHECKPOINTS


def step_files(run_dir) -> list[Path]:
    """Step checkpoints, oldest first (by name: nothing is loaded)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if STEP_FILE.match(p.name)), key=lambda p: p.name)


def newest_step(run_dir) -> int:
    """The step of the newest checkpoint file; 0 without any."""
    files = step_files(run_dir)
    return int(STEP_FILE.match(files[-1].name).group(1)) if files else 0


def refuse_earlier_run(run_dir) -> None:
    """A fresh start must not mix with (or later prune) another run's checkpoints."""
    if step_files(run_dir):
        raise UserError(f"{checkpoint_dir(run_dir)}: holds checkpoints of an earlier run; pass --resume auto "
                        "to continue it, or choose another run.dir")


def write_config(run_dir, text: str) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / CONFIG).write_text(text)


def write_status(run_dir, status: str, step: int, total_steps: int, checkpoint: str | None, metrics: dict) -> None:
    """What launchers read to decide between requeue and done."""
    write_json_atomic(Path(run_dir) / STATUS, {"status": status, "step": step, "total_steps": total_steps,
                                               "checkpoint": checkpoint, "metrics": metrics})


def status_mtime(run_dir) -> int:
    """mtime (ns) of status.json, 0 without one: tells a fresh status from an earlier run's without
    comparing clocks (a shared file system's clock need not be the node's)."""
    try:
        return (Path(run_dir) / STATUS).stat().st_mtime_ns
    except OSError:
        return 0


def read_status(run_dir, unless_mtime: int | None = None) -> dict | None:
    """status.json as the trainer wrote it; None if missing, unreadable, or still the file whose
    mtime was `unless_mtime` (written before this run started)."""
    path = Path(run_dir) / STATUS
    try:
        if unless_mtime is not None and path.stat().st_mtime_ns == unless_mtime:
            return None
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def requeue_steps(run_dir, job_id: str) -> list[int]:
    """Steps at which this job was requeued so far, oldest first."""
    try:
        lines = (Path(run_dir) / REQUEUES).read_text().splitlines()
    except OSError:
        return []
    steps = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == str(job_id) and parts[1].isdigit():
            steps.append(int(parts[1]))
    return steps


def record_requeue(run_dir, job_id: str, step: int, reason: str) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(Path(run_dir) / REQUEUES, "a") as f:
        f.write(f"{job_id} {step} {stamp} {reason}\n")


def wandb_sync_command(run_dir, run_id: str | None = None) -> str | None:
    """`wandb sync` for a run's offline W&B folders (one per start of the same run id), in start order."""
    wandb_dir = Path(run_dir) / "wandb"
    if run_id is None:
        folders = sorted(wandb_dir.glob("offline-run-*-*"))
        if not folders:
            return None
        run_id = folders[-1].name.rsplit("-", 1)[-1]
    return f"wandb sync --id {run_id} {shlex.quote(str(wandb_dir))}/offline-run-*-{run_id}"
