"""The servable drafter directory written next to every Lightning checkpoint (and by ``save_drafter``).

The Lightning ``.ckpt`` holds what resuming needs (weights, optimizer, schedule, data position); the directory
beside it holds only the drafter (``config.json`` + safetensors, no frozen target tensors) plus a provenance
file, which is what evaluation, export and ``AutoModel.from_pretrained`` read.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L

PROVENANCE_FILE = "specdec_provenance.json"
DRAFTER_SUFFIX = ".drafter"


def drafter_directory_of(checkpoint_path: str | Path) -> Path:
    """``…/step=100.ckpt`` → ``…/step=100.drafter``."""
    path = Path(checkpoint_path)
    return path.with_name(path.stem + DRAFTER_SUFFIX)


def provenance_of(module: L.LightningModule, trainer: L.Trainer | None = None) -> dict[str, Any]:
    """Where a drafter came from: target, layer ids, cache fingerprint, step and hyper-parameters."""
    record: dict[str, Any] = {
        "target": module.target_name,
        "layer_ids": list(module.layer_ids),
        "module": f"{type(module).__module__}.{type(module).__qualname__}",
        "hyper_parameters": json.loads(json.dumps(dict(module.hparams), default=str)),
    }
    if trainer is not None:
        record["global_step"] = trainer.global_step
        record["epoch"] = trainer.current_epoch
        manifest = getattr(trainer.datamodule, "manifest", None) if trainer.datamodule is not None else None
        if manifest is not None:
            fingerprint = json.dumps(manifest.get("fingerprint", {}), sort_keys=True)
            record["cache_fingerprint"] = manifest.get("fingerprint")
            record["cache_manifest_id"] = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return record


def save_drafter_directory(
    module: L.LightningModule,
    directory: str | Path,
    state_dict: dict[str, Any] | None = None,
    trainer: L.Trainer | None = None,
    **extra: Any,
) -> Path:
    """Write ``module.drafter`` (or the given full-module ``state_dict``'s ``drafter.*`` tensors) as an HF dir."""
    directory = Path(directory)
    if state_dict is None:
        state_dict = module.state_dict()
    drafter_state = {
        name.removeprefix("drafter."): tensor.detach().cpu().contiguous()
        for name, tensor in state_dict.items()
        if name.startswith("drafter.")
    }
    module.drafter.save_pretrained(directory, state_dict=drafter_state, safe_serialization=True)
    record = {**provenance_of(module, trainer), **extra}
    (directory / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return directory
