"""All of the distributed plumbing: who am I, which device, the process group, reductions.

The only module that reads launcher environment variables: torchrun (`RANK`, `WORLD_SIZE`,
`LOCAL_RANK`), SLURM's srun without torchrun (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`) and
submitit (which runs under SLURM or its local executor). Trainer and predictor call `setup()` once
and then read like single-process code.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import re
import sys
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
import torch.distributed as tdist

from .errors import UserError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # single | torchrun | slurm | submitit
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

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


def _slurm_port(job_id: str) -> int:
    # A port derived from the job id: jobs sharing a node don't collide, and every task agrees.
    return 20000 + int(job_id) % 20000 if job_id.isdigit() else 29500


def _local_port(job_id: str) -> int:
    # submitit's local executor: its job id is the controller's pid; every task of the job agrees.
    return 30000 + int(job_id) % 20000 if job_id.isdigit() else 29500


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


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
        )
    # Only a job step (srun, or submitit's srun) runs one process per task: the batch script's shell
    # also sees SLURM_PROCID=0 and the job's SLURM_NTASKS, but no other rank will ever join it.
    tasks = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    if "SLURM_PROCID" in environ and tasks > 1 and "SLURM_STEP_ID" not in environ:
        _warn_once(f"SLURM_NTASKS={tasks} but this process is not in a job step (no srun): it runs alone; "
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
        )
    return DistEnv()


def choose_device(requested: str, local_rank: int) -> torch.device:
    """auto: the local rank's GPU when CUDA is there, else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device: 'cuda' requested but CUDA is not available on this machine")
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        # With `--gpus-per-task=1` SLURM shows each task only its own GPU, as device 0.
        index = 0 if count == 1 else local_rank
        if index >= count:
            raise UserError(f"local rank {local_rank} has no GPU: it sees {count} (one process per GPU)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def setup(env: DistEnv, device: torch.device, timeout_s: int = 600) -> bool:
    """Join the process group (NCCL on GPUs, gloo on CPU) with a bounded collective timeout.
    Returns whether this call joined it (False with one rank, or when already joined)."""
    if env.world_size == 1 or tdist.is_initialized():
        return False
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    backend = "nccl" if device.type == "cuda" else "gloo"
    tdist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    return True


def teardown() -> None:
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


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def _reduce_device() -> torch.device:
    if tdist.is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: np.ndarray) -> np.ndarray:
    """Sum a numpy array of counts over all ranks (float64 / int64 kept exact)."""
    values = np.asarray(values)
    if not tdist.is_initialized():
        return values.copy()
    tensor = torch.from_numpy(np.ascontiguousarray(values)).to(_reduce_device())
    tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def any_rank(flag: bool) -> bool:
    """True on every rank when the flag is set on any rank (e.g. a stop signal seen by one)."""
    return bool(all_reduce_sum(np.array([int(flag)], dtype=np.int64))[0] > 0)


def broadcast_object(obj):
    if not tdist.is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 where the device computes it natively (Ampere+ GPUs), fp32 on the CPU."""
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise UserError("train.precision: fp16 needs a GPU; use bf16 or fp32 on the CPU")
        return requested
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str):
    """One autocast context for every precision; fp32 is autocast disabled."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


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


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS (CPU inference only).

    By default every freed block over 32 MB is unmapped and faulted in again at the next forward
    pass: 1.4 million page faults per 4-tile batch in the predict benchmark, over 40% of its CPU
    time in the kernel. Keeping them costs resident memory that no longer shrinks after a peak.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    libc.mallopt(m_top_pad, 256 << 20)
