"""A target's shape, as drafter configs need it, read from any HF causal-LM config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from transformers import PretrainedConfig

# Families whose embedding output is scaled by sqrt(hidden_size) inside the model.
SCALED_EMBEDDING_FAMILIES = ("gemma",)


@dataclass(frozen=True)
class TargetGeometry:
    """Sizes of a decoder-only target; the text model's when the checkpoint is multimodal."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    embedding_multiplier: float = 1.0
    final_logit_softcapping: float | None = None

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> TargetGeometry:
        text = config.get_text_config()
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        model_type = text.model_type
        scaled = any(model_type.startswith(family) for family in SCALED_EMBEDDING_FAMILIES)
        rope = getattr(text, "rope_parameters", None) or {}
        return cls(
            model_type=model_type,
            hidden_size=text.hidden_size,
            num_hidden_layers=text.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            intermediate_size=text.intermediate_size,
            vocab_size=text.vocab_size,
            max_position_embeddings=text.max_position_embeddings,
            rms_norm_eps=getattr(text, "rms_norm_eps", 1e-6),
            tie_word_embeddings=_tie_word_embeddings(config, text),
            rope_parameters=dict(rope),
            embedding_multiplier=math.sqrt(text.hidden_size) if scaled else 1.0,
            final_logit_softcapping=getattr(text, "final_logit_softcapping", None),
        )


def _tie_word_embeddings(config: PretrainedConfig, text: PretrainedConfig) -> bool:
    # Multimodal wrappers carry the flag on the outer config; text-only configs on themselves.
    for candidate in (config, text):
        value = getattr(candidate, "tie_word_embeddings", None)
        if value is not None:
            return bool(value)
    return False
