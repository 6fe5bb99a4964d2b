"""Kernels of specdec — Triton for the losses, numba for CPU cache dequantisation — each paired with a plain
PyTorch reference it is tested against.

Installed as ``specdec.kernels``. Importing this package never requires Triton: ``TRITON_AVAILABLE``
says whether kernels can run, and callers fall back to the PyTorch reference when it is False.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _hand_over_top_level_name() -> None:
    """Give ``import kernels`` to the installed distribution of that name when the checkout's root is on sys.path.

    This directory is installed as ``specdec.kernels``, but a checkout root on ``sys.path`` (pytest's rootdir, a
    Python started in the checkout) also makes it importable as plain ``kernels`` — the name of the Hugging Face
    package that transformers imports. Without the hand-over it would shadow that package.
    """
    root = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
    others = [entry for entry in sys.path if os.path.realpath(entry or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", others)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module  # the import statement returns what sys.modules holds after this file ran
    spec.loader.exec_module(module)


if __name__ == "kernels":
    _hand_over_top_level_name()


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
