"""Tensor-name mapping and dtype casting shared by the exporters."""

from __future__ import annotations

from collections.abc import Mapping

import torch

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
