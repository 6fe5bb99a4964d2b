"""The DSpark (and DFlash) training loss: position-weighted CE, L1 and confidence BCE over draft blocks.

Per block slot k the weight is ``eval_mask · exp(−k/γ)`` (γ = 4 in the paper configs), so later slots count
less and only the contiguous valid prefix of each block is supervised. Each weighted sum is divided by the
weight sum of the whole step across ranks and multiplied by the world size: DDP then averages gradients,
which turns the result into one token-weighted mean over every rank's slots instead of a mean of per-rank
means. DFlash is the same loss with ``ce_alpha=1, l1_alpha=0`` and no confidence logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from specdec.losses.vocab_terms import Impl, dspark_vocab_terms


@dataclass
class DSparkLoss:
    """The loss to optimise, its terms, and detached acceptance diagnostics.

    ``ce``, ``l1`` and ``confidence`` are this rank's share of the global weighted means (their mean over
    ranks is the weighted mean over all slots), and stay differentiable. Diagnostics come with their
    numerators and denominators so a caller can reduce them across ranks as Σnum / Σden.
    """

    loss: torch.Tensor
    ce: torch.Tensor
    l1: torch.Tensor
    confidence: torch.Tensor
    accept_rate: torch.Tensor  # [K] mean of 1 − TV per slot over valid slots (teacher-forced)
    accept_rate_numerator: torch.Tensor  # [K]
    accept_rate_denominator: torch.Tensor  # [K] valid slots
    tau_probabilistic: torch.Tensor  # expected accepted length incl. bonus, mean over valid blocks
    tau_numerator: torch.Tensor
    tau_denominator: torch.Tensor  # valid blocks
    weight_sum: torch.Tensor  # global Σw the weighted sums were divided by (this rank's Σw with reduction="sum")
    confidence_abs_error: torch.Tensor | None = None  # mean |σ(z) − c*| over valid slots
    confidence_bias: torch.Tensor | None = None  # mean σ(z) − c* over valid slots


def position_weights(eval_mask: torch.Tensor, gamma: float = 4.0) -> torch.Tensor:
    """fp32 ``eval_mask[..., k] · exp(−k/γ)`` over the last dim (block slot k = 0..K−1)."""
    slots = torch.arange(eval_mask.shape[-1], device=eval_mask.device, dtype=torch.float32)
    return eval_mask.to(torch.float32) * torch.exp(-slots / gamma)


def global_weight_scale(local_weight_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(world_size / W_global, W_global)`` with ``W_global`` the weight sum over all ranks.

    Multiplying a rank's weighted sum by the scale gives its share of the global weighted mean; after DDP
    averages gradients over ranks, the result is the gradient of that global mean. ``W_global`` is clamped
    to the smallest positive float so an all-masked step yields 0, not NaN.
    """
    total = local_weight_sum.detach().to(torch.float32).clone()
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        world_size = dist.get_world_size()
    total = total.clamp_min(torch.finfo(torch.float32).tiny)
    return world_size / total, total


def expected_accepted_length(slot_accept: torch.Tensor, slot_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ over valid chains of ``1 + Σ_k Π_{j≤k} α_j`` and the number of valid chains (slots on the last dim).

    ``α`` is zeroed outside ``slot_mask``, so a chain's product stops at its first invalid slot; a chain is
    valid when any of its slots is.
    """
    alpha = torch.where(slot_mask, slot_accept, torch.zeros_like(slot_accept))
    chain_valid = slot_mask.any(dim=-1)
    lengths = 1.0 + torch.cumprod(alpha, dim=-1).sum(dim=-1)
    numerator = torch.where(chain_valid, lengths, torch.zeros_like(lengths)).sum()
    return numerator, chain_valid.sum().to(torch.float32)


def dspark_loss(
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    target_ids: torch.Tensor,
    eval_mask: torch.Tensor,
    confidence_logits: torch.Tensor | None = None,
    *,
    gamma: float = 4.0,
    ce_alpha: float = 0.1,
    l1_alpha: float = 0.9,
    confidence_alpha: float = 1.0,
    impl: Impl = "auto",
    chunk_size: int | None = None,
    reduction: str = "global_mean",
) -> DSparkLoss:
    """``ce_alpha·CE + l1_alpha·L1 + confidence_alpha·BCE(z, c*)``, weighted by :func:`position_weights`.

    Shapes: logits ``[..., K, V]`` (typically ``[B, N, K, V]``), ``target_ids``, ``eval_mask`` (bool) and
    ``confidence_logits`` ``[..., K]``. The confidence target ``c* = clamp(1 − l1/2, 0, 1)`` is detached, so
    the confidence head learns to predict acceptance without pulling the draft distribution toward it.
    Masked slots are skipped by the vocabulary terms.

    ``reduction="global_mean"`` divides by the weight sum of all ranks (see the module docstring);
    ``reduction="sum"`` returns the weighted sums and this rank's weight sum, for a caller that normalises over
    a whole optimizer step (accumulation included).
    """
    if reduction not in ("global_mean", "sum"):
        raise ValueError(f"reduction = {reduction!r}; expected 'global_mean' or 'sum'")
    eval_mask = eval_mask.bool()
    weights = position_weights(eval_mask, gamma)
    ce, l1 = dspark_vocab_terms(
        draft_logits, target_logits, target_ids, row_mask=eval_mask, impl=impl, chunk_size=chunk_size
    )
    if reduction == "sum":
        weight_sum = weights.sum().detach()
        scale = torch.ones((), device=weight_sum.device)
    else:
        scale, weight_sum = global_weight_scale(weights.sum())
    ce_mean = (weights * ce).sum() * scale
    l1_mean = (weights * l1).sum() * scale

    with torch.no_grad():
        slot_accept = (1.0 - 0.5 * l1).clamp(0.0, 1.0)
        accept_numerator = torch.where(eval_mask, slot_accept, 0.0).flatten(0, -2).sum(dim=0)
        accept_denominator = eval_mask.flatten(0, -2).sum(dim=0).to(torch.float32)
        tau_numerator, tau_denominator = expected_accepted_length(slot_accept, eval_mask)

    confidence_mean = ce_mean.new_zeros(())
    abs_error = bias = None
    if confidence_logits is not None:
        confidence_logits = confidence_logits.float()
        bce = F.binary_cross_entropy_with_logits(confidence_logits, slot_accept, reduction="none")
        confidence_mean = (weights * torch.where(eval_mask, bce, 0.0)).sum() * scale
        with torch.no_grad():
            valid_slots = eval_mask.sum().clamp_min(1)
            error = torch.where(eval_mask, torch.sigmoid(confidence_logits) - slot_accept, 0.0)
            abs_error = error.abs().sum() / valid_slots
            bias = error.sum() / valid_slots

    loss = ce_alpha * ce_mean + l1_alpha * l1_mean + confidence_alpha * confidence_mean
    return DSparkLoss(
        loss=loss,
        ce=ce_mean,
        l1=l1_mean,
        confidence=confidence_mean,
        accept_rate=accept_numerator / accept_denominator.clamp_min(1.0),
        accept_rate_numerator=accept_numerator,
        accept_rate_denominator=accept_denominator,
        tau_probabilistic=tau_numerator / tau_denominator.clamp_min(1.0),
        tau_numerator=tau_numerator,
        tau_denominator=tau_denominator,
        weight_sum=weight_sum,
        confidence_abs_error=abs_error,
        confidence_bias=bias,
    )
