"""Readable ground truth for the vocabulary-sized loss terms: full fp32 softmaxes and autograd.

Every lean path (:mod:`specdec.losses.chunked`, the Triton kernels) is tested against these. They hold
several fp32 ``[rows, V]`` tensors alive for backward, which is exactly the memory the lean paths avoid.
"""

from __future__ import annotations

import torch


def dspark_terms_reference(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    target_ids: torch.Tensor,
    row_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(ce, l1)`` in fp32: ``ce = lse(d) − d[y]`` and ``l1 = ‖softmax(d) − softmax(t)‖₁``."""
    draft_log_probs = torch.log_softmax(draft_logits.float(), dim=-1)
    draft_probs = draft_log_probs.exp()
    target_probs = torch.softmax(target_logits.detach().float(), dim=-1)
    ce = -draft_log_probs.gather(-1, target_ids.long().unsqueeze(-1)).squeeze(-1)
    l1 = (draft_probs - target_probs).abs().sum(dim=-1)
    if row_mask is not None:
        ce = torch.where(row_mask, ce, torch.zeros_like(ce))
        l1 = torch.where(row_mask, l1, torch.zeros_like(l1))
    return ce, l1


def soft_cross_entropy_reference(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row ``−Σ_v softmax(t)_v · log_softmax(d)_v`` in fp32."""
    draft_log_probs = torch.log_softmax(draft_logits.float(), dim=-1)
    target_probs = torch.softmax(target_logits.detach().float(), dim=-1)
    loss = -(target_probs * draft_log_probs).sum(dim=-1)
    if row_mask is not None:
        loss = torch.where(row_mask, loss, torch.zeros_like(loss))
    return loss
