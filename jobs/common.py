"""What the launchers share: cluster defaults for a config, checks against the cluster before anything
is submitted, and the requeue decision with its record in the run directory.

The sbatch scripts in `slurm/` call this module's command line (`python -m jobs.common prepare|after`);
the submitit jobs (`jobs.train`, `jobs.predict`) import it. No torch here: the batch shell calls it
twice per run and it must start in a blink.

Requeue rules (one place, both launchers):
- only an interrupted run (a stop signal, a checkpoint written, exit code 0) is requeued; a run that
  failed (non-zero exit: a fault, a user's mistake, a crash at start) never is;
- a job is requeued at most `launch.max_requeues` times; each requeue is one line of
  `RUN_DIR/requeues` (`<job id> <step> <UTC time> <reason>`), counted per job id (SLURM keeps the id
  across requeues; a new submission starts a new count);
- a job whose previous requeue was at the same step made no progress since: it stops instead of
  looping (e.g. a time limit shorter than start-up plus the signal's lead time).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from unet_dist.config import Config, load_config
from unet_dist.errors import run_command
from unet_dist.rundir import (STATUS, newest_step, read_status, record_requeue, requeue_steps,  # noqa: F401
                              status_mtime, wandb_sync_command)
from unet_dist.errors import UserError

# The run directory's files (status.json, requeues, checkpoint names) belong to unet_dist.rundir;
# these launchers read and write them through it.
STATUS_FILE = STATUS  # the name in messages

# Exit codes of `python -m jobs.common after` (the batch script maps them to its own exit code).
AFTER_REQUEUE, AFTER_COMPLETED, AFTER_STOPPED, AFTER_FAILED = 0, 3, 4, 5


# ---------------------------------------------------------------------------------- config

def cluster_overrides(cfg: Config, environ=os.environ) -> list[str]:
    """Overrides a launcher adds for compute nodes: W&B `auto` becomes `offline` (compute nodes rarely
    reach the internet, even when the API key on the shared home would make `auto` go online).
    An explicit `logging.wandb` or `WANDB_MODE` is left alone."""
    if cfg.logging.wandb == "auto" and not environ.get("WANDB_MODE"):
        return ["logging.wandb=offline"]
    return []


def load_for_cluster(config: str | Path, overrides: list[str]) -> tuple[Config, list[str]]:
    """The config as the job will see it, and the full override list to pass to it."""
    cfg = load_config(config, overrides)
    extra = cluster_overrides(cfg)
    if extra:
        cfg = load_config(config, [*overrides, *extra])
    return cfg, [*overrides, *extra]


# ---------------------------------------------------------------------------- run directory

@dataclass
class Decision:
    requeue: bool
    reason: str


def requeue_decision(run_dir: str | Path, job_id: str, step: int, max_requeues: int) -> Decision:
    """Whether an interrupted run at `step` may be requeued once more (see the module's rules)."""
    done = requeue_steps(run_dir, job_id)
    if len(done) >= max_requeues:
        return Decision(False, f"job {job_id} was already requeued {len(done)} time(s) "
                               f"(launch.max_requeues={max_requeues}); continue it with --resume auto")
    if done and done[-1] >= step:
        return Decision(False, f"no progress since the previous requeue (still at step {step}): the time "
                               "left after start-up may be shorter than the signal's lead time")
    return Decision(True, f"requeue {len(done) + 1} of at most {max_requeues}, at step {step}")


# ------------------------------------------------------------------------------ the cluster

def sbatch_available() -> bool:
    return shutil.which("sbatch") is not None


def choose_cluster(requested: str) -> str:
    """`slurm` or `local`: auto picks SLURM where `sbatch` is on PATH."""
    if requested not in ("auto", "slurm", "local"):
        raise UserError(f"--cluster {requested}: expected auto, slurm or local")
    if requested == "local":
        return "local"
    if sbatch_available():
        return "slurm"
    if requested == "slurm":
        raise UserError("sbatch not found: SLURM is not installed here or not on PATH "
                        "(run on a login node, or pass --cluster local to run on this machine)")
    print("note: sbatch not found (no SLURM here): running with submitit's local executor on this machine",
          file=sys.stderr, flush=True)
    return "local"


# Lines for a submitit job's sbatch script, as in slurm/*.sbatch: rank 0 lives on the first node,
# reached at its NodeAddr (node names need not resolve), on a port derived from the job id.
MASTER_SETUP = [
    'HEAD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
    "HEAD_ADDR=\"$(scontrol show node \"$HEAD\" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | head -n 1 | cut -d= -f2)\"",
    'export MASTER_ADDR="${UNET_DIST_MASTER_ADDR:-${HEAD_ADDR:-$HEAD}}"',
    "export MASTER_PORT=$((10000 + SLURM_JOB_ID % 16000))",  # dist.SLURM_PORT_BASE, SLURM_PORT_SPAN
]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def _minutes(limit: str) -> int | None:
    """SLURM time limit text ('infinite', 'MM', 'H:MM:SS', 'D-HH:MM:SS') in minutes; None = unlimited."""
    limit = limit.strip()
    if not limit or limit in ("infinite", "UNLIMITED", "n/a"):
        return None
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if len(parts) == 1:
        hours, minutes, seconds = 0, parts[0], 0
    elif len(parts) == 2:
        hours, minutes, seconds = 0, parts[0], parts[1]
    else:
        hours, minutes, seconds = parts[-3:]
    return (int(days) if days else 0) * 1440 + hours * 60 + minutes + (1 if seconds else 0)


AUTO_CPUS_MAX = 8  # launch.cpus_per_task=0 asks for what a node offers a task, up to this many


def auto_cpus_per_task(cluster: str, partition: str, tasks_per_node: int) -> int:
    """What a task can have on the cluster's smallest node of `partition` (sinfo's CPUs per node; the
    local executor: this machine's usable cores), shared by the node's tasks, 1..AUTO_CPUS_MAX."""
    if cluster == "local":
        from unet_dist.runtime import usable_cores

        cpus = usable_cores()
    else:
        listing = _run(["sinfo", "-h", "-o", "%c", *([f"--partition={partition}"] if partition else [])])
        counts = [int(c.rstrip("+")) for c in listing.stdout.split() if c.rstrip("+").isdigit()]
        if listing.returncode != 0 or not counts:
            raise UserError("launch.cpus_per_task=0 (auto): sinfo gave no CPU counts "
                            f"({(listing.stderr or listing.stdout).strip() or 'no nodes'}); pass --cpus-per-task")
        cpus = min(counts)
    return max(1, min(AUTO_CPUS_MAX, cpus // max(1, tasks_per_node)))


def check_slurm_request(partition: str, nodes: int, tasks_per_node: int, gpus_per_node: int,
                        cpus_per_task: int, time_min: int, mem_gb: float) -> None:
    """What the cluster can tell before a submission: the partition exists, the time fits its limit,
    and `sbatch --test-only` finds nodes that can run the request. A UserError names the problem."""
    listing = _run(["sinfo", "-h", "-o", "%P|%l"])
    if listing.returncode != 0:
        raise UserError(f"sinfo failed: {(listing.stderr or listing.stdout).strip()} (is SLURM reachable?)")
    limits = {}
    for line in listing.stdout.splitlines():
        name, _, limit = line.partition("|")
        limits[name.rstrip("*")] = (_minutes(limit), name.endswith("*"))
    if partition and partition not in limits:
        raise UserError(f"--partition {partition}: no such partition (available: {', '.join(sorted(limits))})")
    name = partition or next((p for p, (_, default) in limits.items() if default), "")
    max_min = limits.get(name, (None, False))[0]
    if max_min is not None and time_min > max_min:
        raise UserError(f"--time {time_min}: partition {name} allows at most {max_min} minutes")
    cmd = ["sbatch", "--test-only", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
           f"--cpus-per-task={cpus_per_task}", f"--time={time_min}", "--wrap=true"]
    if partition:
        cmd.append(f"--partition={partition}")
    if gpus_per_node:
        cmd.append(f"--gpus-per-node={gpus_per_node}")
    if mem_gb:
        cmd.append(f"--mem={int(mem_gb * 1024)}M")
    test = _run(cmd)
    if test.returncode != 0:
        message = " ".join(line.strip() for line in (test.stderr or test.stdout).splitlines() if line.strip())
        request = (f"{nodes} node(s) x {tasks_per_node} task(s) x {cpus_per_task} CPU(s)"
                   + (f", {gpus_per_node} GPU(s) per node" if gpus_per_node else "")
                   + (f", {mem_gb:g} GB per node" if mem_gb else "") + f", {time_min} min"
                   + (f" on partition {partition}" if partition else ""))
        raise UserError(f"the cluster cannot run {request}: {message}")


# ----------------------------------------------------------------- the sbatch scripts' helpers

def cmd_prepare(args) -> int:
    """Shell assignments for the batch script: RUN_DIR, MAX_REQUEUES, START_STEP, STATUS_MTIME,
    EXTRA_OVERRIDES."""
    cfg, full = load_for_cluster(args.config, args.overrides)
    extra = full[len(args.overrides):]
    print(f"RUN_DIR={shlex.quote(str(Path(cfg.run.dir)))}")
    print(f"MAX_REQUEUES={int(cfg.launch.max_requeues)}")
    print(f"START_STEP={newest_step(cfg.run.dir)}")
    print(f"STATUS_MTIME={status_mtime(cfg.run.dir)}")
    print(f"EXTRA_OVERRIDES=({' '.join(shlex.quote(o) for o in extra)})")
    return 0


def cmd_after(args) -> int:
    """After the training step of a batch job: requeue (exit 0), completed (3), stopped (4), failed (5)."""
    status = read_status(args.run_dir, unless_mtime=args.status_mtime)

    def say(text: str) -> None:
        print(f"train.sbatch: {text}", flush=True)

    if args.exit_code != 0:
        say(f"the training step exited with code {args.exit_code}: not requeued")
        return AFTER_FAILED
    if status is None:
        say(f"the training step wrote no {STATUS_FILE} in {args.run_dir}: not requeued")
        return AFTER_FAILED
    step = int(status.get("step", 0))
    if status.get("status") == "completed":
        say(f"training completed at step {step}/{status.get('total_steps')}; checkpoint {status.get('checkpoint')}")
        if status.get("metrics"):
            say("final metrics " + json.dumps({"step": step, **status["metrics"]}))
        sync = wandb_sync_command(args.run_dir)
        if sync:
            say(f"W&B offline run: upload it with\n  {sync}")
        return AFTER_COMPLETED
    if status.get("status") != "interrupted":
        say(f"unexpected {STATUS_FILE} status {status.get('status')!r}: not requeued")
        return AFTER_FAILED
    decision = requeue_decision(args.run_dir, args.job_id, step, args.max_requeues)
    if not decision.requeue:
        say(f"interrupted at step {step}, not requeued: {decision.reason}")
        return AFTER_STOPPED
    record_requeue(args.run_dir, args.job_id, step, args.reason)
    say(f"interrupted at step {step}: {decision.reason}")
    return AFTER_REQUEUE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.common", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="resolve a config for a batch job (shell assignments on stdout)")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("after", help="decide what a batch job does after its training step")
    p.add_argument("--run-dir", required=True)
    p.add_argument("--job-id", required=True)
    p.add_argument("--exit-code", type=int, required=True)
    p.add_argument("--status-mtime", type=int, required=True,
                   help="STATUS_MTIME from prepare: a status.json still this old was not written by this run")
    p.add_argument("--max-requeues", type=int, required=True)
    p.add_argument("--reason", default="signal", help="what interrupted the run (for the requeue log)")
    p.set_defaults(func=cmd_after)
    args = parser.parse_args(argv)
    return run_command(lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())
