"""Memory-lean vocabulary losses in pure PyTorch: loop over vocabulary chunks, never hold a full fp32 row.

At DSpark's shapes (thousands of rows × a 152k vocabulary) one fp32 copy of the logits is gigabytes, and a
plain softmax-based loss keeps several alive for backward. These autograd Functions keep only per-row
statistics (logsumexp of draft and target, ``Σ s·p_d``) between forward and backward, recompute each chunk's
probabilities in backward, and write the gradient in the logits' own dtype. Per-chunk work runs in place
in two reused fp32 buffers, so the only vocabulary-sized allocation is the gradient itself.

All functions take 2-D ``[rows, V]`` logits. ``rows`` (int64 indices or ``None`` = all rows) selects the
rows to compute; the others get a zero loss and a zero gradient without being read.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 4096


def _selected(values: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return values if rows is None else values.index_select(0, rows)


def _row_count(logits: torch.Tensor, rows: torch.Tensor | None) -> int:
    return logits.shape[0] if rows is None else rows.numel()


def _load_chunk(
    buffer: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int
) -> torch.Tensor:
    """Copy ``logits[rows, start:stop]`` into the leading columns of ``buffer`` as fp32 and return that view."""
    chunk = logits[:, start:stop]
    if rows is not None:
        chunk = chunk.index_select(0, rows)
    return buffer[:, : stop - start].copy_(chunk)


def _store_chunk(grad: torch.Tensor, values: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int) -> None:
    if rows is None:
        grad[:, start:stop].copy_(values)
    else:
        grad[:, start:stop].index_copy_(0, rows, values.to(grad.dtype))


def _chunk_bounds(vocab: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_size, vocab)) for start in range(0, vocab, chunk_size)]


def _update_logsumexp(running_max: torch.Tensor, running_sum: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """Online logsumexp step: fold ``chunk`` (overwritten with exp values) into the running max and sum."""
    new_max = torch.maximum(running_max, chunk.amax(dim=-1))
    running_sum.mul_(torch.exp(running_max - new_max))
    running_sum.add_(chunk.sub_(new_max.unsqueeze(-1)).exp_().sum(dim=-1))
    return new_max


def _buffers(logits: torch.Tensor, row_count: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two fp32 chunk buffers (draft, target) every pass reuses in place."""
    width = min(chunk_size, logits.shape[-1])
    draft, target = (torch.empty(row_count, width, dtype=torch.float32, device=logits.device) for _ in range(2))
    return draft, target


def _scatter_rows(values: torch.Tensor, rows: torch.Tensor | None, total_rows: int) -> torch.Tensor:
    if rows is None:
        return values
    return values.new_zeros(total_rows).index_copy_(0, rows, values)


