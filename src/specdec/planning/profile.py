"""A latency profile: what the parts of a decoding round cost at each concurrency, measured or given as a table.

A chain round of ``R`` concurrent requests with ``L`` drafts each costs one draft step of ``R`` rows, one target
forward over ``R × (L + 1)`` tokens, and a fixed overhead (the acceptance test, committing); a plain decoding step
costs one target forward over ``R`` tokens plus its own overhead. :func:`measure_profile` times these parts on
the local target with the engine's own decoder, so a prediction is made from the same forwards a measurement
would run; a serving stack's own figures go into the same YAML by hand (see ``docs/evaluation.md``).

The target table is keyed either by total tokens per forward (``{tokens: ms}``, the usual serving-engine
profile) or by concurrency then tokens per request (``{rows: {tokens: ms}}``, what a padded batch costs);
between profiled points the step time is interpolated linearly, beyond the largest it grows in proportion.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml


def interpolate(table: Mapping[int, float], x: float) -> float:
    """Linear interpolation of ``table`` at ``x``; constant below its first key, proportional beyond its last."""
    if not table:
        raise ValueError("an empty latency table")
    keys = sorted(table)
    if x <= keys[0]:
        return float(table[keys[0]])
    for low, high in itertools.pairwise(keys):
        if x <= high:
            weight = (x - low) / (high - low)
            return (1 - weight) * float(table[low]) + weight * float(table[high])
    return float(table[keys[-1]]) * x / keys[-1]


def _per_concurrency(value: float | Mapping[int, float], rows: int) -> float:
    return float(value) if isinstance(value, int | float) else interpolate(value, rows)


@dataclass
class LatencyProfile:
    """Milliseconds of a round's parts. ``draft_ms`` / overheads: one number, or ``{concurrency: ms}``."""

    target_forward_ms: dict  # {tokens: ms} or {rows: {tokens per row: ms}}
    draft_ms: float | dict[int, float]
    round_overhead_ms: float | dict[int, float] = 0.0
    plain_overhead_ms: float | dict[int, float] = 0.0
    source: dict = field(default_factory=dict)  # where it was measured (device, engine, target, drafter)

    def __post_init__(self) -> None:
        if not self.target_forward_ms:
            raise ValueError("LatencyProfile.target_forward_ms is empty")
        self.target_forward_ms = {int(k): _int_keys(v) for k, v in self.target_forward_ms.items()}
        self.draft_ms = _int_keys(self.draft_ms)
        self.round_overhead_ms = _int_keys(self.round_overhead_ms)
        self.plain_overhead_ms = _int_keys(self.plain_overhead_ms)

    @property
    def by_concurrency(self) -> bool:
        return isinstance(next(iter(self.target_forward_ms.values())), dict)

    def forward_ms(self, rows: int, tokens_per_row: int) -> float:
        """One target forward over ``rows`` requests of ``tokens_per_row`` tokens each."""
        if not self.by_concurrency:
            return interpolate(self.target_forward_ms, rows * tokens_per_row)
        tables = self.target_forward_ms
        levels = sorted(tables)
        if rows in tables:
            return interpolate(tables[rows], tokens_per_row)
        return interpolate({level: interpolate(tables[level], tokens_per_row) for level in levels}, rows)

    def round_ms(self, rows: int, drafts: int) -> float:
        """A chain round: draft ``drafts`` tokens per request, verify them with the anchor, commit."""
        draft = _per_concurrency(self.draft_ms, rows) if drafts > 0 else 0.0
        return draft + self.forward_ms(rows, drafts + 1) + _per_concurrency(self.round_overhead_ms, rows)

    def plain_step_ms(self, rows: int) -> float:
        return self.forward_ms(rows, 1) + _per_concurrency(self.plain_overhead_ms, rows)

    def to_dict(self) -> dict:
        return {
            "target_forward_ms": self.target_forward_ms,
            "draft_ms": self.draft_ms,
            "round_overhead_ms": self.round_overhead_ms,
            "plain_overhead_ms": self.plain_overhead_ms,
            "source": self.source,
        }

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> LatencyProfile:
        data = yaml.safe_load(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a latency profile is a YAML mapping (target_forward_ms, draft_ms, ...)")
        known = {"target_forward_ms", "draft_ms", "round_overhead_ms", "plain_overhead_ms", "source"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown latency-profile field(s) {unknown}; expected {sorted(known)}")
        for required in ("target_forward_ms", "draft_ms"):
            if required not in data:
                raise ValueError(f"{path}: the latency profile needs {required!r}")
        try:
            return cls(**data)
        except (TypeError, ValueError, AttributeError) as error:
            raise ValueError(f"{path}: {error}") from error


def _int_keys(value):
    if isinstance(value, Mapping):
        return {int(k): _int_keys(v) for k, v in value.items()}
    return float(value)


def _median_ms(seconds: Sequence[float]) -> float:
    return 1000 * statistics.median(seconds)


@torch.no_grad()
def measure_profile(decoder, prompt: Sequence[int], concurrencies: Sequence[int], repeats: int = 7) -> LatencyProfile:
    """Time a :class:`specdec.decoding.SpeculativeDecoder`'s round parts at each concurrency, on its own session.

    At each concurrency ``R``: the target forward over ``R`` rows of ``1 .. K + 1`` tokens (``K`` the decoder's
    draft cap; widths interleaved so drift on a busy machine hits all alike), then full-length decodes of ``R``
    copies of ``prompt`` for the draft step and the round overhead (verify time minus its forward), and a plain
    decode for the plain step's overhead. Compiles what it runs (warm the decoder up first).
    """
    device = next(decoder.target.parameters()).device
    cuda = device.type == "cuda"
    widths = range(1, decoder.max_draft_tokens + 2)
    forward: dict[int, dict[int, float]] = {}
    draft: dict[int, float] = {}
    overhead: dict[int, float] = {}
    plain_overhead: dict[int, float] = {}
    saved_policy = decoder.policy
    for rows in concurrencies:
        prompts = [list(prompt)] * rows
        seconds: dict[int, list[float]] = {width: [] for width in widths}
        with decoder._session() as session:
            session.prefill(prompts, reserve=len(widths) * (repeats + 2))
            keep = torch.ones(rows, dtype=torch.long, device=device)
            for attempt in range(repeats + 2):
                for width in widths:
                    ids = torch.as_tensor((list(prompt) * width)[:width], device=device)[None].expand(rows, -1)
                    if cuda:
                        torch.cuda.synchronize(device)
                    began = time.perf_counter()
                    session.extend(ids.contiguous(), torch.full((rows,), width, dtype=torch.long, device=device))
                    session.keep(keep)
                    if cuda:
                        torch.cuda.synchronize(device)
                    if attempt >= 2:
                        seconds[width].append(time.perf_counter() - began)
        forward[rows] = {width: _median_ms(values) for width, values in seconds.items()}
        decoder.policy = None
        try:
            outputs = [decoder.generate(prompts, torch.Generator(device=device).manual_seed(s)) for s in range(3)]
        finally:
            decoder.policy = saved_policy
        rounds = sum(output.target_forwards for output in outputs)
        draft[rows] = 1000 * sum(output.draft_seconds for output in outputs) / max(rounds, 1)
        verify = 1000 * sum(output.verify_seconds for output in outputs) / max(rounds, 1)
        overhead[rows] = max(verify - forward[rows][decoder.max_draft_tokens + 1], 0.0)
        plain = decoder.autoregressive(prompts, torch.Generator(device=device).manual_seed(0))
        step = 1000 * (plain.seconds - plain.prefill_seconds) / max(plain.target_forwards, 1)
        plain_overhead[rows] = max(step - forward[rows][1], 0.0)
    return LatencyProfile(
        target_forward_ms=forward,
        draft_ms=draft,
        round_overhead_ms=overhead,
        plain_overhead_ms=plain_overhead,
        source={"device": str(device), "engine": decoder.engine, "max_draft_tokens": decoder.max_draft_tokens},
    )
