"""The target cache's ``manifest.json``: what produced the cache (fingerprint), its shards, and their checks.

Schema (format version 1)::

    {
      "format": "specdec-target-cache", "format_version": 1, "created": "<UTC ISO time>",
      "fingerprint": {"target", "target_revision", "tokenizer_hash", "chat_template_hash",
                      "layer_ids", "hidden_size", "max_length", "codec", "zstd"},
      "shards": [{"file", "rank", "index", "samples", "bytes", "sha256", "tokens", "supervised_tokens",
                  "keys_sha256"}, ...],
      "totals": {"shards", "samples", "tokens", "supervised_tokens", "bytes", "bytes_per_token"}
    }

``keys_sha256`` hashes the shard's provenance keys in stored order (one per line); the keys themselves are in the
per-rank progress files next to the shards. A drafter refuses a cache built for another target, layer set or
hidden size through :func:`validate_manifest`; a shard that was truncated or altered is caught by
:func:`verify_shard` (and by the reader while streaming).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from specdec.data.cache.codecs import CodecSpec

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "specdec-target-cache"
MANIFEST_VERSION = 1
FINGERPRINT_FIELDS = (
    "target",
    "target_revision",
    "tokenizer_hash",
    "chat_template_hash",
    "layer_ids",
    "hidden_size",
    "max_length",
    "codec",
    "zstd",
)
SHARD_FIELDS = ("file", "samples", "bytes", "sha256", "tokens", "supervised_tokens", "keys_sha256")


class TargetCacheError(ValueError):
    """Base of the target cache's errors, so a caller can catch them all."""


class ManifestError(TargetCacheError):
    """A manifest that is missing, unreadable, or lacks a required field."""


class CacheMismatchError(TargetCacheError):
    """A cache built for something other than what its user expects (target, layers, hidden size, codec, ...)."""


class ShardIntegrityError(TargetCacheError):
    """A cache shard that is missing, truncated or corrupted; the message names the shard."""


def _sha256_text(text: str | None) -> str | None:
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 of a tokenizer's full definition (vocab, merges, normaliser, added tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _sha256_text(backend.to_str())
    return _sha256_text(json.dumps(tokenizer.get_vocab(), sort_keys=True))


def chat_template_hash(template: str | Mapping[str, str] | None) -> str | None:
    """sha256 of a chat template (a string, or a name → template mapping); None when there is none."""
    if template is None or isinstance(template, str):
        return _sha256_text(template)
    return _sha256_text(json.dumps(dict(template), sort_keys=True))


@dataclass(frozen=True)
class CacheFingerprint:
    """Everything that must match between the cache and its consumer, apart from the feature codec."""

    target: str
    layer_ids: tuple[int, ...]
    hidden_size: int
    max_length: int
    target_revision: str | None = None
    tokenizer_hash: str | None = None
    chat_template_hash: str | None = None

    def to_dict(self, codec: CodecSpec | str) -> dict[str, Any]:
        """The manifest's ``fingerprint`` object: these fields plus the codec and the zstd flag."""
        spec = CodecSpec.parse(codec)
        fields = {**asdict(self), "layer_ids": list(self.layer_ids), "codec": spec.name, "zstd": spec.zstd}
        return {name: fields[name] for name in FINGERPRINT_FIELDS}

    @classmethod
    def from_target(
        cls, target: Any, layer_ids: Sequence[int], max_length: int, chat_template: str | None = None
    ) -> CacheFingerprint:
        """Fingerprint a loaded :class:`specdec.targets.Target` (its tokenizer's own template by default)."""
        from specdec.targets import validate_layer_ids

        ids = validate_layer_ids(layer_ids, target.geometry.num_hidden_layers)
        template = chat_template if chat_template is not None else getattr(target.tokenizer, "chat_template", None)
        return cls(
            target=target.location.name,
            layer_ids=ids,
            hidden_size=target.geometry.hidden_size,
            max_length=max_length,
            target_revision=target.location.revision,
            tokenizer_hash=tokenizer_hash(target.tokenizer),
            chat_template_hash=chat_template_hash(template),
        )


def _normalise(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_normalise(item) for item in value]
    return value


