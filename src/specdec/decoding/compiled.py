"""A decoding step compiled once per input shapes, that falls back to eager execution instead of failing.

Decoding calls the same few functions thousands of times with a handful of shapes (one per token-count
bucket), which is what ``torch.compile`` with ``dynamic=False`` is for: each shape compiles once, the first
time it is seen, and every later call runs the compiled graph (Inductor on CPU; on CUDA the same graph, and
``mode="reduce-overhead"`` captures it as a CUDA graph). A compiler failure must never end an evaluation, so the
first call of each shape is guarded: on any error the step warns once and runs eager from then on.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

BACKEND = "inductor"  # module-level so a test can force a compiler failure with a backend that raises
RECOMPILE_LIMIT = 1024


def compile_mode(device: torch.device) -> str | None:
    """CUDA: capture the compiled graph as a CUDA graph (per-launch overhead gone); CPU: plain Inductor."""
    return "reduce-overhead" if device.type == "cuda" else None


def _signature(args: tuple[Any, ...]) -> tuple:
    """What a ``dynamic=False`` graph specialises on: each tensor's shape, strides and dtype (lists recursively).

    Strides count: a view (``token[:, None]``) and a fresh tensor of the same shape are different graphs, and
    a call that skips guard evaluation must never meet a graph it has not compiled.
    """
    key = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            key.append((tuple(arg.shape), arg.stride(), arg.dtype))
        elif isinstance(arg, list | tuple):
            key.append(_signature(tuple(arg)))
        else:
            key.append(arg)
    return tuple(key)


class CompiledStep:
    """``function`` compiled per input signature (when ``enabled``), timed, with a one-time eager fallback.

    Attributes:
        compile_seconds: wall-clock time of the first call of every signature (compilation plus one run).
        error: the first line of the compiler error that switched this step to eager, else None.
    """

    def __init__(self, function: Callable, *, enabled: bool, name: str, device: torch.device) -> None:
        self.function = function
        self.name = name
        self.enabled = enabled
        self.cuda_graphs = enabled and compile_mode(device) == "reduce-overhead"
        self.compile_seconds = 0.0
        self.error: str | None = None
        self._seen: set[tuple] = set()
        self._compiled: Callable | None = None
        if enabled:
            try:
                self._compiled = torch.compile(
                    function, dynamic=False, fullgraph=True, backend=BACKEND, mode=compile_mode(device)
                )
            except Exception as error:  # a compiler that cannot even start means eager
                self._fall_back(error)

    @property
    def compiled(self) -> bool:
        """Whether calls run a compiled graph (False when disabled or after a compiler failure)."""
        return self._compiled is not None

    def _fall_back(self, error: Exception) -> None:
        self.error = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
        self._compiled = None
        warnings.warn(
            f"torch.compile of the {self.name} failed ({self.error}); decoding continues eager "
            "(set DecodingOptions.engine='eager' or 'static' to skip compilation)",
            RuntimeWarning,
            stacklevel=3,
        )

    def __call__(self, *args):
        if self._compiled is None:
            return self.function(*args)
        key = (_signature(args), torch.is_grad_enabled())  # grad mode is a guard of every graph too
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are no longer read
        if key in self._seen:
            # a seen signature: its graph and guards exist, and only the guards that tell this step's graphs
            # apart (the bucket's shapes) need evaluating; full guard evaluation would cost ~0.3 ms per call
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self._own(self._compiled(*args))
        began = time.perf_counter()
        try:
            # each session, bucket, batch size and buffer size is one cache entry of the same code object:
            # more than dynamo's default of 8 in a process that builds several sessions (an evaluation per
            # checkpoint, a test suite); the limit is only consulted when a new entry is compiled
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                output = self._compiled(*args)
        except Exception as error:  # any compiler failure: run this and later calls eager
            self._fall_back(error)
            return self.function(*args)
        self.compile_seconds += time.perf_counter() - began
        self._seen.add(key)
        return self._own(output)

    def _own(self, output):
        """CUDA-graph outputs live in the graph's memory pool and are overwritten by its next replay; callers
        keep some (the features a drafter reads next round), so they get copies."""
        if not self.cuda_graphs:
            return output
        if isinstance(output, torch.Tensor):
            return output.clone()
        if isinstance(output, tuple | list):
            return type(output)(self._own(item) for item in output)
        return output
