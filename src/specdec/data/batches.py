"""The training batch contract shared by the cached and the online data paths.

A batch is a dict of right-padded tensors (padding only ever follows a sequence's real tokens, so no real
position attends to it under a causal mask):

- ``input_ids`` int64 ``[B, S]`` (``pad_token_id`` after each sequence's end)
- ``attention_mask`` int64 ``[B, S]`` (1 on real tokens)
- ``loss_mask`` bool ``[B, S]`` (True where the drafter is trained; never on padding)
- ``target_hidden_states`` ``[B, S, L·H]`` captured target layer outputs, zero on padding
- ``target_last_hidden_states`` ``[B, S, H]`` final-normed last hidden state, zero wherever ``loss_mask`` is False
- ``keys`` list of ``B`` provenance keys
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

FEATURE_FIELDS = ("target_hidden_states", "target_last_hidden_states")


TOKEN_FIELDS = {"input_ids": torch.long, "attention_mask": torch.long, "loss_mask": torch.bool}


def padded_token_batch(
    keys: Sequence[str],
    input_ids: Sequence[torch.Tensor],
    loss_masks: Sequence[torch.Tensor],
    pad_token_id: int = 0,
    out: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The token fields of a right-padded batch: ``input_ids``, ``attention_mask``, ``loss_mask`` [B, S], ``keys``.

    ``out`` holds preallocated ``[B, S]`` tensors of :data:`TOKEN_FIELDS` to fill instead of new ones.
    """
    if not input_ids:
        raise ValueError("cannot collate an empty batch")
    lengths = [int(ids.shape[0]) for ids in input_ids]
    size, width = len(lengths), max(lengths)
    if out is None:
        out = {name: torch.empty(size, width, dtype=dtype) for name, dtype in TOKEN_FIELDS.items()}
    batch: dict[str, Any] = {name: out[name] for name in TOKEN_FIELDS}
    batch["input_ids"].fill_(pad_token_id)
    batch["attention_mask"].zero_()
    batch["loss_mask"].zero_()
    batch["keys"] = list(keys)
    for row, (ids, mask, length) in enumerate(zip(input_ids, loss_masks, lengths, strict=True)):
        batch["input_ids"][row, :length] = ids
        batch["attention_mask"][row, :length] = 1
        batch["loss_mask"][row, :length] = mask
    return batch


def collate_target_samples(samples: Sequence[Mapping[str, Any]], pad_token_id: int = 0) -> dict[str, Any]:
    """Right-pad samples (each ``input_ids``/``loss_mask`` ``[S]`` and, when present, features ``[S, ·]``)."""
    batch = padded_token_batch(
        [sample["key"] for sample in samples],
        [sample["input_ids"] for sample in samples],
        [sample["loss_mask"] for sample in samples],
        pad_token_id,
    )
    size, width = batch["input_ids"].shape
    for name in FEATURE_FIELDS:
        if name in samples[0]:
            first = samples[0][name]
            batch[name] = torch.zeros(size, width, first.shape[-1], dtype=first.dtype)
            for row, sample in enumerate(samples):
                batch[name][row, : sample[name].shape[0]] = sample[name]
    return batch
