"""The static and compiled decoding engines compute what the eager reference computes, and stay lossless.

- The static target session (preallocated KV, bucketed widths, rollback by validity) gives the HF session's
  logits and layer features, batched rows with different acceptances included, on Qwen3 and Llama targets.
- The static DSpark proposer drafts the same blocks as the eager proposer, so whole decodes agree token for
  token across engines; greedy speculative output equals greedy plain output on every engine.
- Chi-square goodness of fit of the compiled engine's committed tokens at T = 1 and T = 0.7.
- A compiler failure falls back to eager execution with one warning; unsupported targets fall back too.
- The inverse-CDF draw is exact on a known distribution and never draws a zero-probability token.
- The draft-length policy picks the length that maximises expected tokens per second.
"""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import pytest
import torch

import specdec.decoding.compiled as compiled
from specdec.decoding import SpeculativeDecoder, autoregressive_generate, draw
from specdec.decoding.draft_length import RoundCosts, ThroughputDraftLength
from specdec.decoding.proposers import Proposal
from specdec.decoding.static_session import StaticTargetSession, round_up_to_bucket, supports_static_session
from specdec.decoding.target_session import TargetSession
from tests.helpers import tiny_random_target
from tests.test_decoding import (
    GREEDY_PROMPTS,
    POSITIONS,
    PROMPT,
    SAMPLES,
    SMALL_VOCAB,
    chi_square_p_value,
    exact_marginals,
    make_drafter,
    sampled_counts,
    small_target,
)

REPO = Path(__file__).parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def random_target():
    return tiny_random_target("qwen3", num_layers=4)


def _session_trace(session, prompts):
    """Prefill, a 4-wide extend kept differently per row, then a 2-wide and a 1-wide extend."""
    steps = [session.prefill(prompts)]
    steps.append(session.extend(torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]]), torch.tensor([4, 3])))
    session.keep(torch.tensor([2, 3]))
    steps.append(session.extend(torch.tensor([[12, 13], [14, 15]]), torch.tensor([2, 1])))
    session.keep(torch.tensor([1, 1]))
    steps.append(session.extend(torch.tensor([[16], [17]]), torch.tensor([1, 1])))
    return steps


@pytest.mark.parametrize("family", ["qwen3", "llama"])
@torch.no_grad()
def test_static_session_matches_the_hf_session(family):
    model = tiny_random_target(family, num_layers=4)
    assert supports_static_session(model) is None
    prompts = [list(range(3, 20)), list(range(30, 38))]
    layers = [-1, 0, 2]
    with TargetSession(model, layers) as session:
        reference = _session_trace(session, prompts)
    static = StaticTargetSession(model, layers, capacity=8)  # too small: it has to grow on the way
    steps = _session_trace(static, prompts)
    assert static.capacity >= 32
    lengths = [torch.tensor([17, 8]), torch.tensor([4, 3]), torch.tensor([2, 1]), torch.tensor([1, 1])]
    for ours, theirs, used in zip(steps, reference, lengths, strict=True):
        assert ours.logits.shape == theirs.logits.shape
        for row, count in enumerate(used.tolist()):
            logits_rows = slice(None) if ours.logits.shape[1] == 1 else slice(0, count)
            torch.testing.assert_close(ours.logits[row, logits_rows], theirs.logits[row, logits_rows])
            torch.testing.assert_close(ours.features[row, :count], theirs.features[row, :count])


def test_unsupported_targets_are_named_and_fall_back():
    assert "gemma4_text" in supports_static_session(tiny_random_target("gemma4", num_layers=4))
    moe = tiny_random_target("qwen3_moe", num_layers=4)
    assert "qwen3_moe" in supports_static_session(moe)
    with pytest.raises(ValueError, match="cannot drive"):
        StaticTargetSession(moe, [0])
    drafter = make_drafter(moe, "dspark")
    with pytest.warns(RuntimeWarning, match="eager HF forward"):
        decoder = SpeculativeDecoder(moe, drafter, temperature=0.0, max_new_tokens=6, engine="static")
    assert decoder.session is None
    reference = autoregressive_generate(moe, [GREEDY_PROMPTS[0]], temperature=0.0, max_new_tokens=6)
    assert decoder.generate([GREEDY_PROMPTS[0]]).results[0].token_ids == reference.results[0].token_ids


def test_buckets_round_up():
    assert [round_up_to_bucket(n, (1, 2, 4, 8, 16)) for n in (1, 3, 8, 9, 17, 33)] == [1, 4, 8, 16, 32, 48]


