"""The Eagle3 drafter: a small decoder fed [embedding of the next token ; fused target features], trained
with training-time test (TTT) — the draft is unrolled on its own outputs for ``ttt_length`` steps.

Step s at position t consumes the step s-1 output at t and token x_{t+s+1} (RoPE position t + s) and
predicts the target's distribution at t + s + 1. Its queries see step-0 keys causally and, in every later
step, only the key at their own position.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP, Qwen3RMSNorm, Qwen3RotaryEmbedding, apply_rotary_pos_emb

from specdec.drafters.attention import attend, choose_attention_backend
from specdec.drafters.config import backbone_config_of, target_sized_fields
from specdec.drafters.options import Eagle3Options
from specdec.drafters.target_head import softcap
from specdec.targets.layers import validate_layer_ids
from specdec.targets.weights import TargetHead

try:
    from torch.nn.attention.flex_attention import create_block_mask
except ImportError:  # pragma: no cover
    create_block_mask = None


class Eagle3Config(PretrainedConfig):
    """Eagle3 drafter sized like the target; ``draft_vocab_size < vocab_size`` enables a reduced vocabulary."""

    model_type = "specdec_eagle3"

    def __init__(
        self,
        vocab_size: int = 4096,
        draft_vocab_size: int | None = None,
        hidden_size: int = 256,
        intermediate_size: int = 768,
        num_hidden_layers: int = 1,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int = 64,
        rms_norm_eps: float = 1e-6,
        rope_parameters: dict[str, Any] | None = None,
        max_position_embeddings: int = 4096,
        hidden_act: str = "silu",
        attention_bias: bool = False,
        target_layer_ids: Sequence[int] = (0, 1, 2),
        target_num_hidden_layers: int | None = None,
        target_model_type: str = "qwen3",
        ttt_length: int = 7,
        step_loss_decay: float = 0.8,
        embedding_multiplier: float = 1.0,
        final_logit_softcapping: float | None = None,
        attention_backend: str = Eagle3Options.attention_backend,
        initializer_range: float = 0.02,
        qk_norm: bool = Eagle3Options.qk_norm,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.draft_vocab_size = draft_vocab_size or vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.rms_norm_eps = rms_norm_eps
        self.rope_parameters = dict(rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
        self.max_position_embeddings = max_position_embeddings
        self.hidden_act = hidden_act
        self.attention_bias = attention_bias
        self.target_layer_ids = list(target_layer_ids)
        self.target_num_hidden_layers = target_num_hidden_layers
        self.target_model_type = target_model_type
        self.ttt_length = ttt_length
        self.step_loss_decay = step_loss_decay
        self.embedding_multiplier = embedding_multiplier
        self.final_logit_softcapping = final_logit_softcapping
        self.attention_backend = attention_backend
        self.initializer_range = initializer_range
        self.qk_norm = qk_norm  # per-head q/k RMSNorm (Qwen3 style); False is the Llama-style EAGLE3 layer
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        if len(self.target_layer_ids) not in (3, 5):
            raise ValueError(f"Eagle3Config.target_layer_ids has {len(self.target_layer_ids)} ids; Eagle3 uses 3 or 5")
        if self.target_num_hidden_layers is not None:
            validate_layer_ids(self.target_layer_ids, self.target_num_hidden_layers)
        if not 0 < self.draft_vocab_size <= self.vocab_size:
            raise ValueError(f"Eagle3Config.draft_vocab_size = {self.draft_vocab_size} must be in [1, vocab_size]")
        if self.ttt_length < 1 or self.num_hidden_layers < 1:
            raise ValueError("Eagle3Config.ttt_length and num_hidden_layers must be >= 1")

    @property
    def reduced_vocabulary(self) -> bool:
        return self.draft_vocab_size < self.vocab_size

    def backbone_config(self) -> Qwen3Config:
        return backbone_config_of(self)

    @classmethod
    def from_target(cls, target_config: PretrainedConfig, target_layer_ids: Sequence[int], **overrides: Any):
        fields = target_sized_fields(target_config, target_layer_ids)
        fields.update(overrides)
        return cls(**fields)


def ttt_dense_mask(length: int, step: int, device: torch.device | None = None) -> torch.Tensor:
    """[1, 1, S, (step+1)*S] bool: causal over step-0 keys, then only the same position in later steps."""
    query = torch.arange(length, device=device)[:, None]
    kv = torch.arange((step + 1) * length, device=device)[None, :]
    causal = (kv < length) & (kv <= query)
    same_position = (kv >= length) & (kv % length == query)
    return (causal | same_position)[None, None]


def ttt_mask_mod(length: int):
    def mask_mod(b, h, q, kv):
        return ((kv < length) & (kv <= q)) | ((kv >= length) & (kv % length == q))

    return mask_mod


def ttt_block_mask(length: int, step: int, device: torch.device):
    if create_block_mask is None:
        raise RuntimeError("this torch build has no flex attention; use attention_backend='sdpa'")
    return create_block_mask(
        ttt_mask_mod(length), B=None, H=None, Q_LEN=length, KV_LEN=(step + 1) * length, device=device
    )


class Eagle3Attention(nn.Module):
    def __init__(self, config: Eagle3Config, input_size: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.scaling = config.head_dim**-0.5
        bias = config.attention_bias
        self.q_proj = nn.Linear(input_size, config.num_attention_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(input_size, config.num_key_value_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(input_size, config.num_key_value_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * config.head_dim, config.hidden_size, bias=bias)
        qk_norm = getattr(config, "qk_norm", True)
        self.q_norm = Qwen3RMSNorm(config.head_dim, eps=config.rms_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = Qwen3RMSNorm(config.head_dim, eps=config.rms_norm_eps) if qk_norm else nn.Identity()

    def forward(self, inputs, rotary, past: tuple[torch.Tensor, torch.Tensor] | None, mask):
        """Attend over past keys/values plus this call's; returns (output, (all keys, all values))."""
        shape = (*inputs.shape[:-1], -1, self.head_dim)
        query = self.q_norm(self.q_proj(inputs).view(shape)).transpose(1, 2)
        keys = self.k_norm(self.k_proj(inputs).view(shape)).transpose(1, 2)
        values = self.v_proj(inputs).view(shape).transpose(1, 2)
        query, keys = apply_rotary_pos_emb(query, keys, *rotary)
        if past is not None:
            keys = torch.cat([past[0], keys], dim=2)
            values = torch.cat([past[1], values], dim=2)
        output = attend(query, keys, values, mask, self.scaling)
        return self.o_proj(output.transpose(1, 2).reshape(*inputs.shape[:-1], -1)), (keys, values)


