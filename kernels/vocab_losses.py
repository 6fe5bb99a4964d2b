"""Triton kernels for the vocabulary-sized loss terms (DSpark CE + L1, Eagle3 soft cross-entropy).

One program per row walks the vocabulary in blocks: an online logsumexp pass, then (DSpark only) a pass for
``l1 = Σ|p_d − p_t|`` and ``Σ s·p_d`` with ``s = sign(p_d − p_t)``. Backward recomputes the probabilities
block by block from the saved per-row logsumexps and writes the gradient in the logits' dtype, so no fp32
``[rows, V]`` tensor exists at any point. The plain PyTorch reference these are tested against is
``specdec.losses.reference``; the math is the same as ``specdec.losses.chunked``.

Runs on CUDA, and on CPU when ``TRITON_INTERPRET=1`` was set before Triton was first imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_BLOCK_SIZE = 4096


@triton.jit
def _dspark_terms_forward_kernel(
    draft_ptr,
    target_ptr,
    ids_ptr,
    rows_ptr,
    ce_ptr,
    l1_ptr,
    draft_lse_ptr,
    target_lse_ptr,
    signed_mass_ptr,
    draft_row_stride,
    target_row_stride,
    vocab,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    row = tl.load(rows_ptr + program)
    draft_row = draft_ptr + row * draft_row_stride
    target_row = target_ptr + row * target_row_stride
    offsets = tl.arange(0, BLOCK)

    draft_max = float("-inf")
    draft_sum = 0.0
    target_max = float("-inf")
    target_sum = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        valid = cols < vocab
        draft = tl.load(draft_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        target = tl.load(target_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        new_draft_max = tl.maximum(draft_max, tl.max(draft, axis=0))
        draft_sum = draft_sum * tl.exp(draft_max - new_draft_max) + tl.sum(tl.exp(draft - new_draft_max), axis=0)
        draft_max = new_draft_max
        new_target_max = tl.maximum(target_max, tl.max(target, axis=0))
        target_sum = target_sum * tl.exp(target_max - new_target_max) + tl.sum(tl.exp(target - new_target_max), axis=0)
        target_max = new_target_max
    draft_lse = draft_max + tl.log(draft_sum)
    target_lse = target_max + tl.log(target_sum)

    l1 = tl.zeros([BLOCK], dtype=tl.float32)
    signed_mass = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        valid = cols < vocab
        draft = tl.load(draft_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        target = tl.load(target_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        draft_probs = tl.exp(draft - draft_lse)
        gap = draft_probs - tl.exp(target - target_lse)
        l1 += tl.abs(gap)
        signed_mass += tl.where(gap > 0, draft_probs, tl.where(gap < 0, -draft_probs, 0.0))

    label = tl.load(ids_ptr + row)
    label_logit = tl.load(draft_row + label).to(tl.float32)
    tl.store(ce_ptr + row, draft_lse - label_logit)
    tl.store(l1_ptr + row, tl.sum(l1, axis=0))
    tl.store(draft_lse_ptr + program, draft_lse)
    tl.store(target_lse_ptr + program, target_lse)
    tl.store(signed_mass_ptr + program, tl.sum(signed_mass, axis=0))


@triton.jit
def _dspark_terms_backward_kernel(
    draft_ptr,
    target_ptr,
    ids_ptr,
    rows_ptr,
    grad_ce_ptr,
    grad_l1_ptr,
    draft_lse_ptr,
    target_lse_ptr,
    signed_mass_ptr,
    grad_ptr,
    draft_row_stride,
    target_row_stride,
    grad_row_stride,
    vocab,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    row = tl.load(rows_ptr + program)
    draft_row = draft_ptr + row * draft_row_stride
    target_row = target_ptr + row * target_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    offsets = tl.arange(0, BLOCK)

    draft_lse = tl.load(draft_lse_ptr + program)
    target_lse = tl.load(target_lse_ptr + program)
    grad_ce = tl.load(grad_ce_ptr + row).to(tl.float32)
    grad_l1 = tl.load(grad_l1_ptr + row).to(tl.float32)
    offset = grad_ce - grad_l1 * tl.load(signed_mass_ptr + program)
    label = tl.load(ids_ptr + row)
    # ∂/∂d_j = p_d,j · (g_ce + g_l1 · (s_j − Σ s·p_d)) − g_ce · [j = y]
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        valid = cols < vocab
        draft = tl.load(draft_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        target = tl.load(target_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        draft_probs = tl.exp(draft - draft_lse)
        gap = draft_probs - tl.exp(target - target_lse)
        sign = tl.where(gap > 0, 1.0, tl.where(gap < 0, -1.0, 0.0))
        grad = draft_probs * (offset + grad_l1 * sign) - tl.where(cols == label, grad_ce, 0.0)
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _soft_cross_entropy_forward_kernel(
    draft_ptr,
    target_ptr,
    rows_ptr,
    loss_ptr,
    draft_lse_ptr,
    target_lse_ptr,
    draft_row_stride,
    target_row_stride,
    vocab,
    BLOCK: tl.constexpr,
):
    # sce = lse(d) − Σ p_t·d, with Σ e^(t − max_t)·d accumulated next to the target's online logsumexp.
    program = tl.program_id(0)
    row = tl.load(rows_ptr + program)
    draft_row = draft_ptr + row * draft_row_stride
    target_row = target_ptr + row * target_row_stride
    offsets = tl.arange(0, BLOCK)

    draft_max = float("-inf")
    draft_sum = 0.0
    target_max = float("-inf")
    target_sum = 0.0
    weighted_draft = 0.0
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        valid = cols < vocab
        draft = tl.load(draft_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        target = tl.load(target_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        new_draft_max = tl.maximum(draft_max, tl.max(draft, axis=0))
        draft_sum = draft_sum * tl.exp(draft_max - new_draft_max) + tl.sum(tl.exp(draft - new_draft_max), axis=0)
        draft_max = new_draft_max
        new_target_max = tl.maximum(target_max, tl.max(target, axis=0))
        rescale = tl.exp(target_max - new_target_max)
        target_exp = tl.exp(target - new_target_max)
        target_sum = target_sum * rescale + tl.sum(target_exp, axis=0)
        weighted_draft = weighted_draft * rescale + tl.sum(target_exp * tl.where(valid, draft, 0.0), axis=0)
        target_max = new_target_max
    draft_lse = draft_max + tl.log(draft_sum)
    tl.store(loss_ptr + row, draft_lse - weighted_draft / target_sum)
    tl.store(draft_lse_ptr + program, draft_lse)
    tl.store(target_lse_ptr + program, target_max + tl.log(target_sum))


@triton.jit
def _soft_cross_entropy_backward_kernel(
    draft_ptr,
    target_ptr,
    rows_ptr,
    grad_loss_ptr,
    draft_lse_ptr,
    target_lse_ptr,
    grad_ptr,
    draft_row_stride,
    target_row_stride,
    grad_row_stride,
    vocab,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    row = tl.load(rows_ptr + program)
    draft_row = draft_ptr + row * draft_row_stride
    target_row = target_ptr + row * target_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    offsets = tl.arange(0, BLOCK)

    draft_lse = tl.load(draft_lse_ptr + program)
    target_lse = tl.load(target_lse_ptr + program)
    grad_loss = tl.load(grad_loss_ptr + row).to(tl.float32)
    for start in range(0, vocab, BLOCK):
        cols = start + offsets
        valid = cols < vocab
        draft = tl.load(draft_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        target = tl.load(target_row + cols, mask=valid, other=float("-inf")).to(tl.float32)
        grad = grad_loss * (tl.exp(draft - draft_lse) - tl.exp(target - target_lse))
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=valid)


def _block_size(requested: int | None, vocab: int) -> int:
    """A power of two no larger than ``requested`` (default ``DEFAULT_BLOCK_SIZE``) nor than needed for ``vocab``."""
    block = 1 << (max(requested or DEFAULT_BLOCK_SIZE, 16).bit_length() - 1)
    return min(block, max(triton.next_power_of_2(vocab), 16))


def _launch_options(block: int) -> dict[str, int]:
    return {"num_warps": 8 if block >= 2048 else 4}


def _prepare(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if draft_logits.dim() != 2 or target_logits.shape != draft_logits.shape:
        raise ValueError(f"expected matching [rows, V] logits, got {draft_logits.shape} and {target_logits.shape}")
    if draft_logits.stride(-1) != 1:
        draft_logits = draft_logits.contiguous()
    if target_logits.stride(-1) != 1:
        target_logits = target_logits.contiguous()
    if rows is None:
        rows = torch.arange(draft_logits.shape[0], device=draft_logits.device)
    return draft_logits, target_logits, rows.to(device=draft_logits.device, dtype=torch.int64).contiguous()


class _DSparkTermsTriton(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        draft_logits: torch.Tensor,
        target_logits: torch.Tensor,
        target_ids: torch.Tensor,
        rows: torch.Tensor,
        block: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        total_rows, vocab = draft_logits.shape
        count = rows.numel()
        ids = target_ids.to(torch.int64).contiguous()
        ce = torch.zeros(total_rows, dtype=torch.float32, device=draft_logits.device)
        l1 = torch.zeros_like(ce)
        draft_lse, target_lse, signed_mass = (ce.new_empty(count) for _ in range(3))
        if count:
            _dspark_terms_forward_kernel[(count,)](
                draft_logits,
                target_logits,
                ids,
                rows,
                ce,
                l1,
                draft_lse,
                target_lse,
                signed_mass,
                draft_logits.stride(0),
                target_logits.stride(0),
                vocab,
                BLOCK=block,
                **_launch_options(block),
            )
        ctx.save_for_backward(draft_logits, target_logits, ids, rows, draft_lse, target_lse, signed_mass)
        ctx.block = block
        return ce, l1

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_ce: torch.Tensor, grad_l1: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        draft_logits, target_logits, ids, rows, draft_lse, target_lse, signed_mass = ctx.saved_tensors
        count = rows.numel()
        full = count == draft_logits.shape[0]
        grad = torch.empty_like(draft_logits) if full else torch.zeros_like(draft_logits)
        if count:
            _dspark_terms_backward_kernel[(count,)](
                draft_logits,
                target_logits,
                ids,
                rows,
                grad_ce.contiguous(),
                grad_l1.contiguous(),
                draft_lse,
                target_lse,
                signed_mass,
                grad,
                draft_logits.stride(0),
                target_logits.stride(0),
                grad.stride(0),
                draft_logits.shape[1],
                BLOCK=ctx.block,
                **_launch_options(ctx.block),
            )
        return grad, None, None, None, None


class _SoftCrossEntropyTriton(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        draft_logits: torch.Tensor,
        target_logits: torch.Tensor,
        rows: torch.Tensor,
        block: int,
    ) -> torch.Tensor:
        total_rows, vocab = draft_logits.shape
        count = rows.numel()
        loss = torch.zeros(total_rows, dtype=torch.float32, device=draft_logits.device)
        draft_lse, target_lse = loss.new_empty(count), loss.new_empty(count)
        if count:
            _soft_cross_entropy_forward_kernel[(count,)](
                draft_logits,
                target_logits,
                rows,
                loss,
                draft_lse,
                target_lse,
                draft_logits.stride(0),
                target_logits.stride(0),
                vocab,
                BLOCK=block,
                **_launch_options(block),
            )
        ctx.save_for_backward(draft_logits, target_logits, rows, draft_lse, target_lse)
        ctx.block = block
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        draft_logits, target_logits, rows, draft_lse, target_lse = ctx.saved_tensors
        count = rows.numel()
        full = count == draft_logits.shape[0]
        grad = torch.empty_like(draft_logits) if full else torch.zeros_like(draft_logits)
        if count:
            _soft_cross_entropy_backward_kernel[(count,)](
                draft_logits,
                target_logits,
                rows,
                grad_loss.contiguous(),
                draft_lse,
                target_lse,
                grad,
                draft_logits.stride(0),
                target_logits.stride(0),
                grad.stride(0),
                draft_logits.shape[1],
                BLOCK=ctx.block,
                **_launch_options(ctx.block),
            )
        return grad, None, None, None


def dspark_terms_triton(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    target_ids: torch.Tensor,
    rows: torch.Tensor | None = None,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp32 ``(ce, l1)`` of 2-D ``[rows, V]`` logits; rows outside ``rows`` get zeros and zero grad."""
    draft_logits, target_logits, rows = _prepare(draft_logits, target_logits, rows)
    block = _block_size(block_size, draft_logits.shape[1])
    return _DSparkTermsTriton.apply(draft_logits, target_logits.detach(), target_ids, rows, block)


def soft_cross_entropy_triton(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    rows: torch.Tensor | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Per-row fp32 ``−Σ softmax(t)·log_softmax(d)`` of 2-D ``[rows, V]`` logits, zeros outside ``rows``."""
    draft_logits, target_logits, rows = _prepare(draft_logits, target_logits, rows)
    block = _block_size(block_size, draft_logits.shape[1])
    return _SoftCrossEntropyTriton.apply(draft_logits, target_logits.detach(), rows, block)