# every drafter on the static engine; on the compiled one DSpark alone (each compiled drafter costs a minute)
@pytest.mark.parametrize(
    ("engine", "algorithm"),
    [("static", "dspark"), ("static", "dflash_zlab"), ("static", "eagle3"), ("compiled", "dspark")],
)
def test_greedy_output_equals_plain_output_on_every_engine(random_target, engine, algorithm):
    reference = [
        autoregressive_generate(random_target, [prompt], temperature=0.0, max_new_tokens=20).results[0].token_ids
        for prompt in GREEDY_PROMPTS
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # Eagle3 drafts with its eager proposer
        decoder = SpeculativeDecoder(
            random_target, make_drafter(random_target, algorithm), temperature=0.0, max_new_tokens=20, engine=engine
        )
    alone = [decoder.generate([prompt]).results[0].token_ids for prompt in GREEDY_PROMPTS]
    together = [result.token_ids for result in decoder.generate(GREEDY_PROMPTS).results]
    plain = [decoder.autoregressive([prompt]).results[0].token_ids for prompt in GREEDY_PROMPTS]
    assert alone == reference and together == reference and plain == reference
    if engine == "compiled":
        assert decoder.session.step.compiled and decoder.proposer.step.compiled
        assert decoder.compile_seconds > 0


def test_compiled_greedy_output_equals_plain_output_on_every_heldout_prompt():
    """The tiny target on the quickstart's held-out prompts, chat-rendered, with an untrained drafter (many
    rejections): every compiled speculative answer equals the compiled plain answer and the eager HF one."""
    from specdec.decoding import DecodingOptions
    from specdec.decoding.evaluate import render_chat, stop_tokens_of
    from specdec.drafters import DSparkConfig, DSparkDrafter
    from specdec.targets import TINY_TARGET, load_target, read_target_head

    target = load_target(TINY_TARGET, device="cpu")
    torch.manual_seed(0)
    mask = target.tokenizer.mask_token_id
    config = DSparkConfig.from_target(
        target.model.config, [0, 2, 4], num_hidden_layers=1, block_size=4, mask_token_id=mask
    )
    drafter = DSparkDrafter(config).eval()
    drafter.attach_target_head(read_target_head(TINY_TARGET))
    options = DecodingOptions(temperature=0.0, max_new_tokens=32)
    stops = stop_tokens_of(target, options)
    lines = (REPO / "configs/data/tiny_heldout_prompts.jsonl").read_text().splitlines()
    prompts = [
        render_chat(target, [{"role": "user", "content": json.loads(line)["turns"][0]}], options) for line in lines
    ]
    decoder = SpeculativeDecoder(
        target.model, drafter, temperature=0.0, max_new_tokens=32, stop_token_ids=stops, engine="compiled"
    )
    for prompt in prompts:
        speculative = decoder.generate([prompt]).results[0]
        plain = decoder.autoregressive([prompt]).results[0].token_ids
        reference = autoregressive_generate(
            target.model, [prompt], temperature=0.0, max_new_tokens=32, stop_token_ids=stops
        )
        assert speculative.token_ids == plain == reference.results[0].token_ids
    assert len(prompts) == 16 and decoder.session.step.compiled and decoder.proposer.step.compiled


def test_static_engine_decodes_exactly_what_the_eager_engine_decodes(random_target):
    """Same uniforms from the same generator, same distributions: identical samples at T = 1."""
    drafter = make_drafter(random_target, "dspark")
    outputs = {}
    for engine in ("eager", "static"):
        decoder = SpeculativeDecoder(random_target, drafter, temperature=1.0, max_new_tokens=16, engine=engine)
        outputs[engine] = [
            decoder.generate([prompt], torch.Generator().manual_seed(seed)).results[0]
            for seed, prompt in enumerate(GREEDY_PROMPTS)
        ]
    for eager, static in zip(outputs["eager"], outputs["static"], strict=True):
        assert static.token_ids == eager.token_ids
        assert static.accepted == eager.accepted
    assert any(a < n for result in outputs["eager"] for n, a in zip(result.proposed, result.accepted, strict=True))


def test_decoders_at_two_temperatures_share_one_compiled_target_session(random_target):
    """A second decoder verifies on the first one's session (its compiled target steps are reused, none new) and
    decodes what a decoder with a session of its own decodes."""
    drafter = make_drafter(random_target, "dspark")
    greedy = SpeculativeDecoder(random_target, drafter, temperature=0.0, max_new_tokens=12, engine="compiled")
    first = greedy.generate([GREEDY_PROMPTS[0]]).results[0].token_ids
    compiled_before = greedy.session.compile_seconds
    shared = SpeculativeDecoder(
        random_target, drafter, temperature=1.0, max_new_tokens=12, engine="compiled", session=greedy.session
    )
    alone = SpeculativeDecoder(random_target, drafter, temperature=1.0, max_new_tokens=12, engine="compiled")
    assert shared.session is greedy.session
    sampled = [d.generate([GREEDY_PROMPTS[1]], torch.Generator().manual_seed(3)).results[0] for d in (shared, alone)]
    assert sampled[0].token_ids == sampled[1].token_ids and sampled[0].accepted == sampled[1].accepted
    assert greedy.generate([GREEDY_PROMPTS[0]]).results[0].token_ids == first
    assert greedy.session.compile_seconds == compiled_before  # every bucket it met was already compiled
    other_layers = StaticTargetSession(random_target, [0, 1], compile=True)
    with pytest.raises(ValueError, match="layers"):
        SpeculativeDecoder(random_target, drafter, temperature=1.0, engine="compiled", session=other_layers)
    with pytest.raises(ValueError, match="engine 'static'"):
        SpeculativeDecoder(random_target, drafter, temperature=1.0, engine="static", session=greedy.session)


def test_rows_finishing_one_after_another_meet_only_graphs_the_warm_up_compiled(random_target):
    """A batch whose rows finish at different rounds verifies ever fewer rows: the compiled acceptance test pads
    them to a power of two the warm-up compiled, so a timed decode compiles nothing, and decodes what the static
    engine (no padding) decodes from the same uniforms."""
    drafter = make_drafter(random_target, "dspark")
    prompts = [*GREEDY_PROMPTS, GREEDY_PROMPTS[0][:3]]
    stops = list(range(0, random_target.config.vocab_size, 9))  # rows stop at random rounds
    decoders = {
        engine: SpeculativeDecoder(
            random_target, drafter, temperature=1.0, max_new_tokens=24, stop_token_ids=stops, engine=engine
        )
        for engine in ("static", "compiled")
    }
    compiled = decoders["compiled"]
    compiled.warm_up(prompts)
    before = compiled.compile_seconds
    for seed in range(3):
        outputs = {e: d.generate(prompts, torch.Generator().manual_seed(seed)) for e, d in decoders.items()}
        assert [r.token_ids for r in outputs["compiled"].results] == [r.token_ids for r in outputs["static"].results]
        rounds = [result.rounds for result in outputs["compiled"].results]
        assert len(set(rounds)) > 1, rounds  # rows did finish at different rounds
    assert compiled.compile_seconds == before


def test_a_compiled_step_meets_new_strides_and_grad_mode_without_failing():
    """Calls of a seen shape skip guard evaluation; a view with other strides, or grad mode switched on, is a new
    signature that compiles instead of tripping the no-recompile stance."""
    step = compiled.CompiledStep(lambda x: x * 2 + 1, enabled=True, name="toy step", device=torch.device("cpu"))
    base = torch.arange(12.0).reshape(3, 4)
    with torch.no_grad():
        assert torch.equal(step(base.contiguous()), base * 2 + 1)
        assert torch.equal(step(base.t().contiguous().t()), base * 2 + 1)  # same shape, column-major
        assert torch.equal(step(base), base * 2 + 1)
    assert torch.equal(step(base), base * 2 + 1)  # grad mode on
    assert step.compiled and step.error is None


@pytest.fixture(scope="module")
def small():
    return small_target()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_compiled_engine_is_lossless(small, temperature):
    decoder = SpeculativeDecoder(
        small, make_drafter(small, "dspark"), temperature=temperature, max_new_tokens=5, engine="compiled"
    )
    counts, accepted_per_round = sampled_counts(decoder, seed=11)
    assert decoder.session.step.compiled and decoder.proposer.step.compiled
    assert 0.05 < accepted_per_round < decoder.max_draft_tokens
    exact = exact_marginals(small, PROMPT, temperature, POSITIONS)
    p_values = [chi_square_p_value(counts[k], exact[k]) for k in range(POSITIONS)]
    assert min(p_values) > 1e-3, p_values


def _failing_backend(graph_module, example_inputs):
    raise RuntimeError("backend refuses this graph")


def test_a_compiler_failure_falls_back_to_eager_with_one_warning(random_target, monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", _failing_backend)
    drafter = make_drafter(random_target, "dspark")
    decoder = SpeculativeDecoder(random_target, drafter, temperature=0.0, max_new_tokens=12, engine="compiled")
    with pytest.warns(RuntimeWarning, match="torch.compile of the target step failed") as caught:
        first = decoder.generate([GREEDY_PROMPTS[0]]).results[0].token_ids
        second = decoder.generate([GREEDY_PROMPTS[1]]).results[0].token_ids
    target_warnings = [w for w in caught if "target step" in str(w.message)]
    assert len(target_warnings) == 1
    assert not decoder.session.step.compiled and decoder.session.step.error.startswith("BackendCompilerFailed")
    assert not decoder.proposer.step.compiled
    reference = autoregressive_generate(random_target, GREEDY_PROMPTS[:2], temperature=0.0, max_new_tokens=12)
    assert [first, second] == [result.token_ids for result in reference.results]


def test_inverse_cdf_draw_is_exact():
    probabilities = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    generator = torch.Generator().manual_seed(0)
    tokens = draw(probabilities.expand(60_000, -1), generator)
    counts = torch.bincount(tokens, minlength=6)
    assert counts[[0, 2, 5]].sum() == 0  # zero-probability tokens, the last one included, are never drawn
    assert chi_square_p_value(counts, probabilities) > 1e-3
    one_hot = torch.zeros(4, 6)
    one_hot[torch.arange(4), torch.tensor([0, 5, 2, 3])] = 1
    assert draw(one_hot, uniforms=torch.tensor([0.0, 0.0, 0.9999, 0.5])).tolist() == [0, 5, 2, 3]
    biased = draw(torch.tensor([[0.25, 0.75]]), uniforms=torch.tensor([0.2]))
    assert biased.tolist() == [0]  # u · total = 0.2 < 0.25: the first token


def _proposal(length: int) -> Proposal:
    return Proposal(torch.zeros(length, dtype=torch.long), torch.zeros(length, 4))


def test_draft_length_maximises_expected_tokens_per_second():
    # verification flat up to 4 tokens, then each extra token costs as much as the draft step
    verify = {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 2.0, 6: 3.0, 7: 4.0, 8: 5.0}
    costs = RoundCosts(draft_seconds=1.0, verify_seconds=verify, step_seconds=1.0)
    policy = ThroughputDraftLength(costs, max_drafts=7, warmup_rounds=4)
    assert policy.lengths([_proposal(7)]) == [7]  # before any acceptance is seen: the full block
    for _ in range(200):  # every draft accepted with probability 0.8 (conditional), seen at full length
        policy.observe([7] * 5, [0, 1, 3, 7, 7])
    survival = policy.survival()
    assert all(a > b for a, b in itertools.pairwise(survival))
    rates = {length: policy.expected_rate(length) for length in range(1, 8)}
    assert policy.length == max(rates, key=rates.get) == 3  # the flat part of the cost curve
    assert policy.lengths([_proposal(7), _proposal(2)]) == [3, 2]  # never more than a row drafted
    assert policy.chosen == {7: 1, 3: 1, 2: 1}

    # verification cost rising with every token and a second draft that is almost never accepted: one draft
    rising = RoundCosts(draft_seconds=1.0, verify_seconds={n: 0.5 * n for n in range(1, 9)}, step_seconds=1.0)
    policy = ThroughputDraftLength(rising, max_drafts=7, warmup_rounds=4)
    for _ in range(200):
        policy.observe([7] * 4, [1, 1, 0, 0])
    assert policy.length == 1


@pytest.mark.gpu
def test_compiled_engine_on_cuda_is_captured_and_exact():
    """CUDA: the compiled steps run as CUDA graphs (``reduce-overhead``); greedy output equals plain output and
    committed tokens keep the target's distribution."""
    target = tiny_random_target("qwen3", num_layers=4).cuda()
    drafter = make_drafter(target, "dspark").cuda()
    decoder = SpeculativeDecoder(target, drafter, temperature=0.0, max_new_tokens=20, engine="compiled")
    greedy = [decoder.generate([prompt]).results[0].token_ids for prompt in GREEDY_PROMPTS]
    plain = [decoder.autoregressive([prompt]).results[0].token_ids for prompt in GREEDY_PROMPTS]
    assert greedy == plain and decoder.session.step.cuda_graphs and decoder.session.step.compiled
    small = small_target()
    exact = exact_marginals(small, PROMPT, 1.0, POSITIONS)
    small = small.cuda()
    sampler = SpeculativeDecoder(
        small, make_drafter(small, "dspark").cuda(), temperature=1.0, max_new_tokens=5, engine="compiled"
    )
    output = sampler.generate([PROMPT] * SAMPLES, torch.Generator(device="cuda").manual_seed(11))
    tokens = torch.tensor([result.token_ids[:POSITIONS] for result in output.results])
    counts = torch.stack([torch.bincount(tokens[:, k], minlength=SMALL_VOCAB) for k in range(POSITIONS)])
    assert min(chi_square_p_value(counts[k], exact[k]) for k in range(POSITIONS)) > 1e-3