class DSparkTermsChunked(torch.autograd.Function):
    """``(ce, l1)`` per row; gradient w.r.t. the draft logits only."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        draft_logits: torch.Tensor,
        target_logits: torch.Tensor,
        target_ids: torch.Tensor,
        rows: torch.Tensor | None,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        row_count = _row_count(draft_logits, rows)
        bounds = _chunk_bounds(draft_logits.shape[-1], chunk_size)
        draft_chunk, target_chunk = _buffers(draft_logits, row_count, chunk_size)
        draft_max = draft_chunk.new_full((row_count,), -torch.inf)
        target_max = draft_max.clone()
        draft_sum, target_sum = draft_chunk.new_zeros(row_count), draft_chunk.new_zeros(row_count)
        for start, stop in bounds:
            draft_max = _update_logsumexp(
                draft_max, draft_sum, _load_chunk(draft_chunk, draft_logits, rows, start, stop)
            )
            target_max = _update_logsumexp(
                target_max, target_sum, _load_chunk(target_chunk, target_logits, rows, start, stop)
            )
        draft_lse = draft_max.add_(draft_sum.log_()).unsqueeze(-1)
        target_lse = target_max.add_(target_sum.log_()).unsqueeze(-1)

        # l1 = Σ|p_d − p_t|; the backward also needs Σ s·p_d with s = sign(p_d − p_t).
        l1 = draft_chunk.new_zeros(row_count)
        signed_draft_mass = draft_chunk.new_zeros(row_count)
        for start, stop in bounds:
            draft_probs = _load_chunk(draft_chunk, draft_logits, rows, start, stop).sub_(draft_lse).exp_()
            gap = _load_chunk(target_chunk, target_logits, rows, start, stop).sub_(target_lse).exp_().sub_(draft_probs)
            l1.add_(torch.linalg.vector_norm(gap, ord=1, dim=-1))
            signed_draft_mass.sub_(gap.sign_().mul_(draft_probs).sum(dim=-1))  # gap = p_t − p_d, so −sign

        ids = _selected(target_ids, rows).long()
        row_index = torch.arange(row_count, device=ids.device) if rows is None else rows
        ce = draft_lse.squeeze(-1) - draft_logits[row_index, ids].float()

        ctx.save_for_backward(draft_logits, target_logits, ids, rows, draft_lse, target_lse, signed_draft_mass)
        ctx.chunk_size = chunk_size
        total_rows = draft_logits.shape[0]
        return _scatter_rows(ce, rows, total_rows), _scatter_rows(l1, rows, total_rows)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_ce: torch.Tensor, grad_l1: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        draft_logits, target_logits, ids, rows, draft_lse, target_lse, signed_draft_mass = ctx.saved_tensors
        grad_ce = _selected(grad_ce.float(), rows).unsqueeze(-1)
        grad_l1 = _selected(grad_l1.float(), rows).unsqueeze(-1)
        # ∂/∂d_j = p_d,j · (g_ce + g_l1 · (s_j − Σ s·p_d)) − g_ce · [j = y]
        offset = grad_ce - grad_l1 * signed_draft_mass.unsqueeze(-1)
        neg_grad_l1 = -grad_l1
        row_count = _row_count(draft_logits, rows)
        draft_chunk, target_chunk = _buffers(draft_logits, row_count, ctx.chunk_size)
        grad = torch.empty_like(draft_logits) if rows is None else torch.zeros_like(draft_logits)
        for start, stop in _chunk_bounds(draft_logits.shape[-1], ctx.chunk_size):
            draft_probs = _load_chunk(draft_chunk, draft_logits, rows, start, stop).sub_(draft_lse).exp_()
            gap = _load_chunk(target_chunk, target_logits, rows, start, stop).sub_(target_lse).exp_().sub_(draft_probs)
            chunk_grad = gap.sign_().mul_(neg_grad_l1).add_(offset).mul_(draft_probs)  # gap.sign() = −s
            in_chunk = (ids >= start) & (ids < stop)
            local_ids = (ids - start).clamp_(0, stop - start - 1).unsqueeze(-1)
            chunk_grad.scatter_add_(1, local_ids, torch.where(in_chunk.unsqueeze(-1), -grad_ce, 0.0))
            _store_chunk(grad, chunk_grad, rows, start, stop)
        return grad, None, None, None, None


class SoftCrossEntropyChunked(torch.autograd.Function):
    """``−Σ_v softmax(t)_v · log_softmax(d)_v`` per row in one forward pass; gradient w.r.t. the draft only.

    Uses ``sce = lse(d) − Σ_v p_t,v · d_v``, with ``Σ p_t·d`` accumulated online next to the target's
    logsumexp, so the forward reads each chunk once.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        draft_logits: torch.Tensor,
        target_logits: torch.Tensor,
        rows: torch.Tensor | None,
        chunk_size: int,
    ) -> torch.Tensor:
        row_count = _row_count(draft_logits, rows)
        draft_chunk, target_chunk = _buffers(draft_logits, row_count, chunk_size)
        draft_max = draft_chunk.new_full((row_count,), -torch.inf)
        target_max = draft_max.clone()
        draft_sum, target_sum, weighted_draft = (draft_chunk.new_zeros(row_count) for _ in range(3))
        for start, stop in _chunk_bounds(draft_logits.shape[-1], chunk_size):
            draft = _load_chunk(draft_chunk, draft_logits, rows, start, stop)
            target = _load_chunk(target_chunk, target_logits, rows, start, stop)
            new_target_max = torch.maximum(target_max, target.amax(dim=-1))
            rescale = torch.exp(target_max - new_target_max)
            target_max = new_target_max
            target_exp = target.sub_(target_max.unsqueeze(-1)).exp_()
            target_sum.mul_(rescale).add_(target_exp.sum(dim=-1))
            weighted_draft.mul_(rescale).add_(target_exp.mul_(draft).sum(dim=-1))
            draft_max = _update_logsumexp(draft_max, draft_sum, draft)
        draft_lse = draft_max.add_(draft_sum.log_())
        loss = draft_lse - weighted_draft / target_sum
        target_lse = target_max.add_(target_sum.log_())
        ctx.save_for_backward(draft_logits, target_logits, rows, draft_lse.unsqueeze(-1), target_lse.unsqueeze(-1))
        ctx.chunk_size = chunk_size
        return _scatter_rows(loss, rows, draft_logits.shape[0])

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        draft_logits, target_logits, rows, draft_lse, target_lse = ctx.saved_tensors
        grad_loss = _selected(grad_loss.float(), rows).unsqueeze(-1)
        row_count = _row_count(draft_logits, rows)
        draft_chunk, target_chunk = _buffers(draft_logits, row_count, ctx.chunk_size)
        grad = torch.empty_like(draft_logits) if rows is None else torch.zeros_like(draft_logits)
        for start, stop in _chunk_bounds(draft_logits.shape[-1], ctx.chunk_size):
            draft_probs = _load_chunk(draft_chunk, draft_logits, rows, start, stop).sub_(draft_lse).exp_()
            target_probs = _load_chunk(target_chunk, target_logits, rows, start, stop).sub_(target_lse).exp_()
            chunk_grad = target_probs.sub_(draft_probs).mul_(grad_loss).neg_()  # g · (p_d − p_t)
            _store_chunk(grad, chunk_grad, rows, start, stop)
        return grad, None, None, None
