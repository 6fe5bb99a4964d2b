"""Codecs for the feature tensors of the target cache: bf16, fp16, fp8 e4m3 and fp4 e2m1 with scales, optional zstd.

The layer features dominate the cache (5/6 of DeepSpec's 30,726 B/token at Qwen3-4B), so their storage precision
is the main size knob. Every encoded tensor is a 2-D ``[rows, cols]`` matrix (tokens × features) and carries a
fixed 20-byte little-endian header so that a cache entry can be read without specdec:

====== ====== =========================================================================
offset type   meaning
====== ====== =========================================================================
0      4s     magic ``b"SDCT"``
4      u8     header version (1)
5      u8     codec id: 1 = bf16, 2 = fp16, 3 = fp8_e4m3, 4 = fp4_e2m1
6      u8     flags: bit 0 = the payload after the header is one zstd frame
7      u8     block: columns sharing one e4m3 block scale (fp4 only; 0 otherwise)
8      u32    rows
12     u32    cols
16     u32    scale group: columns sharing one fp32 scale (fp8 and fp4; 0 otherwise)
====== ====== =========================================================================

Payload (after zstd decompression where flagged): bf16 / fp16 — ``rows·cols`` 2-byte values (bf16 as its raw
bit pattern), row-major. fp8_e4m3 — first the scales, ``rows · cols/group`` fp32 values row-major, then
``rows·cols`` e4m3fn bytes; a value decodes as ``fp8 · scale`` of its (row, group). The scale of a group is its
absolute maximum / 448 (the largest e4m3 value), so every token — and, with a group per layer, every layer of
every token — uses the full fp8 range; an all-zero group stores scale 1.

fp4_e2m1 — two scale levels, as in NVFP4 but with 32-column blocks: first the group scales, ``rows ·
cols/group`` fp32 values; then one e4m3fn block scale per ``block`` columns, ``rows · cols/block`` bytes; then
the values, two per byte (column ``2j`` in the low nibble, ``2j+1`` in the high one), each a standard E2M1 code
(bit 3 sign, bits 0–2 index into ``0, 0.5, 1, 1.5, 2, 3, 4, 6``). A value decodes as
``e2m1 · (e4m3 block scale · group scale)``, the parenthesis rounded to fp32 first. The block scale targets
the block's absolute maximum / 6 and the group scale is the largest of those / 448. At Qwen3-4B geometry this is
0.53 bytes per value; :mod:`benchmarks.fp4_block_size` measured the block size against the others at the same
budget.
"""

from __future__ import annotations

import functools
import math
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"SDCT"
HEADER_VERSION = 1
HEADER = struct.Struct("<4sBBBBIII")
HEADER_BYTES = HEADER.size
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
FP4_MAX = 6.0  # largest E2M1 magnitude
FP4_BLOCK = 32  # columns per e4m3 block scale of fp4 (benchmarks/fp4_block_size.py)
SCALE_BYTES = 4
ZSTD_FLAG = 1
DECODE_ROWS = 32  # rows dequantised per step: the fp32 working set stays in cache

_CODEC_IDS = {"bf16": 1, "fp16": 2, "fp8_e4m3": 3, "fp4_e2m1": 4}
SCALED_CODECS = ("fp8_e4m3", "fp4_e2m1")
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_CODEC_NAMES = {value: name for name, value in _CODEC_IDS.items()}
CODECS = tuple(_CODEC_IDS)


class CodecError(ValueError):
    """An encoded tensor that cannot be decoded faithfully (bad magic, unknown codec, wrong payload size)."""


