"""Recycled batch memory: feature batches are written into buffers reused once nothing refers to them any more.

A 2,048-token bf16 batch at Qwen3-4B geometry is 63 MB. Written into fresh memory, every page of it is first
zero-filled by the kernel on a page fault, which costs as much as dequantising an fp8 cache into it. A
:class:`BatchBuffers` pool keeps a few buffers and hands out one that is free:

- in the process that consumes the batches (``num_workers=0``), a buffer is free when no tensor holds its
  storage any more (the storage's reference count, which tensor views keep up too);
- with DataLoader workers the batch is consumed in another process, so a worker cannot see who holds it. The
  main process allocates each worker's slots in shared memory before the workers start (they outlive the
  workers, which restart every epoch) and keeps a board of which slots are free. A worker takes a free slot,
  marks it lent, writes the batch into it and sends only where each tensor lies (:class:`SlotTensor`) with a
  ticket; :class:`~specdec.data.resumable.ResumableDataLoader` rebuilds the tensors on the main process's own
  mapping of the slot (no file descriptor passes, no page is mapped anew), watches the slot's reference count
  and marks it free again once nothing holds it. A worker never writes to a slot the board does not show free.

When no slot is free (a consumer holding many batches) a fresh, unpooled buffer is used: the pool can make
reading faster, never wrong. A buffer's memory is recycled once no tensor refers to it; a consumer that keeps
only a batch tensor's ``untyped_storage()`` object, with no tensor on it, must copy instead.
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, NamedTuple

import torch
from torch.utils.data import get_worker_info

TICKET_KEY = "_buffer_ticket"  # batch entry the loader removes in the main process; never seen by a consumer
MAIN_PROCESS_SLOTS = 3  # the batch being consumed, the one Lightning fetched ahead, the one being written
_use_count = getattr(torch._C, "_storage_Use_Count", None)


def storage_is_unreferenced(storage: torch.UntypedStorage) -> bool:
    """True when ``storage`` is held by nothing but the caller's own reference (no tensor, no view)."""
    return _use_count is not None and _use_count(storage._cdata) == 1


