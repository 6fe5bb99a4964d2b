"""Read a target's embedding and LM head straight from its safetensors, without building the model.

A drafter shares these frozen tensors with its target. Reading just them (from a single file or the
shards an index points to) costs the bytes of two matrices instead of the whole target on every rank.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from specdec.targets.geometry import TargetGeometry
from specdec.targets.loading import resolve_target

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
EXCLUDED_EMBEDDING_PARTS = ("vision", "audio", "per_layer")


@dataclass
class TargetHead:
    """The target's frozen input embedding and output projection ([vocab, hidden] each)."""

    embed_tokens: torch.Tensor
    lm_head: torch.Tensor
    tied: bool  # True when lm_head is the embedding tensor itself
    embed_key: str
    lm_head_key: str | None


def _weight_map(directory: Path, fetch) -> dict[str, str]:
    """Tensor name → file, from the shard index or the single safetensors file."""
    index = fetch(INDEX_FILE)
    if index is not None:
        return json.loads(Path(index).read_text())["weight_map"]
    single = fetch(SINGLE_FILE)
    if single is None:
        raise FileNotFoundError(f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE}: no safetensors weights")
    with safe_open(single, framework="pt") as handle:
        return {key: SINGLE_FILE for key in handle.keys()}


def _pick_embedding_key(keys: list[str], where: str) -> str:
    candidates = [
        key
        for key in keys
        if key.endswith("embed_tokens.weight") and not any(p in key for p in EXCLUDED_EMBEDDING_PARTS)
    ]
    if not candidates:
        raise KeyError(f"no '*embed_tokens.weight' tensor in {where}")
    language = [key for key in candidates if "language_model" in key]
    return min(language or candidates, key=len)


def _pick_lm_head_key(keys: list[str]) -> str | None:
    candidates = [key for key in keys if key.endswith("lm_head.weight")]
    return min(candidates, key=len) if candidates else None


def read_target_head(
    name_or_path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
) -> TargetHead:
    """Load only the embedding and LM-head tensors of a local or hub target.

    A checkpoint without an LM-head tensor falls back to the embedding when its config ties them, and is
    refused otherwise.
    """
    location = resolve_target(name_or_path, revision=revision)
    config = AutoConfig.from_pretrained(location.path, revision=revision)
    geometry = TargetGeometry.from_config(config)
    weight_map = _weight_map(location.path, location.fetch)
    keys = sorted(weight_map)
    embed_key = _pick_embedding_key(keys, str(location.path))
    lm_head_key = _pick_lm_head_key(keys)
    if lm_head_key is None and not geometry.tie_word_embeddings:
        raise KeyError(
            f"{location.path} has no '*lm_head.weight' tensor and its config does not tie word embeddings "
            "(tie_word_embeddings is false): the checkpoint is incomplete"
        )

    tensors: dict[str, torch.Tensor] = {}
    wanted = [key for key in (embed_key, lm_head_key) if key is not None]
    for file_name in sorted({weight_map[key] for key in wanted}):
        with safe_open(location.fetch(file_name, required=True), framework="pt") as handle:
            for key in wanted:
                if weight_map[key] == file_name:
                    tensors[key] = handle.get_tensor(key)
    if dtype is not None:
        tensors = {key: tensor.to(dtype) for key, tensor in tensors.items()}
    embed = tensors[embed_key]
    lm_head = tensors[lm_head_key] if lm_head_key is not None else embed
    for name, tensor in (("embedding", embed), ("LM head", lm_head)):
        if tuple(tensor.shape) != (geometry.vocab_size, geometry.hidden_size):
            raise ValueError(
                f"{location.path}: {name} has shape {tuple(tensor.shape)}, config says "
                f"[{geometry.vocab_size}, {geometry.hidden_size}]"
            )
    return TargetHead(
        embed_tokens=embed, lm_head=lm_head, tied=lm_head_key is None, embed_key=embed_key, lm_head_key=lm_head_key
    )
