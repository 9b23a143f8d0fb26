"""All of the distributed plumbing: who am I, which device, the process group, reductions.

The only module that reads launcher environment variables: torchrun (`RANK`, `WORLD_SIZE`,
`LOCAL_RANK`), SLURM's srun without torchrun (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) and
submitit (which runs under SLURM or its local executor). Trainer, predictor and evaluate hold the
process group with `process_group(...)` for their work and then read like single-process code.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import os
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.distributed as tdist

from unet_dist.errors import UserError, warn_once


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # single | torchrun | slurm | submitit
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    local_world_size: int = 1  # ranks on this node (torchrun's LOCAL_WORLD_SIZE, SLURM's tasks on the node)
    # torchrun's restarts of the workers (`--max-restarts`): > 0 means this process replaces ranks that
    # failed, and the run continues from its own latest checkpoint.
    restart_count: int = 0
    agent_store: bool = False  # torchrun's agent hosts the TCPStore at master_addr:master_port

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist: 'node[03-05,7],gpu1' -> 'node03'."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        return nodelist
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


# Rendezvous ports derived from a job id, so jobs sharing a node don't collide and every task agrees.
# Both ranges stay below Linux's ephemeral ports (32768-60999, net.ipv4.ip_local_port_range), which
# the kernel hands to outgoing connections (NCCL's and gloo's own sockets among them): a port from
# there can be taken by the time rank 0 binds it. They also avoid torchrun's default 29500.
# slurm/*.sbatch and jobs/common.py compute SLURM_PORT_BASE + SLURM_JOB_ID % SLURM_PORT_SPAN in shell;
# tests/test_dist.py checks that they agree with this.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 16000  # 10000-25999
LOCAL_PORT_BASE, LOCAL_PORT_SPAN = 26000, 3000  # 26000-28999: submitit's local executor
EPHEMERAL_PORTS = (32768, 60999)


def _slurm_port(job_id: str) -> int:
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN if job_id.isdigit() else 29500


def _local_port(job_id: str) -> int:
    # submitit's local executor: its job id is the controller's pid; every task of the job agrees.
    return LOCAL_PORT_BASE + int(job_id) % LOCAL_PORT_SPAN if job_id.isdigit() else 29500


def tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """This node's entry of SLURM's compressed task counts: '2(x3),1' is 2, 2, 2, 1 for nodes 0-3."""
    counts: list[int] = []
    for part in filter(None, tasks_per_node.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            return 1
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else (counts[0] if counts else 1)


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Rank and world size from torchrun, else srun/submitit (SLURM variables), else submitit's local
    executor (`SUBMITIT_LOCAL_*`), else one process."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(
            rank=int(environ["RANK"]),
            world_size=int(environ["WORLD_SIZE"]),
            local_rank=int(environ.get("LOCAL_RANK", 0)),
            launcher="torchrun",
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", 1)),
            restart_count=int(environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
            agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
        )
    # Only a job step (srun, or submitit's srun) runs one process per task: the batch script's shell
    # also sees SLURM_PROCID=0 and the job's SLURM_NTASKS, but no other rank will ever join it.
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    if "SLURM_PROCID" in environ and tasks > 1 and "SLURM_STEP_ID" not in environ:
        warn_once(f"SLURM_NTASKS={tasks} but this process is not in a job step (no srun): it runs alone; "
                   "start it with srun (see slurm/train.sbatch) to use every task")
    elif "SLURM_PROCID" in environ and tasks > 1:
        job_id = environ.get("SLURM_JOB_ID", "")
        return DistEnv(
            rank=int(environ["SLURM_PROCID"]),
            world_size=tasks,
            local_rank=int(environ.get("SLURM_LOCALID", 0)),
            launcher="submitit" if "SUBMITIT_EXECUTOR" in environ else "slurm",
            master_addr=environ.get("MASTER_ADDR") or first_host(environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=int(environ.get("MASTER_PORT") or _slurm_port(job_id)),
            local_world_size=tasks_on_node(environ.get("SLURM_STEP_TASKS_PER_NODE")
                                           or environ.get("SLURM_TASKS_PER_NODE") or "1",
                                           int(environ.get("SLURM_NODEID", 0))),
        )
    if environ.get("SUBMITIT_EXECUTOR") == "local" and int(environ.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:
        # Local tasks are one machine's processes: the group meets on the loopback interface.
        job_id = environ.get("SUBMITIT_LOCAL_JOB_ID", "")
        return DistEnv(
            rank=int(environ.get("SUBMITIT_LOCAL_GLOBALID", 0)),
            world_size=int(environ["SUBMITIT_LOCAL_NTASKS"]),
            local_rank=int(environ.get("SUBMITIT_LOCAL_LOCALID", 0)),
            launcher="submitit",
            master_addr=environ.get("MASTER_ADDR") or "127.0.0.1",
            master_port=int(environ.get("MASTER_PORT") or _local_port(job_id)),
            local_world_size=int(environ["SUBMITIT_LOCAL_NTASKS"]),
        )
    return DistEnv()


def slurm_node_gpus(environ: Mapping[str, str] = os.environ) -> int | None:
    """GPUs SLURM gave this job step on this node (gres), or None when SLURM manages no GPUs here."""
    listed = environ.get("SLURM_STEP_GPUS") or environ.get("SLURM_JOB_GPUS")
    return len([g for g in listed.split(",") if g.strip()]) if listed else None


def gpu_index(local_rank: int, local_world_size: int, visible: int, node_gpus: int | None = None) -> int:
    """Which of the `visible` GPUs a local rank uses; a UserError when ranks of a node would share one.

    NCCL refuses two ranks on one GPU ("Duplicate GPU detected") at its first collective, after
    every rank has started: better one line before. One visible GPU per rank is SLURM's per-task
    binding (`--gpus-per-task=1`: each task sees only its own, as device 0); that needs SLURM to have
    given the node at least one GPU per task (`node_gpus`). Otherwise local rank r takes GPU r.
    """
    ranks = max(local_world_size, local_rank + 1)
    if visible >= ranks:
        return local_rank
    if visible == 1 and node_gpus is not None and node_gpus >= ranks:
        return 0
    raise UserError(f"{ranks} ranks on this node but {visible} visible GPU(s): each rank needs its own GPU "
                    f"(NCCL refuses to share one); start at most {visible} rank(s) per node "
                    f"(torchrun --nproc_per_node={visible}, srun --ntasks-per-node={visible}) or run on the CPU "
                    "(train.device=cpu, predict --device cpu)")


def choose_device(requested: str, local_rank: int, local_world_size: int = 1) -> torch.device:
    """auto: the local rank's GPU when CUDA is there, else the CPU. Refuses (UserError) more ranks on
    a node than it has GPUs, before any process group exists."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' requested but CUDA is not available on this machine")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        index = gpu_index(local_rank, local_world_size, torch.cuda.device_count(), slurm_node_gpus())
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