class Eagle3DecoderLayer(nn.Module):
    """Layer 0 reads [input_layernorm(embedding) ; hidden_norm(h)] (2H wide); later layers read h alone."""

    def __init__(self, config: Eagle3Config, first: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.first = first
        if first:
            self.hidden_norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.input_layernorm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config, 2 * hidden if first else hidden)
        self.post_attention_layernorm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.mlp = Qwen3MLP(config.backbone_config())

    def forward(self, hidden, embeddings, rotary, past, mask):
        if self.first:
            inputs = torch.cat([self.input_layernorm(embeddings), self.hidden_norm(hidden)], dim=-1)
        else:
            inputs = self.input_layernorm(hidden)
        attended, present = self.self_attn(inputs, rotary, past, mask)
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden)), present


@dataclass
class Eagle3TrainingOutput:
    """Per TTT step: draft logits, target logits (no grad) and the positions that count."""

    draft_logits: list[torch.Tensor]  # each [B, S, draft_vocab]
    target_logits: list[torch.Tensor]  # each [B, S, draft_vocab] (restricted to the draft vocabulary if reduced)
    position_masks: list[torch.Tensor]  # each [B, S] bool


class Eagle3PreTrainedModel(PreTrainedModel):
    config_class = Eagle3Config
    base_model_prefix = "eagle3"
    _no_split_modules = ("Eagle3DecoderLayer",)


