"""Truncation policies: how many of a round's drafts go to verification.

A policy sees the drafted blocks of all active rows (tokens and confidence logits, i.e. drafter-side information
only) and returns how many leading drafts of each row to verify; after verification it is told what was accepted.
Dropping a suffix of drafts before verification keeps decoding lossless as long as the decision to verify slot
``k`` does not depend on draft ``k`` itself or later ones. DSpark's confidence ``c_k`` is computed from the drafts
before slot ``k``, so the cumulative survival ``a_k = prod_{i<=k} c_i`` is such a decision variable; anything
learned from acceptance (the dynamic threshold) may only use rounds that are already verified.

DeepSpec truncates on the per-step confidence ``c_k`` (``deepspec.md`` §7.8); a threshold is only meaningful on
the cumulative survival ``a_k``, the predicted probability that slots 1..k are all accepted.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import torch

from specdec.decoding.proposers import Proposal


def survival(proposal: Proposal) -> torch.Tensor:
    """Predicted prefix survival ``a_k`` [n] (fp64, on the CPU) of a proposal's drafts.

    The one place confidences are read: ``Proposal.confidence_logits`` are already calibrated by the drafter
    (its STS temperatures), so policies never see raw head outputs.
    """
    logits = proposal.confidence_logits
    if logits is None:
        raise ValueError("confidence-based truncation needs a drafter with a confidence head (DSpark)")
    logits = logits[: len(proposal.tokens)].detach().double().cpu()
    return torch.sigmoid(logits).cumprod(dim=-1)


class TruncationPolicy(Protocol):
    """Chooses how many leading drafts of each active row to verify this round."""

    def lengths(self, proposals: Sequence[Proposal]) -> list[int]:
        """Drafts to verify per row (each at most that row's proposal length)."""
        ...

    def observe(self, proposed: Sequence[int], accepted: Sequence[int]) -> None:
        """Verified and accepted drafts per row of the round just verified."""
        ...


class SurvivalPolicy(ABC):
    """A policy that decides from the rows' predicted prefix survivals alone (also what the simulator replays)."""

    @abstractmethod
    def plan(self, survivals: Sequence[torch.Tensor]) -> list[int]:
        """Drafts to verify per row, given each row's ``a_k`` [n]."""

    def lengths(self, proposals: Sequence[Proposal]) -> list[int]:
        return self.plan([survival(proposal) for proposal in proposals])

    def observe(self, proposed: Sequence[int], accepted: Sequence[int]) -> None:
        """Stateless policies ignore the outcome; adaptive ones override this."""
        del proposed, accepted


class FixedLength(SurvivalPolicy):
    """A static budget: the first ``drafts`` drafts of every row (MTP-style fixed verification width)."""

    def __init__(self, drafts: int) -> None:
        if drafts < 0:
            raise ValueError(f"FixedLength.drafts = {drafts}; must be >= 0")
        self.drafts = drafts

    def plan(self, survivals: Sequence[torch.Tensor]) -> list[int]:
        return [min(self.drafts, len(a)) for a in survivals]

    def lengths(self, proposals: Sequence[Proposal]) -> list[int]:  # needs no confidences
        return [min(self.drafts, len(proposal.tokens)) for proposal in proposals]


def truncate(proposals: Sequence[Proposal], lengths: Sequence[int]) -> list[Proposal]:
    """Each proposal cut to its first ``lengths[i]`` drafts (confidences cut alike)."""
    cut = []
    for proposal, length in zip(proposals, lengths, strict=True):
        length = max(0, min(int(length), len(proposal.tokens)))
        confidence = proposal.confidence_logits
        cut.append(
            Proposal(
                tokens=proposal.tokens[:length],
                probabilities=proposal.probabilities[:length],
                confidence_logits=None if confidence is None else confidence[:length],
            )
        )
    return cut


def threshold_length(survival_: torch.Tensor, threshold: float) -> int:
    """Leading drafts whose cumulative survival is at least ``threshold`` (``a_k`` never increases with k)."""
    return int((survival_ >= threshold).long().cumprod(dim=-1).sum())


class StaticThreshold(SurvivalPolicy):
    """Verify drafts while their predicted prefix survival ``a_k`` stays at or above a fixed threshold."""

    def __init__(self, threshold: float) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"StaticThreshold.threshold = {threshold}; must be in [0, 1]")
        self.threshold = threshold

    def plan(self, survivals: Sequence[torch.Tensor]) -> list[int]:
        return [threshold_length(a, self.threshold) for a in survivals]


class DynamicThreshold(SurvivalPolicy):
    """A survival threshold steered so the acceptance rate of verified drafts approaches ``target_rate``.

    The acceptance rate (accepted / verified drafts) over the last ``window`` rounds drives an integral
    controller: too many rejections raise the threshold, a rate above target lowers it. The threshold used in a
    round depends only on rounds verified before it, so truncation stays lossless.

    Args:
        target_rate: the acceptance rate of verified drafts to aim for, in (0, 1).
        window: rounds in the sliding window.
        gain: threshold change per unit of rate error per round (large gains oscillate between cutting everything
            and verifying everything, and the pooled rate is then dominated by the wide rounds).
        initial: the threshold before any round was observed (default ``target_rate``: starting at 0 fills the
            window with full blocks of low acceptance).
        bounds: the threshold stays inside these.
    """

    def __init__(
        self,
        target_rate: float,
        *,
        window: int = 32,
        gain: float = 0.05,
        initial: float | None = None,
        bounds: tuple[float, float] = (0.0, 0.95),
    ) -> None:
        if not 0.0 < target_rate < 1.0:
            raise ValueError(f"DynamicThreshold.target_rate = {target_rate}; must be in (0, 1)")
        if window < 1:
            raise ValueError(f"DynamicThreshold.window = {window}; must be >= 1")
        self.target_rate = target_rate
        self.gain = gain
        self.bounds = bounds
        initial = target_rate if initial is None else initial
        self.threshold = min(max(initial, bounds[0]), bounds[1])
        self.history: deque[tuple[int, int]] = deque(maxlen=window)  # (verified, accepted) per round

    @property
    def observed_rate(self) -> float | None:
        verified = sum(v for v, _ in self.history)
        return None if verified == 0 else sum(a for _, a in self.history) / verified

    def plan(self, survivals: Sequence[torch.Tensor]) -> list[int]:
        return [threshold_length(a, self.threshold) for a in survivals]

    def observe(self, proposed: Sequence[int], accepted: Sequence[int]) -> None:
        verified = int(sum(proposed))
        low, high = self.bounds
        if verified == 0:  # the threshold cut every draft: no evidence, so relax it slowly (never stuck above all)
            relax = self.gain * (1.0 - self.target_rate) / self.history.maxlen
            self.threshold = max(self.threshold - relax, low)
            return
        self.history.append((verified, int(sum(accepted))))
        rate = self.observed_rate
        self.threshold = min(max(self.threshold + self.gain * (self.target_rate - rate), low), high)