# A week: longer than any job's time limit, so the scheduler, not this deadline, ends a stuck job.
PATIENT_TIMEOUT_S = 7 * 24 * 3600

# Side groups made when the process group is joined (every rank calls new_group in the same order):
#   host:    gloo, the job's timeout: reductions of host values (counts, stop flags) on CPU tensors,
#            so on GPUs they neither wait for the device's queue nor copy to it (None: the default
#            group is gloo already);
#   patient: gloo, PATIENT_TIMEOUT_S: the meeting at the end of work whose length grows with the
#            data (a prediction's last reduction waits for the slowest rank, possibly hours later).
#            A rank that dies still ends it at once (its sockets close); only a hung one waits.
_groups: dict[str, object] = {}


def setup(env: DistEnv, device: torch.device, timeout_s: int = 600) -> bool:
    """Join the process group (NCCL on GPUs, gloo on CPU) with a bounded collective timeout.
    Returns whether this call joined it (False with one rank, or when already joined)."""
    if env.world_size == 1 or tdist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    store = _store_of_this_restart(env, timeout_s)
    tdist.init_process_group(
        backend=backend,
        init_method=None if store else "env://",
        store=store,
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    if backend == "nccl":
        _groups["host"] = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    _groups["patient"] = tdist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=PATIENT_TIMEOUT_S))
    return True


_joins = itertools.count()  # every rank joins the same groups in the same order


def _store_of_this_restart(env: DistEnv, timeout_s: int):
    """Under torchrun, the agent's TCPStore with a prefix of this restart's own; None elsewhere.

    The agent keeps one store for all restarts of its workers, and `env://` puts every round's keys
    under the same prefix: a restarted rank can read the gloo address of a peer that died with the
    previous round and fail in `connectFullMesh ... Connection refused` (reproduced with a plain
    15-line gloo script under torchrun 2.13 --standalone --max-restarts). Keys of one round only
    (`restart-<TORCHELASTIC_RESTART_COUNT>`) never meet a dead round's; a join count in the prefix
    keeps a second group of the same round (a later `process_group`) apart from the first in the same way.
    """
    if not env.agent_store:
        return None
    store = tdist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False,
                           timeout=datetime.timedelta(seconds=timeout_s))
    return tdist.PrefixStore(f"unet_dist/restart-{env.restart_count}/join-{next(_joins)}", store)


def teardown() -> None:
    _groups.clear()
    if tdist.is_initialized():
        tdist.destroy_process_group()


