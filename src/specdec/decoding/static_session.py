"""A target session with a preallocated KV cache and a lean forward that compiles at fixed shapes.

Per-call overhead, not arithmetic, is what a small target spends its time on: an HF forward dispatches
about 1.6 k aten ops for one token (mask building, cache objects, hooks, output dataclasses). This session
keeps the target's own weights and modules (projections, norms, MLPs, rotary embedding) but drives them
itself:

- keys and values live in buffers of fixed capacity, written in place at the slots of each forward;
  rolling back after a rejection only marks slots invalid (nothing is copied or reallocated);
- every forward has the same shapes for a given token count: attention always reads the whole buffer
  under a mask (validity of each slot, causality on the shared slot timeline), so a step compiles once
  per token-count bucket and never again;
- token counts are padded up to a bucket (1, 2, 4, 8, 16 …); padded slots are invalid and their outputs
  are dropped.

It speaks the same protocol as :class:`specdec.decoding.target_session.TargetSession` (``prefill`` /
``extend`` / ``keep``), so the speculative decoder and the plain decoder run on it unchanged and on equal
footing. Architectures it drives: Qwen3, Qwen2, Llama and Mistral-style decoders with full attention
(:func:`supports_static_session`); anything else runs on the HF session.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from specdec.decoding.compiled import CompiledStep
from specdec.decoding.target_session import TargetStep
from specdec.drafters.attention import FEW_QUERIES, few_query_attention
from specdec.targets.layers import decoder_of, validate_layer_ids

STATIC_MODEL_TYPES = ("qwen3", "qwen2", "llama", "mistral")
DEFAULT_BUCKETS = (1, 2, 4, 8, 16)


def supports_static_session(model: nn.Module) -> str | None:
    """None when :class:`StaticTargetSession` can drive ``model``; otherwise the reason it cannot."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in STATIC_MODEL_TYPES:
        return f"model_type {model_type!r} is not one of {STATIC_MODEL_TYPES}"
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return "sliding-window attention"
    layer_types = getattr(config, "layer_types", None) or ()
    if any(kind != "full_attention" for kind in layer_types):
        return f"layer types {sorted(set(layer_types))} (only full attention is driven)"
    try:
        decoder = decoder_of(model)
    except TypeError as error:
        return str(error)
    attention = decoder.layers[0].self_attn
    if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")):
        return f"{type(attention).__name__} has no q/k/v/o projections"
    if getattr(decoder, "rotary_emb", None) is None:
        return "the decoder has no shared rotary embedding"
    return None


def buffer_capacity(needed: int, minimum: int = 256) -> int:
    """Buffer sizes are powers of two: an evaluation grows them a few times at most (each size compiles once)."""
    capacity = minimum
    while capacity < needed:
        capacity *= 2
    return capacity


