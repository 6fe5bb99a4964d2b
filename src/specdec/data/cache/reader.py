"""Reading the target cache: stream shards (local or any URL WebDataset opens) into dense training samples.

Every sample is checked before it is yielded — XXH3-64 of each file (CRC-32 in version-1 samples), decoded
shapes against its meta and the manifest — and every shard is checked when it ends: sample count and key list
against the manifest, and optionally size and sha256. A corrupted or truncated shard raises
:class:`ShardIntegrityError` naming it; it never turns into a silently wrong sample.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from webdataset import gopen

from specdec.data.cache.format import (
    Buffer,
    CacheSampleError,
    CheckedSample,
    check_sample,
    decode_checked_sample,
    tar_key,
)
from specdec.data.cache.manifest import (
    MANIFEST_NAME,
    ShardIntegrityError,
    keys_digest,
    read_manifest,
    validate_manifest,
)

Source = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


class _HashingReader:
    """A read-only stream wrapper that hashes and counts what is read, for the end-of-shard checks."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 22):
            pass


def _resolve(source: Source) -> tuple[list[str], dict[str, Any] | None]:
    if isinstance(source, (str, os.PathLike)):
        location = os.fspath(source)
        if os.path.isdir(location):
            manifest = read_manifest(location)
            return [str(Path(location) / shard["file"]) for shard in manifest["shards"]], manifest
        if location.endswith(MANIFEST_NAME):
            manifest = read_manifest(location)
            base = location[: -len(MANIFEST_NAME)]
            return [base + shard["file"] for shard in manifest["shards"]], manifest
        return [location], None
    return [os.fspath(url) for url in source], None


def cache_shard_urls(source: str | os.PathLike[str]) -> list[str]:
    """Shard URLs of a cache directory or ``manifest.json`` URL, in manifest order (for splitting over workers)."""
    return _resolve(source)[0]


def _split_name(name: str) -> tuple[str, str]:
    # WebDataset's rule: the key is the file name up to the first dot after the last slash.
    directory, _, base = name.rpartition("/")
    stem, _, suffix = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), suffix


def open_shard(url: str) -> BinaryIO:
    """Open a shard by path or any URL WebDataset's ``gopen`` understands (``pipe:``, ``http(s)://``, ...)."""
    try:
        return gopen(url, "rb")
    except Exception as error:
        raise ShardIntegrityError(f"target cache shard {url} cannot be opened: {error}") from error


def _mapped(stream: BinaryIO) -> memoryview | None:
    """The whole shard as a read-only memory map when it is a local file, so members are views, not copies."""
    if not getattr(stream, "seekable", lambda: False)():
        return None
    try:
        fileno = stream.fileno()
        if os.fstat(fileno).st_size == 0:
            return None
        return memoryview(mmap.mmap(fileno, 0, access=mmap.ACCESS_READ))
    except (AttributeError, OSError, ValueError):
        return None


def iter_shard_files(stream: BinaryIO, url: str) -> Iterator[tuple[str, dict[str, Buffer]]]:
    """The raw samples of one tar shard in stored order: ``(tar key, {suffix: bytes})``, nothing decoded.

    A local file is memory-mapped and its members are returned as views of the map (the page cache, no copy);
    a pipe or socket is read as a stream. A truncated member, a repeated file or a stream that is not a tar
    raises :class:`ShardIntegrityError`.
    """
    mapped = _mapped(stream)
    try:
        # A seekable (local) file is read header by header, skipping the data; a pipe or socket as a stream.
        with tarfile.open(fileobj=stream, mode="r:" if mapped is not None else "r|") as archive:
            current: str | None = None
            files: dict[str, Buffer] = {}
            for member in archive:
                if not member.isfile():
                    continue
                key, suffix = _split_name(member.name)
                if mapped is not None:
                    data: Buffer = mapped[member.offset_data : member.offset_data + member.size]
                else:
                    data = archive.extractfile(member).read()
                if len(data) != member.size:
                    raise ShardIntegrityError(f"target cache shard {url} is truncated inside {member.name}")
                if key != current:
                    if files:
                        yield current, files
                    current, files = key, {}
                if suffix in files:
                    raise ShardIntegrityError(f"target cache shard {url} stores {member.name} twice")
                files[suffix] = data
            if files:
                yield current, files
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardIntegrityError(f"target cache shard {url} is truncated or not a tar file: {error}") from error


