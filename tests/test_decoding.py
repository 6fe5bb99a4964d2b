"""Speculative decoding is lossless: committed tokens are distributed as the target's own samples.

A small-vocabulary target (16 tokens) makes the target's exact marginal distribution of each generated position
computable by enumerating every prefix; samples of the speculative decoder with a deliberately poor (random)
drafter of each algorithm are checked against it with a chi-square goodness-of-fit test. Greedy speculative
output must equal greedy target output token for token, alone and in batches whose rows accept differently.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

import specdec.decoding.engine as engine
from specdec.decoding import (
    SpeculativeDecoder,
    accept_draft,
    autoregressive_generate,
    residual_distribution,
    token_probabilities,
)
from specdec.drafters import DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter
from specdec.targets.weights import TargetHead
from tests.helpers import tiny_random_target

SMALL_VOCAB = 16
PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
POSITIONS = 4  # generated positions whose marginals are tested
SAMPLES = 1500


pytestmark = pytest.mark.usefixtures("one_thread")


def small_target() -> Qwen3ForCausalLM:
    """A random 3-layer Qwen3 with 16 tokens whose next-token distributions are far from uniform."""
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=SMALL_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(15.0)  # peaked distributions: a poor drafter is then often rejected
    return model


def head_of(model) -> TargetHead:
    return TargetHead(model.model.embed_tokens.weight.detach(), model.lm_head.weight.detach(), False, "e", "h")


def make_drafter(model, algorithm: str, seed: int = 1) -> torch.nn.Module:
    """A randomly initialised (so deliberately poor) drafter of ``algorithm`` for ``model``."""
    torch.manual_seed(seed)
    vocab = model.config.vocab_size
    layers = model.config.num_hidden_layers
    if algorithm == "eagle3":
        config = Eagle3Config.from_target(model.config, [-1, 0, layers - 2], ttt_length=3, initializer_range=0.2)
        drafter = Eagle3Drafter(config)
    else:
        fields = {
            "dspark": dict(block_size=3, markov_rank=8),
            "dflash": dict(block_size=3, markov_rank=0, enable_confidence_head=False),
            "dflash_zlab": dict(block_size=4, markov_rank=0, enable_confidence_head=False, anchor_convention="zlab"),
        }[algorithm]
        config = DSparkConfig.from_target(
            model.config, [0, layers - 2], num_hidden_layers=1, mask_token_id=vocab - 1, initializer_range=0.2, **fields
        )
        drafter = DSparkDrafter(config)
    drafter.eval().attach_target_head(head_of(model))
    return drafter


@torch.no_grad()
def exact_marginals(model, prompt: list[int], temperature: float, positions: int) -> torch.Tensor:
    """[positions, V]: the target's marginal distribution of each generated token, over every possible prefix."""
    vocab = model.config.vocab_size
    prefixes = torch.tensor(list(itertools.product(range(vocab), repeat=positions - 1)))
    inputs = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], dim=1)
    probabilities = token_probabilities(model(input_ids=inputs).logits[:, len(prompt) - 1 :].double(), temperature)
    marginals, path = [], torch.ones(len(prefixes), dtype=torch.float64)
    for k in range(positions):
        repeats = vocab ** (positions - 1 - k)
        marginals.append((path[:, None] * probabilities[:, k]).sum(0) / repeats)
        if k < positions - 1:
            path = path * probabilities[torch.arange(len(prefixes)), k, prefixes[:, k]]
    return torch.stack(marginals)


def chi_square_p_value(counts: torch.Tensor, expected_probabilities: torch.Tensor) -> float:
    """Pearson goodness of fit; bins expecting fewer than 5 samples are pooled (p-value via the upper gamma)."""
    total = counts.sum().double()
    expected = expected_probabilities.double() * total
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    expected = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    assert observed[expected == 0].sum() == 0
    statistic = ((observed - expected) ** 2 / expected).sum()
    dof = len(expected) - 1
    if dof < 1:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))


def sampled_counts(decoder: SpeculativeDecoder, seed: int) -> tuple[torch.Tensor, float]:
    generator = torch.Generator().manual_seed(seed)
    output = decoder.generate([PROMPT] * SAMPLES, generator)
    tokens = torch.tensor([result.token_ids[:POSITIONS] for result in output.results])
    counts = torch.stack([torch.bincount(tokens[:, k], minlength=SMALL_VOCAB) for k in range(POSITIONS)])
    rounds = sum(result.rounds for result in output.results)
    accepted = sum(sum(result.accepted) for result in output.results) / max(1, rounds)
    return counts, accepted


@pytest.fixture(scope="module")
def target():
    return small_target()


@pytest.mark.parametrize(
    ("algorithm", "temperature"),
    [("dspark", 0.7), ("dspark", 1.0), ("dspark", 1.6), ("dflash", 1.0), ("dflash_zlab", 0.8), ("eagle3", 1.3)],
)
def test_committed_tokens_follow_the_target_distribution(target, algorithm, temperature):
    decoder = SpeculativeDecoder(target, make_drafter(target, algorithm), temperature=temperature, max_new_tokens=5)
    counts, accepted_per_round = sampled_counts(decoder, seed=11)
    assert 0.05 < accepted_per_round < decoder.max_draft_tokens  # drafts are both accepted and rejected
    exact = exact_marginals(target, PROMPT, temperature, POSITIONS)
    assert exact[1:].max() < 0.9  # the tested positions are genuinely random
    p_values = [chi_square_p_value(counts[k], exact[k]) for k in range(POSITIONS)]
    assert min(p_values) > 1e-3, p_values


