"""HF-style config of DSpark / DFlash drafters, derived from the target's config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from transformers import PretrainedConfig, Qwen3Config

from specdec.drafters.options import DSparkOptions
from specdec.targets.geometry import TargetGeometry
from specdec.targets.layers import validate_layer_ids

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")
ANCHOR_CONVENTIONS = ("deepspec", "zlab")
BLOCK_STYLES = ("qwen3", "gemma4")
ATTENTION_BACKENDS = ("auto", "sdpa", "flex")


class DSparkConfig(PretrainedConfig):
    """A DSpark drafter: block-parallel draft layers with target-context KV injection.

    ``markov_rank = 0`` and no confidence head make it DFlash. Sizes default to the target's (as DeepSpec);
    ``hidden_size`` may differ from ``target_hidden_size``, in which case small projections bridge the
    frozen target embedding / LM head and the draft width.
    """

    model_type = "specdec_dspark"

    def __init__(
        self,
        vocab_size: int = 4096,
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
        target_hidden_size: int | None = None,
        target_layer_ids: Sequence[int] = (0,),
        target_num_hidden_layers: int | None = None,
        target_model_type: str = "qwen3",
        block_size: int = DSparkOptions.block_size,
        mask_token_id: int = 0,
        num_anchors: int = DSparkOptions.num_anchors,
        anchor_convention: str = DSparkOptions.anchor_convention,
        markov_rank: int = DSparkOptions.markov_rank,
        markov_head_type: str = DSparkOptions.markov_head_type,
        enable_confidence_head: bool = DSparkOptions.enable_confidence_head,
        confidence_head_with_markov: bool = DSparkOptions.confidence_head_with_markov,
        confidence_temperatures: Sequence[float] | None = None,
        block_style: str = "qwen3",
        embedding_multiplier: float = 1.0,
        final_logit_softcapping: float | None = None,
        attention_k_eq_v: bool = False,
        attention_backend: str = DSparkOptions.attention_backend,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
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
        self.target_hidden_size = target_hidden_size or hidden_size
        self.target_layer_ids = list(target_layer_ids)
        self.target_num_hidden_layers = target_num_hidden_layers
        self.target_model_type = target_model_type
        self.block_size = block_size
        self.mask_token_id = mask_token_id
        self.num_anchors = num_anchors
        self.anchor_convention = anchor_convention
        self.markov_rank = markov_rank
        self.markov_head_type = markov_head_type
        self.enable_confidence_head = enable_confidence_head
        self.confidence_head_with_markov = confidence_head_with_markov
        # Sequential Temperature Scaling of the confidence logits per draft position (None: uncalibrated)
        temperatures = confidence_temperatures
        self.confidence_temperatures = None if temperatures is None else [float(t) for t in temperatures]
        self.block_style = block_style
        self.embedding_multiplier = embedding_multiplier
        self.final_logit_softcapping = final_logit_softcapping
        self.attention_k_eq_v = attention_k_eq_v
        self.attention_backend = attention_backend
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        self.validate()

    def validate(self) -> None:
        """Refuse inconsistent settings with the field name in the message."""
        choices = {
            "markov_head_type": (self.markov_head_type, MARKOV_HEAD_TYPES),
            "anchor_convention": (self.anchor_convention, ANCHOR_CONVENTIONS),
            "block_style": (self.block_style, BLOCK_STYLES),
            "attention_backend": (self.attention_backend, ATTENTION_BACKENDS),
        }
        for field, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"DSparkConfig.{field} = {value!r}; expected one of {allowed}")
        if self.block_size < 2 and self.anchor_convention == "zlab":
            raise ValueError("DSparkConfig.block_size must be >= 2 with the zlab anchor convention")
        if self.block_size < 1:
            raise ValueError(f"DSparkConfig.block_size = {self.block_size}; must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("DSparkConfig.num_attention_heads must be a multiple of num_key_value_heads")
        if self.attention_k_eq_v and self.block_style != "gemma4":
            raise ValueError("DSparkConfig.attention_k_eq_v needs block_style='gemma4'")
        if self.markov_rank < 0:
            raise ValueError(f"DSparkConfig.markov_rank = {self.markov_rank}; must be >= 0")
        if self.target_num_hidden_layers is not None:
            validate_layer_ids(self.target_layer_ids, self.target_num_hidden_layers)
        if self.confidence_temperatures is not None and not all(t > 0 for t in self.confidence_temperatures):
            raise ValueError(f"DSparkConfig.confidence_temperatures = {self.confidence_temperatures}; must be > 0")
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise ValueError(f"DSparkConfig.mask_token_id = {self.mask_token_id} is outside the vocabulary")

    @property
    def num_predictions(self) -> int:
        """Draft tokens per block: all B slots (DeepSpec) or the B - 1 mask slots (z-lab DFlash)."""
        return self.block_size if self.anchor_convention == "deepspec" else self.block_size - 1

    @property
    def first_prediction_slot(self) -> int:
        return 0 if self.anchor_convention == "deepspec" else 1

    @property
    def is_dflash(self) -> bool:
        return self.markov_rank == 0 and not self.enable_confidence_head

    def backbone_config(self) -> Qwen3Config:
        return backbone_config_of(self)

    @classmethod
    def from_target(
        cls,
        target_config: PretrainedConfig,
        target_layer_ids: Sequence[int],
        *,
        num_hidden_layers: int = 5,
        mask_token_id: int,
        **overrides: Any,
    ) -> DSparkConfig:
        """Draft config sized like the target (DeepSpec's default); any field can be overridden."""
        fields = target_sized_fields(target_config, target_layer_ids)
        gemma = fields["target_model_type"].startswith("gemma")
        text = target_config.get_text_config()
        fields.update(
            target_hidden_size=fields["hidden_size"],
            num_hidden_layers=num_hidden_layers,
            mask_token_id=mask_token_id,
            block_style="gemma4" if gemma else "qwen3",
            attention_k_eq_v=bool(getattr(text, "attention_k_eq_v", False)) if gemma else False,
        )
        fields.update(overrides)
        return cls(**fields)


def backbone_config_of(config: PretrainedConfig) -> Qwen3Config:
    """A Qwen3 config with a drafter's sizes, for the HF building blocks (norms, MLP, rotary)."""
    return Qwen3Config(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=dict(config.rope_parameters),
        max_position_embeddings=config.max_position_embeddings,
        hidden_act=config.hidden_act,
        attention_bias=config.attention_bias,
    )


def target_sized_fields(target_config: PretrainedConfig, target_layer_ids: Sequence[int]) -> dict[str, Any]:
    """Drafter config fields copied from the target (DeepSpec sizes drafters like their target)."""
    geometry = TargetGeometry.from_config(target_config)
    text = target_config.get_text_config()
    gemma = geometry.model_type.startswith("gemma")
    return dict(
        vocab_size=geometry.vocab_size,
        hidden_size=geometry.hidden_size,
        intermediate_size=geometry.intermediate_size,
        num_attention_heads=geometry.num_attention_heads,
        num_key_value_heads=geometry.num_key_value_heads,
        head_dim=_global_head_dim(text) if gemma else geometry.head_dim,
        rms_norm_eps=geometry.rms_norm_eps,
        rope_parameters=_single_rope(geometry.rope_parameters),
        max_position_embeddings=geometry.max_position_embeddings,
        hidden_act=getattr(text, "hidden_act", None) or getattr(text, "hidden_activation", "silu"),
        target_layer_ids=list(validate_layer_ids(target_layer_ids, geometry.num_hidden_layers)),
        target_num_hidden_layers=geometry.num_hidden_layers,
        target_model_type=geometry.model_type,
        embedding_multiplier=geometry.embedding_multiplier,
        final_logit_softcapping=geometry.final_logit_softcapping,
    )


def _global_head_dim(text_config: PretrainedConfig) -> int:
    """Gemma 4 full-attention layers may use a wider head than sliding ones; the drafter uses the global one."""
    per_layer = getattr(text_config, "per_layer_config", None)
    for index, layer_type in enumerate(getattr(text_config, "layer_types", None) or []):
        if layer_type == "full_attention" and per_layer is not None:
            try:
                return int(per_layer[index].head_dim)
            except (KeyError, IndexError, AttributeError, TypeError):
                break
    return getattr(text_config, "global_head_dim", None) or text_config.head_dim


def _single_rope(rope_parameters: dict[str, Any]) -> dict[str, Any]:
    """Per-layer-type rope dicts (Gemma) collapse to the full-attention entry; flat dicts pass through."""
    if "rope_type" in rope_parameters or "rope_theta" in rope_parameters:
        return dict(rope_parameters)
    for key in ("full_attention", "sliding_attention"):
        if key in rope_parameters:
            return dict(rope_parameters[key])
    return {"rope_type": "default", "rope_theta": 10000.0}