def check_shard_sample(files: Mapping[str, Buffer], key: str, url: str, expected: Mapping[str, Any]) -> CheckedSample:
    """Check one raw sample of shard ``url``; any inconsistency is a :class:`ShardIntegrityError` naming both."""
    try:
        checked = check_sample(files, expected)
    except CacheSampleError as error:
        raise ShardIntegrityError(f"target cache shard {url}, sample {key}: {error}") from error
    if tar_key(checked.meta["key"]) != key:
        raise ShardIntegrityError(f"target cache shard {url}: sample {key} carries the meta of {checked.meta['key']!r}")
    return checked


def decode_shard_sample(
    files: Mapping[str, Buffer], key: str, url: str, expected: Mapping[str, Any], dtype: torch.dtype
) -> dict[str, Any]:
    """Decode one raw sample of shard ``url``; any inconsistency is a :class:`ShardIntegrityError` naming both."""
    checked = check_shard_sample(files, key, url, expected)
    try:
        return decode_checked_sample(files, checked, dtype)
    except CacheSampleError as error:
        raise ShardIntegrityError(f"target cache shard {url}, sample {key}: {error}") from error


def _iter_shard(
    url: str,
    entry: Mapping[str, Any] | None,
    expected: Mapping[str, Any],
    dtype: torch.dtype,
    verify_sha256: bool,
) -> Iterator[dict[str, Any]]:
    keys: list[str] = []
    stream = open_shard(url)
    reader = _HashingReader(stream)
    try:
        for key, files in iter_shard_files(reader, url):
            sample = decode_shard_sample(files, key, url, expected, dtype)
            keys.append(sample["key"])
            yield sample
        if verify_sha256:
            reader.drain()
    finally:
        stream.close()
    if entry is None:
        return
    if len(keys) != entry["samples"]:
        raise ShardIntegrityError(
            f"target cache shard {url} holds {len(keys)} samples; the manifest records {entry['samples']} "
            "(truncated or replaced?)"
        )
    if keys_digest(keys) != entry["keys_sha256"]:
        raise ShardIntegrityError(f"target cache shard {url} holds other samples than the manifest records")
    if verify_sha256 and (reader.bytes, reader.sha256.hexdigest()) != (entry["bytes"], entry["sha256"]):
        raise ShardIntegrityError(
            f"target cache shard {url} is corrupted: {reader.bytes} bytes with sha256 {reader.sha256.hexdigest()}; "
            f"the manifest records {entry['bytes']} bytes with sha256 {entry['sha256']}"
        )


def iter_cache_samples(
    source: Source,
    manifest: Mapping[str, Any] | None = None,
    expected: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    verify_sha256: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield the cache's samples as dense tensors, shard by shard in order.

    ``source`` is a cache directory, a ``manifest.json`` URL, or shard URLs/paths (then pass ``manifest`` to get
    the per-shard checks). ``expected`` is checked against the manifest fingerprint up front (see
    :func:`validate_manifest`). Each sample: ``key`` and ``source`` (provenance), ``input_ids`` int64 [S],
    ``loss_mask`` bool [S], ``target_hidden_states`` [S, L·H] and ``target_last_hidden_states`` [S, H] (zero where
    ``loss_mask`` is false), both of ``dtype``.
    """
    urls, found = _resolve(source)
    manifest = manifest if manifest is not None else found
    entries: dict[str, Mapping[str, Any]] = {}
    sample_expected: dict[str, Any] = {}
    if manifest is not None:
        validate_manifest(manifest, expected or {})
        entries = {shard["file"]: shard for shard in manifest["shards"]}
        fingerprint = manifest["fingerprint"]
        sample_expected = {name: fingerprint[name] for name in ("layer_ids", "hidden_size", "codec", "zstd")}
    elif expected:
        raise ValueError("checking `expected` needs the cache manifest: pass a cache directory or `manifest`")
    for url in urls:
        entry = entries.get(url.rpartition("/")[2]) if manifest is not None else None
        if manifest is not None and entry is None:
            raise ShardIntegrityError(f"target cache shard {url} is not listed in the manifest")
        yield from _iter_shard(url, entry, sample_expected, dtype, verify_sha256)
