"""specdec drafters → vLLM's ``speculators`` format (eagle3, dflash, dspark), which ``vllm serve <dir>`` detects.

The config names the algorithm (``speculators_model_type``), the draft decoder (``transformer_layer_config``,
a full HF decoder config), the verifier, and the proposal (``speculators_config``). Layer ids are vLLM capture
indices (specdec L + 1). Embedding and, for DFlash/DSpark, the LM head are shared from the verifier and left
out; an EAGLE3 draft ships its own ``lm_head`` (plus ``d2t``/``t2d`` when its vocabulary is reduced).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from specdec.drafters import DSparkDrafter, Eagle3Drafter
from specdec.export.conventions import decoder_fields, drafter_weights, dtype_name, num_target_layers, vllm_capture_ids
from specdec.export.directory import ExportProvenance
from specdec.export.expressible import check_expressible
from specdec.export.source import Drafter, target_head_of
from specdec.export.validators import write_validated_export

FORMAT = "vllm"
SPECULATORS_VERSION = "0.3.0"


def _verifier(provenance: ExportProvenance | None, target_config: PretrainedConfig | None) -> dict[str, Any]:
    name = provenance.target if provenance is not None else None
    if name is None and target_config is not None:
        name = getattr(target_config, "_name_or_path", None) or None
    if not name:
        raise ValueError(
            "the speculators format names its verifier (speculators_config.verifier.name_or_path), which "
            "`vllm serve <dir>` loads: pass the target (provenance target or target_config)"
        )
    architectures = list(getattr(target_config, "architectures", None) or []) if target_config is not None else []
    return {"name_or_path": name, "architectures": architectures}


def _speculators_config(algorithm: str, tokens: int, verifier: dict[str, Any]) -> dict[str, Any]:
    return {
        "algorithm": algorithm,
        "proposal_methods": [
            {
                "proposal_type": "greedy",
                "speculative_tokens": int(tokens),
                "verifier_accept_k": 1,
                "accept_tolerance": 0.0,
            }
        ],
        "default_proposal_method": "greedy",
        "verifier": verifier,
    }


def speculators_type(drafter: DSparkDrafter) -> str:
    """``dflash`` for a z-lab-convention DFlash; ``dspark`` (which carries the anchor convention) otherwise."""
    config = drafter.config
    plain_dflash = config.markov_rank == 0 and not config.enable_confidence_head
    return "dflash" if plain_dflash and config.anchor_convention == "zlab" else "dspark"


def eagle3_export(drafter: Eagle3Drafter, target_config, verifier, tokens: int, dtype) -> tuple[dict, dict]:
    config = drafter.config
    qk_norm = getattr(config, "qk_norm", True)
    layer_config = {
        "model_type": "qwen3" if qk_norm else "llama",
        **decoder_fields(config, target_config, config.vocab_size),
    }
    spec = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer_config,
        "draft_vocab_size": config.draft_vocab_size,
        "target_hidden_size": config.hidden_size,
        "norm_before_residual": False,  # the residual is the un-normed fused hidden state
        "norm_before_fc": False,
        "fc_norm": False,
        "norm_output": False,
        "eagle_aux_hidden_state_layer_ids": vllm_capture_ids(config.target_layer_ids),
        "speculators_config": _speculators_config("eagle3", tokens, verifier),
        "torch_dtype": dtype_name(dtype),
    }
    tensors = drafter_weights(drafter)
    if not config.reduced_vocabulary:
        tensors["lm_head.weight"] = target_head_of(drafter).lm_head
    return spec, tensors


def dspark_export(drafter: DSparkDrafter, target_config, verifier, tokens: int, dtype) -> tuple[dict, dict]:
    config = drafter.config
    algorithm = speculators_type(drafter)
    layers = config.num_hidden_layers
    layer_config = {
        "model_type": "qwen3",
        **decoder_fields(config, target_config, config.vocab_size),
        "layer_types": ["full_attention"] * layers,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "block_size": config.block_size,
    }
    spec = {
        "architectures": ["DFlashSpeculator" if algorithm == "dflash" else "DSparkSpeculator"],
        "speculators_model_type": algorithm,
        "speculators_version": SPECULATORS_VERSION,
        "transformer_layer_config": layer_config,
        "aux_hidden_state_layer_ids": vllm_capture_ids(config.target_layer_ids),
        "mask_token_id": config.mask_token_id,
        "block_size": config.block_size,
        "draft_vocab_size": config.vocab_size,
        "target_hidden_size": config.target_hidden_size,
        "speculators_config": _speculators_config(algorithm, tokens, verifier),
        "torch_dtype": dtype_name(dtype),
    }
    if algorithm == "dspark":
        rank = int(config.markov_rank)
        spec.update(
            markov_rank=rank,
            markov_head_type=config.markov_head_type,
            enable_confidence_head=bool(config.enable_confidence_head),
            confidence_head_with_markov=bool(config.confidence_head_with_markov and rank > 0),
            sample_from_anchor=config.anchor_convention == "deepspec",
        )
    return spec, drafter_weights(drafter)


def export_vllm(
    drafter: Drafter,
    output_dir: str | Path,
    *,
    target_config: PretrainedConfig | None = None,
    provenance: ExportProvenance | None = None,
    dtype: torch.dtype = torch.bfloat16,
    speculative_tokens: int | None = None,
) -> Path:
    """Write ``drafter`` in the speculators format and validate the result."""
    check_expressible(drafter.config, FORMAT)
    verifier = _verifier(provenance, target_config)
    if isinstance(drafter, Eagle3Drafter):
        tokens = speculative_tokens or drafter.config.ttt_length
        config, tensors = eagle3_export(drafter, target_config, verifier, tokens, dtype)
        engine_ids = {"eagle_aux_hidden_state_layer_ids": config["eagle_aux_hidden_state_layer_ids"]}
    else:
        tokens = speculative_tokens or drafter.config.num_predictions
        config, tensors = dspark_export(drafter, target_config, verifier, tokens, dtype)
        engine_ids = {"aux_hidden_state_layer_ids": config["aux_hidden_state_layer_ids"]}
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
