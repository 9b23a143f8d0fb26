"""Training as a submitit job: SLURM where `sbatch` is found, submitit's local executor elsewhere.

    python -m jobs.train --config CFG --nodes 2 --gpus-per-node 4 --partition P --time 240 [key=value ...]
    python -m jobs.train --config configs/smoke.yaml --cluster local --gpus-per-node 0 --tasks-per-node 2 --wait

    from jobs.train import submit
    job = submit("configs/isbi2012.yaml", ["run.dir=/shared/runs/isbi"], nodes=2, gpus_per_node=4, partition="gpu")
    print(job.job_id, job.folder)   # logs: RUN_DIR/jobs/<job id>/<job id>_<task>_log.{out,err}
    metrics = job.result()          # {"step": ..., "val/dice_membrane": ..., ...}, rank 0's

One task per GPU (tasks_per_node = gpus_per_node): each task calls `unet_dist.train.train` in-process
and takes its rank from SLURM's variables (or the local executor's) through `dist.detect_env`.
Defaults for nodes, GPUs, CPUs, partition, time, memory and the requeue bound come from the config's
`launch` section; the flags override them.

Timeout and preemption: submitit asks SLURM for `--signal=USR2@<signal delay>` and `--requeue`. The
trainer's handler turns the signal into a checkpoint at the next step boundary and returns
"interrupted"; the job then hands over to submitit's own path (`checkpoint()` below, then
`scontrol requeue`, or the local executor's restart), and the requeued job continues with
`--resume auto`. Requeues are bounded (see `jobs.common`); a job that fails never requeues. SIGTERM
alone (a cancel) stops without a requeue.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import submitit

from unet_dist.errors import UserError

from jobs import common
from jobs.launch import (NotRequeued, SubmittedJob, add_launch_arguments, executor_for, launch_from, resources,
                     submit_and_report)

# What a stop signal means: USR1/USR2 = time limit or preemption notice (requeue); TERM alone = cancel.
REQUEUE_SIGNALS = {signal.SIGUSR1, signal.SIGUSR2}


class SignalsSeen:
    """Which signals reached this process while the trainer's handlers were installed.

    The trainer's handlers only set a flag (saving inside a handler hangs), so they do not say which
    signal it was. Python's wakeup fd receives the number of every signal a Python handler caught,
    whoever installed the handler; read it once the trainer returns.
    """

    def __init__(self):
        self.signals: set[int] | None = None  # None: could not tell

    def __enter__(self) -> "SignalsSeen":
        self._fds = None
        try:
            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
            os.set_blocking(write_fd, False)
            self._previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
            self._fds = (read_fd, write_fd)
        except ValueError:  # not the main thread: no wakeup fd
            pass
        return self

    def __exit__(self, *exc) -> None:
        if self._fds is None:
            return
        read_fd, write_fd = self._fds
        ours = signal.set_wakeup_fd(self._previous) == write_fd  # else someone replaced it meanwhile
        data = b""
        try:
            while chunk := os.read(read_fd, 4096):
                data += chunk
        except BlockingIOError:
            pass
        os.close(read_fd)
        os.close(write_fd)
        self.signals = set(data) if ours else None

    @property
    def cancelled(self) -> bool:
        """SIGTERM and no USR1/USR2: a cancel (or a preemption SLURM requeues by itself). When the
        record is missing or holds no stop signal, assume a requeue notice."""
        stops = (self.signals or set()) & (REQUEUE_SIGNALS | {signal.SIGTERM})
        return bool(stops) and not stops & REQUEUE_SIGNALS


def _restarted() -> bool:
    """True when SLURM restarted this job (our requeue, a preemption, or an admin's requeue)."""
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


class TrainJob(submitit.helpers.Checkpointable):
    """The callable a submitit task runs: train, then requeue through submitit if interrupted."""

    def __init__(self, config: str, overrides: list[str], resume: str = "never"):
        self.config = str(config)
        self.overrides = list(overrides)
        self.resume = resume
        self._step: int | None = None  # where the trainer stopped, for checkpoint()

    def __call__(self) -> dict:
        from unet_dist.config import load_config
        from unet_dist.train.loop import train

        cfg = load_config(self.config, self.overrides)
        env = submitit.JobEnvironment()
        # submitit's checkpoint-and-requeue handler: the trainer replaces it while it runs.
        requeue = signal.getsignal(getattr(signal, "SIG" + env.USR_SIG))
        resume = "auto" if _restarted() else self.resume
        with SignalsSeen() as seen:
            result = train(cfg, resume=resume)
        summary = {"step": result.step, **result.metrics}
        if result.status == "completed":
            if result.reports:
                sync = common.wandb_sync_command(cfg.run.dir)
                if sync:
                    print(f"W&B offline run: upload it with\n  {sync}", flush=True)
            return summary
        self._step = result.step
        if seen.cancelled:
            raise NotRequeued(f"stopped by SIGTERM at step {result.step} (cancelled?): not requeued; "
                              f"continue with --resume auto")
        if not callable(requeue):
            raise NotRequeued(f"interrupted at step {result.step} outside a submitit job: nothing to requeue")
        # Rank 0: checkpoint() below, `scontrol requeue` (or the local executor's restart code), exit.
        # Other ranks return; the requeue ends them (SLURM) or the local executor restarts them.
        requeue(getattr(signal, "SIG" + env.USR_SIG), None)
        return {**summary, "status": "interrupted"}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """submitit calls this on rank 0 before requeueing: bounded, recorded in RUN_DIR/requeues."""
        from unet_dist.config import load_config

        cfg = load_config(self.config, self.overrides)
        job_id = submitit.JobEnvironment().job_id
        step = self._step if self._step is not None else common.newest_step(cfg.run.dir)
        decision = common.requeue_decision(cfg.run.dir, job_id, step, cfg.launch.max_requeues)
        if not decision.requeue:
            print(f"jobs.train: interrupted at step {step}, not requeued: {decision.reason}", file=sys.stderr,
                  flush=True)
            raise NotRequeued(f"interrupted at step {step}, not requeued: {decision.reason}")
        common.record_requeue(cfg.run.dir, job_id, step, "submitit")
        print(f"jobs.train: interrupted at step {step}: {decision.reason}", flush=True)
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides, resume="auto"))


