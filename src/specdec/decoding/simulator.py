"""Throughput against per-user speed under concurrency, by replaying recorded decoding rounds.

A recorded round is one request's predicted prefix survivals ``a_1..a_n`` for its full drafted block and how
many leading drafts the target accepted when all were verified. Verifying only the first ``ℓ`` drafts of that
same block would have accepted ``min(accepted, ℓ)`` (the rejection tests of the kept slots are unchanged), so a
policy can be replayed without rerunning the models. Each simulated step serves ``R`` concurrent requests with
rounds drawn from the records, asks the policy for the verification lengths, and costs ``1 / SPS(B)`` seconds
(plus a fixed drafting time); sweeping ``R`` traces throughput against tokens/s per user (DSpark Fig. 7) and
the verification budget per request (Fig. 8).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specdec.decoding.proposers import Proposal
from specdec.decoding.scheduler import StepsPerSecond
from specdec.decoding.truncation import SurvivalPolicy, survival


@dataclass
class RecordedRound:
    """One request's round with every draft verified."""

    survival: list[float]  # a_1..a_n
    accepted: int  # leading drafts accepted, 0..n


@dataclass
class RoundRecorder:
    """A truncation policy that verifies every draft and records each row's survivals and acceptance.

    Pass it as the decoder's ``policy`` to collect the rounds the simulator replays.
    """

    rounds: list[RecordedRound] = field(default_factory=list)
    _pending: list[list[float]] = field(default_factory=list)

    def lengths(self, proposals: Sequence[Proposal]) -> list[int]:
        self._pending = [survival(proposal).tolist() for proposal in proposals]
        return [len(proposal.tokens) for proposal in proposals]

    def observe(self, proposed: Sequence[int], accepted: Sequence[int]) -> None:
        for values, count in zip(self._pending, accepted, strict=True):
            self.rounds.append(RecordedRound(values, int(count)))
        self._pending = []


@dataclass
class SimulatedPoint:
    """One concurrency level under one policy."""

    concurrency: int
    throughput: float  # committed tokens/s over all requests
    tokens_per_second_per_user: float
    tokens_per_step: float  # committed tokens per request and step (τ)
    verify_tokens_per_request: float  # mean 1 + ℓ (anchor + verified drafts)
    acceptance_rate: float  # accepted / verified drafts

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def simulate(
    rounds: Sequence[RecordedRound],
    make_policy: Callable[[], SurvivalPolicy],
    sps: StepsPerSecond,
    concurrency: int,
    *,
    steps: int = 200,
    draft_seconds: float = 0.0,
    seed: int = 0,
) -> SimulatedPoint:
    """Serve ``concurrency`` requests for ``steps`` steps, each request's round drawn at random from ``rounds``.

    ``make_policy`` builds a fresh policy (stateful ones, e.g. a dynamic threshold, start over per point).
    """
    if not rounds:
        raise ValueError("simulate needs recorded rounds")
    rng = random.Random(seed)
    policy = make_policy()
    seconds = tokens = verified = accepted = 0.0
    for _ in range(steps):
        batch = [rounds[rng.randrange(len(rounds))] for _ in range(concurrency)]
        survivals = [torch.tensor(record.survival, dtype=torch.float64) for record in batch]
        planned = policy.plan(survivals)
        lengths = [min(length, len(record.survival)) for length, record in zip(planned, batch, strict=True)]
        kept = [min(record.accepted, length) for record, length in zip(batch, lengths, strict=True)]
        policy.observe(lengths, kept)
        seconds += 1.0 / sps(concurrency + sum(lengths)) + draft_seconds
        tokens += sum(kept) + concurrency
        verified += sum(lengths)
        accepted += sum(kept)
    throughput = tokens / seconds
    return SimulatedPoint(
        concurrency=concurrency,
        throughput=throughput,
        tokens_per_second_per_user=throughput / concurrency,
        tokens_per_step=tokens / (steps * concurrency),
        verify_tokens_per_request=1.0 + verified / (steps * concurrency),
        acceptance_rate=accepted / verified if verified else 0.0,
    )


def sweep(
    rounds: Sequence[RecordedRound],
    make_policy: Callable[[], SurvivalPolicy],
    sps: StepsPerSecond,
    concurrencies: Sequence[int],
    **options,
) -> list[SimulatedPoint]:
    """:func:`simulate` at each concurrency level (one curve of the throughput-vs-per-user-speed plot)."""
    return [simulate(rounds, make_policy, sps, concurrency, **options) for concurrency in concurrencies]