def round_up_to_bucket(count: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``count`` tokens (multiples of the largest bucket beyond it)."""
    for bucket in buckets:
        if count <= bucket:
            return bucket
    largest = buckets[-1]
    return -(-count // largest) * largest


class LayerKVBuffers(nn.Module):
    """Per-layer key and value buffers, registered (non-persistent) on the module a compiled step runs.

    Registered buffers sit at fixed addresses, which is what CUDA-graph capture needs for tensors a graph
    writes; the static session's target forward and the static proposer's draft round both keep theirs here.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers

    def kv(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"keys_{index}"), getattr(self, f"values_{index}")

    def resize(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> None:
        """Allocate [B, kv_heads, slots, D] buffers; when only the slot count grows, keep what they hold."""
        old = [self.kv(index) for index in range(self.num_layers)] if hasattr(self, "keys_0") else []
        for index in range(self.num_layers):
            for kind in ("keys", "values"):
                buffer = torch.zeros(shape, device=device, dtype=dtype)
                self.register_buffer(f"{kind}_{index}", buffer, persistent=False)
        if old and tuple(old[0][0].shape[:2]) == tuple(shape[:2]):
            for index, (keys, values) in enumerate(old):
                new_keys, new_values = self.kv(index)
                new_keys[:, :, : keys.shape[2]] = keys
                new_values[:, :, : values.shape[2]] = values


class _LeanForward(LayerKVBuffers):
    """The target's forward over a chunk of slots, written against fixed-capacity KV buffers it owns.

    Inputs are all tensors (no Python ints that would specialise a compiled graph): ``slots`` [n] are the
    buffer slots the chunk is written to, ``valid`` [B, S] marks every usable slot (the chunk's included).
    """

    def __init__(self, model: nn.Module, layer_ids: Sequence[int]) -> None:
        decoder = decoder_of(model)
        super().__init__(len(decoder.layers))
        self.decoder = decoder
        self.lm_head = model.get_output_embeddings()
        self.layer_ids = tuple(layer_ids)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, n]
        positions: torch.Tensor,  # [B, n]
        slots: torch.Tensor,  # [n]
        valid: torch.Tensor,  # [B, S]
        logit_rows: torch.Tensor | None = None,  # [B, m] chunk positions whose logits are wanted (None: all)
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        decoder = self.decoder
        hidden = decoder.embed_tokens(input_ids)
        captured: dict[int, torch.Tensor] = {}
        if -1 in self.layer_ids:
            captured[-1] = hidden
        cos, sin = decoder.rotary_emb(hidden, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, n, D]
        capacity = valid.shape[1]
        causal = torch.arange(capacity, device=slots.device)[None, :] <= slots[:, None]  # [n, S]
        mask = (valid[:, None, :] & causal[None]).unsqueeze(1)  # [B, 1, n, S]
        batch, width = input_ids.shape
        for index, layer in enumerate(decoder.layers):
            attention = layer.self_attn
            head_dim = attention.head_dim
            normed = layer.input_layernorm(hidden)
            query = attention.q_proj(normed).view(batch, width, -1, head_dim)
            key = attention.k_proj(normed).view(batch, width, -1, head_dim)
            value = attention.v_proj(normed).view(batch, width, -1, head_dim).transpose(1, 2)
            if getattr(attention, "q_norm", None) is not None:
                query, key = attention.q_norm(query), attention.k_norm(key)
            query, key = query.transpose(1, 2), key.transpose(1, 2)
            query = query * cos + _rotate_half(query) * sin
            key = key * cos + _rotate_half(key) * sin
            keys, values = self.kv(index)
            keys.index_copy_(2, slots, key.to(keys.dtype))
            values.index_copy_(2, slots, value.to(values.dtype))
            attended = _attention(query, keys, values, mask, attention.scaling)
            hidden = hidden + attention.o_proj(attended.transpose(1, 2).reshape(batch, width, -1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if index in self.layer_ids:
                captured[index] = hidden
        features = torch.cat([captured[i] for i in self.layer_ids], dim=-1) if self.layer_ids else None
        last = hidden
        if logit_rows is not None:
            last = last.gather(1, logit_rows[..., None].expand(-1, -1, last.shape[-1]))
        return self.lm_head(decoder.norm(last)), features


def _attention(query, keys, values, mask, scale: float) -> torch.Tensor:
    if query.is_cuda or query.shape[-2] > FEW_QUERIES:
        return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return few_query_attention(query, keys, values, mask, scale)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class StaticTargetSession:
    """Prefill / extend / keep against preallocated KV buffers, with optionally compiled per-bucket steps.

    Unlike the HF session it outlives a batch: :meth:`prefill` starts a new batch in the same buffers, so the
    compiled steps are reused by every request of an evaluation (and by both decoders).

    Args:
        model: an HF causal LM that :func:`supports_static_session` accepts (frozen, eval mode).
        layer_ids: target layers whose outputs are returned as features (specdec convention).
        capacity: slots per row to start with (prompt + answer + one round of drafts); buffers grow to the next
            power of two when a prefill's ``reserve`` or an extend needs more (each size compiles once).
        compile: compile the extend step (one graph per bucket) with ``torch.compile``; eager on failure.
        buckets: token counts an extend is padded up to.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_ids: Sequence[int] | None = None,
        *,
        capacity: int = 256,
        compile: bool = False,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
    ) -> None:
        reason = supports_static_session(model)
        if reason is not None:
            raise ValueError(f"StaticTargetSession cannot drive {type(model).__name__}: {reason}")
        self.model = model
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        layers = decoder_of(model).layers
        self.layer_ids = validate_layer_ids(layer_ids, len(layers)) if layer_ids else ()
        self.buckets = tuple(sorted(buckets))
        self.forward = _LeanForward(model, self.layer_ids)
        self.step = CompiledStep(self.forward, enabled=compile, name="target step", device=self.device)
        self.batch = 0
        self.capacity = 0
        self.valid: torch.Tensor | None = None  # [B, capacity] bool: slots holding context
        self.length = 0  # slots in use on the shared timeline
        self.next_position: torch.Tensor | None = None  # [B] long
        self._chunk_start = 0
        self._reserve(1, capacity)

    @property
    def compile_seconds(self) -> float:
        return self.step.compile_seconds

    # ---- buffers -----------------------------------------------------------------------------------------
    def _reserve(self, batch: int, needed: int) -> None:
        """Buffers for exactly ``batch`` rows and ``needed`` slots plus a largest-bucket margin (power-of-two sizes)."""
        needed += self.buckets[-1]
        if batch == self.batch and needed <= self.capacity:
            return
        capacity = max(buffer_capacity(needed), self.capacity)
        attention = decoder_of(self.model).layers[0].self_attn
        config = self.model.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.forward.resize((batch, kv_heads, capacity, attention.head_dim), self.device, self.dtype)
        self.batch, self.capacity = batch, capacity

    # ---- protocol ----------------------------------------------------------------------------------------
    def __enter__(self) -> StaticTargetSession:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def close(self) -> None:
        pass

    def prefill(self, prompts: Sequence[Sequence[int]], reserve: int = 0) -> TargetStep:
        """Start a batch with the prompts (right-padded); logits of each prompt's last token ([B, 1, V]).

        ``reserve`` slots per row are guaranteed beyond the longest prompt without re-allocation. Features
        cover every prompt slot ([B, width, F]). The prefill runs eager (its length varies per prompt).
        """
        if not prompts or any(len(prompt) == 0 for prompt in prompts):
            raise ValueError("every prompt needs at least one token")
        batch = len(prompts)
        lengths = torch.tensor([len(prompt) for prompt in prompts], device=self.device)
        width = int(lengths.max())
        self._reserve(batch, width + reserve)
        input_ids = torch.zeros(batch, width, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            input_ids[row, : len(prompt)] = torch.as_tensor(list(prompt), device=self.device)
        slots = torch.arange(width, device=self.device)
        self.valid = torch.zeros(batch, self.capacity, dtype=torch.bool, device=self.device)
        self.valid[:, :width] = slots[None] < lengths[:, None]
        logits, features = self.forward(input_ids, slots.expand(batch, -1), slots, self.valid, (lengths - 1)[:, None])
        self.length = width
        self._chunk_start = 0
        self.next_position = lengths.clone()
        return TargetStep(logits=logits, features=features)

    def extend(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> TargetStep:
        """Append ``input_ids`` [B, n]; row r uses its first ``lengths[r]`` slots. Logits of all n slots."""
        if self.valid is None:
            raise RuntimeError("prefill() before extend()")
        width = input_ids.shape[1]
        bucket = round_up_to_bucket(width, self.buckets)
        start = self.length
        if start + bucket > self.capacity:
            self._grow(start + bucket)
        if bucket != width:
            input_ids = F.pad(input_ids, (0, bucket - width))
        offsets = torch.arange(bucket, device=self.device)
        slots = start + offsets
        positions = self.next_position[:, None] + offsets
        self.valid[:, start : start + bucket] = offsets[None] < lengths[:, None]
        logits, features = self.step(input_ids, positions, slots, self.valid)
        self._chunk_start = start
        self.length = start + width
        if bucket != width:
            self.valid[:, start + width : start + bucket] = False
            logits = logits[:, :width]
            features = None if features is None else features[:, :width]
        return TargetStep(logits=logits, features=features)

    def keep(self, kept: torch.Tensor) -> None:
        """After :meth:`extend`, keep each row's first ``kept[r]`` new slots; the rest become free again."""
        start = self._chunk_start
        offsets = torch.arange(self.length - start, device=self.device)
        self.valid[:, start : self.length] &= offsets[None] < kept[:, None]
        self.next_position = self.next_position + kept
        self.length = start + (int(kept.max()) if kept.numel() else 0)

    def _grow(self, needed: int) -> None:
        """More slots than reserved: copy into larger buffers (a new shape recompiles; ``reserve`` avoids it)."""
        old_valid = self.valid
        self._reserve(self.batch, needed)  # the buffers keep their contents
        self.valid = torch.zeros(old_valid.shape[0], self.capacity, dtype=torch.bool, device=self.device)
        self.valid[:, : old_valid.shape[1]] = old_valid