def fingerprint_mismatches(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """One line per field of ``expected`` whose value differs in ``found`` (or that ``found`` lacks)."""
    problems = []
    for name, value in expected.items():
        if name not in found:
            problems.append(f"{name}: not in the cache fingerprint (fields: {', '.join(sorted(found))})")
        elif _normalise(found[name]) != _normalise(value):
            problems.append(f"{name} mismatch: cache has {found[name]!r}, expected {_normalise(value)!r}")
    return problems


def keys_digest(keys: Iterable[str]) -> str:
    """sha256 of provenance keys in order, one per line: a compact check of a shard's sample list."""
    digest = hashlib.sha256()
    for key in keys:
        digest.update(key.encode("utf-8") + b"\n")
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_directory(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write JSON so that readers see the old file or the complete new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_directory(path.parent)


def build_manifest(fingerprint: Mapping[str, Any], shards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Assemble a manifest from a fingerprint and shard entries (which carry :data:`SHARD_FIELDS`)."""
    entries = [dict(shard) for shard in shards]
    tokens = sum(entry["tokens"] for entry in entries)
    total_bytes = sum(entry["bytes"] for entry in entries)
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "fingerprint": dict(fingerprint),
        "shards": entries,
        "totals": {
            "shards": len(entries),
            "samples": sum(entry["samples"] for entry in entries),
            "tokens": tokens,
            "supervised_tokens": sum(entry["supervised_tokens"] for entry in entries),
            "bytes": total_bytes,
            "bytes_per_token": total_bytes / tokens if tokens else 0.0,
        },
    }


def check_manifest(manifest: Any, source: str = MANIFEST_NAME) -> dict[str, Any]:
    """Check a parsed manifest's structure; raise :class:`ManifestError` naming the first bad field."""
    if not isinstance(manifest, dict):
        raise ManifestError(f"{source}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{source}: format is {manifest.get('format')!r}, not {MANIFEST_FORMAT!r}")
    if manifest.get("format_version") != MANIFEST_VERSION:
        raise ManifestError(
            f"{source}: format_version {manifest.get('format_version')!r} is not supported (expected "
            f"{MANIFEST_VERSION}); rebuild the cache with this specdec"
        )
    fingerprint = manifest.get("fingerprint")
    if not isinstance(fingerprint, dict):
        raise ManifestError(f"{source}: fingerprint is missing")
    for name in FINGERPRINT_FIELDS:
        if name not in fingerprint:
            raise ManifestError(f"{source}: fingerprint.{name} is missing")
    if not isinstance(manifest.get("shards"), list):
        raise ManifestError(f"{source}: shards is missing")
    for position, shard in enumerate(manifest["shards"]):
        for name in SHARD_FIELDS:
            if not isinstance(shard, dict) or name not in shard:
                raise ManifestError(f"{source}: shards[{position}].{name} is missing")
    return manifest


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and structurally check ``manifest.json`` (``path`` is the file, its directory, or a URL)."""
    location = str(path)
    if os.path.isdir(location):
        location = os.path.join(location, MANIFEST_NAME)
    try:
        if os.path.exists(location):
            with open(location, encoding="utf-8") as handle:
                manifest = json.load(handle)
        else:
            from webdataset import gopen

            with gopen(location, "rb") as handle:
                manifest = json.loads(handle.read())
    except FileNotFoundError as error:
        raise ManifestError(f"{location}: no target-cache manifest here (was the cache finalized?)") from error
    except (ValueError, OSError) as error:
        raise ManifestError(f"{location}: unreadable manifest: {error}") from error
    return check_manifest(manifest, location)


def validate_manifest(manifest: Mapping[str, Any], expected: Mapping[str, Any], source: str = MANIFEST_NAME) -> None:
    """Refuse a cache whose fingerprint differs from ``expected`` in any given field, naming every such field.

    ``expected`` holds the consumer's view, e.g. ``{"target": ..., "layer_ids": [...], "hidden_size": ...}``;
    fields it leaves out are not compared.
    """
    check_manifest(manifest, source)
    problems = fingerprint_mismatches(manifest["fingerprint"], expected)
    if problems:
        raise CacheMismatchError(f"target cache {source} does not match: " + "; ".join(problems))


def verify_shard(path: str | os.PathLike[str], entry: Mapping[str, Any]) -> None:
    """Check a shard file's size and sha256 against its manifest entry; the error names the shard."""
    path = Path(path)
    if not path.is_file():
        raise ShardIntegrityError(f"target cache shard {path} is missing")
    size = path.stat().st_size
    if size < entry["bytes"]:
        raise ShardIntegrityError(
            f"target cache shard {path} is truncated: {size} bytes on disk, the manifest records {entry['bytes']}"
        )
    if size != entry["bytes"]:
        raise ShardIntegrityError(
            f"target cache shard {path} has {size} bytes on disk, the manifest records {entry['bytes']}"
        )
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise ShardIntegrityError(
            f"target cache shard {path} is corrupted: sha256 {digest} differs from the manifest's {entry['sha256']}"
        )
