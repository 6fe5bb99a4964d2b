"""Target configs for offline use: the HF config when it is at hand, else the published geometry of known targets.

Building a drafter needs only the target's config (sizes, vocabulary, rope). A machine without the hub can still
plan, print and meta-build a paper config for a known target; weights are read only when training starts.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig, Qwen3Config

from specdec.targets.loading import resolve_target

_QWEN3_COMMON: dict[str, Any] = dict(
    vocab_size=151_936,
    head_dim=128,
    num_key_value_heads=8,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    max_position_embeddings=40_960,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    bos_token_id=151_643,
    eos_token_id=151_645,
    attention_bias=False,
)

# Published sizes of the Qwen3 dense chat models the paper configs target.
KNOWN_TARGETS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-4B": dict(
        hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32, tie_word_embeddings=True
    ),
    "Qwen/Qwen3-8B": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        tie_word_embeddings=False,
    ),
    "Qwen/Qwen3-14B": dict(
        hidden_size=5120,
        intermediate_size=17408,
        num_hidden_layers=40,
        num_attention_heads=40,
        tie_word_embeddings=False,
    ),
}


# The id filling drafted slots in DSpark/DFlash blocks: Qwen3's tokenizer has no mask token, so DeepSpec uses
# the first id past its special tokens; Gemma 4's tokenizer has ``<mask>`` at 4.
KNOWN_MASK_TOKEN_IDS: dict[str, int] = {
    "Qwen/Qwen3-4B": 151_669,
    "Qwen/Qwen3-8B": 151_669,
    "Qwen/Qwen3-14B": 151_669,
    "google/gemma-4-12B-it": 4,
}


def known_mask_token_id(name: str) -> int | None:
    """The mask token id of a known target (see :data:`KNOWN_MASK_TOKEN_IDS`), or None."""
    return KNOWN_MASK_TOKEN_IDS.get(name)


def known_target_config(name: str) -> PretrainedConfig | None:
    """The recorded config of a known hub target, or None."""
    fields = KNOWN_TARGETS.get(name)
    if fields is None:
        return None
    return Qwen3Config(**_QWEN3_COMMON, **fields)


def target_config(name: str) -> PretrainedConfig:
    """A target's config: local directory or HF cache first, then the known-target table, then the hub."""
    location = resolve_target(name)
    if location.is_local:
        return AutoConfig.from_pretrained(location.path)
    try:
        return AutoConfig.from_pretrained(location.path, revision=location.revision, local_files_only=True)
    except OSError:
        pass
    known = known_target_config(name)
    if known is not None:
        return known
    try:
        return AutoConfig.from_pretrained(location.path, revision=location.revision)
    except OSError as error:
        raise OSError(
            f"the config of target {name!r} is neither cached nor reachable on the hub ({error}); give a local "
            "model directory"
        ) from error
