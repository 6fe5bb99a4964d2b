"""Plan a target cache before building it: bytes per token and totals per codec, next to DeepSpec's layout.

DeepSpec stores per token an int32 id, an all-ones uint8 attention mask, a uint8 loss mask, the bf16 layer
features (L·H values) and the bf16 final-normed last hidden state (H values) at every position — 30,726 B/token
for Qwen3-4B (H = 2560, L = 5) — plus a 56-byte index record per sample. specdec's layout
(:mod:`specdec.data.cache.format`) drops the attention mask, keeps the last hidden state only at supervised
positions, and adds per-sample container overhead (tar headers and padding, .npy and codec headers, meta.json)
that is amortised here over the average sample length; fp8 adds one fp32 scale per token per layer, fp4 that
scale plus one e4m3 byte per 32 values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from specdec.data.cache.codecs import CODECS, HEADER_BYTES, CodecSpec, payload_bytes
from specdec.data.cache.format import TAR_BLOCK
from specdec.data.cache.writer import DEFAULT_MAX_SHARD_BYTES

DEEPSPEC_INDEX_RECORD_BYTES = 56
NPY_HEADER_BYTES = 128  # numpy's .npy v1 header of a 1-D array, padded to 64-byte alignment
DEFAULT_META_BYTES = 400  # a meta.json with a short key and source; it fills one 512-byte tar block
TAR_END_BYTES = 2 * TAR_BLOCK
TAR_RECORD_BYTES = 20 * TAR_BLOCK  # tar pads the archive to a multiple of this


def deepspec_bytes_per_token(hidden_size: int, num_layers: int) -> int:
    """DeepSpec's per-token bytes: int32 id + uint8 attention mask + uint8 loss mask + bf16 features + bf16 last."""
    return 4 + 1 + 1 + num_layers * hidden_size * 2 + hidden_size * 2


@dataclass(frozen=True)
class CacheEstimate:
    """Size of one cache layout for a given data set."""

    layout: str  # "DeepSpec" or the specdec codec, e.g. "fp8_e4m3+zstd"
    hidden_size: int
    num_layers: int
    num_samples: int
    tokens: int
    supervised_fraction: float
    token_bytes: float  # bytes proportional to tokens, per token (ids, masks, features, last hidden)
    sample_overhead_bytes: float  # fixed bytes per sample (headers, padding, meta, index)
    shard_overhead_bytes: float  # fixed bytes per shard (tar end marker and record padding)
    num_shards: int

    @property
    def total_bytes(self) -> float:
        return (
            self.token_bytes * self.tokens
            + self.sample_overhead_bytes * self.num_samples
            + self.shard_overhead_bytes * self.num_shards
        )

    @property
    def bytes_per_token(self) -> float:
        """All-in bytes per token: the total divided by the token count."""
        return self.total_bytes / self.tokens if self.tokens else 0.0


def _counts(tokens: int | Sequence[int] | None, num_samples: int | None, avg_tokens: float | None) -> tuple[int, int]:
    if tokens is not None and not isinstance(tokens, int):
        lengths = list(tokens)
        return len(lengths), sum(lengths)
    if tokens is not None and num_samples is not None:
        return num_samples, tokens
    if num_samples is not None and avg_tokens is not None:
        return num_samples, round(num_samples * avg_tokens)
    if tokens is not None and avg_tokens is not None:
        return max(1, round(tokens / avg_tokens)), tokens
    raise ValueError("give per-sample token counts, or two of: tokens (total), num_samples, avg_tokens")