@dataclass(frozen=True)
class CodecSpec:
    """How feature tensors are stored: element codec plus an optional zstd pass over the encoded bytes."""

    name: str = "bf16"
    zstd: bool = False
    zstd_level: int = 3

    def __post_init__(self) -> None:
        if self.name not in _CODEC_IDS:
            raise ValueError(f"unknown feature codec {self.name!r}; choose one of {', '.join(CODECS)}")

    @classmethod
    def parse(cls, spec: CodecSpec | str) -> CodecSpec:
        """Accept a spec or a string such as ``"bf16"`` or ``"fp8_e4m3+zstd"``."""
        if isinstance(spec, CodecSpec):
            return spec
        name, _, suffix = spec.partition("+")
        if suffix not in ("", "zstd"):
            raise ValueError(f"feature codec {spec!r}: the only option after '+' is 'zstd'")
        return cls(name=name, zstd=suffix == "zstd")

    @property
    def extension(self) -> str:
        """File-name extension of an encoded entry, e.g. ``bf16`` or ``fp8_e4m3.zst``."""
        return f"{self.name}.zst" if self.zstd else self.name

    def __str__(self) -> str:
        return f"{self.name}+zstd" if self.zstd else self.name


@dataclass(frozen=True)
class TensorHeader:
    """The decoded 20-byte header of one encoded tensor."""

    codec: str
    zstd: bool
    rows: int
    cols: int
    scale_group: int
    block: int = 0

    @property
    def raw_payload_bytes(self) -> int:
        """Payload size before zstd, as the header implies it."""
        return payload_bytes(self.codec, self.rows, self.cols, self.scale_group, self.block)


def fp4_block(group: int) -> int:
    """Columns per fp4 block scale inside a scale group of ``group`` columns: 32, or the group's largest divisor."""
    return math.gcd(group, FP4_BLOCK) if group else FP4_BLOCK


def payload_bytes(codec: str, rows: int, cols: int, scale_group: int | None = None, block: int | None = None) -> int:
    """Bytes of an uncompressed payload: what the size estimator and the decoder's length check rely on."""
    group = scale_group or cols
    groups_per_row = cols // group if cols else 0
    if codec == "fp8_e4m3":
        return rows * cols + rows * groups_per_row * SCALE_BYTES
    if codec == "fp4_e2m1":
        blocks_per_row = cols // (block or fp4_block(group)) if cols else 0
        return rows * groups_per_row * SCALE_BYTES + rows * blocks_per_row + rows * cols // 2
    return rows * cols * 2


def _zstd():
    try:
        import zstandard
    except ImportError as error:
        raise ImportError("the zstd cache option needs the zstandard package: pip install 'specdec[zstd]'") from error
    return zstandard


def _check_matrix(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"feature codecs take a [rows, cols] matrix; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"feature codecs take floating-point tensors; got {x.dtype}")
    x = x.detach().to("cpu")
    if x.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(x))).all()):  # one pass; NaN propagates
        bad = int((~torch.isfinite(x)).any(dim=-1).nonzero()[0, 0])
        raise ValueError(f"feature row {bad} holds a NaN or infinity; the target produced non-finite activations")
    return x


def _resolve_group(codec: str, cols: int, scale_group: int | None) -> int:
    if codec not in SCALED_CODECS:
        return 0
    group = scale_group or cols
    if cols and (group <= 0 or cols % group):
        raise ValueError(f"{codec} scale group {group} does not divide the {cols} feature columns")
    if codec == "fp4_e2m1" and cols % 2:
        raise ValueError(f"fp4_e2m1 packs two values per byte: {cols} feature columns is not even")
    return group


