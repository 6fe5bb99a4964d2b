"""Layout of one target-cache sample: the files a conversation becomes inside a WebDataset tar shard.

One sample per conversation, all files sharing the tar key (a sanitised form of the caller's provenance key):

- ``<key>.input_ids.npy`` — int32 ``[S]``
- ``<key>.loss_mask.npy`` — uint8 ``[S]`` (1 where the drafter is trained)
- ``<key>.features.<codec>`` — the captured layer outputs ``[S, L·H]`` (layers concatenated per token), encoded
  by :mod:`specdec.data.cache.codecs`; fp8 keeps one scale per token per layer
- ``<key>.last_hidden.<codec>`` — the final-normed last hidden state ``[T, H]`` at the ``T`` supervised positions
  only, in position order: the only rows training reads
- ``<key>.meta.json`` — provenance key and source, lengths, codec, layer ids, hidden size and the XXH3-64 checksum
  of every other file (``xxh3_64``: name → 16 hex digits), so a flipped bit is caught before it becomes a silently
  wrong sample. XXH3 hashes at tens of GB/s where CRC-32 manages about 2.5; caches written with per-file CRC-32
  (a ``crc32`` mapping) are still read and checked with it

Unlike DeepSpec's layout there is no all-ones attention mask and no last hidden state at prompt positions.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import xxhash

from specdec.data.cache.codecs import CodecError, CodecSpec, decode_tensor_into, encode_tensor, read_header
from specdec.data.cache.manifest import TargetCacheError

SAMPLE_FORMAT = "specdec-target-cache-sample"
SAMPLE_VERSION = 2  # 2: XXH3-64 file checksums; 1 (still read): CRC-32
INPUT_IDS = "input_ids.npy"
LOSS_MASK = "loss_mask.npy"
META = "meta.json"
FEATURES = "features"
LAST_HIDDEN = "last_hidden"
TAR_BLOCK = 512
MAX_KEY_CHARS = 48  # readable part of a tar key: with the hash and the longest suffix a name fits ustar's 100


_META_FIELDS = ("key", "source", "length", "supervised", "codec", "zstd", "layer_ids", "hidden_size")


class CacheSampleError(TargetCacheError):
    """A cache sample whose files are missing, corrupted or inconsistent with its metadata."""


@dataclass
class CacheSample:
    """What the cache stores for one conversation, as the target forward produced it (one sequence, no batch)."""

    key: str  # provenance key, unique across the cache (e.g. "train.jsonl:1234")
    input_ids: torch.Tensor  # [S] token ids
    loss_mask: torch.Tensor  # [S] bool, True where the drafter is trained
    hidden_states: torch.Tensor  # [S, L*H] captured layer outputs, layers concatenated per token
    last_hidden_state: torch.Tensor  # [S, H], or [T, H] already restricted to the supervised positions
    source: dict[str, Any] = field(default_factory=dict)  # JSON provenance (file, line, turn, ...)


def tar_key(key: str) -> str:
    """A tar-safe WebDataset key for a provenance key: ``[A-Za-z0-9_-]``, no dots, at most 65 characters.

    WebDataset splits a file name at its first dot and skips names like ``__x__``, and ustar headers hold 100
    characters, so anything else is replaced; a hash of the original keeps replaced keys distinct.
    """
    readable = re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_-")[:MAX_KEY_CHARS]
    if readable == key:
        return key
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return f"{readable}-{digest}" if readable else digest


def entry_names(codec: CodecSpec | str) -> tuple[str, str, str, str, str]:
    """File suffixes of one sample, in the order a tar shard stores them (sorted)."""
    spec = CodecSpec.parse(codec)
    return (f"{FEATURES}.{spec.extension}", INPUT_IDS, f"{LAST_HIDDEN}.{spec.extension}", LOSS_MASK, META)


def tar_member_bytes(payload_bytes: int) -> int:
    """Bytes one file occupies in a tar archive: a 512-byte header plus its data padded to 512."""
    return TAR_BLOCK + -(-payload_bytes // TAR_BLOCK) * TAR_BLOCK


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _xxh3(data: bytes | bytearray | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def _crc32(data: bytes | bytearray | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


# sample version → (meta.json field, the check's name in errors, checksum of a file's bytes)
CHECKSUMS = {2: ("xxh3_64", "XXH3-64", _xxh3), 1: ("crc32", "CRC-32", _crc32)}


def encode_sample(
    sample: CacheSample, codec: CodecSpec | str, layer_ids: Sequence[int], hidden_size: int
) -> dict[str, Any]:
    """Encode one sample into the WebDataset dict (``__key__`` plus file suffix → bytes) that a shard stores."""
    spec = CodecSpec.parse(codec)
    key = sample.key
    if not isinstance(key, str) or not key:
        raise ValueError(f"cache sample key must be a non-empty string; got {key!r}")
    input_ids = torch.as_tensor(sample.input_ids).detach().cpu()
    loss_mask = torch.as_tensor(sample.loss_mask).detach().cpu()
    if input_ids.dim() != 1 or input_ids.numel() == 0:
        shape = tuple(input_ids.shape)
        raise ValueError(f"sample {key!r}: input_ids must be a non-empty [S] tensor; got shape {shape}")
    length = input_ids.numel()
    if input_ids.is_floating_point() or int(input_ids.min()) < 0 or int(input_ids.max()) >= 2**31:
        raise ValueError(f"sample {key!r}: input_ids must be integer token ids in [0, 2^31)")
    if tuple(loss_mask.shape) != (length,):
        raise ValueError(f"sample {key!r}: loss_mask has shape {tuple(loss_mask.shape)}, input_ids ({length},)")
    loss_mask = loss_mask.bool()
    supervised = int(loss_mask.sum())
    width = len(layer_ids) * hidden_size
    if tuple(sample.hidden_states.shape) != (length, width):
        raise ValueError(
            f"sample {key!r}: hidden_states has shape {tuple(sample.hidden_states.shape)}; expected "
            f"({length}, {width}) = (tokens, {len(layer_ids)} layers × hidden {hidden_size})"
        )
    last = sample.last_hidden_state
    if last.dim() != 2 or last.shape[1] != hidden_size or last.shape[0] not in (length, supervised):
        raise ValueError(
            f"sample {key!r}: last_hidden_state has shape {tuple(last.shape)}; expected ({length}, {hidden_size}) "
            f"or ({supervised}, {hidden_size}) (supervised positions only)"
        )
    if last.shape[0] == length and length != supervised:
        last = last[loss_mask.to(last.device)]
    try:
        meta_source = json.loads(json.dumps(sample.source))
    except (TypeError, ValueError) as error:
        raise ValueError(f"sample {key!r}: source provenance is not JSON-serialisable: {error}") from error
    files = {
        f"{FEATURES}.{spec.extension}": encode_tensor(sample.hidden_states, spec, scale_group=hidden_size),
        INPUT_IDS: _npy_bytes(input_ids.numpy().astype("<i4")),
        f"{LAST_HIDDEN}.{spec.extension}": encode_tensor(last, spec, scale_group=hidden_size),
        LOSS_MASK: _npy_bytes(loss_mask.numpy().astype(np.uint8)),
    }
    meta = {
        "format": SAMPLE_FORMAT,
        "version": SAMPLE_VERSION,
        "key": key,
        "source": meta_source,
        "length": length,
        "supervised": supervised,
        "codec": spec.name,
        "zstd": spec.zstd,
        "layer_ids": list(layer_ids),
        "hidden_size": hidden_size,
        "xxh3_64": {name: _xxh3(data) for name, data in files.items()},  # CHECKSUMS[SAMPLE_VERSION]
    }
    files[META] = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return {"__key__": tar_key(key), **files}


Buffer = bytes | bytearray | memoryview


def _load_npy(data: Buffer, name: str) -> np.ndarray:
    try:
        return np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise CacheSampleError(f"{name} is not a valid .npy file: {error}") from error


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise CacheSampleError(message)


@dataclass(frozen=True)
class CheckedSample:
    """One sample whose files passed every check (checksums, meta, shapes): what is left is decoding features."""

    meta: dict[str, Any]
    features_name: str
    last_name: str
    input_ids: torch.Tensor  # int64 [S]
    loss_mask: torch.Tensor  # bool [S]

    @property
    def length(self) -> int:
        return int(self.meta["length"])

    @property
    def width(self) -> int:
        return len(self.meta["layer_ids"]) * int(self.meta["hidden_size"])


def check_sample(files: Mapping[str, Buffer], expected: Mapping[str, Any] | None = None) -> CheckedSample:
    """Check one sample's files against its meta and ``expected`` (cache-wide facts from the manifest).

    Every file's checksum, the meta's fields, the token arrays and the feature headers are checked here, so that
    decoding afterwards cannot produce a silently wrong tensor.
    """
    _check(META in files, f"sample has no {META} (files: {sorted(k for k in files if not k.startswith('__'))})")
    try:
        meta = json.loads(bytes(files[META]))
    except (ValueError, UnicodeDecodeError) as error:
        raise CacheSampleError(f"{META} is not valid JSON: {error}") from error
    _check(isinstance(meta, dict) and meta.get("format") == SAMPLE_FORMAT, f"{META} is not a specdec cache sample")
    _check(meta.get("version") in CHECKSUMS, f"{META} has unsupported sample version {meta.get('version')!r}")
    field_name, label, checksum = CHECKSUMS[meta["version"]]
    missing = [name for name in (*_META_FIELDS, field_name) if name not in meta]
    _check(not missing, f"{META} lacks field(s) {', '.join(missing)}")
    checksums = meta[field_name]
    _check(isinstance(checksums, dict), f"{META} {field_name} is not a file → checksum mapping")
    for name, value in checksums.items():
        _check(name in files, f"file {name} is missing")
        _check(checksum(files[name]) == value, f"file {name} fails its {label} check: the shard is corrupted")
    for expected_field, value in (expected or {}).items():
        _check(
            meta.get(expected_field) == value,
            f"{META} {expected_field} is {meta.get(expected_field)!r}; the cache manifest says {value!r}",
        )
    spec = CodecSpec(name=meta["codec"], zstd=meta["zstd"])
    features_name, _, last_name, _, _ = entry_names(spec)
    for name in (features_name, INPUT_IDS, last_name, LOSS_MASK):
        _check(name in checksums, f"{META} does not cover file {name}")
    length, supervised, hidden = meta["length"], meta["supervised"], meta["hidden_size"]
    width = len(meta["layer_ids"]) * hidden

    input_ids = _load_npy(files[INPUT_IDS], INPUT_IDS)
    loss_mask = _load_npy(files[LOSS_MASK], LOSS_MASK)
    _check(input_ids.shape == (length,), f"{INPUT_IDS} has shape {input_ids.shape}; meta says ({length},)")
    _check(input_ids.dtype == np.dtype("<i4"), f"{INPUT_IDS} has dtype {input_ids.dtype}; expected int32")
    _check(loss_mask.shape == (length,), f"{LOSS_MASK} has shape {loss_mask.shape}; meta says ({length},)")
    mask = torch.from_numpy(loss_mask.astype(bool))
    _check(int(mask.sum()) == supervised, f"{LOSS_MASK} has {int(mask.sum())} supervised positions; meta {supervised}")
    try:
        for name, rows, cols in ((features_name, length, width), (last_name, supervised, hidden)):
            header = read_header(files[name])
            _check(
                (header.codec, header.zstd, header.rows, header.cols) == (spec.name, spec.zstd, rows, cols),
                f"{name} holds a [{header.rows}, {header.cols}] {header.codec} tensor (zstd={header.zstd}); "
                f"meta says [{rows}, {cols}] {spec}",
            )
    except CodecError as error:
        raise CacheSampleError(str(error)) from error
    return CheckedSample(meta, features_name, last_name, torch.from_numpy(input_ids.astype(np.int64)), mask)


def decode_features_into(
    files: Mapping[str, Buffer], checked: CheckedSample, features: torch.Tensor, last_hidden: torch.Tensor
) -> None:
    """Decode a checked sample's features into ``features`` [S, L·H] and ``last_hidden`` [S, H] (rows of a batch).

    ``last_hidden`` is written at every position: the decoded rows where the loss mask is set, zero elsewhere.
    """
    positions = checked.loss_mask.nonzero().squeeze(1)
    first, count = (int(positions[0]), positions.numel()) if positions.numel() else (0, 0)
    contiguous = count == 0 or int(positions[-1]) - first + 1 == count  # one supervised span: decode in place
    try:
        decode_tensor_into(files[checked.features_name], features)
        if contiguous:
            decode_tensor_into(files[checked.last_name], last_hidden[first : first + count])
        else:
            rows = torch.empty(count, last_hidden.shape[-1], dtype=last_hidden.dtype)
            decode_tensor_into(files[checked.last_name], rows)
    except CodecError as error:
        raise CacheSampleError(str(error)) from error
    if contiguous:
        last_hidden[:first].zero_()
        last_hidden[first + count :].zero_()
    else:
        last_hidden.zero_()
        last_hidden.index_copy_(0, positions, rows)


def decode_checked_sample(files: Mapping[str, Buffer], checked: CheckedSample, dtype: torch.dtype) -> dict[str, Any]:
    """The dense sample (see :func:`decode_sample`) of files that :func:`check_sample` accepted."""
    features = torch.empty(checked.length, checked.width, dtype=dtype)
    last_hidden = torch.empty(checked.length, int(checked.meta["hidden_size"]), dtype=dtype)
    decode_features_into(files, checked, features, last_hidden)
    return {
        "key": checked.meta["key"],
        "source": checked.meta["source"],
        "input_ids": checked.input_ids,
        "loss_mask": checked.loss_mask,
        "target_hidden_states": features,
        "target_last_hidden_states": last_hidden,
    }


def decode_sample(
    files: Mapping[str, Buffer], expected: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Decode one sample's files into dense tensors, checking them against its meta and ``expected``.

    ``expected`` holds cache-wide facts (``layer_ids``, ``hidden_size``, ``codec``, ``zstd``) from the manifest.
    The result has ``key``, ``source``, ``input_ids`` int64 [S], ``loss_mask`` bool [S],
    ``target_hidden_states`` [S, L·H] and ``target_last_hidden_states`` [S, H], zero at unsupervised positions.
    """
    return decode_checked_sample(files, check_sample(files, expected), dtype)
