import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from specdec.kernels import kernels_usable_on

from specdec.losses import (
    dspark_loss,
    dspark_vocab_terms,
    eagle3_loss,
    global_weight_scale,
    position_weights,
    resolve_impl,
    soft_cross_entropy,
)
from specdec.losses.dspark import expected_accepted_length

PYTORCH_IMPLS = ("reference", "chunked")


def random_logits(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def naive_row_terms(draft: list[float], target: list[float], label: int) -> dict[str, object]:
    """ce, l1, soft CE and their gradients for one row, written out element by element in float64."""
    draft_max, target_max = max(draft), max(target)
    draft_z = sum(math.exp(x - draft_max) for x in draft)
    target_z = sum(math.exp(x - target_max) for x in target)
    draft_lse = draft_max + math.log(draft_z)
    p_d = [math.exp(x - draft_max) / draft_z for x in draft]
    p_t = [math.exp(x - target_max) / target_z for x in target]
    signs = [(a > b) - (a < b) for a, b in zip(p_d, p_t, strict=True)]
    signed_mass = sum(s * p for s, p in zip(signs, p_d, strict=True))
    return {
        "ce": draft_lse - draft[label],
        "l1": sum(abs(a - b) for a, b in zip(p_d, p_t, strict=True)),
        "sce": -sum(pt * (x - draft_lse) for pt, x in zip(p_t, draft, strict=True)),
        "grad_ce": [p - (j == label) for j, p in enumerate(p_d)],
        "grad_l1": [p * (s - signed_mass) for p, s in zip(p_d, signs, strict=True)],
        "grad_sce": [a - b for a, b in zip(p_d, p_t, strict=True)],
    }


def naive_terms(draft: torch.Tensor, target: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row-by-row :func:`naive_row_terms` over any leading shape, as float64 tensors."""
    vocab = draft.shape[-1]
    rows = [
        naive_row_terms(d.tolist(), t.tolist(), int(y))
        for d, t, y in zip(
            draft.detach().double().reshape(-1, vocab),
            target.double().reshape(-1, vocab),
            labels.reshape(-1),
            strict=True,
        )
    ]
    out = {}
    for key in rows[0]:
        values = torch.tensor([row[key] for row in rows], dtype=torch.float64)
        out[key] = values.reshape(draft.shape if key.startswith("grad") else draft.shape[:-1])
    return out


def draft_grad(value: torch.Tensor, draft: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad((value * upstream).sum(), draft)
    return grad


@pytest.mark.parametrize("impl", PYTORCH_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dspark_terms_match_the_naive_formulas(impl, dtype):
    shape, vocab = (2, 3, 4), 37
    draft = random_logits(*shape, vocab, dtype=dtype, seed=1).requires_grad_()
    target = random_logits(*shape, vocab, dtype=dtype, seed=2)
    labels = torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(3))
    row_mask = torch.rand(shape, generator=torch.Generator().manual_seed(4)) > 0.3
    naive = naive_terms(draft, target, labels)

    ce, l1 = dspark_vocab_terms(draft, target, labels, row_mask=row_mask, impl=impl, chunk_size=8)
    assert ce.dtype == l1.dtype == torch.float32 and ce.shape == l1.shape == shape
    keep = row_mask.double()
    torch.testing.assert_close(ce.double(), naive["ce"] * keep, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1.double(), naive["l1"] * keep, rtol=1e-5, atol=1e-5)

    up_ce, up_l1 = random_logits(*shape, seed=5), random_logits(*shape, seed=6)
    grad = draft_grad(ce * up_ce + l1 * up_l1, draft, torch.ones(shape))
    assert grad.dtype == dtype
    expected = (naive["grad_ce"] * up_ce[..., None].double() + naive["grad_l1"] * up_l1[..., None].double()) * keep[
        ..., None
    ]
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    torch.testing.assert_close(grad.double(), expected, **tolerance)
    assert not grad[~row_mask].any()


@pytest.mark.parametrize("impl", PYTORCH_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_cross_entropy_matches_the_naive_formula(impl, dtype):
    shape, vocab = (3, 5), 29
    draft = random_logits(*shape, vocab, dtype=dtype, seed=7).requires_grad_()
    target = random_logits(*shape, vocab, dtype=dtype, seed=8)
    row_mask = torch.rand(shape, generator=torch.Generator().manual_seed(9)) > 0.4
    naive = naive_terms(draft, target, torch.zeros(shape, dtype=torch.long))

    loss = soft_cross_entropy(draft, target, row_mask=row_mask, impl=impl, chunk_size=6)
    keep = row_mask.double()
    torch.testing.assert_close(loss.double(), naive["sce"] * keep, rtol=1e-5, atol=1e-5)
    upstream = random_logits(*shape, seed=10)
    grad = draft_grad(loss, draft, upstream)
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-3}
    torch.testing.assert_close(grad.double(), naive["grad_sce"] * (upstream.double() * keep)[..., None], **tolerance)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 6),
    vocab=st.integers(2, 200),
    chunk_size=st.integers(1, 64),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_chunked_agrees_with_reference(rows, vocab, chunk_size, masked, seed):
    generator = torch.Generator().manual_seed(seed)
    draft = (torch.randn(rows, vocab, generator=generator) * 4).requires_grad_()
    target = torch.randn(rows, vocab, generator=generator) * 4
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    row_mask = torch.rand(rows, generator=generator) > 0.5 if masked else None
    up_ce, up_l1 = torch.randn(rows, generator=generator), torch.randn(rows, generator=generator)

    results = {}
    for impl in PYTORCH_IMPLS:
        ce, l1 = dspark_vocab_terms(draft, target, labels, row_mask=row_mask, impl=impl, chunk_size=chunk_size)
        sce = soft_cross_entropy(draft, target, row_mask=row_mask, impl=impl, chunk_size=chunk_size)
        (grad_terms,) = torch.autograd.grad((ce * up_ce + l1 * up_l1).sum(), draft)
        (grad_sce,) = torch.autograd.grad((sce * up_ce).sum(), draft)
        results[impl] = (ce, l1, sce, grad_terms, grad_sce)
    for chunked, reference in zip(results["chunked"], results["reference"], strict=True):
        torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", PYTORCH_IMPLS)
def test_fully_masked_rows_give_zeros_and_zero_grad(impl):
    draft = random_logits(2, 3, 11).requires_grad_()
    target = random_logits(2, 3, 11, seed=1)
    labels = torch.zeros(2, 3, dtype=torch.long)
    nothing = torch.zeros(2, 3, dtype=torch.bool)
    ce, l1 = dspark_vocab_terms(draft, target, labels, row_mask=nothing, impl=impl)
    sce = soft_cross_entropy(draft, target, row_mask=nothing, impl=impl)
    assert not ce.any() and not l1.any() and not sce.any()
    (grad,) = torch.autograd.grad((ce + l1 + sce).sum(), draft)
    assert not grad.any()


@pytest.mark.parametrize("impl", PYTORCH_IMPLS)
def test_target_logits_never_receive_gradient(impl):
    draft = random_logits(4, 13).requires_grad_()
    target = random_logits(4, 13, seed=1).requires_grad_()
    ce, l1 = dspark_vocab_terms(draft, target, torch.arange(4), impl=impl)
    (ce + l1 + soft_cross_entropy(draft, target, impl=impl)).sum().backward()
    assert target.grad is None and draft.grad is not None


def test_identical_distributions_have_zero_l1_and_entropy_as_soft_ce():
    logits = random_logits(5, 17)
    _, l1 = dspark_vocab_terms(logits, logits.clone(), torch.zeros(5, dtype=torch.long), impl="chunked")
    torch.testing.assert_close(l1, torch.zeros(5), atol=1e-6, rtol=0)
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(soft_cross_entropy(logits, logits, impl="chunked", chunk_size=4), entropy)


def test_shape_errors_are_clear():
    draft = random_logits(2, 7)
    with pytest.raises(ValueError, match="target_logits"):
        dspark_vocab_terms(draft, random_logits(2, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="row_mask"):
        soft_cross_entropy(draft, draft, row_mask=torch.ones(2))
    with pytest.raises(ValueError, match="impl"):
        soft_cross_entropy(draft, draft, impl="fast")


def test_auto_picks_the_chunked_path_on_cpu_and_triton_needs_a_device():
    assert resolve_impl("auto", torch.device("cpu")) == "chunked"
    if kernels_usable_on("cpu"):
        assert resolve_impl("triton", torch.device("cpu")) == "triton"
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            resolve_impl("triton", torch.device("cpu"))


def test_losses_import_and_run_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, specdec.losses as L\n"
        "d = torch.randn(3, 10, requires_grad=True)\n"
        "ce, l1 = L.dspark_vocab_terms(d, torch.randn(3, 10), torch.zeros(3, dtype=torch.long))\n"
        "(ce + l1 + L.soft_cross_entropy(d, torch.randn(3, 10))).sum().backward()\n"
        "try:\n"
        "    L.soft_cross_entropy(d, d, impl='triton')\n"
        "except RuntimeError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('triton impl accepted without triton')\n"
        "assert 'specdec.kernels.vocab_losses' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- DSpark combination -------------------------------------------------------------------------------------


def dspark_inputs(batch: int = 2, anchors: int = 3, slots: int = 4, vocab: int = 23, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, anchors, slots)
    draft = (torch.randn(*shape, vocab, generator=generator) * 2).requires_grad_()
    target = torch.randn(*shape, vocab, generator=generator) * 2
    target_ids = torch.randint(0, vocab, shape, generator=generator)
    valid_prefix = torch.randint(0, slots + 1, shape[:-1], generator=generator)
    eval_mask = torch.arange(slots) < valid_prefix[..., None]
    confidence = torch.randn(shape, generator=generator).requires_grad_()
    return draft, target, target_ids, eval_mask, confidence


def test_position_weights_decay_exponentially_and_respect_the_mask():
    eval_mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    weights = position_weights(eval_mask, gamma=4.0)
    expected = torch.exp(-torch.arange(5.0) / 4.0)
    torch.testing.assert_close(weights[1], expected)
    torch.testing.assert_close(weights[0], expected * torch.tensor([1.0, 1, 1, 0, 0]))
    assert weights.dtype == torch.float32


def test_dspark_loss_matches_a_hand_computation():
    draft, target, target_ids, eval_mask, confidence = dspark_inputs()
    out = dspark_loss(draft, target, target_ids, eval_mask, confidence, impl="chunked")

    probs_d, probs_t = draft.detach().softmax(-1), target.softmax(-1)
    ce = torch.nn.functional.cross_entropy(draft.detach().flatten(0, 2), target_ids.flatten(), reduction="none")
    ce = ce.view_as(target_ids)
    l1 = (probs_d - probs_t).abs().sum(-1)
    weights = eval_mask.float() * torch.exp(-torch.arange(4.0) / 4.0)
    c_star = (1 - l1 / 2).clamp(0, 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(confidence.detach(), c_star, reduction="none")
    total = weights.sum()
    torch.testing.assert_close(out.ce, (weights * ce).sum() / total)
    torch.testing.assert_close(out.l1, (weights * l1).sum() / total)
    torch.testing.assert_close(out.confidence, (weights * bce).sum() / total)
    torch.testing.assert_close(out.loss, 0.1 * out.ce + 0.9 * out.l1 + out.confidence)
    torch.testing.assert_close(out.weight_sum, total)

    alpha = torch.where(eval_mask, 1 - l1 / 2, 0.0)
    per_slot = alpha.flatten(0, 1).sum(0) / eval_mask.flatten(0, 1).sum(0).clamp_min(1)
    torch.testing.assert_close(out.accept_rate, per_slot)
    valid_blocks = eval_mask.any(-1)
    tau = (1 + torch.cumprod(alpha, -1).sum(-1))[valid_blocks].mean()
    torch.testing.assert_close(out.tau_probabilistic, tau)
    error = (confidence.detach().sigmoid() - c_star)[eval_mask]
    torch.testing.assert_close(out.confidence_bias, error.mean())
    torch.testing.assert_close(out.confidence_abs_error, error.abs().mean())


def test_tau_follows_the_prefix_product():
    alpha = torch.tensor([[0.5, 0.5, 0.5], [0.9, 0.1, 0.9], [0.3, 0.3, 0.3]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    numerator, denominator = expected_accepted_length(alpha, mask)
    assert denominator.item() == 2
    torch.testing.assert_close(numerator, torch.tensor((1 + 0.5 + 0.25) + (1 + 0.9 + 0.09 + 0.081)))


def test_dspark_loss_agrees_across_impls():
    draft, target, target_ids, eval_mask, confidence = dspark_inputs(seed=3)
    outs = {}
    for impl in PYTORCH_IMPLS:
        out = dspark_loss(draft, target, target_ids, eval_mask, confidence, impl=impl)
        outs[impl] = (out.loss, *torch.autograd.grad(out.loss, (draft, confidence)))
    for chunked, reference in zip(outs["chunked"], outs["reference"], strict=True):
        torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-6)


def test_masked_slots_do_not_count():
    draft, target, target_ids, eval_mask, confidence = dspark_inputs(seed=4)
    out = dspark_loss(draft, target, target_ids, eval_mask, confidence, impl="chunked")
    draft_grad, confidence_grad = torch.autograd.grad(out.loss, (draft, confidence))
    assert not draft_grad[~eval_mask].any() and not confidence_grad[~eval_mask].any()

    scrambled = draft.detach().clone()
    scrambled[~eval_mask] = 100.0 * torch.randn_like(scrambled[~eval_mask])
    scrambled_ids = torch.where(eval_mask, target_ids, 0)
    again = dspark_loss(scrambled, target, scrambled_ids, eval_mask, confidence, impl="chunked")
    torch.testing.assert_close(again.loss, out.loss)


@pytest.mark.parametrize("impl", PYTORCH_IMPLS)
def test_all_masked_batch_gives_zero_loss_without_nan(impl):
    draft, target, target_ids, eval_mask, confidence = dspark_inputs()
    out = dspark_loss(draft, target, target_ids, torch.zeros_like(eval_mask), confidence, impl=impl)
    assert out.loss.item() == 0.0
    draft_grad, confidence_grad = torch.autograd.grad(out.loss, (draft, confidence))
    for value in (draft_grad, confidence_grad, out.accept_rate, out.tau_probabilistic, out.confidence_bias):
        assert torch.isfinite(value).all() and not value.any()


def test_confidence_target_is_detached():
    draft, target, target_ids, eval_mask, confidence = dspark_inputs(seed=5)
    out = dspark_loss(draft, target, target_ids, eval_mask, confidence, ce_alpha=0.0, l1_alpha=0.0, impl="chunked")
    draft_grad, confidence_grad = torch.autograd.grad(out.loss, (draft, confidence))
    assert not draft_grad.any()
    assert confidence_grad[eval_mask].abs().min() > 0


def test_dflash_configuration_is_position_weighted_cross_entropy():
    draft, target, target_ids, eval_mask, _ = dspark_inputs(seed=6)
    out = dspark_loss(draft, target, target_ids, eval_mask, None, ce_alpha=1.0, l1_alpha=0.0, impl="chunked")
    assert out.confidence.item() == 0.0 and out.confidence_bias is None
    torch.testing.assert_close(out.loss, out.ce)


def test_weight_scale_without_distributed_is_the_inverse_local_sum():
    scale, total = global_weight_scale(torch.tensor(8.0))
    assert scale.item() == pytest.approx(1 / 8) and total.item() == 8.0
    scale, _ = global_weight_scale(torch.tensor(0.0))
    assert torch.isfinite(scale)


# --- world-size normalisation, two gloo ranks --------------------------------------------------------------

HIDDEN, VOCAB = 8, 19


def ddp_batch() -> tuple[torch.Tensor, ...]:
    """A batch of 2 sequences whose valid-slot counts differ a lot, so rank-local means would be wrong."""
    generator = torch.Generator().manual_seed(11)
    shape = (2, 3, 4)
    hidden = torch.randn(*shape, HIDDEN, generator=generator)
    target = torch.randn(*shape, VOCAB, generator=generator) * 2
    target_ids = torch.randint(0, VOCAB, shape, generator=generator)
    eval_mask = torch.arange(4) < torch.tensor([[4, 4, 3], [1, 0, 0]])[..., None]
    return hidden, target, target_ids, eval_mask


def ddp_parameters() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(12)
    head = (torch.randn(HIDDEN, VOCAB, generator=generator) * 0.5).requires_grad_()
    confidence_head = torch.randn(HIDDEN, generator=generator).requires_grad_()
    return head, confidence_head


def ddp_loss_and_grads(hidden, target, target_ids, eval_mask) -> tuple[torch.Tensor, ...]:
    head, confidence_head = ddp_parameters()
    out = dspark_loss(hidden @ head, target, target_ids, eval_mask, hidden @ confidence_head, impl="chunked")
    out.loss.backward()
    return out.loss.detach(), head.grad, confidence_head.grad


def ddp_rank(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        shard = [part[rank : rank + 1] for part in ddp_batch()]
        torch.save(ddp_loss_and_grads(*shard), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_world_size_normalisation_matches_one_process_on_the_whole_batch(tmp_path):
    world_size = 2
    mp.spawn(ddp_rank, args=(world_size, str(tmp_path / "init"), str(tmp_path)), nprocs=world_size, join=True)
    per_rank = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(world_size)]
    averaged = [torch.stack(values).mean(0) for values in zip(*per_rank, strict=True)]  # what DDP does

    whole = ddp_loss_and_grads(*ddp_batch())
    for ddp_value, single_value in zip(averaged, whole, strict=True):
        torch.testing.assert_close(ddp_value, single_value, rtol=1e-5, atol=1e-6)

    local_means = [ddp_loss_and_grads(*[part[r : r + 1] for part in ddp_batch()]) for r in range(world_size)]
    naive_head_grad = torch.stack([grads[1] for grads in local_means]).mean(0)
    assert not torch.allclose(naive_head_grad, whole[1], rtol=1e-3, atol=1e-5)  # the test can tell them apart


# --- Eagle3 ---------------------------------------------------------------------------------------------------


def eagle3_inputs(steps: int = 3, batch: int = 2, length: int = 5, vocab: int = 17):
    generator = torch.Generator().manual_seed(21)
    drafts = [(torch.randn(batch, length, vocab, generator=generator) * 2).requires_grad_() for _ in range(steps)]
    targets = [torch.randn(batch, length, vocab, generator=generator) * 2 for _ in range(steps)]
    base = torch.rand(batch, length, generator=generator) > 0.2
    masks = [torch.cat([base[:, s:], torch.zeros(batch, s, dtype=torch.bool)], dim=1) for s in range(steps)]
    return drafts, targets, masks


def test_eagle3_loss_matches_a_hand_computation():
    drafts, targets, masks = eagle3_inputs()
    out = eagle3_loss(drafts, targets, masks, step_decay=0.8, impl="chunked")

    expected_total = 0.0
    for step, (draft, target, mask) in enumerate(zip(drafts, targets, masks, strict=True)):
        per_position = -(target.softmax(-1) * draft.detach().log_softmax(-1)).sum(-1)
        step_loss = (per_position * mask).sum() / mask.numel()
        expected_total += 0.8**step * step_loss
        torch.testing.assert_close(out.step_losses[step], step_loss)
        correct = (draft.argmax(-1) == target.argmax(-1)) & mask
        torch.testing.assert_close(out.accuracy[step], correct.sum() / mask.sum())
        tv = 0.5 * (draft.detach().softmax(-1) - target.softmax(-1)).abs().sum(-1)
        torch.testing.assert_close(out.accept_rate[step], (1 - tv)[mask].mean())
        assert out.valid_tokens[step].item() == mask.sum().item()
    torch.testing.assert_close(out.loss, expected_total)
    assert 1.0 <= out.tau_probabilistic.item() <= 1.0 + len(drafts)


def test_eagle3_loss_agrees_across_impls_in_value_and_gradient():
    drafts, targets, masks = eagle3_inputs()
    results = {}
    for impl in PYTORCH_IMPLS:
        out = eagle3_loss(drafts, targets, masks, impl=impl)
        results[impl] = (out.loss, out.tau_probabilistic, *torch.autograd.grad(out.loss, drafts))
    for chunked, reference in zip(results["chunked"], results["reference"], strict=True):
        torch.testing.assert_close(chunked, reference, rtol=1e-4, atol=1e-6)


def test_eagle3_loss_refuses_mismatched_steps():
    drafts, targets, masks = eagle3_inputs()
    with pytest.raises(ValueError, match="same positive number"):
        eagle3_loss(drafts, targets[:-1], masks)
