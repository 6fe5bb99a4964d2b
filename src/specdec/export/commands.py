"""``specdec export …``: export a trained drafter for an engine, import an exported/DeepSpec drafter, validate
an export, check its parity. Each function's signature and docstring are its flags (jsonargparse ``auto_cli``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

ExportFormat = Literal["deepspec", "vllm", "sglang"]


def _read_train_config(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    import yaml

    text = Path(path).read_text()
    loaded = yaml.safe_load(text)
    return loaded if isinstance(loaded, dict) else {"config": loaded}


def _source_record(source: Path) -> dict[str, Any]:
    """The provenance a training run wrote beside its HF drafter directory (target, layer ids, cache id)."""
    from specdec.export.directory import PROVENANCE_FILE

    path = Path(source) / PROVENANCE_FILE
    return json.loads(path.read_text()) if Path(source).is_dir() and path.exists() else {}


def export_command(
    source: Path,
    output_dir: Path,
    target: str | None = None,
    format: ExportFormat = "vllm",
    dtype: str = "bfloat16",
    speculative_tokens: int | None = None,
    revision: str | None = None,
    cache_manifest: Path | None = None,
    train_config: Path | None = None,
    check_parity: bool = True,
) -> None:
    """Export a drafter to DeepSpec's layout, vLLM's speculators format or SGLang's layout (validated on write).

    Args:
        source: the HF drafter directory (``save_pretrained``) or a Lightning ``.ckpt`` of a drafter module.
        output_dir: where the engine-ready directory is written.
        target: the target the drafter was trained for (``specdec-tiny``, a local HF directory or a hub id):
            its embedding / LM head, depth and context length, and the verifier named in vLLM exports.
            Default: the target recorded in the drafter directory's provenance by training.
        format: ``deepspec``, ``vllm`` or ``sglang``.
        dtype: weight dtype of the export (bfloat16, float16 or float32).
        speculative_tokens: vLLM's ``num_speculative_tokens`` (default: the drafter's tokens per round).
        revision: the target's hub revision, recorded in the provenance.
        cache_manifest: the target cache's manifest.json the drafter was trained on (recorded as an id).
        train_config: the training YAML/JSON, copied into the provenance.
        check_parity: rebuild the drafter from the exported files and require identical logits.
    """
    from transformers import AutoConfig

    from specdec.export.api import export_drafter
    from specdec.export.directory import ExportProvenance, cache_manifest_id
    from specdec.export.parity import check_export_parity
    from specdec.export.source import load_drafter, recorded_target
    from specdec.targets import resolve_target

    record = _source_record(source)
    target = target or recorded_target(source)
    if target is None:
        raise ValueError(f"{source}: give --target (the drafter records no target)")
    manifest_id = cache_manifest_id(cache_manifest) if cache_manifest is not None else record.get("cache_manifest_id")
    trained_with = _read_train_config(train_config) or record.get("hyper_parameters")
    drafter = load_drafter(source, target, revision=revision)
    target_config = AutoConfig.from_pretrained(resolve_target(target, revision=revision).path, revision=revision)
    provenance = ExportProvenance.from_target(
        target,
        revision,
        cache_manifest_id=manifest_id,
        train_config=trained_with,
        extra={"source": str(source)},
    )
    path = export_drafter(
        drafter,
        format,
        output_dir,
        target_config=target_config,
        provenance=provenance,
        dtype=dtype,
        speculative_tokens=speculative_tokens,
    )
    architecture = json.loads((path / "config.json").read_text()).get("architectures", ["?"])[0]
    print(f"wrote {format} export ({architecture}) to {path}: validated")
    if check_parity:
        print(check_export_parity(drafter, path).summary())


def import_command(source: Path, output_dir: Path, target: str | None = None) -> None:
    """Import an exported drafter (DeepSpec checkpoint, vLLM speculators or SGLang layout) as a specdec drafter.

    Args:
        source: the exported directory (``config.json`` + safetensors), e.g. a DeepSpec release.
        output_dir: where the specdec HF drafter directory is written (``from_pretrained``-able; fine-tune from it).
        target: the target, for formats that share the embedding / LM head with it (not needed for DeepSpec).
    """
    from specdec.export.loaders import load_export

    drafter = load_export(source, target=target)
    drafter.save_pretrained(output_dir)
    config = drafter.config
    print(f"imported {source} as {type(drafter).__name__} (layers {config.target_layer_ids}) into {output_dir}")


def validate_command(path: Path, format: ExportFormat | None = None) -> None:
    """Check an exported directory against its engine's contract; every problem is listed.

    Args:
        path: the exported directory.
        format: the engine it is meant for (default: the one recorded in its provenance); ``sglang`` adds
            SGLang's DSpark rules to the shared ``Qwen3DSparkModel`` layout.
    """
    from specdec.export.validators import validate_export

    validate_export(path, format)
    print(f"{path}: valid")


def parity_command(source: Path, export_dir: Path, target: str, atol: float = 0.0) -> None:
    """Rebuild a drafter from its export as the engine would and compare its logits with the original's.

    Args:
        source: the original HF drafter directory or Lightning ``.ckpt``.
        export_dir: the exported directory.
        target: the target (embedding / LM head).
        atol: largest tolerated absolute logit difference (0: exact, after rounding to the export dtype).
    """
    from specdec.export.parity import check_export_parity
    from specdec.export.source import load_drafter

    drafter = load_drafter(source, target)
    print(check_export_parity(drafter, export_dir, target=target, atol=atol).summary())


EXPORT_COMMANDS = {
    "_help": "Export drafters for vLLM, SGLang or DeepSpec; import exported drafters; validate; check parity.",
    "drafter": export_command,
    "import": import_command,
    "validate": validate_command,
    "parity": parity_command,
}
