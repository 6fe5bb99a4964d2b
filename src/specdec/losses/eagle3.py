"""The Eagle3 training-time-test loss: per-step soft cross-entropy to the target distribution, decayed by step.

Each step's summed loss is divided by ``B·S`` (all positions, valid or not), not by the valid-token count:
that keeps every position's gradient scale independent of how many other positions in the batch are
masked, at the price of a loss value that shrinks with padding (the convention DeepSpec and SpecForge use).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specdec.losses.dspark import expected_accepted_length
from specdec.losses.vocab_terms import Impl, dspark_vocab_terms, soft_cross_entropy


@dataclass
class Eagle3Loss:
    """The loss to optimise and detached per-step diagnostics (with counts, for cross-rank reduction)."""

    loss: torch.Tensor
    step_losses: torch.Tensor  # [steps] soft CE per step, local mean over B·S
    accuracy: torch.Tensor  # [steps] argmax(draft) == argmax(target) over valid positions
    accept_rate: torch.Tensor  # [steps] mean 1 − TV over valid positions (conditional, teacher-forced)
    correct_tokens: torch.Tensor  # [steps]
    accept_rate_numerator: torch.Tensor  # [steps]
    valid_tokens: torch.Tensor  # [steps]
    tau_probabilistic: torch.Tensor  # 1 + Σ_s Π_{j≤s} α_j, mean over positions valid at step 0
    tau_numerator: torch.Tensor
    tau_denominator: torch.Tensor


def eagle3_loss(
    step_draft_logits: Sequence[torch.Tensor],
    step_target_logits: Sequence[torch.Tensor],
    step_position_masks: Sequence[torch.Tensor],
    *,
    step_decay: float = 0.8,
    impl: Impl = "auto",
    chunk_size: int | None = None,
) -> Eagle3Loss:
    """``Σ_s step_decay^s · loss_s`` with ``loss_s = Σ_masked softCE(d_s, t_s) / (B·S)``.

    Each step gives draft and target logits ``[B, S, V]`` and a bool position mask ``[B, S]``; position t of
    every step belongs to the chain drafted from position t, which is what ``tau_probabilistic`` follows.
    """
    if not (len(step_draft_logits) == len(step_target_logits) == len(step_position_masks) > 0):
        raise ValueError("need the same positive number of draft logits, target logits and position masks")
    total: torch.Tensor | None = None
    step_losses, correct, accept_sums, valid, step_accept, masks = [], [], [], [], [], []
    for step, (draft, target, mask) in enumerate(
        zip(step_draft_logits, step_target_logits, step_position_masks, strict=True)
    ):
        mask = mask.bool()
        per_position = soft_cross_entropy(draft, target, row_mask=mask, impl=impl, chunk_size=chunk_size)
        step_loss = per_position.sum() / mask.numel()
        total = step_loss if total is None else total + step_decay**step * step_loss
        with torch.no_grad():
            target_choice = target.argmax(dim=-1)
            _, l1 = dspark_vocab_terms(
                draft.detach(), target, target_choice, row_mask=mask, impl=impl, chunk_size=chunk_size
            )
            accept = (1.0 - 0.5 * l1).clamp(0.0, 1.0)
            step_losses.append(step_loss.detach())
            correct.append(((draft.argmax(dim=-1) == target_choice) & mask).sum().to(torch.float32))
            accept_sums.append(torch.where(mask, accept, 0.0).sum())
            valid.append(mask.sum().to(torch.float32))
            step_accept.append(accept)
            masks.append(mask)

    with torch.no_grad():
        correct_tokens, accept_numerator, valid_tokens = (
            torch.stack(correct),
            torch.stack(accept_sums),
            torch.stack(valid),
        )
        slot_mask = torch.stack(masks, dim=-1)
        chain_mask = slot_mask & slot_mask[..., :1]  # chains start at positions valid at step 0
        tau_numerator, tau_denominator = expected_accepted_length(torch.stack(step_accept, dim=-1), chain_mask)
    return Eagle3Loss(
        loss=total,
        step_losses=torch.stack(step_losses),
        accuracy=correct_tokens / valid_tokens.clamp_min(1.0),
        accept_rate=accept_numerator / valid_tokens.clamp_min(1.0),
        correct_tokens=correct_tokens,
        accept_rate_numerator=accept_numerator,
        valid_tokens=valid_tokens,
        tau_probabilistic=tau_numerator / tau_denominator.clamp_min(1.0),
        tau_numerator=tau_numerator,
        tau_denominator=tau_denominator,
    )
