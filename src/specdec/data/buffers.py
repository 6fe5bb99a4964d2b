"""Recycled batch memory: feature batches are written into buffers reused once nothing refers to them any more.

A 2,048-token bf16 batch at Qwen3-4B geometry is 63 MB. Written into fresh memory, every page of it is first
zero-filled by the kernel on a page fault, which costs as much as dequantising an fp8 cache into it. A
:class:`BatchBuffers` pool keeps a few buffers and hands out one that is free:

- in the process that consumes the batches (``num_workers=0``), a buffer is free when no tensor holds its
  storage any more (the storage's reference count, which tensor views keep up too);
- with DataLoader workers the batch is consumed in another process, so a worker cannot see who holds it. The
  main process allocates each worker's slots in shared memory before the workers start (they outlive the
  workers, which restart every epoch) and keeps a board of which slots are free. A worker takes a free slot,
  marks it lent and stamps the batch with a ticket; :class:`~specdec.data.resumable.ResumableDataLoader` takes the
  ticket off in the main process, watches the reference count of the received storage there, and marks the slot
  free again once nothing holds it. A worker never writes to a slot the board does not show free.

When no slot is free (a consumer holding many batches) a fresh, unpooled buffer is used: the pool can make
reading faster, never wrong. A buffer's memory is recycled once no tensor refers to it; a consumer that keeps
only a batch tensor's ``untyped_storage()`` object, with no tensor on it, must copy instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch.utils.data import get_worker_info

TICKET_KEY = "_buffer_ticket"  # batch entry the loader removes in the main process; never seen by a consumer
MAIN_PROCESS_SLOTS = 3  # the batch being consumed, the one Lightning fetched ahead, the one being written
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def storage_is_unreferenced(storage: torch.UntypedStorage) -> bool:
    """True when ``storage`` is held by nothing but the caller's own reference (no tensor, no view)."""
    return _use_count is not None and _use_count(storage._cdata) == 1


def new_storage(nbytes: int, shared: bool) -> torch.UntypedStorage:
    """A fresh storage of ``nbytes`` (at least one), in shared memory when ``shared``."""
    nbytes = max(1, nbytes)
    return torch.UntypedStorage._new_shared(nbytes) if shared else torch.UntypedStorage(nbytes)


ALIGNMENT = 64  # bytes; every tensor laid on a shared storage starts at a multiple of this


