"""CPU kernels that dequantise fp8 / fp4 cache features straight into batch rows (numba).

Dequantising is the reader's hot loop: a 512-token sample at Qwen3-4B geometry is 6.5 M values. In PyTorch it
takes a table lookup (``index_select``) plus building its int32 index, about 2 ns per value on one core; these
kernels do the lookup in one pass over the codes, about 0.35 ns per value.

Exactness is left to PyTorch: the caller builds, per scale unit, a small table of every code's value times that
unit's scale, computed in fp32 and rounded to the output dtype by PyTorch (the same products and the same
rounding as :func:`specdec.data.cache.codecs.decode_tensor_reference`); a kernel only copies table entries.
Tables and outputs are passed as integer views of the same bits, since numpy has no bfloat16.

``NUMBA_AVAILABLE`` is False when numba cannot be imported; the codecs then use their PyTorch path.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
except ImportError:  # pragma: no cover - numba is a dependency; this keeps the codecs usable without it
    numba = None

NUMBA_AVAILABLE = numba is not None


def _fp8_gather(codes: np.ndarray, tables: np.ndarray, group: int, out: np.ndarray) -> None:
    """``out[u·group + c] = tables[u, codes[u·group + c]]``: one 256-entry table per (row, scale group) unit."""
    for unit in range(tables.shape[0]):
        table = tables[unit]
        start = unit * group
        for column in range(group):
            out[start + column] = table[codes[start + column]]


def _fp4_gather(packed: np.ndarray, tables: np.ndarray, block: int, out: np.ndarray) -> None:
    """Two values per byte (low nibble first) through one 16-entry table per block of ``block`` columns."""
    half = block // 2
    for index in range(tables.shape[0]):
        table = tables[index]
        source, target = index * half, index * block
        for pair in range(half):
            byte = packed[source + pair]
            out[target + 2 * pair] = table[byte & 15]
            out[target + 2 * pair + 1] = table[byte >> 4]


if NUMBA_AVAILABLE:
    # Compiled on first call per dtype and cached next to this file, so later processes load it.
    fp8_gather = numba.njit(nogil=True, cache=True, boundscheck=False)(_fp8_gather)
    fp4_gather = numba.njit(nogil=True, cache=True, boundscheck=False)(_fp4_gather)
else:  # pragma: no cover
    fp8_gather = fp4_gather = None


def warm_up() -> None:
    """Compile (or load) the kernels for every output dtype now, e.g. before DataLoader workers are forked."""
    if not NUMBA_AVAILABLE:
        return
    for dtype in (np.int16, np.float32):
        out = np.zeros(4, dtype=dtype)
        fp8_gather(np.zeros(4, dtype=np.uint8), np.zeros((1, 256), dtype=dtype), 4, out)
        fp4_gather(np.zeros(2, dtype=np.uint8), np.zeros((1, 16), dtype=dtype), 4, out)
