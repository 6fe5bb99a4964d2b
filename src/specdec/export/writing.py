"""The last step of every exporter: provenance, files on disk, then the validators on what was written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from specdec.export.config_fields import target_max_positions
from specdec.export.files import write_export
from specdec.export.provenance import Provenance, provenance_record
from specdec.export.source import Drafter
from specdec.export.tensors import cast_floats
from specdec.export.validators import validate_export


def write_validated_export(
    output_dir: str | Path,
    drafter: Drafter,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    format_name: str,
    engine_layer_ids: dict[str, Any],
    num_target_layers: int | None,
    target_config: PretrainedConfig | None,
    provenance: Provenance | None,
    dtype: torch.dtype,
) -> Path:
    """Write ``config`` and ``tensors`` (cast to ``dtype``) with their provenance, and validate the directory."""
    record = provenance_record(
        provenance,
        format_name=format_name,
        architecture=config["architectures"][0],
        layer_ids=list(drafter.config.target_layer_ids),
        engine_layer_ids=engine_layer_ids,
        num_target_layers=num_target_layers,
        drafter_config=drafter.config.to_dict(),
        target_max_position_embeddings=target_max_positions(target_config),
    )
    write_export(output_dir, config, cast_floats(tensors, dtype), record)
    validate_export(output_dir)
    return Path(output_dir)