def estimate_cache_size(
    hidden_size: int,
    num_layers: int,
    tokens: int | Sequence[int] | None = None,
    num_samples: int | None = None,
    avg_tokens: float | None = None,
    supervised_fraction: float = 0.6,
    codec: CodecSpec | str = "bf16",
    compression_ratio: float = 1.0,
    samples_per_shard: int | None = None,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
    meta_bytes: int = DEFAULT_META_BYTES,
) -> CacheEstimate:
    """Estimate a specdec cache. ``tokens`` is a total or a list of per-sample lengths.

    ``compression_ratio`` (raw / zstd bytes of the feature payloads) only applies with a zstd codec; measure it
    on a small cache of the real target, since it depends on the activations.
    """
    spec = CodecSpec.parse(codec)
    if not 0.0 <= supervised_fraction <= 1.0:
        raise ValueError(f"supervised_fraction must lie in [0, 1]; got {supervised_fraction}")
    if compression_ratio <= 0:
        raise ValueError(f"compression_ratio must be positive; got {compression_ratio}")
    samples, total_tokens = _counts(tokens, num_samples, avg_tokens)
    ratio = compression_ratio if spec.zstd else 1.0
    width = num_layers * hidden_size
    features = payload_bytes(spec.name, 1, width, hidden_size) / ratio
    last_hidden = payload_bytes(spec.name, 1, hidden_size, hidden_size) / ratio
    token_bytes = 4 + 1 + features + supervised_fraction * last_hidden
    data_entries = 4  # features, input_ids, last_hidden, loss_mask: each pads to 512 on average by half a block
    sample_overhead = (
        2 * NPY_HEADER_BYTES
        + 2 * HEADER_BYTES
        + 5 * TAR_BLOCK
        + data_entries * (TAR_BLOCK - 1) / 2
        + math.ceil(meta_bytes / TAR_BLOCK) * TAR_BLOCK
    )
    shard_overhead = TAR_END_BYTES + (TAR_RECORD_BYTES - TAR_BLOCK) / 2
    if samples_per_shard:
        shards = math.ceil(samples / samples_per_shard)
    else:
        data = token_bytes * total_tokens + sample_overhead * samples
        shards = math.ceil(data / max_shard_bytes) if max_shard_bytes else 1
    return CacheEstimate(
        layout=str(spec),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_samples=samples,
        tokens=total_tokens,
        supervised_fraction=supervised_fraction,
        token_bytes=token_bytes,
        sample_overhead_bytes=sample_overhead,
        shard_overhead_bytes=shard_overhead,
        num_shards=max(shards, 1 if samples else 0),
    )


def estimate_deepspec_cache_size(
    hidden_size: int,
    num_layers: int,
    tokens: int | Sequence[int] | None = None,
    num_samples: int | None = None,
    avg_tokens: float | None = None,
    supervised_fraction: float = 0.6,
    max_shard_bytes: int = 64 << 30,
) -> CacheEstimate:
    """DeepSpec's layout for the same data: :func:`deepspec_bytes_per_token` plus its 56-byte index record."""
    samples, total_tokens = _counts(tokens, num_samples, avg_tokens)
    token_bytes = deepspec_bytes_per_token(hidden_size, num_layers)
    return CacheEstimate(
        layout="DeepSpec",
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_samples=samples,
        tokens=total_tokens,
        supervised_fraction=supervised_fraction,
        token_bytes=token_bytes,
        sample_overhead_bytes=DEEPSPEC_INDEX_RECORD_BYTES,
        shard_overhead_bytes=0.0,
        num_shards=max(1, math.ceil(token_bytes * total_tokens / max_shard_bytes)),
    )


def compare_layouts(
    hidden_size: int,
    num_layers: int,
    tokens: int | Sequence[int] | None = None,
    num_samples: int | None = None,
    avg_tokens: float | None = None,
    supervised_fraction: float = 0.6,
    codecs: Sequence[CodecSpec | str] = CODECS,
    compression_ratios: dict[str, float] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[CacheEstimate]:
    """DeepSpec's reference estimate followed by specdec's for each codec, for one data set."""
    counts = dict(tokens=tokens, num_samples=num_samples, avg_tokens=avg_tokens)
    estimates = [
        estimate_deepspec_cache_size(hidden_size, num_layers, **counts, supervised_fraction=supervised_fraction)
    ]
    for codec in codecs:
        spec = CodecSpec.parse(codec)
        estimates.append(
            estimate_cache_size(
                hidden_size,
                num_layers,
                **counts,
                supervised_fraction=supervised_fraction,
                codec=spec,
                compression_ratio=(compression_ratios or {}).get(str(spec), 1.0),
                max_shard_bytes=max_shard_bytes,
            )
        )
    return estimates


def format_bytes(count: float) -> str:
    """Decimal units, as disk sizes are quoted (DeepSpec's "38 TB")."""
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count:.0f} B"


def format_estimates(estimates: Sequence[CacheEstimate]) -> str:
    """A plain-text table; ratios are against the first row (DeepSpec's layout from :func:`compare_layouts`)."""
    first = estimates[0]
    lines = [
        f"target cache estimate: hidden {first.hidden_size}, {first.num_layers} layers, {first.num_samples:,} samples, "
        f"{first.tokens:,} tokens (avg {first.tokens / max(first.num_samples, 1):,.0f}/sample), "
        f"{first.supervised_fraction:.0%} supervised",
        f"{'layout':<18} {'B/token (data)':>15} {'B/token (all-in)':>17} {'total':>11} {'shards':>8} {'vs first':>9}",
    ]
    for estimate in estimates:
        lines.append(
            f"{estimate.layout:<18} {estimate.token_bytes:>15,.1f} {estimate.bytes_per_token:>17,.1f} "
            f"{format_bytes(estimate.total_bytes):>11} {estimate.num_shards:>8,} "
            f"{estimate.total_bytes / first.total_bytes:>8.3f}×"
        )
    return "\n".join(lines)
