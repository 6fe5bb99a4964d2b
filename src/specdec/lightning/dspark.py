"""DSpark and DFlash (its Markov-free, confidence-free case) as LightningModules."""

from __future__ import annotations

from typing import Any, Literal

import torch

from specdec.drafters import DFlashOptions, DSparkConfig, DSparkDrafter, DSparkOptions
from specdec.lightning.base import DrafterModule, StepLoss
from specdec.losses import dspark_loss
from specdec.targets import resolve_target


def mask_token_of(target: str) -> int:
    """The id of the target tokenizer's mask token (DSpark fills a block's drafted slots with it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_target(target).path)
    if tokenizer.mask_token_id is None:
        raise ValueError(f"the tokenizer of {target} has no mask token: give mask_token_id explicitly")
    return tokenizer.mask_token_id


class DSparkModule(DrafterModule):
    """Train a DSpark drafter for ``target`` on batches of target features (cached or online).

    Args:
        target: the target whose features the data holds (``specdec-tiny``, a local HF directory or a hub id).
        layer_ids: captured target layer ids (must equal the cache's).
        num_hidden_layers: drafter depth.
        mask_token_id: the id filling drafted slots (default: the target tokenizer's mask token).
        drafter: the drafter's design (:class:`DSparkOptions`: block size, anchors, Markov and confidence heads).
        gamma: position-weight decay ``exp(-k/gamma)`` of the loss.
        ce_alpha: weight of the soft cross-entropy term.
        l1_alpha: weight of the L1 (total variation) term.
        confidence_alpha: weight of the confidence-head BCE term.
        **kwargs: optimizer, schedule, seed and decoding options of :class:`DrafterModule`.
    """

    def __init__(
        self,
        target: str,
        layer_ids: list[int],
        num_hidden_layers: int = 5,
        mask_token_id: int | None = None,
        drafter: DSparkOptions | None = None,
        gamma: float = 4.0,
        ce_alpha: float = 0.1,
        l1_alpha: float = 0.9,
        confidence_alpha: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(target, layer_ids, **kwargs)
        options = DSparkOptions.coerce(drafter)
        mask = mask_token_id if mask_token_id is not None else mask_token_of(target)
        self.config = DSparkConfig.from_target(
            self.target_config,
            layer_ids,
            num_hidden_layers=num_hidden_layers,
            mask_token_id=mask,
            **options.overrides(),
        )
        self.drafter = DSparkDrafter(self.config)
        slots = self.config.num_predictions
        ratios = [f"accept_rate@{slot}" for slot in range(slots)] + ["tau_probabilistic"]
        if self.config.enable_confidence_head:
            ratios += ["confidence_abs_error", "confidence_bias"]
        self.build_ratio_metrics(ratios, terms=["ce", "l1", "confidence"])

    def target_head_attached(self) -> bool:
        return self.drafter.target_head.attached

    def step_loss(self, batch: dict[str, Any], generator: torch.Generator | None) -> StepLoss:
        dtype = self.drafter.fc.weight.dtype
        output = self._forward(
            batch["input_ids"],
            batch["target_hidden_states"].to(dtype),
            batch["loss_mask"],
            batch["target_last_hidden_states"].to(dtype),
            generator,
        )
        hparams = self.hparams
        loss = dspark_loss(
            output.draft_logits,
            output.target_logits,
            output.target_ids,
            output.eval_mask,
            output.confidence_logits,
            gamma=hparams.gamma,
            ce_alpha=hparams.ce_alpha,
            l1_alpha=hparams.l1_alpha,
            confidence_alpha=hparams.confidence_alpha,
            impl=hparams.loss_impl,
            reduction="sum",
        )
        blocks = output.blocks
        kept = blocks.keep.sum().float()
        ratios = {
            f"accept_rate@{slot}": (loss.accept_rate_numerator[slot], loss.accept_rate_denominator[slot])
            for slot in range(loss.accept_rate_numerator.shape[0])
        }
        ratios["tau_probabilistic"] = (loss.tau_numerator, loss.tau_denominator)
        valid_slots = loss.accept_rate_denominator.sum()
        if loss.confidence_abs_error is not None:
            ratios["confidence_abs_error"] = (loss.confidence_abs_error * valid_slots, valid_slots)
            ratios["confidence_bias"] = (loss.confidence_bias * valid_slots, valid_slots)
        sequences = torch.tensor(float(batch["input_ids"].shape[0]), device=kept.device)
        scalars = {
            "anchors_per_sequence": kept / sequences,
            "anchor_candidates_per_sequence": blocks.valid_anchor_count.float().mean(),
            "valid_slots_per_block": valid_slots / kept.clamp_min(1.0),
        }
        return StepLoss(
            weighted_sum=loss.loss,
            weight=loss.weight_sum,
            terms={"ce": loss.ce, "l1": loss.l1, "confidence": loss.confidence},
            ratios=ratios,
            scalars=scalars,
        )

    def _forward(self, *args):
        return self.compiled_forward(self.drafter, *args) if self.hparams.compile else self.drafter(*args)


class DFlashModule(DSparkModule):
    """DFlash: the DSpark module without Markov and confidence heads, trained on cross-entropy alone.

    ``anchor_convention`` picks DeepSpec's layout (the anchor slot predicts too) or z-lab's (only mask slots do).
    """

    def __init__(
        self,
        target: str,
        layer_ids: list[int],
        num_hidden_layers: int = 5,
        mask_token_id: int | None = None,
        drafter: DFlashOptions | None = None,
        anchor_convention: Literal["deepspec", "zlab"] = "deepspec",
        gamma: float = 4.0,
        **kwargs: Any,
    ) -> None:
        fields = DFlashOptions.coerce(drafter).overrides()
        design = DSparkOptions(
            **fields, markov_rank=0, enable_confidence_head=False, anchor_convention=anchor_convention
        )
        super().__init__(
            target,
            layer_ids,
            num_hidden_layers=num_hidden_layers,
            mask_token_id=mask_token_id,
            drafter=design,
            gamma=gamma,
            ce_alpha=1.0,
            l1_alpha=0.0,
            confidence_alpha=0.0,
            **kwargs,
        )
