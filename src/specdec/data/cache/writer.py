"""Writing the target cache: per-rank WebDataset tar shards that survive a crash at any moment.

Each rank writes ``shard-r{rank:03d}-{index:06d}.tar`` under a ``.partial`` name, fsyncs it, renames it, and only
then appends the shard's record (file, size, sha256, provenance keys) to its append-only, fsynced progress file
``progress/rank-{rank:03d}.jsonl``. A restart therefore trusts exactly the recorded shards: it deletes the partial
shard and any renamed shard whose record never made it, truncates a torn last progress line, and skips every key
already recorded by any rank, so no input is lost and no key is stored twice — even if the world size changed.
:func:`finalize_cache` (rank 0, once every rank has closed its writer) merges the progress files into
``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm.auto import tqdm
from webdataset import TarWriter

from specdec.data.cache.codecs import CodecSpec
from specdec.data.cache.format import CacheSample, encode_sample, tar_member_bytes
from specdec.data.cache.manifest import (
    MANIFEST_NAME,
    CacheFingerprint,
    CacheMismatchError,
    ShardIntegrityError,
    TargetCacheError,
    build_manifest,
    fingerprint_mismatches,
    fsync_directory,
    keys_digest,
    verify_shard,
    write_json_atomic,
)

PROGRESS_DIR = "progress"
PARTIAL_SUFFIX = ".partial"
DEFAULT_MAX_SHARD_BYTES = 1 << 30
MANIFEST_SHARD_FIELDS = ("file", "rank", "index", "samples", "bytes", "sha256", "tokens", "supervised_tokens")


def shard_name(rank: int, index: int) -> str:
    """File name of a rank's ``index``-th shard; ranks never share a name."""
    return f"shard-r{rank:03d}-{index:06d}.tar"


def progress_path(output_dir: str | os.PathLike[str], rank: int) -> Path:
    """The per-rank progress file."""
    return Path(output_dir) / PROGRESS_DIR / f"rank-{rank:03d}.jsonl"


