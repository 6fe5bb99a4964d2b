"""Layer-id convention and in-forward capture of target layer outputs.

Inside specdec a layer id L means "output of decoder layer L, 0-based, before the final norm", which is
HF ``hidden_states[L + 1]``; L = -1 is the embedding output (``hidden_states[0]``). The last decoder
layer is refused: HF exposes it only after the final norm (``hidden_states[-1]``), engines cannot capture
it, and the final-normed state is captured separately as ``last_hidden_state``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


class LayerIdError(ValueError):
    """A requested target layer id that specdec cannot capture."""


def hf_hidden_states_index(layer_id: int) -> int:
    """Index into HF ``output_hidden_states`` that holds the output of decoder layer ``layer_id``."""
    return layer_id + 1


def validate_layer_ids(layer_ids: Sequence[int], num_hidden_layers: int) -> tuple[int, ...]:
    """Check ``layer_ids`` against a target with ``num_hidden_layers`` layers; return them as a tuple."""
    ids = tuple(layer_ids)
    if not ids:
        raise LayerIdError("target layer_ids is empty: name at least one decoder layer to capture")
    for layer_id in ids:
        if isinstance(layer_id, bool) or not isinstance(layer_id, int):
            raise LayerIdError(f"target layer id {layer_id!r} is not an integer")
        if layer_id == num_hidden_layers - 1:
            raise LayerIdError(
                f"target layer id {layer_id} is the final layer of a {num_hidden_layers}-layer target: HF exposes its "
                "output only after the final norm (hidden_states[-1]) and serving engines cannot capture it; use ids "
                f"in [-1, {num_hidden_layers - 2}] (the final-normed state is captured as last_hidden_state)"
            )
        if layer_id == num_hidden_layers:
            raise LayerIdError(
                f"target layer id {layer_id} would be HF hidden_states[{layer_id}], the post-norm final state of a "
                f"{num_hidden_layers}-layer target; specdec layer ids mean 'output of decoder layer L' (= HF "
                f"hidden_states[L + 1]), valid from -1 to {num_hidden_layers - 2}"
            )
        if not -1 <= layer_id < num_hidden_layers:
            raise LayerIdError(
                f"target layer id {layer_id} is out of range for a {num_hidden_layers}-layer target: "
                f"valid ids are -1 (embeddings) to {num_hidden_layers - 2}"
            )
    if len(set(ids)) != len(ids):
        raise LayerIdError(f"target layer_ids {list(ids)} repeat a layer")
    return ids


def decoder_of(model: nn.Module) -> nn.Module:
    """The text decoder (embeddings, layers, final norm) of a causal LM, multimodal wrappers included."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no decoder with a `layers` ModuleList; is it a causal LM?")
    return decoder


@dataclass
class TargetFeatures:
    """What one target forward yields for drafter training."""

    hidden_states: torch.Tensor  # [B, S, len(layer_ids) * H], layers concatenated in layer_ids order
    last_hidden_state: torch.Tensor  # [B, S, H], after the final norm (the LM head's input)
    layer_ids: tuple[int, ...]


def _first_tensor(output: torch.Tensor | tuple) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


@torch.no_grad()
def capture_target_features(
    model: nn.Module,
    input_ids: torch.Tensor,
    layer_ids: Sequence[int],
    attention_mask: torch.Tensor | None = None,
) -> TargetFeatures:
    """Run the target's decoder once (no LM head) and capture the chosen layer outputs.

    Forward hooks read each layer's output as it is produced, so no other layer's activations are kept.
    """
    decoder = decoder_of(model)
    layers = decoder.layers
    ids = validate_layer_ids(layer_ids, len(layers))
    captured: dict[int, torch.Tensor] = {}

    def keep_output(layer_id: int):
        def hook(_module, _args, output):
            captured[layer_id] = _first_tensor(output)

        return hook

    def keep_embedding(_module, args, kwargs):
        captured[-1] = args[0] if args else kwargs["hidden_states"]

    handles = []
    try:
        for layer_id in ids:
            if layer_id == -1:
                handles.append(layers[0].register_forward_pre_hook(keep_embedding, with_kwargs=True))
            else:
                handles.append(layers[layer_id].register_forward_hook(keep_output(layer_id)))
        output = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return TargetFeatures(
        hidden_states=torch.cat([captured[layer_id] for layer_id in ids], dim=-1),
        last_hidden_state=output.last_hidden_state,
        layer_ids=ids,
    )
