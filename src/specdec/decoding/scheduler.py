"""Hardware-aware prefix scheduler (DSpark Algorithm 1) and its production "dynamic top-K" variant.

Verifying more drafts raises the expected committed tokens per step but lowers the steps per second of the
target. Given each active request's predicted prefix survival ``a_{r,j}`` and a measured steps-per-second curve
``SPS(B)`` of a verification forward over ``B`` tokens, the scheduler walks the candidates ``(r, j)`` in order of
decreasing ``a`` and admits them while the expected throughput ``Θ = τ · SPS(B)`` keeps improving. The break at
the first non-improving candidate is what keeps it lossless: whether draft ``(r, j)`` is admitted is decided from
candidates ranked above it, never from confidences computed after seeing draft ``j`` (``deepspec.md`` §5.4,
Appendix A shows the global argmax over the whole path is not lossless).
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from specdec.decoding.target_session import TargetSession
from specdec.decoding.truncation import SurvivalPolicy


@dataclass
class StepsPerSecond:
    """``SPS(B)``: verification forwards per second over ``B`` tokens, linearly interpolated between profiled points.

    Beyond the largest profiled count the step time is extrapolated proportionally to ``B`` (compute-bound).
    """

    token_counts: list[int]
    steps_per_second: list[float]

    def __post_init__(self) -> None:
        if not self.token_counts or len(self.token_counts) != len(self.steps_per_second):
            raise ValueError("StepsPerSecond needs one steps/s value per profiled token count")
        order = sorted(range(len(self.token_counts)), key=lambda i: self.token_counts[i])
        self.token_counts = [int(self.token_counts[i]) for i in order]
        self.steps_per_second = [float(self.steps_per_second[i]) for i in order]
        self._table = [self._interpolate(b) for b in range(self.token_counts[-1] + 1)]  # O(1) lookups

    def _interpolate(self, tokens: int) -> float:
        counts, sps = self.token_counts, self.steps_per_second
        if tokens <= counts[0]:
            return sps[0]
        for index in range(1, len(counts)):
            if tokens <= counts[index]:
                low, high = counts[index - 1], counts[index]
                weight = (tokens - low) / (high - low)
                seconds = (1 - weight) / sps[index - 1] + weight / sps[index]  # interpolate step time
                return 1.0 / seconds
        return sps[-1] * counts[-1] / tokens

    def __call__(self, tokens: int) -> float:
        return self._table[tokens] if tokens < len(self._table) else self._interpolate(tokens)

    def to_dict(self) -> dict:
        return {"token_counts": self.token_counts, "steps_per_second": self.steps_per_second}


@torch.no_grad()
def profile_verification(
    target: nn.Module,
    token_counts: Sequence[int],
    *,
    rows: int = 1,
    context_length: int = 64,
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
    session=None,
) -> StepsPerSecond:
    """Measure ``SPS(B)`` with the engine's own verification forward (``extend``) on ``target``.

    ``rows`` requests share a KV cache of ``context_length`` random prompt tokens each; a forward over ``B``
    tokens spreads them over the rows as evenly as the padded batch allows. Each point is the median of
    ``repeats`` timed forwards (after ``warmup``), the cache cropped back after every forward. ``session``: the
    static (compiled) session a decoder verifies on, so the curve is that of the forwards it will run; default
    a fresh HF session.
    """
    device = next(target.parameters()).device
    vocab = target.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab, (rows, context_length), generator=generator).tolist()
    cuda = device.type == "cuda"
    measured = []
    with session if session is not None else TargetSession(target) as session:
        session.prefill(prompts, reserve=max(-(-int(c) // rows) for c in token_counts) + 1)
        for count in token_counts:
            if count < rows:
                raise ValueError(f"profile_verification: {count} tokens cannot give each of {rows} rows one")
            width = -(-int(count) // rows)
            lengths = torch.full((rows,), count // rows, dtype=torch.long, device=device)
            lengths[: count % rows] += 1
            input_ids = torch.randint(0, vocab, (rows, width), generator=generator).to(device)
            seconds = []
            for attempt in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize(device)
                began = time.perf_counter()
                session.extend(input_ids, lengths)
                if cuda:
                    torch.cuda.synchronize(device)
                if attempt >= warmup:
                    seconds.append(time.perf_counter() - began)
                session.keep(torch.zeros(rows, dtype=torch.long, device=device))
            measured.append(1.0 / statistics.median(seconds))
    return StepsPerSecond(list(token_counts), measured)


def _ranked(survivals: Sequence[torch.Tensor]) -> list[tuple[float, int, int]]:
    """Candidates ``(a, r, j)`` with ``a > 0``, by decreasing ``a``; ties keep prefixes in order (j, then r)."""
    candidates = []
    for row, a in enumerate(survivals):
        for slot, value in enumerate(a.tolist(), start=1):
            if value > 0:
                candidates.append((value, row, slot))
    candidates.sort(key=lambda c: (-c[0], c[2], c[1]))
    return candidates


def _lengths_of(candidates: Sequence[tuple[float, int, int]], admitted: int, rows: int) -> list[int]:
    lengths = [0] * rows
    for _, row, slot in candidates[:admitted]:
        lengths[row] = max(lengths[row], slot)
    return lengths


def prefix_schedule(
    survivals: Sequence[torch.Tensor], sps: StepsPerSecond, *, early_stop: bool = True
) -> tuple[list[int], float]:
    """Algorithm 1: drafts to verify per request, and the expected throughput ``Θ`` of that choice.

    With ``early_stop`` the walk ends at the first candidate that does not raise ``Θ`` (lossless). Without it
    the best point of the whole greedy path is returned: an unconstrained search that escapes SPS cliffs but
    may not decide a draft's admission before seeing confidences that depend on it (only usable for budgets
    computed from old rounds, as in :class:`DynamicTopK`).
    """
    rows = len(survivals)
    candidates = _ranked(survivals)
    batch, tau = rows, float(rows)
    best, admitted = tau * sps(batch), 0
    for index, (a, _, _) in enumerate(candidates, start=1):
        batch += 1
        tau += a
        throughput = tau * sps(batch)
        if throughput > best:
            best, admitted = throughput, index
        elif early_stop:
            break
    return _lengths_of(candidates, admitted, rows), best


def top_k_lengths(survivals: Sequence[torch.Tensor], budget: int) -> list[int]:
    """Drafts per request when the ``budget`` candidates of highest fresh survival are admitted (prefix-closed)."""
    candidates = _ranked(survivals)
    return _lengths_of(candidates, max(0, budget), len(survivals))


class PrefixScheduler(SurvivalPolicy):
    """Algorithm 1 with early stop over all active rows of a round (a truncation policy for the engine)."""

    def __init__(self, sps: StepsPerSecond) -> None:
        self.sps = sps
        self.budgets: list[int] = []  # drafts admitted per round, for reports

    def plan(self, survivals: Sequence[torch.Tensor]) -> list[int]:
        lengths, _ = prefix_schedule(survivals, self.sps, early_stop=True)
        self.budgets.append(sum(lengths))
        return lengths


class DynamicTopK(SurvivalPolicy):
    """Production variant (§5.5): the draft budget ``K`` comes from confidences two rounds old.

    Each round runs the unconstrained search (no early stop) on its fresh survivals and queues the resulting
    draft count; the round itself admits the top-``K`` candidates by fresh survival, with ``K`` the count
    queued ``delay`` rounds earlier (``initial_budget`` until then). ``K`` never depends on the current drafts,
    and top-K admission of a draft depends only on candidates ranked above it, so decoding stays lossless.
    """

    def __init__(self, sps: StepsPerSecond, *, delay: int = 2, initial_budget: int = 0) -> None:
        if delay < 1:
            raise ValueError(f"DynamicTopK.delay = {delay}; must be >= 1 (a budget from the current round leaks)")
        self.sps = sps
        self.pending: deque[int] = deque([initial_budget] * delay)
        self.budgets: list[int] = []  # the K used in each round

    def plan(self, survivals: Sequence[torch.Tensor]) -> list[int]:
        budget = self.pending.popleft()
        searched, _ = prefix_schedule(survivals, self.sps, early_stop=False)
        self.pending.append(sum(searched))
        self.budgets.append(budget)
        return top_k_lengths(survivals, budget)
