"""Export specdec drafters for serving engines and import DeepSpec checkpoints, with validators and a parity gate.

- :func:`export_drafter` writes DeepSpec's layout, vLLM's speculators format or SGLang's native layouts
  (layer ids converted per engine, RoPE in both spellings, embed/LM head included only where required,
  provenance next to the weights) and validates every export (:func:`validate_export`).
- :func:`load_export` rebuilds the drafter an engine would serve from exported files (also the DeepSpec import);
  :func:`check_export_parity` requires it to reproduce the original drafter's logits.
- :func:`load_drafter` reads a drafter from an HF drafter directory or a Lightning checkpoint.
"""

from specdec.export.api import EXPORTERS, export_drafter
from specdec.export.deepspec import export_deepspec
from specdec.export.directory import ExportProvenance, cache_manifest_id
from specdec.export.expressible import (
    FORMATS,
    UnsupportedDrafterError,
    check_expressible,
    expressible_formats,
    unsupported_reasons,
)
from specdec.export.loaders import ExportReadError, load_deepspec, load_export
from specdec.export.parity import ParityError, ParityReport, check_export_parity, export_and_check
from specdec.export.sglang import export_sglang
from specdec.export.source import load_drafter
from specdec.export.validators import ExportValidationError, find_problems, validate_export
from specdec.export.vllm import export_vllm

__all__ = [
    "EXPORTERS",
    "FORMATS",
    "ExportProvenance",
    "ExportReadError",
    "ExportValidationError",
    "ParityError",
    "ParityReport",
    "UnsupportedDrafterError",
    "cache_manifest_id",
    "check_export_parity",
    "check_expressible",
    "export_and_check",
    "export_deepspec",
    "export_drafter",
    "export_sglang",
    "export_vllm",
    "expressible_formats",
    "find_problems",
    "load_deepspec",
    "load_drafter",
    "load_export",
    "unsupported_reasons",
    "validate_export",
]
