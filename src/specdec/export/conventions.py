"""How a specdec drafter maps onto engine fields: layer ids, shared decoder config fields, tensor names and dtypes.

Layer ids are converted from specdec's convention here and nowhere else. specdec's layer id L is the output of
decoder layer L, 0-based, before the final norm (HF ``hidden_states[L+1]``).

=====================================================  ==========================  ==============
field                                                  meaning                      from specdec L
=====================================================  ==========================  ==============
DeepSpec / SGLang ``target_layer_ids`` (DSpark)        output of layer L            L
SGLang ``eagle_config.eagle_aux_hidden_state_layer_ids``  output of layer L (+1 inside)  L
z-lab / SGLang ``dflash_config.target_layer_ids``      output of layer L            L
vLLM ``eagle_aux_hidden_state_layer_ids`` (EAGLE3)     capture index (input of L+1)  L + 1
speculators ``aux_hidden_state_layer_ids`` (DFlash/DSpark)  capture index          L + 1
=====================================================  ==========================  ==============

Engines read RoPE either from ``rope_theta`` + ``rope_scaling`` (older stacks) or from ``rope_parameters``
(transformers v5); exports write both so one directory serves either. ``max_position_embeddings`` is never
below the target's: a drafter config that says 2048 caps the engine's positions and collapses acceptance
on longer prompts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import PretrainedConfig

from specdec.targets.geometry import TargetGeometry


def output_of_layer_ids(layer_ids: Sequence[int]) -> list[int]:
    """DeepSpec, z-lab DFlash and SGLang config fields use specdec's own convention."""
    return [int(layer_id) for layer_id in layer_ids]


def vllm_capture_ids(layer_ids: Sequence[int]) -> list[int]:
    """vLLM captures the input of layer i, i.e. the output of layer i - 1: specdec L becomes L + 1."""
    return [int(layer_id) + 1 for layer_id in layer_ids]


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


# specdec module names → DeepSpec names for the non-vanilla Markov heads (vanilla names are identical).
DEEPSPEC_MARKOV_RENAMES = {
    "markov_head.gate.": "markov_head.gate_proj.",
    "markov_head.cell.": "markov_head.joint_proj.",
}


def cast_floats(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating tensors to ``dtype``; integer (d2t) and bool (t2d) tensors keep theirs."""
    return {
        name: tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach()
        for name, tensor in tensors.items()
    }


def renamed(tensors: Mapping[str, torch.Tensor], renames: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Tensors with every name prefix/infix in ``renames`` replaced."""
    result = {}
    for name, tensor in tensors.items():
        for old, new in renames.items():
            name = name.replace(old, new)
        result[name] = tensor
    return result


def drafter_weights(drafter: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The drafter's own persistent tensors (trainable weights, d2t/t2d, layer scalars), no target head."""
    return dict(drafter.state_dict())


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    choices = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if name not in choices:
        raise ValueError(f"dtype {name!r} is not one of {sorted(choices)}")
    return choices[name]