def layout_nbytes(layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> int:
    """Bytes of a storage holding the tensors of ``layout`` (name → dtype, shape) end to end, each aligned."""
    offset = 0
    for dtype, shape in layout.values():
        offset = -(-offset // ALIGNMENT) * ALIGNMENT + math.prod(shape) * dtype.itemsize
    return offset


def tensors_on(
    storage: torch.UntypedStorage, layout: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of ``layout`` (name → dtype, shape) laid end to end on ``storage``, each aligned.

    One storage per batch means one file descriptor to hand over from a worker, not one per tensor.
    """
    tensors, offset = {}, 0
    for name, (dtype, shape) in layout.items():
        offset = -(-offset // ALIGNMENT) * ALIGNMENT
        tensors[name] = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
        offset += math.prod(shape) * dtype.itemsize
    return tensors


class BatchBuffers:
    """The pool of one batch stream (see the module docstring). Picklable: workers get the slots and the board."""

    def __init__(self) -> None:
        self.slots: list[list[torch.UntypedStorage]] = []  # [worker][slot], shared memory, owned by the main process
        self.board: torch.Tensor | None = None  # shared int8 [worker, slot]: 1 = free, 0 = lent
        self._owner = os.getpid()
        self._private: list[torch.UntypedStorage] = []  # main-process slots (num_workers=0)
        self._received: dict[tuple[int, int], torch.UntypedStorage] = {}  # main process: lent slots, as received
        self.generation = 0  # which slots and board a ticket refers to; a new one for each set of slots
        self._iterating = False  # main process: an iteration's workers may be writing into the slots
        self.tickets_received = 0  # main process: batches that came back in a pooled slot

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # a worker needs the shared slots and the board
        state.update(_owner=-1, _private=[], _received={}, _iterating=False)
        return state

    def prepare(self, num_workers: int, prefetch_factor: int | None, nbytes: int) -> int:
        """Main process, before the loader's workers start: slots of ``nbytes`` for each worker and a fresh board.

        A worker has up to ``prefetch_factor`` batches queued and one being written; two more cover the batch
        being consumed and the one fetched ahead. Slots still held from an earlier epoch stay lent; an iteration
        that is still open (its workers may still write) leaves its slots to it, and new ones are allocated.
        Returns the generation that :meth:`finish` is given back.
        """
        if self._iterating:
            self._abandon()
        if num_workers == 0:
            self.board = None
            return self.generation
        self._iterating = True
        per_worker = (prefetch_factor or 2) + 3
        if len(self.slots) != num_workers or len(self.slots[0]) != per_worker or self.slots[0][0].nbytes() < nbytes:
            self._abandon()
            self.slots = [[new_storage(nbytes, shared=True) for _ in range(per_worker)] for _ in range(num_workers)]
        self.release_unreferenced()
        board = torch.ones(num_workers, per_worker, dtype=torch.int8)
        for worker, slot in self._received:
            board[worker, slot] = 0
        self.board = board.share_memory_()
        return self.generation

    def finish(self, generation: int, exhausted: bool) -> None:
        """Main process, when an iteration ends: after a complete one every worker is done writing; after one
        broken off, its workers may still be, so their slots are given up (a later epoch allocates new ones)."""
        if generation != self.generation:
            return  # those slots were given up already
        if self._iterating and not exhausted:
            self._abandon()
        self._iterating = False

    def _abandon(self) -> None:
        self.slots, self.board = [], None
        self._received.clear()
        self.generation += 1

    def storage(self, nbytes: int, shared: bool) -> tuple[torch.UntypedStorage, tuple[int, int, int] | None]:
        """A storage of at least ``nbytes`` (in shared memory when ``shared``) and the ticket the batch must carry.

        The ticket is ``None`` when the batch needs none: a main-process buffer, or one outside the pool.
        """
        info = get_worker_info()
        if info is None and not shared and _use_count is not None and self._owner == os.getpid():
            return self._main_process_storage(nbytes), None
        board = self.board
        if info is not None and shared and board is not None and info.id < board.shape[0]:
            worker = info.id
            for slot, storage in enumerate(self.slots[worker]):
                if storage.nbytes() >= nbytes and bool(board[worker, slot]):
                    board[worker, slot] = 0
                    return storage, (self.generation, worker, slot)
        return new_storage(nbytes, shared), None

    def _main_process_storage(self, nbytes: int) -> torch.UntypedStorage:
        for index, storage in enumerate(self._private):
            if storage_is_unreferenced(storage):
                if storage.nbytes() < nbytes:
                    storage = self._private[index] = new_storage(nbytes, shared=False)
                return storage
        storage = new_storage(nbytes, shared=False)
        if len(self._private) < MAIN_PROCESS_SLOTS:
            self._private.append(storage)
        return storage

    def receive(self, batch: Any) -> Any:
        """Main process: take the ticket off ``batch`` (a dict) and watch the storage it names."""
        if isinstance(batch, MutableMapping) and TICKET_KEY in batch:
            generation, worker, slot, name = batch.pop(TICKET_KEY)
            if generation == self.generation:  # a batch of an abandoned iteration frees nothing of the current one
                self._received[(int(worker), int(slot))] = batch[name].untyped_storage()
                self.tickets_received += 1
        return batch

    def release_unreferenced(self) -> None:
        """Main process: mark free every lent slot that no tensor here holds any more."""
        for key in [key for key, storage in self._received.items() if storage_is_unreferenced(storage)]:
            del self._received[key]
            if self.board is not None and key[0] < self.board.shape[0] and key[1] < self.board.shape[1]:
                self.board[key] = 1
