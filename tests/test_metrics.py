"""Acceptance and speed metrics: hand-computed values, DeepSpec's identities, ratio-of-sums reduction."""

import pytest
import torch

from specdec.decoding import DecodeOutput, GenerationResult
from specdec.metrics import AcceptanceMetrics, GroupedDecodingMetrics, SpeedMetrics


def floats(values: dict) -> dict[str, float]:
    return {name: value.item() for name, value in values.items()}


# three rounds of up to 3 drafts: all accepted; 1 accepted; 0 of 2 accepted
PROPOSED, ACCEPTED, COMMITTED = [3, 3, 2], [3, 1, 0], [4, 2, 1]


def test_acceptance_metrics_by_hand():
    metric = AcceptanceMetrics(max_drafts=3)
    metric.update(torch.tensor(PROPOSED), torch.tensor(ACCEPTED), torch.tensor(COMMITTED))
    values = floats(metric.compute())
    assert values["tau"] == pytest.approx(7 / 3)  # bonus/correction token included
    assert values["propose"] == pytest.approx(8 / 3)
    assert values["verify_rate"] == pytest.approx(7 / (8 + 3))
    assert values["draft_acceptance_rate"] == pytest.approx(4 / 8)
    # prefix survival: rounds with > k accepted among rounds with > k proposed
    assert [values[f"accept_rate@{k}"] for k in range(3)] == pytest.approx([2 / 3, 1 / 3, 1 / 2])
    # conditional: draft k accepted given drafts < k accepted and draft k proposed
    assert [values[f"cond_accept@{k}"] for k in range(3)] == pytest.approx([2 / 3, 1 / 2, 1.0])


def test_paper_identity_between_survival_and_conditional_acceptance():
    """With full-length proposals, cond_accept@k = accept_rate@k / accept_rate@(k-1) (DeepSpec §4.2)."""
    torch.manual_seed(0)
    accepted = torch.randint(0, 5, (200,))
    metric = AcceptanceMetrics(max_drafts=4)
    metric.update(torch.full((200,), 4), accepted, accepted + 1)
    values = floats(metric.compute())
    previous = 1.0
    for k in range(4):
        assert values[f"cond_accept@{k}"] == pytest.approx(values[f"accept_rate@{k}"] / previous, rel=1e-5)
        previous = values[f"accept_rate@{k}"]
    assert values["tau"] == pytest.approx(1 + values["draft_acceptance_rate"] * 4, rel=1e-5)


def test_states_reduce_by_sum_so_sharding_does_not_matter():
    whole, first, second = AcceptanceMetrics(3), AcceptanceMetrics(3), AcceptanceMetrics(3)
    whole.update(torch.tensor([*PROPOSED, 1]), torch.tensor([*ACCEPTED, 1]), torch.tensor([*COMMITTED, 2]))
    first.update(torch.tensor(PROPOSED), torch.tensor(ACCEPTED), torch.tensor(COMMITTED))
    second.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([2]))
    assert {reduction.__name__ for reduction in whole._reductions.values()} == {"dim_zero_sum"}
    for name in whole._defaults:  # what a DDP all-reduce (sum) of the two ranks' states gives
        setattr(first, name, getattr(first, name) + getattr(second, name))
    combined, reference = floats(first.compute()), floats(whole.compute())
    for name in ("tau", "propose", "verify_rate", "accept_rate@0", "cond_accept@2"):
        assert combined[name] == pytest.approx(reference[name])
    # τ over all rounds, not the mean of the two shards' τ
    assert reference["tau"] == pytest.approx(9 / 4)


def _output(tokens_per_request, seconds, draft=0.0, verify=0.0, forwards=0, committed=None, prefill=0.0):
    results = [GenerationResult(prompt_ids=[1], token_ids=[0] * n) for n in tokens_per_request]
    for result, rounds in zip(results, committed or [[] for _ in results], strict=True):
        result.committed = rounds
        result.proposed = [c for c in rounds]
        result.accepted = [c - 1 for c in rounds]
    return DecodeOutput(results, seconds, prefill, draft, verify, forwards)


def test_speed_metrics_and_ideal_speedup():
    speculative = _output([9], seconds=1.0, draft=0.2, verify=0.6, forwards=2, committed=[[4, 4]], prefill=0.1)
    autoregressive = _output([9], seconds=3.0, forwards=8, prefill=0.2)
    metric = SpeedMetrics()
    metric.update(speculative, autoregressive)
    values = floats(metric.compute())
    assert values["tokens_per_second"] == pytest.approx(9.0)
    assert values["ar_tokens_per_second"] == pytest.approx(3.0)
    assert values["speedup"] == pytest.approx(3.0)
    # τ = 4 tokens per 0.4 s round vs one token per 2.8 / 8 s step
    assert values["ideal_speedup"] == pytest.approx((8 / 0.8) / (8 / 2.8))
    assert torch.isnan(SpeedMetrics().compute()["speedup"])  # nothing measured: no number


def test_grouped_metrics_count_each_prompt_in_all_dataset_and_domain():
    metrics = GroupedDecodingMetrics(["dataset/gsm8k", "domain/math", "dataset/mbpp", "domain/code"], max_drafts=3)
    speculative = _output([5], 1.0, 0.1, 0.1, 1, [[4]])
    metrics.update(["dataset/gsm8k", "domain/math"], speculative)
    values = {group: floats(group_values) for group, group_values in metrics.compute().items()}
    assert values["all"]["tau"] == values["dataset/gsm8k"]["tau"] == values["domain/math"]["tau"] == 4
    assert values["dataset/mbpp"]["rounds"] == 0
    with pytest.raises(KeyError, match="not declared"):
        metrics.update(["dataset/unknown"], speculative)
