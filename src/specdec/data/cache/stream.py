"""Streaming a target cache into equal, deterministic per-rank micro-batches.

Each epoch the shards are put in an order drawn from ``(seed, epoch)`` (manifest order without shuffling) and
read as one global sample stream. Rank ``r`` takes the contiguous range ``[r·n, (r+1)·n)`` of that stream, with
``n = total // world_size`` (the remainder — fewer than ``world_size`` samples — is left out this epoch), so a
rank opens only the shards its range touches. The range is cut into per-worker blocks of whole batches; each
worker streams its block through a seeded shuffle buffer, decodes only the samples it yields, and pads them
into batches. Shard integrity is checked as in :mod:`specdec.data.cache.reader`: XXH3-64 of every file, shapes
against the manifest, and the sample count and key list of every shard read to its end.

A batch is decoded straight from the shard's bytes (memory-mapped for local files) into its batch tensors, one
write per value; inside a DataLoader worker those tensors are allocated in shared memory, so handing the batch
to the training process moves a file descriptor, not the features. The tensors' memory is recycled
(:mod:`specdec.data.buffers`) once nothing holds the batch, so pages are not zero-filled anew for every batch.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import get_worker_info

from specdec.data.batches import TOKEN_FIELDS, padded_token_batch
from specdec.data.buffers import BatchBuffers, layout_nbytes, new_storage, tensors_on
from specdec.data.cache.codecs import SCALED_CODECS, compiled_kernels
from specdec.data.cache.format import Buffer, decode_features_into
from specdec.data.cache.manifest import ShardIntegrityError, keys_digest
from specdec.data.cache.reader import check_shard_sample, iter_shard_files, open_shard
from specdec.data.resumable import EpochBatches, worker_batch_counts


@dataclass(frozen=True)
class ShardSpan:
    """A slice ``[start, stop)`` of one shard's samples."""

    url: str
    entry: Mapping[str, Any]
    start: int
    stop: int


def seeded_random(*parts: int) -> random.Random:
    """A ``random.Random`` seeded from several integers (seed, epoch, rank, worker) without collisions."""
    return random.Random("/".join(str(part) for part in parts))


