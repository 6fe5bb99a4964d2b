"""The target side of decoding: one HF KV cache for a batch of requests that advance by different amounts.

Rows share one slot timeline: every forward appends the same number of slots to each row, and a row marks the
slots it really uses as valid (the 2-D attention mask). Rows keep their own positions (``position_ids``), so a
row that accepted 2 drafts while its neighbour accepted 5 sees exactly the context it would see alone; slots
rejected by every row are cropped away, so batch size 1 never has holes. Chosen target layers are captured by
forward hooks during the same forward that produces the logits (the drafter's context features).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel

from specdec.targets.layers import decoder_of, validate_layer_ids


@dataclass
class TargetStep:
    """What one target forward returns: logits of the new slots and the captured layer features."""

    logits: torch.Tensor  # [B, n, V] in the model's dtype
    features: torch.Tensor | None  # [B, n, len(layer_ids) * H], None when no layers are captured


def _cache_argument(model: nn.Module) -> str:
    """The keyword the model's forward takes its KV cache under (``cache`` in recent transformers)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class TargetSession:
    """A batch of requests against a frozen causal LM: prefill, extend by slots, keep what was accepted.

    Use as a context manager (the layer hooks are removed on exit).
    """

    def __init__(self, model: PreTrainedModel, layer_ids: Sequence[int] | None = None) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.cache_argument = _cache_argument(model)
        layers = decoder_of(model).layers
        self.layer_ids = validate_layer_ids(layer_ids, len(layers)) if layer_ids else ()
        self._captured: dict[int, torch.Tensor] = {}
        self._handles = []
        for layer_id in self.layer_ids:
            if layer_id == -1:
                self._handles.append(layers[0].register_forward_pre_hook(self._keep_embedding, with_kwargs=True))
            else:
                self._handles.append(layers[layer_id].register_forward_hook(self._keep_output(layer_id)))
        self.cache: DynamicCache | None = None
        self.valid: torch.Tensor | None = None  # [B, slots] bool
        self.next_position: torch.Tensor | None = None  # [B] long
        self._chunk_start = 0

    # ---- hooks -------------------------------------------------------------------------------------------
    def _keep_output(self, layer_id: int):
        def hook(_module, _args, output):
            self._captured[layer_id] = output if isinstance(output, torch.Tensor) else output[0]

        return hook

    def _keep_embedding(self, _module, args, kwargs):
        self._captured[-1] = args[0] if args else kwargs["hidden_states"]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.cache = None

    def __enter__(self) -> TargetSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- forwards ----------------------------------------------------------------------------------------
    def _forward(self, input_ids, chunk_valid, position_ids, logits_to_keep) -> TargetStep:
        valid = chunk_valid if self.valid is None else torch.cat([self.valid, chunk_valid], dim=1)
        attention_mask = None if bool(valid.all()) else valid.long()
        self._captured.clear()
        output = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self.cache_argument: self.cache},
        )
        self.valid = valid
        features = torch.cat([self._captured[i] for i in self.layer_ids], dim=-1) if self.layer_ids else None
        self._captured.clear()
        return TargetStep(logits=output.logits, features=features)

    def prefill(self, prompts: Sequence[Sequence[int]], reserve: int = 0) -> TargetStep:
        """Run the prompts (right-padded); logits are those of each prompt's last token ([B, 1, V]).

        ``reserve`` (slots needed beyond the prompts) is accepted for the static session's protocol; this
        cache grows as it goes.
        """
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        lengths = torch.tensor([len(prompt) for prompt in prompts], device=self.device)
        width = int(lengths.max())
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = torch.as_tensor(list(prompt), device=self.device)
        slots = torch.arange(width, device=self.device)
        self.cache = DynamicCache(config=self.model.config)
        self.valid = None
        self._chunk_start = 0
        last = lengths - 1
        keep = torch.unique(last)
        step = self._forward(input_ids, slots[None] < lengths[:, None], slots.expand(len(prompts), -1), keep)
        self.next_position = lengths.clone()
        self._chunk_start = width
        rows = torch.arange(len(prompts), device=self.device)
        return TargetStep(logits=step.logits[rows, torch.searchsorted(keep, last)][:, None], features=step.features)

    def extend(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> TargetStep:
        """Append ``input_ids`` [B, n]; row r uses its first ``lengths[r]`` slots. Logits of all n slots."""
        if self.cache is None:
            raise RuntimeError("prefill() before extend()")
        width = input_ids.shape[1]
        slots = torch.arange(width, device=self.device)
        self._chunk_start = self.valid.shape[1]
        positions = self.next_position[:, None] + slots
        return self._forward(input_ids, slots[None] < lengths[:, None], positions, 0)

    def keep(self, kept: torch.Tensor) -> None:
        """After :meth:`extend`, keep each row's first ``kept[r]`` new slots; drop slots no row kept."""
        start = self._chunk_start
        chunk = self.valid[:, start:]
        slots = torch.arange(chunk.shape[1], device=self.device)
        self.valid = torch.cat([self.valid[:, :start], chunk & (slots[None] < kept[:, None])], dim=1)
        self.next_position = self.next_position + kept
        new_length = start + int(kept.max()) if kept.numel() else start
        removed = self.valid.shape[1] - new_length
        if removed > 0:
            self.cache.crop(-removed)  # negative: tokens to remove (older transformers read it the same way)
            self.valid = self.valid[:, :new_length]
