"""What the submitit launchers (`jobs.train`, `jobs.predict`) share: the executor with a signalled,
requeueable job, the resource request (flags over the config's `launch` section, checked against
the cluster), the submitted job's handle, and the command-line flags and report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import submitit

from unet_dist.errors import run_command
from unet_dist.errors import UserError

from jobs import common


class NotRequeued(RuntimeError):
    """An interrupted job that may not be requeued (bound reached, no progress, or cancelled)."""


def requeue_refusal(requeues: int, max_requeues: int, done: int, done_at_requeue: int) -> str | None:
    """Why an interrupted blockwise job (predict, segment) is not requeued, or None: the bound is
    reached, or no block finished since the previous requeue (such a job would requeue forever)."""
    if requeues >= max_requeues:
        return f"already requeued {requeues} time(s) (--max-requeues {max_requeues})"
    if done <= done_at_requeue:
        return f"no block finished since the previous requeue ({done} done)"
    return None


class SubmittedJob:
    """submitit's job, except that `result()` is rank 0's return value for multi-task jobs too."""

    def __init__(self, job, cluster: str):
        self.job = job
        self.cluster = cluster

    def __getattr__(self, name):
        return getattr(self.job, name)

    @property
    def folder(self) -> Path:
        return Path(self.job.paths.folder)

    def result(self) -> dict:
        return self.job.results()[0]


def executor_for(cluster: str, folder: str | Path, *, name: str, nodes: int, tasks_per_node: int,
                 gpus_per_node: int, cpus_per_task: int, time_min: int, mem_gb: float, partition: str,
                 signal_delay_s: int, max_requeues: int, account: str = "", qos: str = "",
                 constraint: str = "") -> submitit.AutoExecutor:
    """An AutoExecutor for `cluster` (slurm | local) with a requeueable, signalled job."""
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster, slurm_max_num_timeout=max_requeues,
                                     local_max_num_timeout=max_requeues)
    params = dict(name=name, nodes=nodes, tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task,
                  timeout_min=int(time_min))
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if cluster == "slurm":
        extra = {"requeue": True}  # scontrol requeue needs it where JobRequeue=0 (a common default)
        if account:
            extra["account"] = account
        if qos:
            extra["qos"] = qos
        if constraint:
            extra["constraint"] = constraint
        params.update(slurm_signal_delay_s=signal_delay_s, slurm_additional_parameters=extra,
                      slurm_setup=list(common.MASTER_SETUP))
        if partition:
            params["slurm_partition"] = partition
        if mem_gb:
            params["mem_gb"] = mem_gb
    # (The local executor signals 30 s before its timeout; AutoExecutor does not let that be changed.)
    executor.update_parameters(**params)
    return executor


def resources(cfg, cluster: str, nodes=None, gpus_per_node=None, tasks_per_node=None, cpus_per_task=None,
              partition=None, time_min=None, mem_gb=None) -> dict:
    """The request: flags over the config's `launch` section, checked where the cluster can tell."""
    launch = cfg.launch
    req = dict(nodes=launch.nodes if nodes is None else nodes,
               gpus_per_node=launch.gpus_per_node if gpus_per_node is None else gpus_per_node,
               cpus_per_task=launch.cpus_per_task if cpus_per_task is None else cpus_per_task,
               partition=launch.partition if partition is None else partition,
               time_min=launch.time_min if time_min is None else time_min,
               mem_gb=launch.mem_gb if mem_gb is None else mem_gb)
    req["tasks_per_node"] = tasks_per_node if tasks_per_node is not None else max(1, req["gpus_per_node"])
    if req["cpus_per_task"] == 0:
        req["cpus_per_task"] = common.auto_cpus_per_task(cluster, req["partition"], req["tasks_per_node"])
        print(f"cpus per task: {req['cpus_per_task']} (what the cluster's nodes offer a task; --cpus-per-task "
              "or launch.cpus_per_task to choose)", file=sys.stderr, flush=True)
    flags = {"nodes": "--nodes", "tasks_per_node": "--tasks-per-node", "cpus_per_task": "--cpus-per-task",
             "time_min": "--time"}
    for key, flag in flags.items():
        if int(req[key]) < 1:
            raise UserError(f"{flag} {req[key]}: must be >= 1")
    if req["gpus_per_node"] < 0 or req["mem_gb"] < 0:
        raise UserError("--gpus-per-node and --mem-gb must be >= 0")
    if cluster == "local":
        if req["nodes"] != 1:
            raise UserError(f"--nodes {req['nodes']}: the local executor runs on this machine only (one node)")
    else:
        common.check_slurm_request(req["partition"], req["nodes"], req["tasks_per_node"], req["gpus_per_node"],
                                   req["cpus_per_task"], int(req["time_min"]), req["mem_gb"])
    return req


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags shared by jobs.train and jobs.predict (None: the config's `launch` value)."""
    parser.add_argument("--cluster", default="auto", choices=("auto", "slurm", "local"),
                        help="auto: SLURM where sbatch is found, else submitit's local executor")
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node; one task per GPU")
    parser.add_argument("--tasks-per-node", type=int, help="default: --gpus-per-node (at least 1); "
                                                           "e.g. 2 CPU ranks with --gpus-per-node 0")
    parser.add_argument("--cpus-per-task", type=int,
                        help="CPUs per task (default: launch.cpus_per_task; 0: what the nodes offer a task, at most 8)")
    parser.add_argument("--partition")
    parser.add_argument("--time", type=int, dest="time_min", help="time limit in minutes")
    parser.add_argument("--mem-gb", type=float, help="memory per node in GB (0: the partition's default)")
    parser.add_argument("--account", default="")
    parser.add_argument("--qos", default="")
    parser.add_argument("--constraint", default="")
    parser.add_argument("--signal-delay", type=int, default=120, dest="signal_delay_s",
                        help="seconds before the time limit at which the job checkpoints (default 120)")
    parser.add_argument("--log-dir", help="submitit folder; %%j is the job id")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its result as JSON")


def launch_from(args) -> dict:
    """submit()'s launch keywords from the flags of add_launch_arguments."""
    return {k: getattr(args, k) for k in ("cluster", "log_dir", "signal_delay_s", "account", "qos", "constraint",
                                          "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task",
                                          "partition", "time_min", "mem_gb")}


def report(job: SubmittedJob, wait: bool) -> int:
    print(f"submitted job {job.job_id} ({job.cluster}); logs in {job.folder}", flush=True)
    if not wait:
        return 0
    try:
        print(json.dumps(job.result()), flush=True)
    except Exception as exc:  # the job's own traceback is in its logs
        print(f"error: job {job.job_id} failed: {str(exc).strip()}", file=sys.stderr)
        return 1
    return 0


def submit_and_report(submit_job: Callable[[], SubmittedJob], wait: bool) -> int:
    """The launchers' command line: submit (a user's mistake is one line and exit 2), then report."""
    return run_command(lambda: report(submit_job(), wait))
