"""One entry point over the three exporters, so callers pick a format by name."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PretrainedConfig

from specdec.export.conventions import parse_dtype
from specdec.export.deepspec import export_deepspec
from specdec.export.directory import ExportProvenance
from specdec.export.expressible import FORMATS
from specdec.export.sglang import export_sglang
from specdec.export.source import Drafter
from specdec.export.vllm import export_vllm

EXPORTERS = {"deepspec": export_deepspec, "vllm": export_vllm, "sglang": export_sglang}


def export_drafter(
    drafter: Drafter,
    format_name: str,
    output_dir: str | Path,
    *,
    target_config: PretrainedConfig | None = None,
    provenance: ExportProvenance | None = None,
    dtype: str | torch.dtype = torch.bfloat16,
    speculative_tokens: int | None = None,
) -> Path:
    """Export ``drafter`` to ``format_name`` (``deepspec``, ``vllm`` or ``sglang``); validated on write."""
    if format_name not in EXPORTERS:
        raise ValueError(f"unknown export format {format_name!r}; expected one of {FORMATS}")
    options = {"target_config": target_config, "provenance": provenance, "dtype": parse_dtype(dtype)}
    if format_name == "vllm":
        options["speculative_tokens"] = speculative_tokens
    return EXPORTERS[format_name](drafter, output_dir, **options)
