"""Epoch-planned batch streams that every rank agrees on, and a DataLoader Lightning can checkpoint mid-epoch.

An :class:`EpochBatches` dataset knows, before reading anything, how many micro-batches this rank yields in an
epoch — the same number on every rank, so DDP never waits on a rank that ran out. Its batches are numbered
``k = 0 … n-1``; with ``W`` loader workers, worker ``l`` yields ``k ≡ l (mod W)`` in increasing order, which is
exactly the round-robin order in which ``torch.utils.data.DataLoader`` collects them, so the loader's output
order is fixed by the seed, the epoch, the world size and ``W``.

:class:`ResumableDataLoader` counts the batches it handed out and saves ``(epoch, batches)`` in Lightning's
checkpoint (Lightning calls ``state_dict`` on any train loader that has one). On resume the dataset skips the
consumed batches without decoding them and rotates the workers so the next batch is the one that would have
come next.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torch.utils.data.dataloader import _InfiniteConstantSampler

from specdec.data.buffers import BatchBuffers


class EpochBatches(IterableDataset, ABC):
    """Base of datasets that yield whole, pre-planned micro-batches of one rank for one epoch."""

    def __init__(self, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.skip_batches = 0  # batches of this epoch already consumed (resume)
        self.buffers: BatchBuffers | None = None  # recycled batch memory, when the subclass writes into it

    def before_workers_start(self) -> None:
        """Main process, before the loader forks its workers: work they should inherit rather than repeat."""

    def batch_nbytes(self) -> int:
        """Bytes of the largest batch written into :attr:`buffers` (the size of a worker's slot)."""
        return 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @abstractmethod
    def num_batches(self) -> int:
        """Micro-batches this rank yields per epoch (equal on every rank)."""

    @abstractmethod
    def iter_worker(self, worker: int, num_workers: int, skip: int) -> Iterator[dict[str, Any]]:
        """Yield batches ``k = worker + j·num_workers`` for ``j ≥ skip``, ``k < num_batches()``, in order."""

    def __len__(self) -> int:
        return self.num_batches()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers, physical = (info.num_workers, info.id) if info is not None else (1, 0)
        consumed = min(self.skip_batches, self.num_batches())
        # Rotate so that physical worker 0, asked first by the loader, holds batch `consumed`.
        worker = (physical + consumed) % num_workers
        skip = max(0, -(-(consumed - worker) // num_workers))  # batches k < consumed with k ≡ worker
        yield from self.iter_worker(worker, num_workers, skip)


def worker_batch_counts(num_batches: int, num_workers: int) -> list[int]:
    """How many of ``num_batches`` each worker yields under the ``k ≡ worker (mod W)`` rule."""
    return [len(range(worker, num_batches, num_workers)) for worker in range(num_workers)]


class _EpochSampler(_InfiniteConstantSampler):
    """The loader's stand-in sampler for an iterable dataset, plus the ``set_epoch`` Lightning calls on samplers."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        super().__init__()
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)


class ResumableDataLoader(DataLoader):
    """A DataLoader over an :class:`EpochBatches` dataset whose position Lightning saves and restores.

    Exact resume needs the same world size, batch size and worker count; with another world size the
    consumed share of the epoch is carried over (the remaining batches are then not exactly those an
    uninterrupted run would have seen).
    """

    def __init__(self, dataset: EpochBatches, **kwargs: Any) -> None:
        if kwargs.pop("persistent_workers", False):
            warnings.warn(
                "persistent_workers is ignored: workers must see each epoch's plan", UserWarning, stacklevel=2
            )
        for name in ("batch_size", "sampler", "batch_sampler", "shuffle", "drop_last"):
            if kwargs.get(name) is not None:
                raise ValueError(f"{name} is set by the dataset's epoch plan, not the loader")
            kwargs.pop(name, None)
        super().__init__(dataset, batch_size=None, **kwargs)
        object.__setattr__(self, "sampler", _EpochSampler(self))  # DataLoader forbids setting it after init
        self._consumed = 0
        self._pending: dict[str, Any] | None = None
        self._requested_epoch = 0
        self._epoch_offset = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration yields (Lightning calls this through the sampler)."""
        self._requested_epoch = epoch
        self.dataset.set_epoch(epoch + self._epoch_offset)

    def _resume_position(self) -> int:
        """Batches to skip in the coming epoch; after a restore, the restored epoch wins over the requested one.

        Lightning's epoch counter, stopped mid-epoch by ``max_steps``, reads one ahead on restore; the offset
        between it and the restored epoch is kept for the epochs that follow.
        """
        state, self._pending = self._pending, None
        if state is None:
            return 0
        dataset: EpochBatches = self.dataset
        batches = int(state["batches"])
        if state.get("world_size", dataset.world_size) != dataset.world_size:
            batches = batches * state["world_size"] // dataset.world_size
        epoch = int(state["epoch"])
        if batches >= dataset.num_batches():  # saved at the end of an epoch: the next one starts fresh
            epoch, batches = epoch + 1, 0
        self._epoch_offset = epoch - self._requested_epoch
        dataset.set_epoch(epoch)
        return batches

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is requested, after Lightning has called set_epoch.
        dataset: EpochBatches = self.dataset
        dataset.skip_batches = self._consumed = self._resume_position()
        if self.num_workers > 0:
            dataset.before_workers_start()
        buffers = dataset.buffers
        if buffers is None:
            for batch in super().__iter__():
                self._consumed += 1
                yield batch
            return
        # Before super().__iter__ starts the workers: their shared slots and the board of free ones.
        generation = buffers.prepare(self.num_workers, self.prefetch_factor, dataset.batch_nbytes())
        exhausted = False
        try:
            for batch in super().__iter__():
                self._consumed += 1
                yield buffers.receive(batch)
                buffers.release_unreferenced()  # the consumer asked for the next batch: it may have let go of some
            exhausted = True
        finally:
            buffers.finish(generation, exhausted)

    def state_dict(self) -> dict[str, Any]:
        dataset: EpochBatches = self.dataset
        return {
            "epoch": dataset.epoch,
            "batches": self._consumed,
            "world_size": dataset.world_size,
            "num_workers": self.num_workers,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = dict(state)