class Eagle3Drafter(Eagle3PreTrainedModel):
    def __init__(self, config: Eagle3Config) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.fc = nn.Linear(len(config.target_layer_ids) * hidden, hidden, bias=False)
        self.layers = nn.ModuleList(Eagle3DecoderLayer(config, first=i == 0) for i in range(config.num_hidden_layers))
        self.norm = Qwen3RMSNorm(hidden, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen3RotaryEmbedding(config.backbone_config())
        self.register_buffer("embed_weight", torch.zeros(config.vocab_size, hidden), persistent=False)
        self.register_buffer("target_lm_head_weight", torch.zeros(config.vocab_size, hidden), persistent=False)
        if config.reduced_vocabulary:
            # Trained, initialised from the target's rows of the kept tokens (see attach_target_head).
            self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
            self.register_buffer("t2d", torch.ones(config.vocab_size, dtype=torch.bool))
        else:
            self.lm_head = None
        self.target_attached = False
        self.post_init()

    def attach_target_head(self, head: TargetHead) -> None:
        """Share the target's frozen embedding and LM head; a reduced head starts from the kept rows."""
        self.embed_weight = head.embed_tokens.detach().to(self.embed_weight.device, self.embed_weight.dtype)
        self.target_lm_head_weight = head.lm_head.detach().to(self.embed_weight.device, self.embed_weight.dtype)
        self.target_attached = True

    def set_vocabulary_mapping(self, draft_to_target: torch.Tensor, initialize_head: bool = True) -> None:
        """Install the reduced vocabulary (sorted target ids of the kept tokens) as d2t offsets and t2d mask."""
        if self.lm_head is None:
            raise ValueError("set_vocabulary_mapping needs draft_vocab_size < vocab_size")
        ids = draft_to_target.to(self.d2t.device, torch.long)
        if ids.numel() != self.config.draft_vocab_size or not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("draft_to_target must hold draft_vocab_size distinct target ids in ascending order")
        self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True
        if initialize_head:
            if not self.target_attached:
                raise RuntimeError("attach_target_head() before initialising the reduced head from it")
            with torch.no_grad():
                self.lm_head.weight.copy_(self.target_lm_head_weight[ids])

    def draft_token_ids(self) -> torch.Tensor:
        """Target ids of the draft vocabulary, in draft order."""
        if self.lm_head is None:
            return torch.arange(self.config.vocab_size, device=self.embed_weight.device)
        return self.d2t + torch.arange(self.config.draft_vocab_size, device=self.d2t.device)

    def _check(self) -> None:
        if not self.target_attached:
            raise RuntimeError("the drafter's target embedding / LM head are not attached: call attach_target_head()")

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        self._check()
        embeddings = nn.functional.embedding(token_ids, self.embed_weight)
        return embeddings * self.config.embedding_multiplier if self.config.embedding_multiplier != 1.0 else embeddings

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Draft logits over the draft vocabulary."""
        self._check()
        normed = self.norm(hidden)
        weight = self.lm_head.weight if self.lm_head is not None else self.target_lm_head_weight
        return softcap(normed @ weight.T.to(normed.dtype), self.config.final_logit_softcapping)

    def target_logits(self, target_last_hidden: torch.Tensor) -> torch.Tensor:
        """The target's logits, restricted to the draft vocabulary when it is reduced."""
        self._check()
        weight = self.target_lm_head_weight
        if self.lm_head is not None:
            weight = weight[self.draft_token_ids()]
        return softcap(target_last_hidden.to(weight.dtype) @ weight.T, self.config.final_logit_softcapping)

    def step(self, hidden, token_ids, positions, past: list | None, mask):
        """One draft pass over a chunk: returns (output hidden, per-layer (keys, values) including past)."""
        embeddings = self.embed(token_ids).to(hidden.dtype)
        rotary = self.rotary_emb(hidden, positions)
        presents = []
        for index, layer in enumerate(self.layers):
            hidden, present = layer(hidden, embeddings, rotary, past[index] if past else None, mask)
            presents.append(present)
        return hidden, presents

    def forward(
        self,
        input_ids: torch.Tensor,
        target_hidden_states: torch.Tensor,
        loss_mask: torch.Tensor,
        target_last_hidden_states: torch.Tensor,
    ) -> Eagle3TrainingOutput:
        """Training-time test over ``ttt_length`` steps (see the module docstring for the alignment)."""
        config = self.config
        batch, length = input_ids.shape
        device = input_ids.device
        backend = choose_attention_backend(config.attention_backend, device)
        step0_mask = _drop_last_valid(loss_mask.bool())
        hidden = self.fc(target_hidden_states.to(self.fc.weight.dtype))
        past = None
        outputs = Eagle3TrainingOutput([], [], [])
        for step in range(config.ttt_length):
            tokens = _shift_left(input_ids, step + 1, fill=0)
            positions = (torch.arange(length, device=device) + step).expand(batch, length)
            mask = ttt_block_mask(length, step, device) if backend == "flex" else ttt_dense_mask(length, step, device)
            hidden, past = self.step(hidden, tokens, positions, past, mask)
            outputs.draft_logits.append(self.logits(hidden))
            with torch.no_grad():
                source = _shift_left(target_last_hidden_states, step + 1, fill=0.0)
                outputs.target_logits.append(self.target_logits(source))
            outputs.position_masks.append(_shift_left(step0_mask, step, fill=False))
        return outputs


def _shift_left(tensor: torch.Tensor, shift: int, fill) -> torch.Tensor:
    """Shift dim 1 left by ``shift`` positions, filling the end."""
    if shift == 0:
        return tensor
    shifted = torch.full_like(tensor, fill)
    shifted[:, :-shift] = tensor[:, shift:]
    return shifted


def _drop_last_valid(mask: torch.Tensor) -> torch.Tensor:
    """The loss mask with each sequence's last supervised position cleared."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).max(dim=1).values
    return mask & (positions != last[:, None])


def vocabulary_from_counts(token_counts: torch.Tensor, draft_vocab_size: int) -> torch.Tensor:
    """The ``draft_vocab_size`` most frequent target ids (ties → lower id), ascending: the d2t source."""
    order = torch.argsort(-token_counts.double() * (token_counts.numel() + 1) + torch.arange(token_counts.numel()))
    return order[:draft_vocab_size].sort().values
