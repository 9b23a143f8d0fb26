"""How this process runs on its device, apart from which rank it is (that is `dist`): precision and
autocast, deterministic kernels and the autotuner, glibc's handling of freed memory, and the cores
this process may use.
"""

from __future__ import annotations

import ctypes
import os

import torch

from unet_dist.errors import UserError, warn_once


def auto_precision(device_type: str, native_bf16: bool) -> str:
    """What `precision=auto` means: bf16 only where the GPU computes it natively (compute capability
    8.0+); emulated bf16 (older GPUs accept the dtype) is slower than fp32, so those get fp32."""
    return "bf16" if device_type == "cuda" and native_bf16 else "fp32"


def native_bf16(device: torch.device) -> bool:
    # including_emulation=False: torch's default also counts GPUs that merely accept the dtype.
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_precision(requested: str, device: torch.device) -> str:
    """auto: bf16 where the device computes it natively (Ampere+ GPUs), fp32 elsewhere."""
    if requested != "auto":
        if requested == "fp16" and device.type == "cpu":
            raise UserError("train.precision: fp16 needs a GPU; use bf16 or fp32 on the CPU")
        if requested == "bf16" and device.type == "cuda" and not native_bf16(device):
            warn_once(f"precision bf16: {torch.cuda.get_device_name(device)} has no native bf16, it is emulated "
                       "(slow); fp16 or fp32 is faster there")
        return requested
    return auto_precision(device.type, native_bf16(device))


def make_deterministic() -> None:
    """Deterministic kernels (train.deterministic). Called before CUDA is first used: cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG when it creates its handle, and without it torch refuses its matmuls
    under deterministic algorithms."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def tune_for_fixed_shapes(device: torch.device) -> None:
    """cuDNN's autotuner: training patches, validation tiles and predictor tiles have fixed shapes, so
    the best convolution algorithm found on the first call is reused for every later one. Not under
    deterministic algorithms (it may pick a different, non-deterministic kernel per run)."""
    if device.type == "cuda" and not torch.are_deterministic_algorithms_enabled():
        torch.backends.cudnn.benchmark = True


def autocast(device: torch.device, precision: str):
    """One autocast context for every precision; fp32 is autocast disabled."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def keep_freed_memory() -> None:
    """Stop glibc from handing large freed blocks back to the OS (the predictor, on any device).

    By default every freed block over 32 MB is unmapped and faulted in again at the next forward
    pass: 1.4 million page faults per 4-tile batch in the predict benchmark, over 40% of its CPU
    time in the kernel. The predictor's host side does the same on a smaller scale with every
    decoded chunk, batch of tiles and block (0.3-1.3 MB each, thousands per GiB): about 10% of the
    I/O pipeline's CPU time (BENCHMARKS.md, io). Keeping them costs resident memory that no longer
    shrinks after a peak.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, (1 << 31) - 1)
    libc.mallopt(m_top_pad, 256 << 20)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: SLURM's and taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1
