"""Tiny random targets of each supported family for CPU unit tests."""

from __future__ import annotations

import torch
from transformers import (
    Gemma4ForCausalLM,
    Gemma4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

VOCAB = 96
HIDDEN = 32


def tiny_random_target(family: str, num_layers: int = 4, tie_word_embeddings: bool = False) -> PreTrainedModel:
    """A randomly initialised target of ``family`` small enough for CPU unit tests."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    if family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common))
    elif family == "qwen3_moe":
        config = Qwen3MoeConfig(head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, **common)
        model = Qwen3MoeForCausalLM(config)
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "gemma4":
        config = Gemma4TextConfig(
            head_dim=8,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=VOCAB,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * (num_layers // 2),
            per_layer_config={},
            **common,
        )
        model = Gemma4ForCausalLM(config)
    else:
        raise ValueError(family)
    return model.eval()


FAMILIES = ("qwen3", "qwen3_moe", "llama", "gemma4")
