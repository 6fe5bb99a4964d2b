"""How many tokens to draft, chosen from measured costs and the acceptance seen so far.

A round with ``L`` drafts commits ``1 + a_0 + … + a_{L-1}`` tokens on average (``a_k``: prefix survival, the
probability that drafts 0..k are all accepted) and costs one draft step plus a verification over ``L + 1``
tokens. Drafting more is only worth it while the extra expected tokens outrun the extra verification cost, and
where that stops depends on the machine (an overhead-bound CPU forward is nearly flat in the token count, a
compute-bound one is not) and on the drafter. :func:`measure_round_costs` times both parts on the decoder's own
session; :class:`ThroughputDraftLength` re-chooses ``L`` after every round from acceptance counts of the rounds
already verified, so the choice never depends on the drafts it truncates (decoding stays lossless).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specdec.decoding.proposers import Proposal


@dataclass
class RoundCosts:
    """Seconds of one round's parts on this machine, measured on the decoder's own (compiled) session."""

    draft_seconds: float  # one draft step
    verify_seconds: dict[int, float]  # target forward over n tokens (anchor + n - 1 drafts) + acceptance test
    step_seconds: float  # one plain decoding step (the baseline's round)
    forward_seconds: dict[int, float] = field(default_factory=dict)  # the target forward alone, by token count

    def round_seconds(self, drafts: int) -> float:
        return self.draft_seconds + self.verify_seconds[drafts + 1]

    def as_dict(self) -> dict:
        return {
            "draft_ms": 1000 * self.draft_seconds,
            "verify_ms": {n: 1000 * s for n, s in self.verify_seconds.items()},
            "target_forward_ms": {n: 1000 * s for n, s in self.forward_seconds.items()},
            "plain_step_ms": 1000 * self.step_seconds,
        }


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


@torch.no_grad()
def measure_round_costs(decoder, prompt: Sequence[int], repeats: int = 9) -> RoundCosts:
    """Time a :class:`specdec.decoding.SpeculativeDecoder`'s round parts on ``prompt`` (compiles what it runs).

    The target forward is timed at every token count a round can verify (1 .. max drafts + 1); the draft step and
    the per-round acceptance work come from decoding ``prompt`` at the full draft length. Medians of ``repeats``.
    """
    max_drafts = decoder.max_draft_tokens
    saved_policy = decoder.policy
    decoder.policy = None
    try:
        outputs = [decoder.generate([prompt], torch.Generator().manual_seed(seed)) for seed in range(3)]
    finally:
        decoder.policy = saved_policy
    rounds = sum(output.target_forwards for output in outputs[1:])
    draft = sum(output.draft_seconds for output in outputs[1:]) / max(rounds, 1)
    verify_full = sum(output.verify_seconds for output in outputs[1:]) / max(rounds, 1)

    device = next(decoder.target.parameters()).device
    cuda = device.type == "cuda"
    counts = range(1, max_drafts + 2)
    seconds: dict[int, list[float]] = {count: [] for count in counts}
    keep_one = torch.ones(1, dtype=torch.long, device=device)
    with decoder._session() as session:
        session.prefill([list(prompt)], reserve=len(counts) * (repeats + 2))
        for attempt in range(repeats + 2):  # widths interleaved, so drift on a busy machine hits all alike
            for count in counts:
                ids = torch.as_tensor((list(prompt) * count)[:count], device=device)[None]
                if cuda:
                    torch.cuda.synchronize(device)
                began = time.perf_counter()
                session.extend(ids, torch.full((1,), count, dtype=torch.long, device=device))
                session.keep(keep_one)
                if cuda:
                    torch.cuda.synchronize(device)
                if attempt >= 2:
                    seconds[count].append(time.perf_counter() - began)
    forward = {count: _median(values) for count, values in seconds.items()}
    # what a round spends around the forward (acceptance test, commit) is assumed independent of the width
    overhead = max(verify_full - forward[max_drafts + 1], 0.0)
    verify = {count: seconds + overhead for count, seconds in forward.items()}
    step = decoder.autoregressive([prompt], torch.Generator().manual_seed(0))
    step_seconds = (step.seconds - step.prefill_seconds) / max(step.target_forwards, 1)
    return RoundCosts(draft_seconds=draft, verify_seconds=verify, step_seconds=step_seconds, forward_seconds=forward)


class ThroughputDraftLength:
    """A truncation policy verifying the ``L`` drafts that maximise expected tokens per second.

    ``a_k`` is estimated from the rounds verified so far as a product of conditional acceptances, each with a
    uniform prior (``(passed + 1) / (tested + 2)``); until ``warmup_rounds`` rounds are seen, every draft is
    verified (which also measures all positions).

    Args:
        costs: measured round costs (:func:`measure_round_costs`).
        max_drafts: the longest draft allowed.
        warmup_rounds: rounds at full length before the first choice.
    """

    def __init__(self, costs: RoundCosts, max_drafts: int, warmup_rounds: int = 16) -> None:
        self.costs = costs
        self.max_drafts = max_drafts
        self.warmup_rounds = warmup_rounds
        self.tested = [0] * max_drafts
        self.passed = [0] * max_drafts
        self.rounds = 0
        self.length = max_drafts
        self.chosen: Counter[int] = Counter()  # rounds verified at each length

    def survival(self) -> list[float]:
        """Estimated prefix survival ``a_k`` for k = 0 .. max_drafts - 1."""
        values, running = [], 1.0
        for tested, passed in zip(self.tested, self.passed, strict=True):
            running *= (passed + 1) / (tested + 2)
            values.append(running)
        return values

    def expected_rate(self, drafts: int) -> float:
        """Expected committed tokens per second with ``drafts`` drafts a round."""
        return (1 + sum(self.survival()[:drafts])) / self.costs.round_seconds(drafts)

    def best_length(self) -> int:
        return max(range(1, self.max_drafts + 1), key=self.expected_rate)

    def lengths(self, proposals: Sequence[Proposal]) -> list[int]:
        chosen = [min(self.length, len(proposal.tokens)) for proposal in proposals]
        self.chosen.update(chosen)
        return chosen

    def observe(self, proposed: Sequence[int], accepted: Sequence[int]) -> None:
        for verified, kept in zip(proposed, accepted, strict=True):
            for position in range(min(verified, kept + 1)):
                self.tested[position] += 1
                self.passed[position] += int(kept > position)
        self.rounds += len(proposed)
        if self.rounds >= self.warmup_rounds:
            self.length = self.best_length()

    @property
    def typical_length(self) -> int:
        """The length most rounds were verified at."""
        return self.chosen.most_common(1)[0][0] if self.chosen else self.length