def read_progress(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """Records of a progress file. A last line without its newline was never committed: it is ignored, and
    with ``repair`` (the file's own rank only) cut off so that the next append starts on a clean line."""
    if not path.exists():
        return []
    data = path.read_bytes()
    committed, _, torn = data.rpartition(b"\n")
    if torn and repair:
        with open(path, "r+b") as handle:
            handle.truncate(len(data) - len(torn))
            handle.flush()
            os.fsync(handle.fileno())
    records = []
    for number, line in enumerate(committed.split(b"\n") if committed else [], start=1):
        try:
            records.append(json.loads(line))
        except ValueError as error:
            raise TargetCacheError(f"{path}:{number}: corrupted progress record: {error}") from error
    if records and records[0].get("type") != "start":
        raise TargetCacheError(f"{path}:1: progress file does not begin with a start record")
    return records


class _HashingFile:
    """A write-only file wrapper that hashes and counts what passes through, so a shard is hashed once."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle = handle
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.dropped = False  # the shard is being deleted: late writes (the tar stream's finaliser) go nowhere

    def write(self, data: bytes) -> int:
        if self.dropped:
            return len(data)
        self.handle.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        return len(data)

    def flush(self) -> None:
        self.handle.flush()


@contextmanager
def _disk_errors(path: Path) -> Iterator[None]:
    """Name the file and the way out in an OS error (a full disk, a lost mount) while writing the cache."""
    try:
        yield
    except OSError as error:
        if error.filename == str(path):
            raise  # named already
        raise OSError(
            error.errno,
            f"{error.strerror or error}; the build kept every stored sample: free space or fix the storage and "
            "rerun the same command to resume",
            str(path),
        ) from error


@dataclass
class _OpenShard:
    index: int
    partial: Path
    handle: BinaryIO
    hashing: _HashingFile
    tar: TarWriter
    keys: list[str] = field(default_factory=list)
    tokens: int = 0
    supervised_tokens: int = 0
    tar_bytes: int = 0


class TargetCacheWriter:
    """One rank's resumable writer of target-cache shards.

    Give ``samples_per_shard``, ``max_shard_bytes`` or both (default: 1 GiB shards). Use as a context manager:
    a clean exit marks the rank complete; an exception keeps every fully written sample (the open shard is
    committed) without marking it complete, so a rerun continues where this one stopped.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        fingerprint: CacheFingerprint,
        codec: CodecSpec | str = "bf16",
        samples_per_shard: int | None = None,
        max_shard_bytes: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if samples_per_shard is not None and samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be at least 1; got {samples_per_shard}")
        if max_shard_bytes is not None and max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive; got {max_shard_bytes}")
        if samples_per_shard is None and max_shard_bytes is None:
            max_shard_bytes = DEFAULT_MAX_SHARD_BYTES
        self.output_dir = Path(output_dir)
        self.codec = CodecSpec.parse(codec)
        self.layer_ids = tuple(fingerprint.layer_ids)
        self.hidden_size = fingerprint.hidden_size
        self.max_length = fingerprint.max_length
        self.fingerprint = fingerprint.to_dict(self.codec)
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.rank = rank
        self.world_size = world_size
        self.dropped_files: list[str] = []  # partial or unrecorded shards removed on (re)start
        self._progress = progress_path(self.output_dir, rank)
        self._progress.parent.mkdir(parents=True, exist_ok=True)
        self._shards: list[dict[str, Any]] = []
        self._done: dict[str, str] = {}
        self._run_keys: set[str] = set()
        self._run_tar_keys: set[str] = set()
        self._open: _OpenShard | None = None
        self._broken = False
        self._closed = False
        self._recover()

    # ----------------------------------------------------------------------------------------- restart logic
    def _recover(self) -> None:
        records = read_progress(self._progress, repair=True)
        if not records:
            start = {"type": "start", "rank": self.rank, "world_size": self.world_size, "fingerprint": self.fingerprint}
            self._append(start)
            records = [start]
        self._check_fingerprint(records[0], self._progress)
        self._shards = [record for record in records if record["type"] == "shard"]
        for position, record in enumerate(self._shards):
            if record["index"] != position:
                raise TargetCacheError(f"{self._progress}: shard records are out of order at {record['file']}")
        recorded = {record["file"] for record in self._shards}
        for path in sorted(self.output_dir.glob(f"shard-r{self.rank:03d}-*")):
            if path.name not in recorded:
                path.unlink()
                self.dropped_files.append(path.name)
        if self.dropped_files:
            fsync_directory(self.output_dir)
        for record in self._shards:
            path = self.output_dir / record["file"]
            found = f"{path.stat().st_size} bytes" if path.exists() else "missing"
            if found != f"{record['bytes']} bytes":
                raise ShardIntegrityError(
                    f"target cache shard {path} is recorded as complete in {self._progress} with "
                    f"{record['bytes']} bytes but is {found}"
                )
        for path in sorted(self._progress.parent.glob("rank-*.jsonl")):
            others = records if path == self._progress else read_progress(path)
            if not others:
                continue
            self._check_fingerprint(others[0], path)
            for record in others:
                if record["type"] == "shard":
                    self._done.update(dict.fromkeys(record["keys"], record["file"]))

    def _check_fingerprint(self, start: dict[str, Any], path: Path) -> None:
        problems = fingerprint_mismatches(start["fingerprint"], self.fingerprint)
        if problems:
            raise CacheMismatchError(
                f"{self.output_dir} holds a cache with another fingerprint ({path}): "
                + "; ".join(problems)
                + "; use a new output directory"
            )

    def _append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":")).encode("utf-8") + b"\n"
        with _disk_errors(self._progress), open(self._progress, "ab") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    # ------------------------------------------------------------------------------------------------ writing
    def done_keys(self) -> frozenset[str]:
        """Provenance keys already stored by any rank: the inputs a (re)started build must skip."""
        return frozenset(self._done)

    @property
    def shards(self) -> list[dict[str, Any]]:
        """Records of this rank's completed shards."""
        return list(self._shards)

    def write(self, sample: CacheSample) -> None:
        """Append one sample to the open shard, rolling over to a new shard at the configured size."""
        if self._closed:
            raise RuntimeError("this cache writer is closed")
        if self._broken:
            raise RuntimeError("an earlier shard write failed; restart the build to resume from the last shard")
        if sample.key in self._done:
            raise TargetCacheError(f"sample key {sample.key!r} is already in the cache ({self._done[sample.key]})")
        if sample.key in self._run_keys:
            raise TargetCacheError(f"sample key {sample.key!r} appears twice in the input")
        length = int(sample.input_ids.shape[-1])
        if length > self.max_length:
            raise ValueError(f"sample {sample.key!r} has {length} tokens; the cache's max_length is {self.max_length}")
        files = encode_sample(sample, self.codec, self.layer_ids, self.hidden_size)
        if files["__key__"] in self._run_tar_keys:
            raise TargetCacheError(f"sample key {sample.key!r} maps to tar key {files['__key__']!r} of another sample")
        size = sum(tar_member_bytes(len(data)) for name, data in files.items() if name != "__key__")
        shard = self._open
        if shard is not None and self.max_shard_bytes and shard.tar_bytes + size > self.max_shard_bytes:
            self._commit()
        shard = self._open or self._open_shard()
        self._broken = True
        with _disk_errors(shard.partial):
            shard.tar.write(files)
        self._broken = False
        shard.keys.append(sample.key)
        shard.tokens += length
        shard.supervised_tokens += int(torch.as_tensor(sample.loss_mask).bool().sum())
        shard.tar_bytes += size
        self._run_keys.add(sample.key)
        self._run_tar_keys.add(files["__key__"])
        if self.samples_per_shard and len(shard.keys) >= self.samples_per_shard:
            self._commit()

    def _open_shard(self) -> _OpenShard:
        index = len(self._shards)
        partial = self.output_dir / (shard_name(self.rank, index) + PARTIAL_SUFFIX)
        handle = open(partial, "wb")  # noqa: SIM115 - closed in _commit or _discard
        hashing = _HashingFile(handle)
        tar = TarWriter(hashing, encoder=False, user="specdec", group="specdec", mtime=0)  # int: no PAX header per file
        self._open = _OpenShard(index=index, partial=partial, handle=handle, hashing=hashing, tar=tar)
        return self._open

    def _commit(self) -> None:
        shard, self._open = self._open, None
        name = shard_name(self.rank, shard.index)
        with _disk_errors(shard.partial):
            try:
                shard.tar.close()
                shard.handle.flush()
                os.fsync(shard.handle.fileno())
            except BaseException:
                shard.hashing.dropped = True  # the rerun removes the partial file
                raise
            finally:
                shard.handle.close()
            os.replace(shard.partial, self.output_dir / name)
            fsync_directory(self.output_dir)
        record = {
            "type": "shard",
            "file": name,
            "rank": self.rank,
            "index": shard.index,
            "samples": len(shard.keys),
            "bytes": shard.hashing.bytes,
            "sha256": shard.hashing.sha256.hexdigest(),
            "tokens": shard.tokens,
            "supervised_tokens": shard.supervised_tokens,
            "keys_sha256": keys_digest(shard.keys),
            "keys": shard.keys,
        }
        self._append(record)
        self._shards.append(record)
        self._done.update(dict.fromkeys(shard.keys, name))

    def _discard(self) -> None:
        shard, self._open = self._open, None
        shard.hashing.dropped = True
        shard.handle.close()
        shard.partial.unlink(missing_ok=True)

    def close(self) -> None:
        """Commit the open shard and mark this rank complete."""
        if self._closed:
            return
        if self._broken:
            raise RuntimeError("an earlier shard write failed; restart the build to resume from the last shard")
        if self._open is not None:
            self._commit()
        samples = sum(record["samples"] for record in self._shards)
        self._append({"type": "complete", "shards": len(self._shards), "samples": samples})
        self._closed = True

    def abort(self) -> None:
        """Stop without marking the rank complete, keeping every sample that was fully written."""
        if self._open is not None:
            if self._broken or not self._open.keys:
                self._discard()
            else:
                self._commit()
        self._closed = True

    def __enter__(self) -> TargetCacheWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def finalize(self, verify_sha256: bool = False) -> dict[str, Any]:
        """Rank 0, after every rank closed its writer: merge the progress files into ``manifest.json``."""
        if self.rank != 0:
            raise RuntimeError(f"finalize runs on rank 0 only (this writer is rank {self.rank})")
        self.close()
        return finalize_cache(self.output_dir, world_size=self.world_size, verify_sha256=verify_sha256)


