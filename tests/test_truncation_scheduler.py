"""Truncation policies and the prefix scheduler keep decoding lossless and choose what they should.

Losslessness is checked as in ``test_decoding.py``: a 16-token random target, a poor random DSpark drafter, and a
chi-square test of the committed tokens against the target's exact marginals, now with confidence-truncated,
dynamically thresholded and scheduled proposals. The DSpark paper's Appendix-A counterexample is simulated
directly: the scheduler without its early stop shifts the committed distribution, with it it does not.
"""

from __future__ import annotations

import math

import pytest
import torch

from specdec.decoding import DecodingOptions, SpeculativeDecoder, TreeSpeculativeDecoder
from specdec.decoding.evaluate import build_decoder
from specdec.decoding.proposers import Proposal
from specdec.decoding.scheduler import (
    DynamicTopK,
    PrefixScheduler,
    StepsPerSecond,
    prefix_schedule,
    profile_verification,
    top_k_lengths,
)
from specdec.decoding.simulator import RecordedRound, RoundRecorder, simulate, sweep
from specdec.decoding.truncation import (
    DynamicThreshold,
    FixedLength,
    StaticThreshold,
    survival,
    threshold_length,
    truncate,
)
from tests.test_decoding import (
    POSITIONS,
    PROMPT,
    SAMPLES,
    SMALL_VOCAB,
    chi_square_p_value,
    exact_marginals,
    make_drafter,
    small_target,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def a(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---- truncation policies -----------------------------------------------------------------------------------


def proposal(logits: list[float]) -> Proposal:
    n = len(logits)
    return Proposal(torch.arange(n), torch.full((n, 4), 0.25), torch.tensor(logits))


def test_threshold_is_on_cumulative_survival_not_the_per_step_confidence():
    logit = math.log(0.9 / 0.1)  # c_k = 0.9 at every slot: a = 0.9, 0.81, 0.729
    drafts = proposal([logit, logit, logit])
    assert torch.allclose(survival(drafts), a(0.9, 0.81, 0.729))
    assert StaticThreshold(0.8).lengths([drafts]) == [2]  # the per-step value (0.9) would keep all 3
    assert StaticThreshold(0.0).lengths([drafts]) == [3]
    assert StaticThreshold(0.95).lengths([drafts]) == [0]
    assert threshold_length(a(0.9, 0.5, 0.4), 0.5) == 2
    cut = truncate([drafts, drafts], [1, 5])
    assert [len(p.tokens) for p in cut] == [1, 3] and cut[0].confidence_logits.shape == (1,)
    assert FixedLength(2).lengths([drafts, proposal([0.0])]) == [2, 1]
    with pytest.raises(ValueError, match="confidence head"):
        survival(Proposal(torch.arange(2), torch.zeros(2, 4), None))


def test_dynamic_threshold_moves_only_after_observed_rounds_toward_the_target_rate():
    policy = DynamicThreshold(0.8, window=4, gain=0.5, initial=0.3)
    block = [a(0.9, 0.6, 0.35, 0.2)]
    assert policy.plan(block) == [3]
    assert policy.plan(block) == [3] and policy.threshold == 0.3  # planning alone never changes it
    policy.observe([3, 3], [1, 2])  # rate 0.5 < 0.8: too many rejections, raise the threshold
    assert policy.threshold == pytest.approx(0.3 + 0.5 * 0.3)
    assert policy.plan(block) == [2]
    for _ in range(4):  # the window of 4 rounds forgets the bad one
        policy.observe([2], [2])
    assert policy.observed_rate == 1.0
    before = policy.threshold
    policy.observe([2], [2])  # rate 1.0 > 0.8: lower the threshold
    assert policy.threshold == pytest.approx(before - 0.5 * 0.2)
    before = policy.threshold
    policy.observe([0], [0])  # everything cut: relax slowly (a window's worth of such rounds undoes one step)
    assert policy.threshold == pytest.approx(before - 0.5 * 0.2 / 4) and len(policy.history) == 4
    high = DynamicThreshold(0.5, initial=2.0)
    assert high.threshold == 0.95  # clamped into bounds


# ---- Algorithm 1 ---------------------------------------------------------------------------------------------


def test_steps_per_second_interpolates_step_time_and_extrapolates_linearly():
    sps = StepsPerSecond([3, 1], [0.5, 1.0])
    assert sps.token_counts == [1, 3]
    assert sps(1) == 1.0 and sps(3) == 0.5
    assert sps(2) == pytest.approx(1 / 1.5)  # halfway between 1 s and 2 s per step
    assert sps(6) == pytest.approx(0.25)  # twice the tokens of the largest point: twice its step time


def test_prefix_scheduler_on_a_hand_computed_case():
    survivals = [a(0.9, 0.5), a(0.6)]
    sps = StepsPerSecond([2, 3, 4, 5], [1.0, 0.9, 0.8, 0.5])
    # Θ0 = 2·1.0 = 2; +(0,1): 2.9·0.9 = 2.61; +(1,1): 3.5·0.8 = 2.8; +(0,2): 4.0·0.5 = 2.0 → stop
    lengths, throughput = prefix_schedule(survivals, sps)
    assert lengths == [1, 1] and throughput == pytest.approx(2.8)
    flat = StepsPerSecond([1, 100], [1.0, 1.0])  # free verification: every candidate raises τ
    assert prefix_schedule(survivals, flat)[0] == [2, 1]
    assert prefix_schedule([a(0.0, 0.0), a(0.7)], flat)[0] == [0, 1]  # a = 0 is never a candidate
    assert PrefixScheduler(sps).plan(survivals) == [1, 1]


def test_early_stop_keeps_the_first_local_optimum_the_global_search_does_not():
    sps = StepsPerSecond([1, 2, 3], [1.0, 0.5, 0.45])
    survivals = [a(0.8, 0.72)]  # Θ: 1.0, 0.9, 1.134
    assert prefix_schedule(survivals, sps) == ([0], 1.0)
    lengths, throughput = prefix_schedule(survivals, sps, early_stop=False)
    assert lengths == [2] and throughput == pytest.approx(2.52 * 0.45)


def test_top_k_admits_the_highest_survivals_as_prefixes():
    survivals = [a(0.9, 0.5), a(0.6), a(0.5, 0.5)]
    assert top_k_lengths(survivals, 0) == [0, 0, 0]
    assert top_k_lengths(survivals, 2) == [1, 1, 0]
    assert top_k_lengths(survivals, 3) == [1, 1, 1]  # ties: the shallower slot first
    assert top_k_lengths(survivals, 4) == [2, 1, 1]
    assert top_k_lengths(survivals, 99) == [2, 1, 2]


def test_dynamic_top_k_uses_the_budget_searched_two_rounds_earlier():
    sps = StepsPerSecond([1, 2, 3], [1.0, 0.5, 0.45])
    policy = DynamicTopK(sps, initial_budget=1)
    rich, poor = [a(0.8, 0.72)], [a(0.8, 0.1)]  # unconstrained search: K = 2 for rich, 0 for poor
    assert policy.plan(rich) == [1]  # initial budget
    assert policy.plan(poor) == [1]  # initial budget
    assert policy.plan(poor) == [2]  # K from round 1 (rich) — fresh confidences still rank the slots
    assert policy.plan(rich) == [0]  # K from round 2 (poor)
    assert policy.budgets == [1, 1, 2, 0]


# ---- Appendix A ----------------------------------------------------------------------------------------------


def appendix_a_first_token(early_stop: bool, samples: int, seed: int) -> float:
    """P(first committed token = A) for the Appendix-A setup, simulated: drafting, scheduling, rejection sampling."""
    generator = torch.Generator().manual_seed(seed)
    p_target, p_draft = torch.tensor([0.7, 0.3]), torch.tensor([0.5, 0.5])
    sps = StepsPerSecond([1, 2, 3], [1.0, 0.5, 0.45])
    x1 = torch.multinomial(p_draft, samples, replacement=True, generator=generator)
    c2 = torch.where(x1 == 0, 0.9, 0.0)  # the drafter's confidence in slot 2 depends on the token drafted at 1
    lengths = torch.tensor(
        [prefix_schedule([a(0.8, 0.8 * float(c))], sps, early_stop=early_stop)[0][0] for c in c2.tolist()]
    )
    u = torch.rand(samples, generator=generator)
    accepted = u * p_draft[x1] < p_target[x1]
    residual = (p_target - p_draft).clamp_min(0)
    corrected = torch.multinomial(residual / residual.sum(), samples, replacement=True, generator=generator)
    from_target = torch.multinomial(p_target, samples, replacement=True, generator=generator)
    verified = torch.where(accepted, x1, corrected)
    first = torch.where(lengths >= 1, verified, from_target)
    return float((first == 0).double().mean())


def test_appendix_a_counterexample_needs_the_early_stop():
    samples = 6000
    sigma = math.sqrt(0.7 * 0.3 / samples)  # ≈ 0.006
    leaky = appendix_a_first_token(early_stop=False, samples=samples, seed=0)
    assert abs(leaky - 0.85) < 5 * sigma and abs(leaky - 0.7) > 15 * sigma  # shifted: P(A) = 0.85, not 0.7
    safe = appendix_a_first_token(early_stop=True, samples=samples, seed=0)
    assert abs(safe - 0.7) < 4.5 * sigma


# ---- losslessness of the engine with each policy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def target():
    return small_target()


@pytest.fixture(scope="module")
def drafter(target):
    return make_drafter(target, "dspark")


def quadratic_sps(rows: int) -> StepsPerSecond:
    """A made-up SPS curve where verification slows quadratically with the tokens per row."""
    counts = [1, *range(rows, 5 * rows + 1, rows // 4)]
    return StepsPerSecond(counts, [1.0 / (1.0 + 0.25 * (count / rows) ** 2) for count in counts])


POLICIES = {
    "static_threshold": lambda: StaticThreshold(0.45),
    "dynamic_threshold": lambda: DynamicThreshold(0.6, window=2, gain=1.0, initial=0.3),
    "prefix_scheduler": lambda: PrefixScheduler(quadratic_sps(SAMPLES)),
    "dynamic_top_k": lambda: DynamicTopK(quadratic_sps(SAMPLES), delay=2, initial_budget=SAMPLES),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_truncated_and_scheduled_proposals_stay_lossless(target, drafter, name):
    policy = POLICIES[name]()
    decoder = SpeculativeDecoder(target, drafter, temperature=1.0, max_new_tokens=5, policy=policy)
    output = decoder.generate([PROMPT] * SAMPLES, torch.Generator().manual_seed(21))
    # the policy really truncated, to different lengths in the same round
    first_round = [result.proposed[0] for result in output.results]
    assert len(set(first_round)) > 1 and sum(first_round) < 3 * SAMPLES
    assert sum(sum(result.accepted) for result in output.results) > 0.05 * SAMPLES
    tokens = torch.tensor([result.token_ids[:POSITIONS] for result in output.results])
    counts = torch.stack([torch.bincount(tokens[:, k], minlength=SMALL_VOCAB) for k in range(POSITIONS)])
    exact = exact_marginals(target, PROMPT, 1.0, POSITIONS)
    p_values = [chi_square_p_value(counts[k], exact[k]) for k in range(POSITIONS)]
    assert min(p_values) > 1e-3, p_values
    if isinstance(policy, DynamicThreshold):
        assert policy.threshold != 0.3 and len(policy.history) > 0  # it adapted from verified rounds


class PeekingPolicy:
    """Verifies a draft only if the drafted token itself is even: depends on the draft, so it is not lossless."""

    def lengths(self, proposals):
        return [int((p.tokens % 2 == 0).long().cumprod(0).sum()) for p in proposals]

    def observe(self, proposed, accepted):
        pass


def test_the_check_detects_truncation_that_peeks_at_the_draft(target, drafter):
    decoder = SpeculativeDecoder(target, drafter, temperature=1.0, max_new_tokens=5, policy=PeekingPolicy())
    output = decoder.generate([PROMPT] * SAMPLES, torch.Generator().manual_seed(21))
    tokens = torch.tensor([result.token_ids[:POSITIONS] for result in output.results])
    counts = torch.stack([torch.bincount(tokens[:, k], minlength=SMALL_VOCAB) for k in range(POSITIONS)])
    exact = exact_marginals(target, PROMPT, 1.0, POSITIONS)
    assert min(chi_square_p_value(counts[k], exact[k]) for k in range(1, POSITIONS)) < 1e-6


# ---- recording, profiling and simulation -----------------------------------------------------------------------


def test_recorder_profile_and_simulator(target, drafter):
    recorder = RoundRecorder()
    decoder = SpeculativeDecoder(target, drafter, temperature=1.0, max_new_tokens=8, policy=recorder)
    output = decoder.generate([PROMPT] * 8, torch.Generator().manual_seed(3))
    assert len(recorder.rounds) == sum(result.rounds for result in output.results)
    assert sorted(r.accepted for r in recorder.rounds) == sorted(n for res in output.results for n in res.accepted)
    assert all(len(r.survival) >= r.accepted for r in recorder.rounds)
    sps = profile_verification(target, [1, 4, 16], rows=1, context_length=8, repeats=2, warmup=1)
    assert sps.token_counts == [1, 4, 16] and all(value > 0 for value in sps.steps_per_second)
    assert profile_verification(target, [4], rows=2, context_length=8, repeats=1, warmup=0).token_counts == [4]

    rounds = [RecordedRound([0.9, 0.8, 0.7], 3), RecordedRound([0.5, 0.2, 0.1], 0)]
    flat = StepsPerSecond([1, 1000], [10.0, 10.0])
    never = simulate(rounds, lambda: FixedLength(0), flat, 4, steps=50)
    assert never.tokens_per_step == 1.0 and never.verify_tokens_per_request == 1.0
    assert never.throughput == pytest.approx(40.0) and never.tokens_per_second_per_user == pytest.approx(10.0)
    full = simulate(rounds, lambda: FixedLength(3), flat, 4, steps=400)
    assert 2.2 < full.tokens_per_step < 2.8  # half the rounds commit 4 tokens, half 1
    assert full.acceptance_rate == pytest.approx((full.tokens_per_step - 1) / 3)
    # verification cost grows with tokens: the scheduler verifies less per request as concurrency grows
    sps = StepsPerSecond([1, 8, 64], [100.0, 90.0, 10.0])
    points = sweep(rounds, lambda: PrefixScheduler(sps), sps, [1, 4, 16], steps=100)
    budgets = [point.verify_tokens_per_request for point in points]
    assert budgets[0] > budgets[-1] and budgets == sorted(budgets, reverse=True)
    static = sweep(rounds, lambda: FixedLength(3), sps, [16], steps=100)[0]
    assert points[-1].throughput > static.throughput


# ---- proposal modes chosen by DecodingOptions -------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["static@0.45", "dynamic@0.2", "tree@2x2"])
def test_proposal_modes_of_the_decoding_options_stay_lossless_in_batches(target, drafter, mode):
    """What ``specdec test --model.decoding.truncation …`` / ``--model.decoding.tree …`` build, decoded as the
    evaluator decodes: batches of 8 prompts, each batch one generate call."""
    options = DecodingOptions(temperature=1.0, max_new_tokens=5, engine="eager").for_mode(mode)
    decoder = build_decoder(target, drafter, options, stop_token_ids=[])
    assert isinstance(decoder, TreeSpeculativeDecoder) == (options.tree is not None)
    generator = torch.Generator().manual_seed(23)
    results = []
    for _ in range(0, SAMPLES, 8):
        results += decoder.generate([PROMPT] * 8, generator).results
    rounds = [proposed for result in results for proposed in result.proposed]
    if options.tree is None:
        assert len(set(rounds)) > 1  # the policy cut rounds to different lengths
    else:
        assert max(rounds) == 6  # 2 + 4 nodes verified per round (fewer where the token limit is near)
    assert sum(sum(result.accepted) for result in results) > 0.05 * len(results)
    tokens = torch.tensor([result.token_ids[:POSITIONS] for result in results])
    counts = torch.stack([torch.bincount(tokens[:, k], minlength=SMALL_VOCAB) for k in range(POSITIONS)])
    exact = exact_marginals(target, PROMPT, 1.0, POSITIONS)
    p_values = [chi_square_p_value(counts[k], exact[k]) for k in range(POSITIONS)]
    assert min(p_values) > 1e-3, p_values


def test_decoding_options_refuse_unknown_modes_and_label_theirs():
    assert DecodingOptions().mode == "chain"
    assert DecodingOptions(truncation="static", threshold=0.4).mode == "static@0.4"
    assert DecodingOptions(tree=[3, 2, 1]).mode == "tree@3x2x1"
    assert DecodingOptions().for_mode("prefix").truncation == "prefix"
    with pytest.raises(ValueError, match="truncation"):
        DecodingOptions(truncation="sometimes")
    with pytest.raises(ValueError, match="'tree@3x0' is not a proposal mode"):
        DecodingOptions(compare=["tree@3x0"])
    with pytest.raises(ValueError, match="verified whole"):
        DecodingOptions(tree=[2], truncation="static")
