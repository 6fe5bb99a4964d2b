"""What produced an export: target, tokenizer and chat template, layer ids, cache, training config.

Written next to the weights as ``specdec_provenance.json`` (engines ignore it), so a served drafter can be
traced back to its target revision and training run, and a validator can check the engine layer ids
against the ones the drafter was trained on.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import specdec

PROVENANCE_FORMAT = "specdec-export-provenance"


@dataclass
class Provenance:
    """Optional facts about how the drafter was made; every field may be left out."""

    target: str | None = None
    target_revision: str | None = None
    tokenizer_hash: str | None = None
    chat_template_hash: str | None = None
    cache_manifest_id: str | None = None
    train_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_target(cls, target: str, revision: str | None = None, **fields: Any) -> Provenance:
        """Fill the tokenizer and chat-template hashes from the target's tokenizer, when one can be loaded."""
        from specdec.data.cache.manifest import chat_template_hash, tokenizer_hash
        from specdec.targets import resolve_target

        hashes: dict[str, Any] = {}
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(resolve_target(target, revision=revision).path)
        except (OSError, ValueError):
            tokenizer = None
        if tokenizer is not None:
            hashes = {
                "tokenizer_hash": tokenizer_hash(tokenizer),
                "chat_template_hash": chat_template_hash(getattr(tokenizer, "chat_template", None)),
            }
        return cls(target=target, target_revision=revision, **{**hashes, **fields})


def cache_manifest_id(manifest_path: str | Path) -> str:
    """sha256 of a target cache's fingerprint (what the features were computed from), as a short stable id."""
    manifest = json.loads(Path(manifest_path).read_text())
    fingerprint = manifest.get("fingerprint", manifest)
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def provenance_record(
    provenance: Provenance | None,
    *,
    format_name: str,
    architecture: str,
    layer_ids: list[int],
    engine_layer_ids: dict[str, list[int]],
    num_target_layers: int | None,
    drafter_config: dict[str, Any],
    target_max_position_embeddings: int | None = None,
) -> dict[str, Any]:
    """The JSON written next to an export."""
    given = asdict(provenance) if provenance is not None else asdict(Provenance())
    extra = given.pop("extra")
    return {
        "format": PROVENANCE_FORMAT,
        "specdec_version": specdec.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "export_format": format_name,
        "architecture": architecture,
        "layer_ids": list(layer_ids),
        "layer_id_convention": "specdec: output of decoder layer L (0-based, pre-final-norm) = HF hidden_states[L+1]",
        "engine_layer_ids": engine_layer_ids,
        "num_target_layers": num_target_layers,
        "target_max_position_embeddings": target_max_position_embeddings,
        **given,
        "extra": extra,
        "drafter_config": drafter_config,
    }