def shuffle_buffer(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    """Yield ``items`` in a shuffled order using a buffer of ``size`` (1 or less: unchanged order)."""
    if size <= 1:
        yield from items
        return
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class TargetCacheStream(EpochBatches):
    """This rank's micro-batches of a target cache for each epoch (see the module docstring)."""

    def __init__(
        self,
        urls: Sequence[str],
        manifest: Mapping[str, Any],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 256,
        drop_last: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        entries = {shard["file"]: shard for shard in manifest["shards"]}
        self.shards: list[tuple[str, Mapping[str, Any]]] = []
        for url in urls:
            entry = entries.get(url.rpartition("/")[2])
            if entry is None:
                raise ShardIntegrityError(f"target cache shard {url} is not listed in the manifest")
            self.shards.append((url, entry))
        fingerprint = manifest["fingerprint"]
        self.expected = {name: fingerprint[name] for name in ("layer_ids", "hidden_size", "codec", "zstd")}
        self.max_length = int(fingerprint["max_length"])
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.drop_last = drop_last
        self.dtype = dtype
        self.pad_token_id = pad_token_id
        self.buffers = BatchBuffers()
        self.total_samples = sum(entry["samples"] for _, entry in self.shards)
        self.rank_samples = self.total_samples // world_size
        if self.num_batches() == 0:
            raise ValueError(
                f"the target cache holds {self.total_samples} samples: too few for {world_size} rank(s) × "
                f"batch size {batch_size}{' with drop_last' if drop_last else ''}"
            )

    def before_workers_start(self) -> None:
        kernels = compiled_kernels()
        if kernels is not None and self.expected["codec"] in SCALED_CODECS:
            kernels.warm_up()  # compiled once here, not once per worker and epoch

    def batch_nbytes(self) -> int:
        hidden = int(self.expected["hidden_size"])
        width = len(self.expected["layer_ids"]) * hidden
        return layout_nbytes(batch_layout(self.batch_size, self.max_length, width, hidden, self.dtype))

    def num_batches(self) -> int:
        if self.drop_last:
            return self.rank_samples // self.batch_size
        return -(-self.rank_samples // self.batch_size)

    def shard_order(self, epoch: int) -> list[int]:
        """Indices into the shard list in this epoch's reading order (identical on every rank)."""
        order = list(range(len(self.shards)))
        if self.shuffle:
            seeded_random(self.seed, epoch).shuffle(order)
        return order

    def worker_range(self, worker: int, num_workers: int) -> tuple[int, int]:
        """Global stream positions ``[start, stop)`` whose samples this worker of this rank yields."""
        counts = worker_batch_counts(self.num_batches(), num_workers)
        rank_start = self.rank * self.rank_samples
        start = rank_start + self.batch_size * sum(counts[:worker])
        stop = min(start + self.batch_size * counts[worker], rank_start + self.rank_samples)
        return start, stop

    def spans(self, epoch: int, start: int, stop: int) -> list[ShardSpan]:
        """The shard slices covering global positions ``[start, stop)`` of epoch ``epoch``."""
        spans, offset = [], 0
        for index in self.shard_order(epoch):
            url, entry = self.shards[index]
            count = entry["samples"]
            lo, hi = max(start, offset), min(stop, offset + count)
            if lo < hi:
                spans.append(ShardSpan(url, entry, lo - offset, hi - offset))
            offset += count
        return spans

    def _raw_samples(self, spans: Sequence[ShardSpan]) -> Iterator[tuple[str, str, dict[str, Buffer]]]:
        for span in spans:
            whole = span.start == 0 and span.stop == span.entry["samples"]
            keys: list[str] = []
            position = -1
            stream = open_shard(span.url)
            try:
                for position, (key, files) in enumerate(iter_shard_files(stream, span.url)):
                    if position >= span.stop:
                        if whole:
                            raise ShardIntegrityError(
                                f"target cache shard {span.url} holds more samples than the {span.entry['samples']} "
                                "the manifest records"
                            )
                        break
                    if whole:
                        keys.append(_meta_key(files, key, span.url))
                    if position >= span.start:
                        yield span.url, key, files
            finally:
                stream.close()
            if position + 1 < span.stop:
                raise ShardIntegrityError(
                    f"target cache shard {span.url} ends after {position + 1} samples; the manifest records "
                    f"{span.entry['samples']} (truncated?)"
                )
            if whole and keys_digest(keys) != span.entry["keys_sha256"]:
                raise ShardIntegrityError(f"target cache shard {span.url} holds other samples than its manifest entry")

    def iter_worker(self, worker: int, num_workers: int, skip: int) -> Iterator[dict[str, Any]]:
        start, stop = self.worker_range(worker, num_workers)
        rng = seeded_random(self.seed, self.epoch, self.rank, worker)
        raw = self._raw_samples(self.spans(self.epoch, start, stop))
        ordered = shuffle_buffer(raw, self.shuffle_buffer if self.shuffle else 1, rng)
        batch: list[tuple[str, str, dict[str, Buffer]]] = []
        index = 0
        for item in ordered:
            batch.append(item)
            if len(batch) == self.batch_size:
                if index >= skip:
                    yield self._collate(batch)
                index += 1
                batch = []
        if batch and not self.drop_last and index >= skip:
            yield self._collate(batch)

    def _collate(self, raw: Sequence[tuple[str, str, dict[str, Buffer]]]) -> dict[str, Any]:
        return decode_batch(raw, self.expected, self.dtype, self.pad_token_id, buffers=self.buffers)


def batch_layout(
    size: int, width: int, feature_width: int, hidden: int, dtype: torch.dtype
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every tensor of a ``[size, width]`` batch, as laid out on its one storage (see :mod:`specdec.data.buffers`)."""
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        "target_hidden_states": (dtype, (size, width, feature_width)),
        "target_last_hidden_states": (dtype, (size, width, hidden)),
    }
    layout.update({name: (token_dtype, (size, width)) for name, token_dtype in TOKEN_FIELDS.items()})
    return layout


_POOL: tuple[int, ThreadPoolExecutor] | None = None


def _worker_decode_pool() -> ThreadPoolExecutor | None:
    """Inside a DataLoader worker with cores to spare (fewer workers than cores): threads that decode the rows of
    a batch side by side (the decoders release the GIL). DataLoader gives each worker one intra-op thread, and
    raising that after fork is unsafe with OpenMP; Python threads created in the worker are not."""
    global _POOL
    info = get_worker_info()
    if info is None:
        return None
    threads = len(os.sched_getaffinity(0)) // info.num_workers
    if threads < 2:
        return None
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(threads, thread_name_prefix="specdec-decode"))
    return _POOL[1]


def decode_batch(
    raw: Sequence[tuple[str, str, Mapping[str, Buffer]]],
    expected: Mapping[str, Any],
    dtype: torch.dtype,
    pad_token_id: int = 0,
    shared: bool | None = None,
    buffers: BatchBuffers | None = None,
) -> dict[str, Any]:
    """Check and decode ``(url, tar key, files)`` samples into one right-padded batch (see :mod:`specdec.data.batches`).

    Equal to decoding each sample and padding them with :func:`~specdec.data.batches.collate_target_samples`;
    ``shared`` (default: inside a DataLoader worker) puts the feature tensors in shared memory; with ``buffers``
    they are written into a recycled buffer of that pool.
    """
    checked = [check_shard_sample(files, key, url, expected) for url, key, files in raw]
    layout = batch_layout(
        len(checked),
        max(sample.length for sample in checked),
        checked[0].width,
        int(checked[0].meta["hidden_size"]),
        dtype,
    )
    nbytes = layout_nbytes(layout)
    shared = get_worker_info() is not None if shared is None else shared
    storage, ticket = buffers.storage(nbytes, shared) if buffers is not None else (new_storage(nbytes, shared), None)
    tensors = tensors_on(storage, layout)
    batch = padded_token_batch(
        [sample.meta["key"] for sample in checked],
        [sample.input_ids for sample in checked],
        [sample.loss_mask for sample in checked],
        pad_token_id,
        out=tensors,
    )
    batch["target_hidden_states"] = tensors["target_hidden_states"]
    batch["target_last_hidden_states"] = tensors["target_last_hidden_states"]

    def decode_row(row: int) -> None:
        sample, files, length = checked[row], raw[row][2], checked[row].length
        features, last = batch["target_hidden_states"][row], batch["target_last_hidden_states"][row]
        decode_features_into(files, sample, features[:length], last[:length])
        features[length:].zero_()
        last[length:].zero_()

    pool = _worker_decode_pool()
    if pool is not None and len(checked) > 1:
        for _ in pool.map(decode_row, range(len(checked))):  # re-raises a row's error here
            pass
    else:
        for row in range(len(checked)):
            decode_row(row)
    if ticket is not None:
        buffers.send(batch, storage, ticket)
    return batch


def _meta_key(files: Mapping[str, Buffer], key: str, url: str) -> str:
    try:
        return json.loads(bytes(files["meta.json"]))["key"]
    except (KeyError, ValueError, TypeError) as error:
        raise ShardIntegrityError(f"target cache shard {url}, sample {key}: unreadable meta.json: {error}") from error
