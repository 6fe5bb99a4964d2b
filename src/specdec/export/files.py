"""Reading and writing an export directory: ``config.json`` plus one ``model.safetensors``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
