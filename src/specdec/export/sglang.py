"""specdec drafters → SGLang's native drafter layouts.

- EAGLE3: ``LlamaForCausalLMEagle3`` — the single draft layer is ``midlayer.*``, aux layer ids live in
  ``eagle_config`` in the output-of-layer convention (SGLang adds 1 itself), ``d2t``/``t2d`` map the draft
  vocabulary (identity when it is full), the embedding is shared from the target.
- DSpark, and DFlash in the DeepSpec (anchor-first) convention: ``Qwen3DSparkModel``, DeepSpec's layout,
  which SGLang's DSpark worker loads as-is (frozen embedding and LM head included; strict key check).
- DFlash in the z-lab convention: ``DFlashDraftModel`` with ``dflash_config``; no embedding or LM head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from specdec.drafters import DSparkDrafter, Eagle3Drafter
from specdec.export.conventions import (
    decoder_fields,
    drafter_weights,
    dtype_name,
    num_target_layers,
    output_of_layer_ids,
    renamed,
)
from specdec.export.deepspec import dspark_config, dspark_tensors
from specdec.export.directory import ExportProvenance
from specdec.export.expressible import UnsupportedDrafterError, check_expressible
from specdec.export.source import Drafter, target_head_of
from specdec.export.validators import write_validated_export

FORMAT = "sglang"


def eagle3_export(drafter: Eagle3Drafter, target_config, dtype) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = drafter.config
    spec = {
        **decoder_fields(config, target_config, config.vocab_size),
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.hidden_size,
        "eagle_config": {
            "eagle_aux_hidden_state_layer_ids": output_of_layer_ids(config.target_layer_ids),
            "use_aux_hidden_state": True,
        },
        "mlp_bias": False,
        "pretraining_tp": 1,
        "torch_dtype": dtype_name(dtype),
    }
    tensors = renamed(drafter_weights(drafter), {"layers.0.": "midlayer."})
    if not config.reduced_vocabulary:
        vocab = config.vocab_size
        tensors["lm_head.weight"] = target_head_of(drafter).lm_head
        tensors["d2t"] = torch.zeros(vocab, dtype=torch.long)  # identity: target id = draft id + 0
        tensors["t2d"] = torch.ones(vocab, dtype=torch.bool)
    return spec, tensors


def dflash_export(drafter: DSparkDrafter, target_config, dtype) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = drafter.config
    depth = num_target_layers(config, target_config)
    if depth is None:
        raise UnsupportedDrafterError(FORMAT, "num_target_layers is unknown: pass the target")
    layers = config.num_hidden_layers
    spec = {
        **decoder_fields(config, target_config, config.vocab_size),
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "block_size": config.block_size,
        "dflash_config": {
            "mask_token_id": config.mask_token_id,
            "target_layer_ids": output_of_layer_ids(config.target_layer_ids),
        },
        "num_target_layers": depth,
        "layer_types": ["full_attention"] * layers,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "torch_dtype": dtype_name(dtype),
    }
    return spec, drafter_weights(drafter)


def export_sglang(
    drafter: Drafter,
    output_dir: str | Path,
    *,
    target_config: PretrainedConfig | None = None,
    provenance: ExportProvenance | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write ``drafter`` in the SGLang layout that fits it and validate the result."""
    check_expressible(drafter.config, FORMAT)
    if isinstance(drafter, Eagle3Drafter):
        config, tensors = eagle3_export(drafter, target_config, dtype)
        engine_ids = {
            "eagle_config.eagle_aux_hidden_state_layer_ids": config["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
        }
    elif drafter.config.anchor_convention == "zlab":
        config, tensors = dflash_export(drafter, target_config, dtype)
        engine_ids = {"dflash_config.target_layer_ids": config["dflash_config"]["target_layer_ids"]}
    else:
        config, tensors = dspark_config(drafter, target_config, dtype, FORMAT), dspark_tensors(drafter)
        engine_ids = {"target_layer_ids": config["target_layer_ids"]}
    return write_validated_export(
        output_dir,
        drafter,
        config,
        tensors,
        format_name=FORMAT,
        engine_layer_ids=engine_ids,
        num_target_layers=num_target_layers(drafter.config, target_config),
        target_config=target_config,
        provenance=provenance,
        dtype=dtype,
    )
