"""The online data path: tokenised conversations in memory, target features computed on the training device.

:class:`ConversationBatches` plans epochs like the cache stream (equal micro-batch counts on every rank, a
contiguous range of a seeded permutation per rank) but holds token ids only. :class:`OnlineTargetFeatures`
fills in the target features of a batch after it reached the device, one unpadded sequence per forward, so
the result equals what the cache stores for the same conversation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from specdec.data.batches import FEATURE_FIELDS, collate_target_samples
from specdec.data.cache.builder import target_features
from specdec.data.cache.stream import seeded_random
from specdec.data.resumable import EpochBatches
from specdec.targets import Target, validate_layer_ids


class ConversationBatches(EpochBatches):
    """This rank's micro-batches of tokenised samples (``key``, ``input_ids``, ``loss_mask``) for each epoch."""

    def __init__(
        self,
        samples: Sequence[Mapping[str, Any]],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        self.samples = list(samples)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.pad_token_id = pad_token_id
        self.rank_samples = len(self.samples) // world_size
        if self.num_batches() == 0:
            raise ValueError(
                f"{len(self.samples)} samples are too few for {world_size} rank(s) × batch size {batch_size}"
                f"{' with drop_last' if drop_last else ''}"
            )

    def num_batches(self) -> int:
        if self.drop_last:
            return self.rank_samples // self.batch_size
        return -(-self.rank_samples // self.batch_size)

    def rank_order(self, epoch: int) -> list[int]:
        """Indices of this rank's samples in epoch ``epoch``, in order."""
        order = list(range(len(self.samples)))
        if self.shuffle:
            seeded_random(self.seed, epoch).shuffle(order)
        start = self.rank * self.rank_samples
        return order[start : start + self.rank_samples]

    def iter_worker(self, worker: int, num_workers: int, skip: int) -> Iterator[dict[str, Any]]:
        order = self.rank_order(self.epoch)
        for batch in range(worker + skip * num_workers, self.num_batches(), num_workers):
            chosen = order[batch * self.batch_size : (batch + 1) * self.batch_size]
            yield collate_target_samples([self.samples[index] for index in chosen], self.pad_token_id)


class OnlineTargetFeatures:
    """Adds ``target_hidden_states`` and ``target_last_hidden_states`` to a batch by running the frozen target."""

    def __init__(self, target: Target, layer_ids: Sequence[int], dtype: torch.dtype = torch.bfloat16) -> None:
        self.target = target
        self.layer_ids = validate_layer_ids(layer_ids, target.geometry.num_hidden_layers)
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        input_ids = batch["input_ids"]
        device = input_ids.device
        if next(self.target.model.parameters()).device != device:
            self.target.model.to(device)
        size, width = input_ids.shape
        hidden = self.target.geometry.hidden_size
        features = torch.zeros(size, width, len(self.layer_ids) * hidden, dtype=self.dtype, device=device)
        last = torch.zeros(size, width, hidden, dtype=self.dtype, device=device)
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for row, length in enumerate(lengths):
            row_features, row_last = target_features(self.target, input_ids[row, :length], self.layer_ids)
            features[row, :length] = row_features.to(self.dtype)
            last[row, :length] = row_last.to(self.dtype)
        last[~batch["loss_mask"]] = 0
        return {**batch, FEATURE_FIELDS[0]: features, FEATURE_FIELDS[1]: last}
