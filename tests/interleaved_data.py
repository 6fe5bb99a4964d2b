"""A DataModule whose optimizer steps hold the same samples for any world size × accumulation split.

Rank ``r`` of ``W`` takes global micro-batches ``r, r + W, …`` of one fixed list read from a real target cache,
so step ``i`` of a 2-process run with accumulation 1 sees global micro-batches ``2i`` and ``2i + 1`` — exactly
what step ``i`` of a 1-process run with accumulation 2 sees. The equivalence tests of the training math need
that; the cache DataModule instead gives each rank a contiguous range, to read fewer shards.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L

from specdec.data.batches import collate_target_samples
from specdec.data.cache.reader import iter_cache_samples
from specdec.data.resumable import EpochBatches, ResumableDataLoader


class InterleavedBatches(EpochBatches):
    def __init__(self, batches: list[dict[str, Any]], rank: int, world_size: int) -> None:
        super().__init__(rank, world_size)
        self.batches = batches

    def num_batches(self) -> int:
        return len(self.batches) // self.world_size

    def iter_worker(self, worker: int, num_workers: int, skip: int) -> Iterator[dict[str, Any]]:
        for local in range(worker + skip * num_workers, self.num_batches(), num_workers):
            yield self.batches[local * self.world_size + self.rank]


class InterleavedCacheDataModule(L.LightningDataModule):
    """Global micro-batches of ``batch_size`` samples, in cache order, dealt to ranks round-robin."""

    def __init__(self, cache: str, target: str, layer_ids: list[int], batch_size: int = 2, repeat: int = 1) -> None:
        super().__init__()
        self.cache = cache
        self.target = target  # linked into the model by the CLI, like TargetCacheDataModule's
        self.layer_ids = layer_ids
        self.batch_size = batch_size
        self.repeat = repeat

    def setup(self, stage: str | None = None) -> None:
        samples = list(iter_cache_samples(self.cache)) * self.repeat
        self.batches = [
            collate_target_samples(samples[start : start + self.batch_size], 0)
            for start in range(0, len(samples) - self.batch_size + 1, self.batch_size)
        ]

    def train_dataloader(self) -> ResumableDataLoader:
        trainer = self.trainer
        return ResumableDataLoader(InterleavedBatches(self.batches, trainer.global_rank, trainer.world_size))
