"""Training blocks of DSpark / DFlash: anchor sampling, block inputs, positions, labels and masks.

A block starts at an anchor position p of a supervised response and is fed ``[x_p, mask, ..., mask]`` at
positions ``p .. p + B - 1``. Each prediction slot k targets the token at ``label_position = p + offset + k``
(DeepSpec: all B slots, slot k predicts p + k + 1; z-lab: mask slots 1..B-1, slot k predicts p + k).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainingBlocks:
    """Everything the training forward needs about the sampled blocks of a batch."""

    anchors: torch.Tensor  # [B, N] anchor positions, ascending; 0 for dropped slots
    keep: torch.Tensor  # [B, N] bool, False for anchor slots beyond the sequence's valid count
    valid_anchor_count: torch.Tensor  # [B] how many positions could have been anchors
    block_input_ids: torch.Tensor  # [B, N * block_size]: anchor token then mask tokens
    block_positions: torch.Tensor  # [B, N * block_size]: anchor + slot
    label_positions: torch.Tensor  # [B, N, P] positions of the predicted tokens (clamped into the sequence)
    labels: torch.Tensor  # [B, N, P] token ids at label_positions
    eval_mask: torch.Tensor  # [B, N, P] bool, contiguous valid prefix of each kept block


def anchor_candidates(loss_mask: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: positions p with loss_mask[p] & loss_mask[p + 1] (the last position never qualifies)."""
    mask = loss_mask.bool()
    candidates = torch.zeros_like(mask)
    candidates[:, :-1] = mask[:, :-1] & mask[:, 1:]
    return candidates


def sample_anchors(
    loss_mask: torch.Tensor, num_anchors: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw up to ``num_anchors`` distinct candidate positions per sequence, uniformly, sorted ascending.

    Returns ``(anchors [B, N], keep [B, N], valid_count [B])``; slots past a sequence's candidate count are
    not kept and point at position 0.
    """
    candidates = anchor_candidates(loss_mask)
    batch, length = candidates.shape
    scores = torch.rand(batch, length, generator=generator, device="cpu").to(candidates.device)
    scores = scores.masked_fill(~candidates, 2.0)  # invalid positions sort last
    take = min(num_anchors, length)
    chosen = scores.topk(take, dim=1, largest=False).indices
    valid_count = candidates.sum(dim=1)
    keep = torch.arange(take, device=candidates.device)[None, :] < valid_count[:, None]
    anchors = torch.where(keep, chosen, torch.full_like(chosen, length)).sort(dim=1).values
    anchors = anchors.masked_fill(~keep, 0)
    if take < num_anchors:  # a sequence shorter than num_anchors: pad with dropped slots
        pad = num_anchors - take
        anchors = torch.cat([anchors, anchors.new_zeros(batch, pad)], dim=1)
        keep = torch.cat([keep, keep.new_zeros(batch, pad)], dim=1)
    return anchors, keep, valid_count


def build_training_blocks(
    input_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    num_anchors: int,
    block_size: int,
    mask_token_id: int,
    first_prediction_slot: int,
    generator: torch.Generator | None = None,
) -> TrainingBlocks:
    """Sample anchors and lay out block inputs, positions, labels and the contiguous-prefix eval mask."""
    batch, length = input_ids.shape
    anchors, keep, valid_count = sample_anchors(loss_mask, num_anchors, generator)
    slots = torch.arange(block_size, device=input_ids.device)

    block_input_ids = torch.full((batch, num_anchors, block_size), mask_token_id, dtype=input_ids.dtype)
    block_input_ids = block_input_ids.to(input_ids.device)
    block_input_ids[:, :, 0] = torch.gather(input_ids, 1, anchors)
    block_positions = anchors[:, :, None] + slots

    num_predictions = block_size - first_prediction_slot
    # Both conventions predict anchor + 1 .. anchor + P; they differ in which slots hold the predictions.
    offsets = torch.arange(1, num_predictions + 1, device=input_ids.device)
    raw_label_positions = anchors[:, :, None] + offsets  # [B, N, P]
    in_sequence = raw_label_positions < length
    label_positions = raw_label_positions.clamp(max=length - 1)
    labels = torch.gather(input_ids, 1, label_positions.flatten(1)).view_as(label_positions)
    supervised = torch.gather(loss_mask.bool(), 1, label_positions.flatten(1)).view_as(label_positions)
    eval_mask = (in_sequence & supervised & keep[:, :, None]).int().cumprod(dim=-1).bool()
    return TrainingBlocks(
        anchors=anchors,
        keep=keep,
        valid_anchor_count=valid_count,
        block_input_ids=block_input_ids.flatten(1),
        block_positions=block_positions.flatten(1),
        label_positions=label_positions,
        labels=labels,
        eval_mask=eval_mask,
    )
