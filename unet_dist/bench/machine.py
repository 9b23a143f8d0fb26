"""The machine a benchmark ran on and the versions it ran with, for every suite's report."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

# Dense (no 2:4 sparsity) bf16 tensor-core peak per device, FLOP/s, from the vendors' data sheets.
# Matched against torch.cuda.get_device_name(), first hit wins (so "H100 PCIe" before "H100", and
# "H200 NVL" before "H200").
PEAK_BF16_DENSE = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200 NVL", 835e12),  # the PCIe card: lower clocks and power than the SXM module
    ("H200", 989e12),  # SXM
    ("GH200", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_bf16_flops(device_name: str | None) -> float | None:
    """The device's bf16 dense peak in FLOP/s, or None (CPUs, GPUs not in the table)."""
    if not device_name:
        return None
    for key, peak in PEAK_BF16_DENSE:
        if key.lower() in device_name.lower():
            return peak
    return None


def machine_info(device) -> dict:
    import psutil
    import torch

    from unet_dist import runtime

    info = {
        "cpu": cpu_model(),
        "cores": runtime.usable_cores(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "device": str(device),
        "gpu": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "count": torch.cuda.device_count(),
                       "memory_gb": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}",
                       "peak_bf16_dense_tflops": (peak_bf16_flops(props.name) or 0) / 1e12 or None}
    return info


def versions() -> dict:
    import numcodecs
    import scipy
    import tifffile
    import torch
    import zarr

    from unet_dist import __version__

    found = {"unet_dist": __version__, "python": platform.python_version(), "torch": torch.__version__,
             "numpy": np.__version__, "scipy": scipy.__version__, "zarr": zarr.__version__,
             "numcodecs": numcodecs.__version__, "tifffile": tifffile.__version__,
             "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None}
    try:
        import monai

        found["monai"] = monai.__version__
    except ImportError:
        found["monai"] = None
    return found
