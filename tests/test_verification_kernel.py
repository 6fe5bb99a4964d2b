"""The Triton acceptance test of one verified round against the reference, alone and inside the decoder.

- ``verify_round`` returns what ``acceptance_test`` returns on random rounds at T = 1, T = 0.7 and greedy:
  ragged verified counts, rejections, rows accepting everything (bonus draw), stop tokens among accepted
  drafts, rows verifying nothing, bf16 and fp32 logits, vocabularies not a multiple of the block, fp64 and
  fp32 carries. p(d) agrees to float rounding, decisions and tokens exactly (a draw within rounding of a CDF
  boundary, or a ratio within rounding of its uniform, may differ: none does in these cases).
- Where p == q exactly the residual has no mass and both draw from p.
- ``SpeculativeDecoder(verification="kernel")`` keeps the target's distribution (chi-square against the exact
  marginals, a batch of 1500 rows) and greedy output equal to plain greedy output.
- ``verification="kernel"`` where Triton cannot run is refused by name; ``auto`` on CPU is the reference.

On CPU the kernels run under the Triton interpreter, switched on before Triton is first imported: the checks
run once in a subprocess with ``TRITON_INTERPRET=1`` and report per case. The ``gpu`` copy runs them on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import specdec.kernels as kernels
import torch

from specdec.decoding import SpeculativeDecoder, autoregressive_generate, draw, token_probabilities
from specdec.decoding.engine import acceptance_test
from specdec.sampling import residual_distribution
from tests.helpers import tiny_random_target
from tests.triton_interpreter import run_checks_interpreted

ROUNDING = 1e-6  # a uniform or threshold this close to its boundary may fall either side of it


@dataclass(frozen=True)
class Case:
    temperature: float
    rows: int = 6
    width: int = 5
    vocab: int = 1000
    block: int = 128
    dtype: str = "float32"
    layout: str = "mixed"  # "mixed": rows of every kind; "p_equals_q": exact uniform p == q everywhere
    fp64_carry: bool = True


CASES = {
    "t1-fp32-ragged-stops-bonus": Case(1.0),
    "t07-bf16-vocab-not-multiple-of-block": Case(0.7, rows=12, vocab=777, block=128, dtype="bfloat16"),
    "t1-fp32-carry": Case(1.0, vocab=1000, block=256, fp64_carry=False),
    "t13-block-wider-than-vocab": Case(1.3, width=4, vocab=100, block=4096),
    "greedy-fp32": Case(0.0, vocab=555, block=128),
    "greedy-bf16": Case(0.0, vocab=777, block=128, dtype="bfloat16"),
    "no-drafts-width-1": Case(1.0, rows=3, width=1, vocab=300, block=64),
    "p-equals-q-falls-back-to-p": Case(1.0, rows=4, width=4, vocab=1000, block=128, layout="p_equals_q"),
}
GPU_CASES = {
    **CASES,
    "t1-bf16-qwen-vocab": Case(1.0, rows=8, width=8, vocab=151_936, block=4096, dtype="bfloat16"),
    "greedy-bf16-qwen-vocab": Case(0.0, rows=8, width=8, vocab=151_936, block=4096, dtype="bfloat16"),
}
DECODER_CASES = ("decoder-lossless-t1", "decoder-greedy-equals-plain")
DECODER_SAMPLES = 300  # rows of the chi-square batch: the interpreter runs each Triton program in Python


def _mixed_round(case: Case, generator: torch.Generator, device: str) -> dict[str, object]:
    """Rows cycling through six kinds: a poor drafter at full length; a drafter equal to the target (everything
    accepted, then the bonus draw); a poor drafter verifying 2; nothing verified; a stop token accepted at slot
    1 (the drafter equal to the target up to it, poor after it, as the engine's drafter would be); everything
    accepted with one slot to spare."""
    rows, width, vocab, temperature = case.rows, case.width, case.vocab, case.temperature
    logits = (torch.randn(rows, width, vocab, generator=generator) * 3).to(getattr(torch, case.dtype))
    p = token_probabilities(logits, temperature)
    poor = token_probabilities(logits.float() + 2 * torch.randn(rows, width, vocab, generator=generator), temperature)
    slots = max(width - 1, 0)
    kind = torch.arange(rows) % 6
    counts = torch.tensor([[slots, slots, 2, 0, slots, slots - 1][k] for k in kind.tolist()]).clamp(0, slots)
    equal = ((kind == 1) | (kind == 5))[:, None] | ((kind == 4)[:, None] & (torch.arange(width)[None] < 2))
    q = torch.where(equal[..., None], p, poor)
    q = q * (torch.arange(width)[None, :] < counts[:, None])[..., None]  # the engine's zeros after the drafts
    drafts = draw(q[:, :-1], uniforms=torch.rand(rows, slots, generator=generator))
    drafts = torch.where(torch.arange(slots)[None] < counts[:, None], drafts, 0)
    stop_rows = (kind == 4).nonzero().flatten()
    stops = drafts[stop_rows, 1].unique() if width > 2 and len(stop_rows) else torch.tensor([-1])
    return {
        "logits": logits.to(device),
        "q": q.to(device),
        "drafts": drafts.to(device),
        "counts": counts.to(device),
        "u": torch.rand(rows, slots, generator=generator).to(device),
        "u_next": torch.rand(rows, generator=generator).to(device),
        "stops": torch.cat([stops, torch.tensor([vocab - 1])]).to(device),
    }


def _equal_round(case: Case, generator: torch.Generator, device: str) -> dict[str, object]:
    """p uniform over 8 tokens of every slot (logits 0, the rest so low exp underflows): exact in any order of
    summation, and q equal to it, so every row accepts all it verifies and the next slot has no residual."""
    rows, width, vocab = case.rows, case.width, case.vocab
    support = torch.rand(rows, width, vocab, generator=generator).argsort(dim=-1)[..., :8]
    logits = torch.full((rows, width, vocab), -30_000.0).scatter(-1, support, 0.0).to(getattr(torch, case.dtype))
    q = torch.zeros(rows, width, vocab).scatter(-1, support, 0.125)
    counts = torch.tensor([width - 1, width - 2, 1, 0][:rows])
    drafts = draw(q[:, :-1], uniforms=torch.rand(rows, width - 1, generator=generator))
    return {
        "logits": logits.to(device),
        "q": q.to(device),
        "drafts": drafts.to(device),
        "counts": counts.to(device),
        "u": torch.rand(rows, width - 1, generator=generator).to(device),
        "u_next": torch.rand(rows, generator=generator).to(device),
        "stops": torch.tensor([-1], device=device),
    }


def _assert_explained(name: str, mine: torch.Tensor, theirs: torch.Tensor, near_boundary: torch.Tensor) -> None:
    differs = mine != theirs
    unexplained = differs & ~near_boundary
    assert not bool(unexplained.any()), f"{name}: kernel {mine.tolist()} != reference {theirs.tolist()}"


def check_case(case: Case, device: str) -> None:
    """Kernel == reference for ``case``; raises AssertionError naming what differs."""
    from specdec.kernels.verification import draft_statistics, verify_round

    generator = torch.Generator().manual_seed(0)
    build = _equal_round if case.layout == "p_equals_q" else _mixed_round
    inputs = build(case, generator, device)
    args = [inputs[key] for key in ("logits", "q", "drafts", "counts", "u", "u_next", "stops")]
    temperature = case.temperature
    reference = acceptance_test(temperature)(*args)
    mine = verify_round(*args, temperature, block_size=case.block, fp64_carry=case.fp64_carry)
    logits, q, drafts, counts, u, u_next, stops = args
    rows = torch.arange(logits.shape[0], device=device)

    p = token_probabilities(logits, temperature)
    p_draft = p[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
    q_draft = q[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
    stats = draft_statistics(logits, q, drafts, temperature, block_size=case.block)
    torch.testing.assert_close(stats["p_draft"], p_draft, rtol=1e-5, atol=1e-9, msg=lambda m: f"p(d): {m}")
    assert torch.equal(stats["q_draft"], q_draft), "q(d) differs"

    # an acceptance decision within rounding of its uniform may go either way, and the row's later outputs too
    verified = torch.arange(drafts.shape[1], device=device)[None] < counts[:, None]
    tie = (u * q_draft - p_draft).abs() <= ROUNDING * p_draft.clamp_min(1e-30)
    tied_rows = (tie & verified).any(dim=-1)
    _assert_explained("accepted", mine[0], reference[0], tied_rows)
    _assert_explained("stopped early", mine[2], reference[2], tied_rows)

    following = residual_distribution(p[rows, reference[0]], q[rows, reference[0]]).double()
    cdf = following.cumsum(dim=-1)
    threshold = u_next.double() * cdf[:, -1]
    low, high = torch.minimum(mine[1], reference[1]), torch.maximum(mine[1], reference[1])
    between = (torch.arange(cdf.shape[1], device=device)[None] >= low[:, None]) & (
        torch.arange(cdf.shape[1], device=device)[None] < high[:, None]
    )
    near = ((cdf - threshold[:, None]).abs() <= ROUNDING) & between
    _assert_explained("next token", mine[1], reference[1], tied_rows | near.any(dim=-1))
    assert torch.equal(mine[3], torch.isin(mine[1], stops)), "next_is_stop is not isin(next token, stops)"
    assert [t.dtype for t in mine] == [t.dtype for t in reference], "output dtypes differ"

    accepted, stopped = reference[0].cpu(), reference[2].cpu()
    if case.layout == "p_equals_q":
        mass = (p[rows, reference[0]] - q[rows, reference[0]]).clamp_min(0).sum(dim=-1)
        assert bool((mass == 0).all()) and torch.equal(accepted, counts.cpu()), "the case misses the fallback"
    elif case.width > 2:
        kind = torch.arange(len(accepted)) % 6
        assert bool((accepted[kind == 1] == counts.cpu()[kind == 1]).all()), "the case misses the bonus draw"
        assert bool(stopped[kind == 4].all()), "the case misses a stop token among the accepted drafts"
        if case.temperature > 0:
            assert bool((accepted[kind == 0] < counts.cpu()[kind == 0]).any()), "the case misses a rejection"


def _lossless_decoder_case(device: str) -> None:
    from tests.test_decoding import (
        POSITIONS,
        PROMPT,
        SMALL_VOCAB,
        chi_square_p_value,
        exact_marginals,
        make_drafter,
        small_target,
    )

    target = small_target()
    exact = exact_marginals(target, PROMPT, 1.0, POSITIONS)
    target = target.to(device)
    drafter = make_drafter(target, "dspark").to(device)
    decoder = SpeculativeDecoder(target, drafter, temperature=1.0, max_new_tokens=5, verification="kernel")
    assert decoder.verification_path == "kernel"
    output = decoder.generate([PROMPT] * DECODER_SAMPLES, torch.Generator(device=device).manual_seed(11))
    tokens = torch.tensor([result.token_ids[:POSITIONS] for result in output.results])
    counts = torch.stack([torch.bincount(tokens[:, k], minlength=SMALL_VOCAB) for k in range(POSITIONS)])
    rounds = sum(result.rounds for result in output.results)
    accepted_per_round = sum(sum(result.accepted) for result in output.results) / max(1, rounds)
    assert 0.05 < accepted_per_round < decoder.max_draft_tokens, accepted_per_round
    p_values = [chi_square_p_value(counts[k], exact[k]) for k in range(POSITIONS)]
    assert min(p_values) > 1e-3, p_values


def _greedy_decoder_case(device: str) -> None:
    from tests.test_decoding import GREEDY_PROMPTS, make_drafter

    target = tiny_random_target("qwen3", num_layers=4).to(device)
    drafter = make_drafter(target, "dspark").to(device)
    plain = autoregressive_generate(target, GREEDY_PROMPTS, temperature=0.0, max_new_tokens=16).results
    for engine in ("eager", "static"):
        decoder = SpeculativeDecoder(
            target, drafter, temperature=0.0, max_new_tokens=16, engine=engine, verification="kernel"
        )
        results = decoder.generate(GREEDY_PROMPTS).results
        assert [r.token_ids for r in results] == [r.token_ids for r in plain], engine


def run_checks(device: str, names: list[str]) -> dict[str, str | None]:
    """Each case's failure message, or None where it passed."""
    decoder_cases = {"decoder-lossless-t1": _lossless_decoder_case, "decoder-greedy-equals-plain": _greedy_decoder_case}
    outcomes: dict[str, str | None] = {}
    for name in names:
        try:
            if name in decoder_cases:
                decoder_cases[name](device)
            else:
                check_case(GPU_CASES[name], device)
            outcomes[name] = None
        except Exception as error:  # any failure is this case's, reported by name
            outcomes[name] = f"{type(error).__name__}: {error}"
    return outcomes


@pytest.fixture(scope="module")
def interpreted_outcomes() -> dict[str, str | None]:
    """Run every CPU case once in a subprocess with the Triton interpreter switched on."""
    if not kernels.TRITON_AVAILABLE:
        pytest.skip("triton is not installed")
    return run_checks_interpreted("tests.test_verification_kernel", [*CASES, *DECODER_CASES])


@pytest.mark.parametrize("name", [*CASES, *DECODER_CASES])
def test_kernel_agrees_with_the_reference_under_the_interpreter(interpreted_outcomes, name):
    assert interpreted_outcomes[name] is None, interpreted_outcomes[name]


@pytest.fixture(scope="module")
def random_target():
    return tiny_random_target("qwen3", num_layers=4)


def test_kernel_verification_without_a_usable_triton_is_refused(random_target, monkeypatch):
    from tests.test_decoding import make_drafter

    monkeypatch.setattr(kernels, "TRITON_INTERPRET", False)
    drafter = make_drafter(random_target, "dspark")
    with pytest.raises(ValueError, match="verification='kernel' cannot run here"):
        SpeculativeDecoder(random_target, drafter, temperature=1.0, verification="kernel")
    with pytest.raises(ValueError, match="verification 'fused': expected one of"):
        SpeculativeDecoder(random_target, drafter, temperature=1.0, verification="fused")


def test_decoding_options_choose_the_verification_path(random_target, monkeypatch):
    from specdec.decoding import DecodingOptions
    from specdec.decoding.evaluate import build_decoder
    from tests.test_decoding import make_drafter

    drafter = make_drafter(random_target, "dspark")
    options = DecodingOptions(engine="eager", verification="reference")
    decoder = build_decoder(random_target, drafter, options, stop_token_ids=[0])
    assert decoder.verification == "reference" and decoder.verification_path == "reference"
    monkeypatch.setattr(kernels, "TRITON_INTERPRET", False)
    with pytest.raises(ValueError, match="verification='kernel' cannot run here"):
        build_decoder(random_target, drafter, DecodingOptions(engine="eager", verification="kernel"), [0])
    with pytest.raises(ValueError, match=r"DecodingOptions\.verification = 'fused'"):
        DecodingOptions(verification="fused")


@pytest.mark.usefixtures("one_thread")
def test_auto_verification_on_cpu_is_the_reference(random_target):
    from tests.test_decoding import GREEDY_PROMPTS, make_drafter

    decoder = SpeculativeDecoder(
        random_target, make_drafter(random_target, "dspark"), temperature=1.0, max_new_tokens=4
    )
    assert decoder.verification == "auto" and decoder.verification_path == "reference"
    decoder.warm_up(GREEDY_PROMPTS[:2])
    assert decoder.verification_path == "reference" and decoder.verification_seconds == {}


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION is unset")
def test_kernels_compile_for_a_cuda_target_without_a_gpu():
    """The interpreter accepts what the compiler may not: both kernels, every specialisation the wrapper
    launches, lower to an sm_90 cubin (Triton's bundled ptxas; no device needed)."""
    if not kernels.TRITON_AVAILABLE:
        pytest.skip("triton is not installed")
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as error:
        pytest.skip(f"this Triton has no offline compiler entry point: {error}")
    from specdec.kernels import verification

    scalars = ("width", "vocab", "temperature")
    statistics_signature = {
        **dict.fromkeys(("logits_ptr",), "*bf16"),
        **dict.fromkeys(("q_ptr", "max_ptr", "sum_ptr", "p_draft_ptr", "q_draft_ptr"), "*fp32"),
        **dict.fromkeys(("drafts_ptr", "argmax_ptr"), "*i64"),
        **dict.fromkeys(("logits_row_stride", "logits_slot_stride", "q_row_stride", "q_slot_stride"), "i32"),
        "drafts_row_stride": "i32",
        **dict.fromkeys(scalars, "i32"),
        "temperature": "fp32",
        "GREEDY": "constexpr",
        "BLOCK": "constexpr",
    }
    draw_signature = {
        "logits_ptr": "*bf16",
        **dict.fromkeys(("q_ptr", "max_ptr", "sum_ptr", "u_ptr"), "*fp32"),
        **dict.fromkeys(("slots_ptr", "tokens_ptr"), "*i64"),
        **dict.fromkeys(("logits_row_stride", "logits_slot_stride", "q_row_stride", "q_slot_stride"), "i32"),
        **dict.fromkeys(scalars, "i32"),
        "temperature": "fp32",
        "min_mass": "fp32",
        "CARRY": "constexpr",
        "BLOCK": "constexpr",
    }
    target = GPUTarget("cuda", 90, 32)
    launches = [
        (verification._slot_statistics_kernel, statistics_signature, {"GREEDY": greedy, "BLOCK": 4096})
        for greedy in (False, True)
    ] + [
        (verification._residual_draw_kernel, draw_signature, {"CARRY": carry, "BLOCK": 4096})
        for carry in (tl.float64, tl.float32)
    ]
    for kernel, signature, constexprs in launches:
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=target, options={"num_warps": 8})
        assert compiled.asm.get("cubin"), kernel


@pytest.mark.gpu
@pytest.mark.parametrize("name", [*GPU_CASES, *DECODER_CASES])
def test_kernel_agrees_with_the_reference_on_cuda(name):
    outcome = run_checks("cuda", [name])[name]
    assert outcome is None, outcome


@pytest.mark.gpu
def test_auto_verification_on_cuda_times_both_paths():
    from tests.test_decoding import GREEDY_PROMPTS, make_drafter

    target = tiny_random_target("qwen3", num_layers=4).cuda()
    decoder = SpeculativeDecoder(
        target, make_drafter(target, "dspark").cuda(), temperature=1.0, max_new_tokens=8, engine="compiled"
    )
    assert decoder.verification_path == "reference"
    decoder.warm_up(GREEDY_PROMPTS[:2])
    assert set(decoder.verification_seconds) == {"reference", "kernel"}
    faster = min(decoder.verification_seconds, key=decoder.verification_seconds.get)
    assert decoder.verification_path == faster
