"""Codecs for the feature tensors of the target cache: bf16, fp16 and fp8 e4m3 with fp32 scales, optional zstd.

The layer features dominate the cache (5/6 of DeepSpec's 30,726 B/token at Qwen3-4B), so their storage precision
is the main size knob. Every encoded tensor is a 2-D ``[rows, cols]`` matrix (tokens × features) and carries a
fixed 20-byte little-endian header so that a cache entry can be read without specdec:

====== ====== =========================================================================
offset type   meaning
====== ====== =========================================================================
0      4s     magic ``b"SDCT"``
4      u8     header version (1)
5      u8     codec id: 1 = bf16, 2 = fp16, 3 = fp8_e4m3
6      u8     flags: bit 0 = the payload after the header is one zstd frame
7      u8     reserved (0)
8      u32    rows
12     u32    cols
16     u32    scale group: columns sharing one fp32 scale (fp8 only; 0 otherwise)
====== ====== =========================================================================

Payload (after zstd decompression where flagged): bf16 / fp16 — ``rows·cols`` 2-byte values (bf16 as its raw
bit pattern), row-major. fp8_e4m3 — first the scales, ``rows · cols/group`` fp32 values row-major, then
``rows·cols`` e4m3fn bytes; a value decodes as ``fp8 · scale`` of its (row, group). The scale of a group is its
absolute maximum / 448 (the largest e4m3 value), so every token — and, with a group per layer, every layer of
every token — uses the full fp8 range; an all-zero group stores scale 1.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

MAGIC = b"SDCT"
HEADER_VERSION = 1
HEADER = struct.Struct("<4sBBBBIII")
HEADER_BYTES = HEADER.size
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
SCALE_BYTES = 4
ZSTD_FLAG = 1

_CODEC_IDS = {"bf16": 1, "fp16": 2, "fp8_e4m3": 3}
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

    @property
    def raw_payload_bytes(self) -> int:
        """Payload size before zstd, as the header implies it."""
        return payload_bytes(self.codec, self.rows, self.cols, self.scale_group)


def payload_bytes(codec: str, rows: int, cols: int, scale_group: int | None = None) -> int:
    """Bytes of an uncompressed payload: what the size estimator and the decoder's length check rely on."""
    if codec == "fp8_e4m3":
        group = scale_group or cols
        groups_per_row = cols // group if cols else 0
        return rows * cols + rows * groups_per_row * SCALE_BYTES
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
    if codec != "fp8_e4m3":
        return 0
    group = scale_group or cols
    if cols and (group <= 0 or cols % group):
        raise ValueError(f"fp8 scale group {group} does not divide the {cols} feature columns")
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
    else:
        payload = _fp8_encode(x, group)
    flags = 0
    if spec.zstd:
        payload = _zstd().ZstdCompressor(level=spec.zstd_level).compress(payload)
        flags |= ZSTD_FLAG
    header = HEADER.pack(MAGIC, HEADER_VERSION, _CODEC_IDS[spec.name], flags, 0, rows, cols, group)
    return header + payload


def read_header(data: bytes) -> TensorHeader:
    """Parse and check the header of an encoded tensor."""
    if len(data) < HEADER_BYTES:
        raise CodecError(f"encoded tensor is {len(data)} bytes, shorter than its {HEADER_BYTES}-byte header")
    magic, version, codec_id, flags, _reserved, rows, cols, group = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CodecError(f"encoded tensor starts with {magic!r}, not the {MAGIC!r} magic")
    if version != HEADER_VERSION:
        raise CodecError(f"encoded tensor header version {version} is not supported (expected {HEADER_VERSION})")
    if codec_id not in _CODEC_NAMES:
        raise CodecError(f"encoded tensor names unknown codec id {codec_id}")
    codec = _CODEC_NAMES[codec_id]
    if codec == "fp8_e4m3" and cols and (group <= 0 or cols % group):
        raise CodecError(f"encoded fp8 tensor has scale group {group} that does not divide {cols} columns")
    return TensorHeader(codec=codec, zstd=bool(flags & ZSTD_FLAG), rows=rows, cols=cols, scale_group=group)


def decode_tensor(data: bytes, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode bytes from :func:`encode_tensor` into a ``[rows, cols]`` tensor of ``dtype``."""
    header = read_header(data)
    payload = memoryview(data)[HEADER_BYTES:]
    expected = header.raw_payload_bytes
    if header.zstd:
        zstandard = _zstd()
        try:
            declared = zstandard.frame_content_size(payload)
            if declared not in (-1, expected):
                raise CodecError(f"zstd frame declares {declared} bytes; the header implies {expected}")
            payload = zstandard.ZstdDecompressor().decompress(payload, max_output_size=expected)
        except zstandard.ZstdError as error:
            raise CodecError(f"zstd payload does not decompress: {error}") from error
    if len(payload) != expected:
        raise CodecError(
            f"{header.codec} payload is {len(payload)} bytes; a [{header.rows}, {header.cols}] tensor needs {expected}"
        )
    rows, cols = header.rows, header.cols
    if header.codec in ("bf16", "fp16"):
        storage = torch.bfloat16 if header.codec == "bf16" else torch.float16
        values = torch.from_numpy(np.frombuffer(payload, dtype="<i2").copy()).view(storage).reshape(rows, cols)
        return values.to(dtype)
    if rows == 0 or cols == 0:
        return torch.zeros(rows, cols, dtype=dtype)
    groups = cols // header.scale_group
    scale_count = rows * groups
    scales = torch.from_numpy(np.frombuffer(payload, dtype="<f4", count=scale_count).copy()).reshape(rows, groups, 1)
    codes = np.frombuffer(payload, dtype=np.uint8, offset=scale_count * SCALE_BYTES).copy()
    values = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().reshape(rows, groups, header.scale_group)
    return (values * scales).reshape(rows, cols).to(dtype)


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
