"""The hyper-parameters a user chooses for a drafter, typed, so a config is checked before anything is built.

A drafter's config (:class:`~specdec.drafters.DSparkConfig`, :class:`~specdec.drafters.Eagle3Config`) holds
two kinds of fields: those copied from the target (vocabulary, RoPE, layer count, the default widths) and the
design choices of the drafter itself. These dataclasses hold the second kind. As the LightningModules'
``drafter`` argument they give the CLI parser every field's type, default and help, so
``--model.init_args.drafter.block_size abc`` is refused at parse time and ``--print_config`` shows the defaults.
The drafter configs take their defaults from here, so each default is stated once.

Size fields left ``None`` mean "as the target" (DeepSpec sizes drafters like their target).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

OptionsT = TypeVar("OptionsT", bound="DrafterOptions")


@dataclass
class DrafterOptions:
    """Fields every drafter shares.

    Args:
        attention_backend: ``auto`` (flex attention where it compiles, else SDPA), ``sdpa`` or ``flex``.
        hidden_size: drafter width (None: the target's; other widths bridge the target head by projections).
        intermediate_size: MLP width (None: the target's).
        num_attention_heads: query heads (None: the target's).
        num_key_value_heads: key/value heads (None: the target's).
        head_dim: per-head width (None: the target's).
    """

    attention_backend: Literal["auto", "sdpa", "flex"] = "auto"
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    head_dim: int | None = None

    def overrides(self) -> dict[str, Any]:
        """The fields set here, as keyword overrides of the target-sized drafter config (``None`` left out)."""
        return {name: value for name, value in asdict(self).items() if value is not None}

    @classmethod
    def coerce(cls: type[OptionsT], value: OptionsT | dict[str, Any] | None) -> OptionsT:
        """Options from a dataclass, a plain dict (a checkpoint's hyper-parameters, Python callers) or None."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, DrafterOptions):
            value = value.overrides()
        if not isinstance(value, dict):
            raise TypeError(f"drafter: expected {cls.__name__} or a dict of its fields, got {type(value).__name__}")
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise TypeError(f"drafter: {cls.__name__} has no field {', '.join(unknown)} (fields: {sorted(known)})")
        return cls(**value)


@dataclass
class DFlashOptions(DrafterOptions):
    """A DFlash drafter's design: block-parallel drafting without Markov or confidence heads.

    Args:
        block_size: tokens per draft block (the anchor and the slots drafted with it).
        num_anchors: anchors (blocks) sampled per training sequence.
    """

    block_size: int = 7
    num_anchors: int = 512


@dataclass
class DSparkOptions(DFlashOptions):
    """A DSpark drafter's design: DFlash's block plus the Markov head and the confidence head.

    Args:
        anchor_convention: ``deepspec`` (the anchor slot predicts too) or ``zlab`` (only mask slots do).
        markov_rank: rank of the Markov head's low-rank token-transition term (0: no Markov head).
        markov_head_type: ``vanilla``, ``gated`` or ``rnn``.
        enable_confidence_head: train the head that predicts each draft token's acceptance.
        confidence_head_with_markov: feed the Markov head's state into the confidence head.
    """

    anchor_convention: Literal["deepspec", "zlab"] = "deepspec"
    markov_rank: int = 256
    markov_head_type: Literal["vanilla", "gated", "rnn"] = "vanilla"
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True


@dataclass
class Eagle3Options(DrafterOptions):
    """An Eagle3 drafter's design beyond its depth, TTT length and vocabulary (the module's own arguments).

    Args:
        qk_norm: RMS-normalise queries and keys per head (Qwen3 style; False is the Llama-style EAGLE3 layer).
    """

    qk_norm: bool = True