def submit(config: str | Path, overrides=(), *, cluster: str = "auto", resume: str = "never",
           log_dir: str | Path | None = None, signal_delay_s: int = 120, account: str = "", qos: str = "",
           constraint: str = "", **request) -> SubmittedJob:
    """Check what can be checked here, then submit; `request` holds nodes, gpus_per_node,
    tasks_per_node, cpus_per_task, partition, time_min, mem_gb (defaults: the config's launch)."""
    kind = common.choose_cluster(cluster)
    overrides = list(overrides)
    if kind == "slurm":
        cfg, overrides = common.load_for_cluster(config, overrides)
    else:
        from unet_dist.config import load_config
        cfg = load_config(config, overrides)
    req = resources(cfg, kind, **request)  # what the cluster can run (quick: no torch yet)
    from unet_dist.rundir import refuse_earlier_run
    from unet_dist.train.loop import check_inputs

    check_inputs(cfg)  # the store, slices and patch size, before anything is queued
    if resume == "never":
        refuse_earlier_run(cfg.run.dir)
    if resume not in ("never", "auto") and not Path(resume).is_file():
        raise UserError(f"--resume {resume}: checkpoint not found")
    folder = Path(log_dir) if log_dir else Path(cfg.run.dir) / "jobs" / "%j"
    name = "unet-train" + (f"-{cfg.run.name}" if cfg.run.name else "")
    executor = executor_for(kind, folder.absolute(), name=name, signal_delay_s=signal_delay_s,
                            max_requeues=cfg.launch.max_requeues, account=account, qos=qos,
                            constraint=constraint, **req)
    job = executor.submit(TrainJob(str(Path(config).absolute()), overrides, resume))
    return SubmittedJob(job, kind)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", default="never", help="never (default), auto, or a checkpoint path")
    add_launch_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100 run.dir=X")
    args = parser.parse_args(argv)
    return submit_and_report(lambda: submit(args.config, args.overrides, resume=args.resume, **launch_from(args)),
                             args.wait)


if __name__ == "__main__":
    sys.exit(main())