@contextlib.contextmanager
def process_group(env: DistEnv, device: torch.device, timeout_s: int = 600):
    """The process group for a block of work: joined on entry, left on exit, unless a caller above
    already holds it. `cv` holds one group across all its folds because a second join under
    torchrun fails (the agent's store still has the first group's keys)."""
    joined = setup(env, device, timeout_s)
    if not joined:
        # Joining is a meeting point (every rank has made its own checks before anyone acts, e.g.
        # takes the prediction lock); a held group must be one too, on the way in and out.
        barrier()
    try:
        yield
    finally:
        if joined:
            teardown()
    if not joined:  # not on an error: the other ranks may never come
        barrier()


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier(patient: bool = False) -> None:
    """All ranks meet; `patient`: without the job's timeout (see PATIENT_TIMEOUT_S)."""
    if tdist.is_initialized():
        tdist.barrier(group=_groups.get("patient") if patient else None)


def all_reduce_sum(values: np.ndarray, patient: bool = False) -> np.ndarray:
    """Sum a numpy array of counts over all ranks (float64 / int64 kept exact), on the CPU.

    `patient`: the ranks may arrive hours apart (the end of a prediction), so no job timeout applies.
    """
    values = np.asarray(values)
    if not tdist.is_initialized():
        return values.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(values).copy())
    tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM, group=_groups.get("patient" if patient else "host"))
    return tensor.numpy()


def any_rank(flag: bool) -> bool:
    """True on every rank when the flag is set on any rank (e.g. a stop signal seen by one)."""
    return bool(all_reduce_sum(np.array([int(flag)], dtype=np.int64))[0] > 0)


def all_gather_object(obj, patient: bool = False) -> list:
    """Every rank's `obj` (small, picklable), in rank order, on every rank; `patient` as in all_reduce_sum."""
    if not tdist.is_initialized():
        return [obj]
    gathered = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, obj, group=_groups.get("patient" if patient else "host"))
    return gathered


def all_gather_arrays(values: np.ndarray, patient: bool = False) -> list[np.ndarray]:
    """Every rank's 1D array (any dtype, lengths may differ; each rank the same dtype), in rank
    order, on every rank, bit for bit: sent as raw bytes on the gloo side group, without pickling
    (tables of millions of pairs). `patient` as in all_reduce_sum."""
    values = np.ascontiguousarray(values).reshape(-1)
    if not tdist.is_initialized():
        return [values.copy()]
    group = _groups.get("patient" if patient else "host")
    raw = values.view(np.uint8)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(tdist.get_world_size())]
    tdist.all_gather(sizes, torch.tensor([raw.size], dtype=torch.int64), group=group)
    longest = max(int(s) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:raw.size] = torch.from_numpy(raw.copy())
    parts = [torch.empty(longest, dtype=torch.uint8) for _ in sizes]
    tdist.all_gather(parts, padded, group=group)
    return [p.numpy()[:int(s)].view(values.dtype).copy() for p, s in zip(parts, sizes)]


def broadcast_object(obj):
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def loader_workers(requested: int, env: DistEnv, environ: Mapping[str, str] = os.environ) -> int:
    """DataLoader workers this rank can run without oversubscribing what SLURM gave it.

    SLURM_CPUS_PER_TASK CPUs serve one rank per task (srun) or all the ranks torchrun starts in the
    task; one CPU stays for the rank's main process. Outside SLURM the config's number is used as is.
    """
    cpus = environ.get("SLURM_CPUS_PER_TASK", "")
    if not cpus.isdigit() or requested == 0:
        return requested
    ranks = env.local_world_size if env.launcher == "torchrun" else 1
    per_rank = max(1, int(cpus) // max(1, ranks))
    usable = max(0, per_rank - 1)
    if requested > usable:
        if env.is_main:
            warn_once(f"data.num_workers={requested} but SLURM gives this rank {per_rank} CPU(s) "
                       f"(SLURM_CPUS_PER_TASK={cpus}): using {usable} loader worker(s); ask for "
                       f"--cpus-per-task={(requested + 1) * ranks} to run {requested}")
        return usable
    return requested


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (e.g. BatchNorm running statistics).

    DDP broadcasts buffers at the start of each forward, but the forward then updates them with each
    rank's own batch; before validating or saving, all ranks must hold the same ones.
    """
    if not tdist.is_initialized():
        return
    with torch.no_grad():
        for buffer in model.buffers():
            tdist.broadcast(buffer, src=0)


def replica_spread(model: torch.nn.Module) -> float:
    """Largest difference between ranks of a parameter and buffer checksum: 0.0 when in sync."""
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    with torch.no_grad():
        checksum = sum(float(t.double().sum()) + float(t.double().pow(2).sum()) for t in tensors)
    values = np.zeros(world_size())
    values[rank()] = checksum
    values = all_reduce_sum(values)
    return float(values.max() - values.min())


