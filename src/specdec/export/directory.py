"""An export directory: ``config.json``, ``model.safetensors`` and ``specdec_provenance.json``.

The provenance file records what produced the export (target, tokenizer and chat template, layer ids, cache,
training config); engines ignore it, so a served drafter can be traced back to its target revision and
training run, and a validator can check the engine layer ids against the ones the drafter was trained on.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import specdec

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROVENANCE_FILE = "specdec_provenance.json"


def write_export(
    directory: str | Path,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Write config, weights and provenance; tensors are made contiguous and un-shared (safetensors needs it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    owned = {name: tensor.detach().cpu().contiguous().clone() for name, tensor in tensors.items()}
    save_file(owned, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    if provenance is not None:
        (directory / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not an exported drafter directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error


def read_provenance(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / PROVENANCE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def read_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors files (single file or shards)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors file")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key in tensors:
                    raise ValueError(f"{file.name}: tensor {key!r} also appears in another shard")
                tensors[key] = handle.get_tensor(key)
    return tensors


PROVENANCE_FORMAT = "specdec-export-provenance"


@dataclass
class ExportProvenance:
    """Optional facts about how the drafter was made; every field may be left out."""

    target: str | None = None
    target_revision: str | None = None
    tokenizer_hash: str | None = None
    chat_template_hash: str | None = None
    cache_manifest_id: str | None = None
    train_config: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_target(cls, target: str, revision: str | None = None, **fields: Any) -> ExportProvenance:
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
    provenance: ExportProvenance | None,
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
    given = asdict(provenance) if provenance is not None else asdict(ExportProvenance())
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