def finalize_cache(
    output_dir: str | os.PathLike[str], world_size: int = 1, verify_sha256: bool = False
) -> dict[str, Any]:
    """Write ``manifest.json`` from every rank's progress file; return the manifest.

    Ranks ``0 … world_size-1`` must have closed their writers. Progress files of other ranks (an earlier run
    with more ranks) are merged too: their recorded shards are part of the cache.
    """
    output_dir = Path(output_dir)
    paths = sorted((output_dir / PROGRESS_DIR).glob("rank-*.jsonl"))
    if not paths:
        raise TargetCacheError(f"{output_dir} has no {PROGRESS_DIR}/rank-*.jsonl: nothing was written there")
    fingerprint: dict[str, Any] | None = None
    complete: set[int] = set()
    shards: list[dict[str, Any]] = []
    for path in paths:
        records = read_progress(path)
        if not records:
            continue
        start = records[0]
        if fingerprint is None:
            fingerprint = start["fingerprint"]
        problems = fingerprint_mismatches(start["fingerprint"], fingerprint)
        if problems:
            raise CacheMismatchError(f"{path} was written with another fingerprint: " + "; ".join(problems))
        if records[-1]["type"] == "complete":
            complete.add(start["rank"])
        shards.extend(record for record in records if record["type"] == "shard")
    missing = [rank for rank in range(world_size) if rank not in complete]
    if missing:
        raise TargetCacheError(
            f"rank(s) {missing} of {world_size} have not finished writing {output_dir}: finalize only after "
            "every rank closed its writer (rerun the build to resume an interrupted rank)"
        )
    shards.sort(key=lambda record: (record["rank"], record["index"]))
    owner: dict[str, str] = {}
    for record in shards:
        for key in record["keys"]:
            if key in owner:
                raise TargetCacheError(f"sample key {key!r} is stored twice: in {owner[key]} and {record['file']}")
            owner[key] = record["file"]
        path = output_dir / record["file"]
        if verify_sha256:
            verify_shard(path, record)
        elif not path.is_file() or path.stat().st_size != record["bytes"]:
            raise ShardIntegrityError(f"target cache shard {path} is missing or not {record['bytes']} bytes")
    entries = [
        {**{name: record[name] for name in MANIFEST_SHARD_FIELDS}, "keys_sha256": record["keys_sha256"]}
        for record in shards
    ]
    manifest = build_manifest(fingerprint, entries)
    write_json_atomic(output_dir / MANIFEST_NAME, manifest)
    return manifest


@dataclass(frozen=True)
class BuildReport:
    """What one :func:`build_cache` call did."""

    written: int
    skipped: int
    shards: int  # this rank's completed shards, earlier runs included
    bytes: int


def build_cache(
    samples: Iterable[CacheSample],
    writer: TargetCacheWriter,
    total: int | None = None,
    progress: bool = True,
) -> BuildReport:
    """Write computed samples through ``writer``, skipping keys an earlier run already stored; close the rank.

    To avoid recomputing finished inputs, the producer of ``samples`` should itself filter its inputs with
    ``writer.done_keys()`` before running the target; the skip here is the guarantee against duplicates.
    """
    done = writer.done_keys()
    written = skipped = 0
    with writer, tqdm(samples, total=total, disable=not progress, unit="sample", desc="target cache") as bar:
        if done:
            bar.write(f"target cache: resuming, {len(done)} samples already stored")
        for sample in bar:
            if sample.key in done:
                skipped += 1
                continue
            writer.write(sample)
            written += 1
            if written % 16 == 0:
                bar.set_postfix(shards=len(writer.shards), refresh=False)
    shards = writer.shards
    return BuildReport(
        written=written, skipped=skipped, shards=len(shards), bytes=sum(record["bytes"] for record in shards)
    )