def _fp8_encode(x: torch.Tensor, group: int) -> bytes:
    rows, cols = x.shape
    if rows == 0 or cols == 0:
        return b""
    grouped = x.float().reshape(rows, cols // group, group)
    amax = grouped.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = (grouped / scales.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX)
    codes = scaled.to(torch.float8_e4m3fn).reshape(rows, cols).view(torch.uint8)
    return scales.numpy().astype("<f4").tobytes() + codes.numpy().tobytes()


def _e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code (sign bit 3, magnitude index bits 0-2) of values already scaled into [-6, 6]."""
    values = torch.tensor(E2M1_VALUES)
    index = torch.bucketize(y.abs(), (values[1:] + values[:-1]) / 2).to(torch.uint8)
    return index | ((y < 0) & (index > 0)).to(torch.uint8) << 3


def _fp4_scales(grouped: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group scales [R, G], e4m3 block-scale codes [R, G, B/G] and the fp32 block scales they decode to."""
    rows, groups, width = grouped.shape
    amax = grouped.reshape(rows, groups, width // block, block).abs().amax(dim=-1)
    wanted = amax / FP4_MAX
    peak = wanted.amax(dim=-1)
    group_scales = torch.where(peak > 0, peak / FP8_MAX, torch.ones_like(peak))
    codes = (wanted / group_scales.unsqueeze(-1)).clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    return group_scales, codes, codes.float() * group_scales.unsqueeze(-1)


def _fp4_encode(x: torch.Tensor, group: int) -> tuple[bytes, int]:
    rows, cols = x.shape
    block = fp4_block(group)
    if rows == 0 or cols == 0:
        return b"", block
    grouped = x.float().reshape(rows, cols // group, group)
    group_scales, block_codes, block_scales = _fp4_scales(grouped, block)
    blocks = grouped.reshape(rows, -1, block)
    divisor = block_scales.reshape(rows, -1, 1)
    scaled = torch.where(divisor > 0, blocks / divisor.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    nibbles = _e2m1_codes(scaled.clamp(-FP4_MAX, FP4_MAX)).reshape(rows, cols)
    packed = nibbles[:, 0::2] | nibbles[:, 1::2] << 4
    payload = (
        group_scales.numpy().astype("<f4").tobytes()
        + block_codes.view(torch.uint8).numpy().tobytes()
        + packed.numpy().tobytes()
    )
    return payload, block


def encode_tensor(x: torch.Tensor, codec: CodecSpec | str = "bf16", scale_group: int | None = None) -> bytes:
    """Encode a ``[rows, cols]`` float tensor; ``scale_group`` columns share an fp8 scale (default: the row).

    bf16 input round-trips bit-exactly through ``bf16``; fp16 refuses values beyond its range rather than
    storing infinities, and non-finite input is refused by every codec.
    """
    spec = CodecSpec.parse(codec)
    x = _check_matrix(x)
    rows, cols = x.shape
    group = _resolve_group(spec.name, cols, scale_group)
    if spec.name == "bf16":
        payload = x.to(torch.bfloat16).contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
    elif spec.name == "fp16":
        half = x.to(torch.float16)
        if not bool(torch.isfinite(half).all()):
            peak = float(x.abs().max())
            raise ValueError(f"feature magnitude {peak:.4g} exceeds the fp16 range (65504); use bf16 or fp8_e4m3")
        payload = half.contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
    elif spec.name == "fp8_e4m3":
        payload = _fp8_encode(x, group)
    else:
        payload, block = _fp4_encode(x, group)
    flags = 0
    if spec.zstd:
        payload = _zstd().ZstdCompressor(level=spec.zstd_level).compress(payload)
        flags |= ZSTD_FLAG
    block_byte = block if spec.name == "fp4_e2m1" else 0
    header = HEADER.pack(MAGIC, HEADER_VERSION, _CODEC_IDS[spec.name], flags, block_byte, rows, cols, group)
    return header + payload


def read_header(data: bytes) -> TensorHeader:
    """Parse and check the header of an encoded tensor."""
    if len(data) < HEADER_BYTES:
        raise CodecError(f"encoded tensor is {len(data)} bytes, shorter than its {HEADER_BYTES}-byte header")
    magic, version, codec_id, flags, block, rows, cols, group = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"encoded tensor starts with {magic!r}, not the {MAGIC!r} magic")
    if version != HEADER_VERSION:
        raise CodecError(f"encoded tensor header version {version} is not supported (expected {HEADER_VERSION})")
    if codec_id not in _CODEC_NAMES:
        raise CodecError(f"encoded tensor names unknown codec id {codec_id}")
    codec = _CODEC_NAMES[codec_id]
    if codec in SCALED_CODECS and cols and (group <= 0 or cols % group):
        raise CodecError(f"encoded {codec} tensor has scale group {group} that does not divide {cols} columns")
    if codec == "fp4_e2m1" and (block <= 0 or (cols and (group % block or cols % 2))):
        raise CodecError(f"encoded fp4 tensor has block {block} that does not divide its scale group {group}")
    return TensorHeader(codec=codec, zstd=bool(flags & ZSTD_FLAG), rows=rows, cols=cols, scale_group=group, block=block)


def _view(payload: memoryview, dtype: torch.dtype, count: int, offset: int = 0) -> torch.Tensor:
    """A tensor over ``payload`` without a copy (read only here; a bytes payload is not writable)."""
    if count == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(payload, dtype=dtype, count=count, offset=offset)


def _fp8_lookup() -> torch.Tensor:
    """fp32 value of every e4m3 byte, ``[256]``."""
    return torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()


def _fp4_pair_lookup() -> torch.Tensor:
    """fp32 values of both nibbles of every byte, ``[256, 2]`` (low nibble first)."""
    magnitudes = torch.tensor(E2M1_VALUES)
    nibble = torch.cat([magnitudes, -magnitudes])
    codes = torch.arange(256)
    return torch.stack([nibble[codes & 15], nibble[codes >> 4]], dim=-1)


_FP8_LOOKUP = _fp8_lookup()
_FP4_PAIRS = _fp4_pair_lookup()
_FP4_NIBBLES = _FP4_PAIRS[:16, 0].clone()  # fp32 value of each nibble code
_KERNEL_VIEWS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.float32}
USE_COMPILED_KERNELS = True  # False: always the PyTorch path (tests compare the two)


@functools.cache
def _load_kernels():
    try:
        from specdec.kernels import feature_dequant
    except ImportError:  # pragma: no cover - the kernels ship with the package
        return None
    return feature_dequant if feature_dequant.NUMBA_AVAILABLE else None


def compiled_kernels():
    """The numba dequantisation kernels (:mod:`specdec.kernels.feature_dequant`), or None to use PyTorch."""
    return _load_kernels() if USE_COMPILED_KERNELS else None


def _bits(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of ``tensor``'s memory with a dtype numpy has (bfloat16 as int16)."""
    return tensor.view(_KERNEL_VIEWS[tensor.dtype]).numpy()


def payload_of(data: bytes | bytearray | memoryview) -> tuple[TensorHeader, memoryview]:
    """The header and the raw (decompressed, length-checked) payload of an encoded tensor."""
    header = read_header(data)
    payload = memoryview(data)[HEADER_BYTES:]
    expected = header.raw_payload_bytes
    if header.zstd:
        zstandard = _zstd()
        try:
            declared = zstandard.frame_content_size(payload)
            if declared not in (-1, expected):
                raise CodecError(f"zstd frame declares {declared} bytes; the header implies {expected}")
            payload = memoryview(zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected))
        except zstandard.ZstdError as error:
            raise CodecError(f"zstd payload does not decompress: {error}") from error
    if len(payload) != expected:
        raise CodecError(
            f"{header.codec} payload is {len(payload)} bytes; a [{header.rows}, {header.cols}] tensor needs {expected}"
        )
    return header, payload


def decode_tensor_into(data: bytes | bytearray | memoryview, out: torch.Tensor) -> TensorHeader:
    """Decode an encoded tensor straight into ``out`` (``[rows, cols]``, any float dtype), with no full copy.

    Equal to :func:`decode_tensor` bit for bit: scaled values are computed in fp32 and rounded once to ``out``.
    """
    header, payload = payload_of(data)
    rows, cols = header.rows, header.cols
    if tuple(out.shape) != (rows, cols):
        raise CodecError(f"encoded tensor is [{rows}, {cols}]; the destination is {list(out.shape)}")
    if rows == 0 or cols == 0:
        return header
    if header.codec in ("bf16", "fp16"):
        storage = torch.bfloat16 if header.codec == "bf16" else torch.float16
        out.copy_(_view(payload, torch.int16, rows * cols).view(storage).view(rows, cols))
        return header
    groups = cols // header.scale_group
    group_scales = _view(payload, torch.float32, rows * groups).view(rows, groups, 1)
    offset = rows * groups * SCALE_BYTES
    direct = out.device.type == "cpu" and out.is_contiguous() and out.dtype in _KERNEL_VIEWS and not out.requires_grad
    kernels = compiled_kernels() if direct else None
    if header.codec == "fp8_e4m3":
        if kernels is not None:
            tables = (group_scales.view(-1, 1) * _FP8_LOOKUP).to(out.dtype)  # [row·group, code]
            codes_np = np.frombuffer(payload, dtype=np.uint8, count=rows * cols, offset=offset)
            kernels.fp8_gather(codes_np, _bits(tables), header.scale_group, _bits(out).reshape(-1))
            return header
        codes = _view(payload, torch.uint8, rows * cols, offset).view(rows, cols)
        _decode_fp8_rows(codes, group_scales, header.scale_group, out)
        return header
    blocks = cols // header.block
    block_codes = _view(payload, torch.uint8, rows * blocks, offset).view(torch.float8_e4m3fn)
    scales = (block_codes.float().view(rows, groups, -1) * group_scales).view(rows, blocks, 1)
    if kernels is not None:
        tables = (scales.view(-1, 1) * _FP4_NIBBLES).to(out.dtype)  # [row·block, nibble]
        packed = np.frombuffer(payload, dtype=np.uint8, count=rows * cols // 2, offset=offset + rows * blocks)
        kernels.fp4_gather(packed, _bits(tables), header.block, _bits(out).reshape(-1))
        return header
    codes = _view(payload, torch.uint8, rows * cols // 2, offset + rows * blocks).view(rows, cols // 2)
    step = max(1, min(rows, DECODE_ROWS))
    index = torch.empty(step * codes.shape[1], dtype=torch.int32)
    values = torch.empty(step * codes.shape[1], 2)  # values of both nibbles of each code byte
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        count = (stop - start) * codes.shape[1]
        chunk_index = index[:count]
        chunk_index.copy_(codes[start:stop].reshape(-1))
        chunk = torch.index_select(_FP4_PAIRS, 0, chunk_index, out=values[:count]).view(stop - start, -1, header.block)
        chunk.mul_(scales[start:stop])
        out[start:stop].copy_(chunk.view(stop - start, cols))
    return header


def _decode_fp8_rows(codes: torch.Tensor, scales: torch.Tensor, group: int, out: torch.Tensor) -> None:
    """Dequantise fp8 codes ``[rows, cols]`` with their group scales ``[rows, groups, 1]`` into ``out``.

    One lookup per value: for each chunk of rows a table holds every code's value already scaled by its (row,
    group) scale and rounded to ``out``'s dtype — the same fp32 product, rounded once, as the reference — and the
    code plus 256 × its (row, group) position indexes it, written straight into ``out`` when it is contiguous.
    """
    rows, cols = codes.shape
    groups = cols // group
    step = max(1, min(rows, DECODE_ROWS))
    unit = torch.arange(step * groups, dtype=torch.int32).mul_(256).view(step, groups, 1)
    position = unit.expand(step, groups, group).reshape(step, cols)  # 256 × (row · groups + group) of each value
    index = torch.empty(step, cols, dtype=torch.int32)
    products = torch.empty(step, groups, 256)  # fp32 code value × scale
    table = products if out.dtype == torch.float32 else torch.empty(step, groups, 256, dtype=out.dtype)
    direct = out.is_contiguous()
    staging = None if direct else torch.empty(step, cols, dtype=out.dtype)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        n = stop - start
        torch.mul(scales[start:stop], _FP8_LOOKUP, out=products[:n])
        if table is not products:
            table[:n].copy_(products[:n])
        index[:n].copy_(codes[start:stop]).add_(position[:n])  # two same-dtype passes beat one mixed-dtype add
        target = out[start:stop] if direct else staging[:n]
        torch.index_select(table[:n].view(-1), 0, index[:n].view(-1), out=target.view(-1))
        if not direct:
            out[start:stop].copy_(target)


def decode_tensor_reference(data: bytes | bytearray | memoryview, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The payload layout above read in the plainest way: what :func:`decode_tensor_into` must equal."""
    header, payload = payload_of(data)
    rows, cols, group = header.rows, header.cols, header.scale_group
    raw = np.frombuffer(payload, dtype=np.uint8)
    if header.codec in ("bf16", "fp16"):
        storage = torch.bfloat16 if header.codec == "bf16" else torch.float16
        return torch.from_numpy(raw.view("<i2").copy()).view(storage).reshape(rows, cols).to(dtype)
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols, dtype=dtype)
    groups = cols // group
    scales = torch.from_numpy(raw[: rows * groups * SCALE_BYTES].view("<f4").copy()).reshape(rows, groups, 1)
    rest = raw[rows * groups * SCALE_BYTES :]
    if header.codec == "fp8_e4m3":
        values = torch.from_numpy(rest.copy()).view(torch.float8_e4m3fn).float().reshape(rows, groups, group)
        return (values * scales).reshape(rows, cols).to(dtype)
    blocks = cols // header.block
    block_scales = torch.from_numpy(rest[: rows * blocks].copy()).view(torch.float8_e4m3fn).float()
    block_scales = (block_scales.reshape(rows, groups, -1) * scales).reshape(rows, blocks, 1)
    packed = torch.from_numpy(rest[rows * blocks :].copy()).long().reshape(rows, cols // 2)
    nibbles = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(rows, cols)
    magnitude = torch.tensor(E2M1_VALUES)[nibbles & 7]
    values = torch.where(nibbles >= 8, -magnitude, magnitude)
    return (values.reshape(rows, blocks, header.block) * block_scales).reshape(rows, cols).to(dtype)


def decode_tensor(data: bytes | bytearray | memoryview, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode bytes from :func:`encode_tensor` into a new ``[rows, cols]`` tensor of ``dtype``."""
    header = read_header(data)
    out = torch.empty(header.rows, header.cols, dtype=dtype)
    decode_tensor_into(data, out)
    return out


@dataclass(frozen=True)
class CodecErrorStats:
    """Per-token reconstruction error of one codec on one tensor (token = row)."""

    codec: str
    rows: int
    rel_l2_mean: float  # mean over tokens of ‖x − x̂‖₂ / ‖x‖₂
    rel_l2_max: float
    max_abs_mean: float  # mean over tokens of max |x − x̂|
    max_abs_max: float
    bytes_per_row: float  # encoded bytes per token, header included


def measure_codec_error(x: torch.Tensor, codec: CodecSpec | str, scale_group: int | None = None) -> CodecErrorStats:
    """Round-trip ``x`` through ``codec`` and report the per-token relative L2 and max-abs error."""
    spec = CodecSpec.parse(codec)
    encoded = encode_tensor(x, spec, scale_group=scale_group)
    reference = x.detach().float().cpu()
    error = decode_tensor(encoded, torch.float32) - reference
    norms = reference.norm(dim=-1)
    nonzero = norms > 0
    rel_l2 = error.norm(dim=-1)[nonzero] / norms[nonzero]
    max_abs = error.abs().amax(dim=-1) if error.numel() else torch.zeros(0)
    rows = max(int(x.shape[0]), 1)
    return CodecErrorStats(
        codec=str(spec),
        rows=int(x.shape[0]),
        rel_l2_mean=float(rel_l2.mean()) if rel_l2.numel() else 0.0,
        rel_l2_max=float(rel_l2.max()) if rel_l2.numel() else 0.0,
        max_abs_mean=float(max_abs.mean()) if max_abs.numel() else 0.0,
        max_abs_max=float(max_abs.max()) if max_abs.numel() else 0.0,
        bytes_per_row=len(encoded) / rows,
    )
