"""Config fields every engine format shares: decoder sizes, RoPE in both spellings, context length.

Engines read RoPE either from ``rope_theta`` + ``rope_scaling`` (older stacks) or from ``rope_parameters``
(transformers v5); exports write both so one directory serves either. ``max_position_embeddings`` is never
below the target's: a drafter config that says 2048 caps the engine's positions and collapses acceptance
on longer prompts.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from specdec.targets.geometry import TargetGeometry


def rope_fields(rope_parameters: dict[str, Any]) -> dict[str, Any]:
    """``rope_theta``, ``rope_scaling`` (None for plain RoPE) and ``rope_parameters`` for one RoPE setting."""
    parameters = dict(rope_parameters)
    parameters.setdefault("rope_type", "default")
    theta = parameters.get("rope_theta", 10000.0)
    parameters["rope_theta"] = theta
    rope_type = parameters["rope_type"]
    scaling = None
    if rope_type != "default":
        scaling = {key: value for key, value in parameters.items() if key != "rope_theta"}
        scaling["type"] = rope_type
    return {"rope_theta": theta, "rope_scaling": scaling, "rope_parameters": parameters}


def max_positions(drafter_positions: int, target_config: PretrainedConfig | None) -> int:
    """The drafter's context length, raised to the target's when the target allows longer sequences."""
    if target_config is None:
        return int(drafter_positions)
    return max(int(drafter_positions), TargetGeometry.from_config(target_config).max_position_embeddings)


def decoder_fields(config: PretrainedConfig, target_config: PretrainedConfig | None, vocab_size: int) -> dict[str, Any]:
    """Sizes of the drafter's decoder layers in HF Qwen3/Llama config spelling."""
    return {
        "vocab_size": int(vocab_size),
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "hidden_act": config.hidden_act,
        "attention_bias": bool(config.attention_bias),
        "attention_dropout": 0.0,
        "max_position_embeddings": max_positions(config.max_position_embeddings, target_config),
        "tie_word_embeddings": False,
        **rope_fields(config.rope_parameters),
    }


def num_target_layers(config: PretrainedConfig, target_config: PretrainedConfig | None) -> int | None:
    """Depth of the target the drafter reads, from the target config or the drafter's own record."""
    if target_config is not None:
        return TargetGeometry.from_config(target_config).num_hidden_layers
    return getattr(config, "target_num_hidden_layers", None)


def target_max_positions(target_config: PretrainedConfig | None) -> int | None:
    if target_config is None:
        return None
    return TargetGeometry.from_config(target_config).max_position_embeddings
