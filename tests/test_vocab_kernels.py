"""The Triton vocabulary-loss kernels against the PyTorch reference and the chunked path, in value and gradient.

On CPU the kernels run under the Triton interpreter, which must be switched on before Triton is first
imported: the checks run once in a subprocess with ``TRITON_INTERPRET=1`` and report per case, so the
variable never reaches the other tests. The ``gpu`` copy runs the same checks compiled on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from specdec.kernels import TRITON_AVAILABLE

from tests.triton_interpreter import run_checks_interpreted


@dataclass(frozen=True)
class Case:
    term: str  # "dspark" or "soft_ce"
    shape: tuple[int, ...]
    vocab: int
    block: int
    dtype: str = "float32"
    mask: str = "none"  # "none", "random" or "empty"


CASES = {
    "dspark-fp32-vocab-not-multiple-of-block": Case("dspark", (3, 5), 1000, 128),
    "dspark-fp32-leading-bnk-row-mask": Case("dspark", (2, 3, 4), 777, 64, mask="random"),
    "dspark-bf16": Case("dspark", (6,), 515, 128, dtype="bfloat16"),
    "dspark-block-wider-than-vocab": Case("dspark", (4,), 100, 4096),
    "dspark-all-rows-masked": Case("dspark", (2, 3), 50, 32, mask="empty"),
    "soft_ce-fp32-vocab-not-multiple-of-block": Case("soft_ce", (3, 5), 1000, 128),
    "soft_ce-fp32-leading-bnk-row-mask": Case("soft_ce", (2, 3, 4), 777, 64, mask="random"),
    "soft_ce-bf16": Case("soft_ce", (6,), 515, 256, dtype="bfloat16"),
}
GPU_CASES = {
    **CASES,
    "dspark-bf16-qwen-vocab": Case("dspark", (2, 7), 151_936, 4096, dtype="bfloat16", mask="random"),
    "soft_ce-bf16-qwen-vocab": Case("soft_ce", (2, 7), 151_936, 4096, dtype="bfloat16", mask="random"),
}


def _outputs(case: Case, impl: str, device: str) -> list[torch.Tensor]:
    """The term(s) of ``case`` under ``impl`` and the gradients of random projections of them."""
    from specdec.losses import dspark_vocab_terms, soft_cross_entropy

    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, case.dtype)
    full_shape = (*case.shape, case.vocab)
    draft = (torch.randn(full_shape, generator=generator) * 3).to(device=device, dtype=dtype).requires_grad_()
    target = (torch.randn(full_shape, generator=generator) * 3).to(device=device, dtype=dtype)
    labels = torch.randint(0, case.vocab, case.shape, generator=generator).to(device)
    upstream = [torch.randn(case.shape, generator=generator).to(device) for _ in range(2)]
    row_mask = {
        "none": None,
        "random": (torch.rand(case.shape, generator=generator) > 0.3).to(device),
        "empty": torch.zeros(case.shape, dtype=torch.bool, device=device),
    }[case.mask]
    if case.term == "dspark":
        terms = dspark_vocab_terms(draft, target, labels, row_mask=row_mask, impl=impl, chunk_size=case.block)
    else:
        terms = (soft_cross_entropy(draft, target, row_mask=row_mask, impl=impl, chunk_size=case.block),)
    scalar = sum((term * weight).sum() for term, weight in zip(terms, upstream, strict=False))
    (grad,) = torch.autograd.grad(scalar, draft)
    assert grad.dtype == dtype and all(term.dtype == torch.float32 for term in terms)
    return [term.detach().float().cpu() for term in terms] + [grad.float().cpu()]


def check_case(case: Case, device: str) -> None:
    """Triton == reference == chunked for ``case``; raises AssertionError naming what differs."""
    results = {impl: _outputs(case, impl, device) for impl in ("reference", "chunked", "triton")}
    grad_tolerance = {"rtol": 1e-4, "atol": 1e-6} if case.dtype == "float32" else {"rtol": 1e-2, "atol": 1e-4}
    for other in ("reference", "chunked"):
        *triton_terms, triton_grad = results["triton"]
        *other_terms, other_grad = results[other]
        for index, (mine, theirs) in enumerate(zip(triton_terms, other_terms, strict=True)):
            torch.testing.assert_close(
                mine, theirs, rtol=1e-4, atol=1e-5, msg=lambda m, i=index, o=other: f"term {i} vs {o}: {m}"
            )
        torch.testing.assert_close(
            triton_grad, other_grad, **grad_tolerance, msg=lambda m, o=other: f"grad vs {o}: {m}"
        )


def run_checks(device: str, names: list[str]) -> dict[str, str | None]:
    """Each case's failure message, or None where it passed."""
    outcomes: dict[str, str | None] = {}
    for name in names:
        try:
            check_case(GPU_CASES[name], device)
            outcomes[name] = None
        except AssertionError as error:
            outcomes[name] = str(error)
    return outcomes


@pytest.fixture(scope="module")
def interpreted_outcomes() -> dict[str, str | None]:
    """Run every CPU case once in a subprocess with the Triton interpreter switched on."""
    if not TRITON_AVAILABLE:
        pytest.skip("triton is not installed")
    return run_checks_interpreted("tests.test_vocab_kernels", list(CASES))


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernels_agree_under_the_interpreter(interpreted_outcomes, name):
    assert interpreted_outcomes[name] is None, interpreted_outcomes[name]


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_triton_kernels_agree_on_cuda(name):
    check_case(GPU_CASES[name], "cuda")
