"""specdec drafters → DeepSpec's HF layout (``Qwen3DSparkModel``, ``Gemma4DSparkModel``, ``Qwen3Eagle3Model``).

DeepSpec's drafters carry frozen copies of the target's embedding and LM head (``embed_tokens``, ``lm_head``)
and a config that is the target's text config with the draft depth and DSpark/Eagle3 fields added
(DeepSpec's ``build_draft_config``). Module names otherwise match specdec's, so the export is a copy plus
the two target tensors. SGLang's DSpark path loads this layout as-is. The reverse direction (DeepSpec →
specdec) is :func:`specdec.export.loaders.load_deepspec`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from specdec.drafters import DSparkDrafter, Eagle3Drafter
from specdec.export.conventions import (
    DEEPSPEC_MARKOV_RENAMES,
    decoder_fields,
    drafter_weights,
    dtype_name,
    num_target_layers,
    output_of_layer_ids,
    renamed,
    rope_fields,
)
from specdec.export.directory import ExportProvenance
from specdec.export.expressible import UnsupportedDrafterError, check_expressible
from specdec.export.source import Drafter, target_head_of
from specdec.export.validators import write_validated_export

FORMAT = "deepspec"


def _token_ids(target_config: PretrainedConfig | None) -> dict[str, Any]:
    if target_config is None:
        return {}
    text = target_config.get_text_config()
    return {key: getattr(text, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}


def _require_depth(config: PretrainedConfig, target_config: PretrainedConfig | None, format_name: str) -> int:
    depth = num_target_layers(config, target_config)
    if depth is None:
        raise UnsupportedDrafterError(
            format_name, "num_target_layers is unknown: pass the target (or build the drafter with from_target)"
        )
    return depth


def dspark_config(
    drafter: DSparkDrafter, target_config: PretrainedConfig | None, dtype: torch.dtype, format_name: str = FORMAT
) -> dict[str, Any]:
    """config.json of a ``Qwen3DSparkModel`` / ``Gemma4DSparkModel``."""
    config = drafter.config
    depth = _require_depth(config, target_config, format_name)
    rank = int(config.markov_rank)
    fields = decoder_fields(config, target_config, config.vocab_size)
    layers = config.num_hidden_layers
    common = {
        **fields,
        **_token_ids(target_config),
        "layer_types": ["full_attention"] * layers,
        "block_size": config.block_size,
        "mask_token_id": config.mask_token_id,
        "target_layer_ids": output_of_layer_ids(config.target_layer_ids),
        "num_target_layers": depth,
        "num_anchors": config.num_anchors,
        "markov_rank": rank,
        "markov_head_type": config.markov_head_type,
        "enable_confidence_head": bool(config.enable_confidence_head),
        "confidence_head_with_markov": bool(config.confidence_head_with_markov and rank > 0),
        "torch_dtype": dtype_name(dtype),
    }
    if config.block_style == "gemma4":
        rope = rope_fields(config.rope_parameters)["rope_parameters"]
        common.update(
            architectures=["Gemma4DSparkModel"],
            model_type="gemma4_text",
            hidden_activation=config.hidden_act,
            global_head_dim=config.head_dim,
            final_logit_softcapping=config.final_logit_softcapping,
            attention_k_eq_v=bool(config.attention_k_eq_v),
            rope_parameters={"full_attention": rope, "sliding_attention": dict(rope)},
        )
        return common
    common.update(
        architectures=["Qwen3DSparkModel"],
        model_type="qwen3",
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=layers,
    )
    return common


def dspark_tensors(drafter: DSparkDrafter) -> dict[str, torch.Tensor]:
    head = target_head_of(drafter)
    tensors = renamed(drafter_weights(drafter), DEEPSPEC_MARKOV_RENAMES)
    tensors["embed_tokens.weight"] = head.embed_tokens
    tensors["lm_head.weight"] = head.lm_head
    return tensors


def eagle3_config(drafter: Eagle3Drafter, target_config: PretrainedConfig | None, dtype: torch.dtype) -> dict[str, Any]:
    """config.json of a ``Qwen3Eagle3Model`` (full vocabulary, Qwen3 attention)."""
    config = drafter.config
    return {
        **decoder_fields(config, target_config, config.vocab_size),
        **_token_ids(target_config),
        "architectures": ["Qwen3Eagle3Model"],
        "model_type": "qwen3",
        "layer_types": ["full_attention"] * config.num_hidden_layers,
        "use_sliding_window": False,
        "sliding_window": None,
        "target_layer_ids": output_of_layer_ids(config.target_layer_ids),
        "num_target_layers": _require_depth(config, target_config, FORMAT),
        "ttt_length": config.ttt_length,
        "step_loss_decay": config.step_loss_decay,
        "torch_dtype": dtype_name(dtype),
    }


def eagle3_tensors(drafter: Eagle3Drafter) -> dict[str, torch.Tensor]:
    head = target_head_of(drafter)
    tensors = drafter_weights(drafter)
    tensors["embed_tokens.weight"] = head.embed_tokens
    tensors["lm_head.weight"] = head.lm_head
    return tensors


def export_deepspec(
    drafter: Drafter,
    output_dir: str | Path,
    *,
    target_config: PretrainedConfig | None = None,
    provenance: ExportProvenance | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write ``drafter`` in DeepSpec's layout and validate the result."""
    check_expressible(drafter.config, FORMAT)
    if isinstance(drafter, DSparkDrafter):
        config, tensors = dspark_config(drafter, target_config, dtype), dspark_tensors(drafter)
    else:
        config, tensors = eagle3_config(drafter, target_config, dtype), eagle3_tensors(drafter)
    return write_validated_export(
        output_dir,
        drafter,
        config,
        tensors,
        format_name=FORMAT,
        engine_layer_ids={"target_layer_ids": config["target_layer_ids"]},
        num_target_layers=config["num_target_layers"],
        target_config=target_config,
        provenance=provenance,
        dtype=dtype,
    )