def test_the_check_detects_resampling_from_p_instead_of_the_residual(target, monkeypatch):
    """Power of the test above: the classic bug (after a rejection, draw from p) must fail it."""
    monkeypatch.setattr(engine, "residual_distribution", lambda p, q: p)
    decoder = SpeculativeDecoder(target, make_drafter(target, "dspark"), temperature=1.0, max_new_tokens=5)
    counts, _ = sampled_counts(decoder, seed=11)
    exact = exact_marginals(target, PROMPT, 1.0, POSITIONS)
    assert min(chi_square_p_value(counts[k], exact[k]) for k in range(1, POSITIONS)) < 1e-6


def test_acceptance_rule_and_residual():
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.6, 0.2])
    assert torch.allclose(residual_distribution(p, q), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(residual_distribution(p, p), p)  # no residual mass: fall back to p
    u = torch.tensor([0.49, 0.51])
    # token 1: p/q = 0.5 → accepted iff u < 0.5
    assert accept_draft(torch.tensor([0.3, 0.3]), torch.tensor([0.6, 0.6]), u).tolist() == [True, False]
    assert not accept_draft(torch.tensor(0.3), torch.tensor(0.0), torch.tensor(0.0))  # q = 0: never drawn
    assert token_probabilities(torch.tensor([1.0, 3.0, 2.0]), 0.0).tolist() == [0.0, 1.0, 0.0]


GREEDY_PROMPTS = [[1, 5, 7, 9, 11], [3, 4], [8, 9, 10, 11, 12, 13, 14, 15], [20, 21, 22]]


@pytest.fixture(scope="module")
def random_target():
    return tiny_random_target("qwen3", num_layers=4)


@pytest.mark.parametrize("algorithm", ["dspark", "dflash", "dflash_zlab", "eagle3"])
def test_greedy_speculative_output_equals_greedy_target_output(random_target, algorithm):
    reference = [
        autoregressive_generate(random_target, [prompt], temperature=0.0, max_new_tokens=24).results[0].token_ids
        for prompt in GREEDY_PROMPTS
    ]
    decoder = SpeculativeDecoder(
        random_target, make_drafter(random_target, algorithm), temperature=0.0, max_new_tokens=24
    )
    alone = [decoder.generate([prompt]).results[0] for prompt in GREEDY_PROMPTS]
    together = decoder.generate(GREEDY_PROMPTS).results
    assert [result.token_ids for result in alone] == reference
    assert [result.token_ids for result in together] == reference
    assert all(len(tokens) == 24 for tokens in reference)
    for result in together:
        assert sum(result.committed) + 1 == len(result.token_ids)  # the first token comes from the prefill
        assert all(
            a <= n and c == a + 1 for n, a, c in zip(result.proposed, result.accepted, result.committed, strict=True)
        )


def test_batched_rows_accept_different_lengths_and_stop_on_stop_tokens(random_target):
    drafter = make_drafter(random_target, "dspark")
    reference = autoregressive_generate(random_target, GREEDY_PROMPTS, temperature=0.0, max_new_tokens=24).results
    stop = reference[0].token_ids[6]
    stopped = SpeculativeDecoder(random_target, drafter, temperature=0.0, max_new_tokens=24, stop_token_ids=[stop])
    results = stopped.generate(GREEDY_PROMPTS).results
    for result, full in zip(results, reference, strict=True):
        expected = full.token_ids[: full.token_ids.index(stop) + 1] if stop in full.token_ids else full.token_ids
        assert result.token_ids == expected
        assert result.stopped == (stop in full.token_ids)
    assert results[0].token_ids[-1] == stop and len(results[0].token_ids) <= 7
    # rows of one batch accepted different numbers of drafts in the same round
    decoder = SpeculativeDecoder(random_target, drafter, temperature=1.0, max_new_tokens=16)
    batch = decoder.generate(GREEDY_PROMPTS * 4, torch.Generator().manual_seed(0)).results
    assert len({result.accepted[0] for result in batch}) > 1
    assert all(len(result.token_ids) == 16 for result in batch)


def test_baseline_and_speculative_report_where_time_went(random_target):
    drafter = make_drafter(random_target, "eagle3")
    output = SpeculativeDecoder(random_target, drafter, temperature=1.0, max_new_tokens=10).generate(
        GREEDY_PROMPTS, torch.Generator().manual_seed(0)
    )
    assert output.new_tokens == 40 and output.target_forwards >= 1
    assert 0 < output.draft_seconds + output.verify_seconds + output.prefill_seconds <= output.seconds
    baseline = autoregressive_generate(random_target, GREEDY_PROMPTS, max_new_tokens=10)
    assert baseline.new_tokens == 40 and baseline.target_forwards == 9