def _madvise():
    """libc's ``madvise`` where it can populate page tables (Linux ≥ 5.14), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return function


_MADVISE = _madvise()
MADV_POPULATE_WRITE = 23


def map_for_writing(storage: torch.UntypedStorage) -> None:
    """Map all of ``storage``'s pages into this process in one call.

    A forked worker inherits the slots' mappings but not their page-table entries, so its first write to each
    page would fault; populating them up front costs a third of that. Best effort: no-op where unsupported.
    """
    if _MADVISE is not None and storage.nbytes():
        _MADVISE(storage.data_ptr(), storage.nbytes(), MADV_POPULATE_WRITE)


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

    One storage per batch: a worker hands over one slot (or, outside the pool, one file descriptor).
    """
    tensors, offset = {}, 0
    for name, (dtype, shape) in layout.items():
        offset = -(-offset // ALIGNMENT) * ALIGNMENT
        tensors[name] = torch.empty(0, dtype=dtype).set_(storage, offset // dtype.itemsize, shape)
        offset += math.prod(shape) * dtype.itemsize
    return tensors


class SlotTensor(NamedTuple):
    """A tensor a worker wrote into a pooled slot, sent as where it lies instead of as shared memory."""

    offset: int  # in elements of dtype
    dtype: torch.dtype
    shape: tuple[int, ...]


class BatchBuffers:
    """The pool of one batch stream (see the module docstring). Picklable: workers get the slots and the board."""

    def __init__(self) -> None:
        self.slots: list[list[torch.UntypedStorage]] = []  # [worker][slot], shared memory, owned by the main process
        self.board: torch.Tensor | None = None  # shared int8 [worker, slot]: 1 = free, 0 = lent
        self.generation = 0  # which slots and board a ticket refers to; a new one for each set of slots
        self._owner = os.getpid()
        self._private: list[torch.UntypedStorage] = []  # main-process slots (num_workers=0)
        self._lent: set[tuple[int, int]] = set()  # main process: slots of this generation holding a received batch
        self._retired: dict[int, list[list[torch.UntypedStorage]]] = {}  # slots of iterations given up, still open
        self._iterating = False  # main process: an iteration's workers may be writing into the slots
        self.tickets_received = 0  # main process: batches that came back in a pooled slot
        self._mapped: set[tuple[int, int, int]] = set()  # worker: (process, generation, slot) already mapped

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # a worker needs the shared slots, the board and the generation
        state.update(_owner=-1, _private=[], _lent=set(), _retired={}, _iterating=False)
        return state

    def prepare(self, num_workers: int, prefetch_factor: int | None, nbytes: int) -> int:
        """Main process, before the loader's workers start: slots of ``nbytes`` for each worker and a fresh board.

        A worker has up to ``prefetch_factor`` batches queued and one being written; two more cover the batch
        being consumed and the one fetched ahead. Slots still held from an earlier epoch stay lent; an iteration
        that is still open (its workers may still write) keeps its slots, and new ones are allocated.
        Returns the generation that :meth:`finish` is given back.
        """
        if self._iterating:
            self._abandon(keep_for_open_iteration=True)
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
        for worker, slot in self._lent:
            board[worker, slot] = 0
        self.board = board.share_memory_()
        return self.generation

    def finish(self, generation: int, exhausted: bool) -> None:
        """Main process, when an iteration ends: after a complete one every worker is done writing; after one
        broken off, its workers may still be, so their slots are given up (a later epoch allocates new ones)."""
        self._retired.pop(generation, None)  # its batches keep their own memory alive
        if generation != self.generation:
            return
        if self._iterating and not exhausted:
            self._abandon()
        self._iterating = False

    def _abandon(self, keep_for_open_iteration: bool = False) -> None:
        if keep_for_open_iteration and self.slots:
            self._retired[self.generation] = self.slots
        self.slots, self.board = [], None
        self._lent.clear()
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
                    if (os.getpid(), self.generation, slot) not in self._mapped:
                        map_for_writing(storage)
                        self._mapped.add((os.getpid(), self.generation, slot))
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

    def send(self, batch: dict[str, Any], storage: torch.UntypedStorage, ticket: tuple[int, int, int]) -> None:
        """Worker: replace the tensors ``batch`` holds on the slot ``storage`` by :class:`SlotTensor` references.

        The main process maps every slot already, so the hand-off carries a few numbers, not file descriptors.
        """
        pointer = storage.data_ptr()
        for name, value in batch.items():
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr() == pointer:
                batch[name] = SlotTensor(value.storage_offset(), value.dtype, tuple(value.shape))
        batch[TICKET_KEY] = ticket

    def receive(self, batch: Any) -> Any:
        """Main process: rebuild the tensors of a batch sent from a slot, and watch that slot."""
        if not (isinstance(batch, MutableMapping) and TICKET_KEY in batch):
            return batch
        generation, worker, slot = batch.pop(TICKET_KEY)
        slots = self.slots if generation == self.generation else self._retired.get(generation)
        if slots is None:
            raise RuntimeError(f"a batch arrived in slot {worker}/{slot} of generation {generation}, now released")
        storage = slots[worker][slot]
        for name, value in batch.items():
            if isinstance(value, SlotTensor):
                batch[name] = torch.empty(0, dtype=value.dtype).set_(storage, value.offset, value.shape)
        if generation == self.generation:  # a batch of an abandoned iteration frees nothing of the current one
            self._lent.add((worker, slot))
            self.tickets_received += 1
        return batch

    def release_unreferenced(self) -> None:
        """Main process: mark free every lent slot that no tensor holds any more."""
        for worker, slot in [key for key in self._lent if storage_is_unreferenced(self.slots[key[0]][key[1]])]:
            self._lent.discard((worker, slot))
            if self.board is not None:
                self.board[worker, slot] = 1
