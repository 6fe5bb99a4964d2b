"""What machine a benchmark ran on, recorded beside its figures (they compare only within one machine)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_info(device: str | torch.device = "cpu") -> dict[str, object]:
    """Platform, Python, torch and its threads, cores, CPU model, Triton (None if absent) and the GPU on CUDA."""
    info: dict[str, object] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        info["cpu"] = names[0] if names else platform.processor()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
