"""Triton kernels of specdec, each paired with a plain PyTorch reference it is tested against.

Installed as ``specdec.kernels``. Importing this package never requires Triton: ``TRITON_AVAILABLE``
says whether kernels can run, and callers fall back to the PyTorch reference when it is False.
"""

from __future__ import annotations

import importlib.util
import os


def _triton_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install is the same as none for dispatch purposes
        return False
    return True


TRITON_AVAILABLE: bool = _triton_available()
TRITON_INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"


def kernels_usable_on(device_type: str) -> bool:
    """Whether Triton kernels can run for tensors on ``device_type`` (CUDA, or CPU under the interpreter)."""
    if not TRITON_AVAILABLE:
        return False
    return device_type == "cuda" or (device_type == "cpu" and TRITON_INTERPRET)
