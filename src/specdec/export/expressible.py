"""Which drafters each export format can represent exactly, and why not when it cannot.

A format that silently drops a feature (SGLang's EAGLE3 loader skips unknown weights, for instance) yields a
served drafter that differs from the trained one. Exports therefore refuse such drafters up front, with
every reason and the format that would work instead.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig


class UnsupportedDrafterError(ValueError):
    """The drafter has a feature the target format cannot represent; the message says which and what to use."""

    def __init__(self, format_name: str, reason: str) -> None:
        super().__init__(f"cannot export to {format_name}: {reason}")
        self.format_name = format_name
        self.reason = reason


FORMATS = ("deepspec", "vllm", "sglang")
EAGLE3_SERVING_AUX_LAYERS = 3  # fc is 3 * target_hidden wide in both engines' EAGLE3 models


def is_eagle3(config: PretrainedConfig) -> bool:
    return config.model_type == "specdec_eagle3"


def _markov_rank(config: PretrainedConfig) -> int:
    return int(getattr(config, "markov_rank", 0))


def _gemma_features(config: PretrainedConfig) -> list[str]:
    found = []
    if config.embedding_multiplier != 1.0:
        found.append(f"embedding_multiplier = {config.embedding_multiplier:g} (Gemma-scaled embeddings)")
    if config.final_logit_softcapping is not None:
        found.append(f"final_logit_softcapping = {config.final_logit_softcapping}")
    return found


def unsupported_reasons(config: PretrainedConfig, format_name: str) -> list[str]:
    """Every reason ``format_name`` cannot express the drafter with this config (empty when it can)."""
    if format_name not in FORMATS:
        raise ValueError(f"unknown export format {format_name!r}; expected one of {FORMATS}")
    if is_eagle3(config):
        return _eagle3_reasons(config, format_name)
    return _dspark_reasons(config, format_name)


def _dspark_reasons(config: PretrainedConfig, format_name: str) -> list[str]:
    reasons = []
    if config.hidden_size != config.target_hidden_size:
        reasons.append(
            f"hidden_size {config.hidden_size} differs from target_hidden_size {config.target_hidden_size}: the "
            "embedding/LM-head width bridges (target_head.embed_proj/head_proj) exist only in specdec"
        )
    gemma = config.block_style == "gemma4"
    rank = _markov_rank(config)
    if format_name == "deepspec":
        if config.anchor_convention != "deepspec":
            reasons.append(
                "anchor_convention is 'zlab' (slots 1..B-1 predict); DeepSpec's DSpark models predict from every slot "
                "(anchor-first) — export a zlab DFlash to sglang (DFlashDraftModel) or vllm (dflash)"
            )
        if gemma and not math.isclose(config.embedding_multiplier, math.sqrt(config.hidden_size)):
            reasons.append("Gemma4DSparkModel scales embeddings by sqrt(hidden_size); this drafter does not")
        if not gemma:
            reasons.extend(f"{feature}: Qwen3DSparkModel has no such field" for feature in _gemma_features(config))
        return reasons
    if gemma:
        reasons.append(
            f"block_style 'gemma4' (sandwich norms, layer scalars) has no {format_name} DSpark/DFlash model; "
            "export --format deepspec (Gemma4DSparkModel layout)"
        )
    reasons.extend(f"{feature}: not representable in {format_name}" for feature in _gemma_features(config))
    if rank > 0 and config.markov_head_type != "vanilla":
        reasons.append(f"markov_head_type '{config.markov_head_type}': engines serve only the 'vanilla' Markov head")
    if format_name == "sglang":
        if rank > 0 and config.anchor_convention == "zlab":
            reasons.append(
                "a Markov head with the zlab anchor convention: SGLang's DSpark path is anchor-first and its "
                "DFlashDraftModel has no Markov head — export to vllm (dspark, sample_from_anchor=false)"
            )
        if config.enable_confidence_head and not (config.confidence_head_with_markov and rank > 0):
            reasons.append(
                "a confidence head without Markov features: SGLang's DSpark loader requires "
                "confidence_head_with_markov=true when the head is present"
            )
        if config.anchor_convention == "zlab" and config.hidden_act != "silu":
            reasons.append(f"hidden_act '{config.hidden_act}': SGLang's DFlashDraftModel requires silu")
    return reasons


def _eagle3_reasons(config: PretrainedConfig, format_name: str) -> list[str]:
    reasons = [f"{feature}: not representable in {format_name}" for feature in _gemma_features(config)]
    qk_norm = getattr(config, "qk_norm", True)
    if format_name == "deepspec":
        if config.draft_vocab_size < config.vocab_size:
            reasons.append(
                f"a reduced draft vocabulary ({config.draft_vocab_size} of {config.vocab_size}): DeepSpec's "
                "Qwen3Eagle3Model predicts over the full target vocabulary and has no d2t/t2d"
            )
        if not qk_norm:
            reasons.append("qk_norm=False: Qwen3Eagle3Model's attention always has per-head q/k norms")
        return reasons
    count = len(config.target_layer_ids)
    if count != EAGLE3_SERVING_AUX_LAYERS:
        reasons.append(
            f"{count} aux layers: the {format_name} EAGLE3 contract has exactly {EAGLE3_SERVING_AUX_LAYERS} "
            f"(fc is 3*target_hidden wide) — export --format deepspec for a {count}-layer research drafter"
        )
    if format_name == "sglang":
        if qk_norm:
            reasons.append(
                "per-head q/k norms (qk_norm=True): SGLang's LlamaForCausalLMEagle3 uses Llama attention and its "
                "loader silently skips q_norm/k_norm — train with qk_norm=False (serving profile) or export to vllm"
            )
        if config.num_hidden_layers != 1:
            reasons.append(
                f"{config.num_hidden_layers} draft layers: SGLang's extra EAGLE3 layers (BasicDecoderLayer) use a "
                "different norm/residual layout than specdec's — export a 1-layer drafter"
            )
    return reasons


def check_expressible(config: PretrainedConfig, format_name: str) -> None:
    """Raise :class:`UnsupportedDrafterError` with every reason the format cannot express the drafter."""
    reasons = unsupported_reasons(config, format_name)
    if reasons:
        raise UnsupportedDrafterError(format_name, "; ".join(reasons))


def expressible_formats(config: PretrainedConfig) -> list[str]:
    return [name for name in FORMATS if not unsupported_reasons(config, name)]
