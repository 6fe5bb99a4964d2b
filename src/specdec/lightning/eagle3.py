"""Eagle3 as a LightningModule: training-time test over ``ttt_length`` steps, full or reduced vocabulary."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from specdec.drafters import Eagle3Config, Eagle3Drafter, Eagle3Options, vocabulary_from_counts
from specdec.lightning.base import DrafterModule, StepLoss
from specdec.losses import eagle3_loss


class Eagle3Module(DrafterModule):
    """Train an Eagle3 drafter for ``target``.

    The loss of a micro-batch is ``Σ_s step_decay^s · Σ_positions softCE_s`` over the positions supervised at
    step 0; the base module divides it by the number of such positions in the whole optimizer step.

    Args:
        target: the target whose features the data holds.
        layer_ids: captured target layer ids (3 or 5).
        num_hidden_layers: drafter depth (1 in the paper configs).
        ttt_length: training-time-test steps (draft tokens per round).
        step_loss_decay: weight ``decay^s`` of step ``s``.
        draft_vocab_size: a reduced draft vocabulary of the most frequent supervised tokens (default: full).
        drafter: the drafter's further design fields (:class:`Eagle3Options`).
        **kwargs: optimizer, schedule, seed and decoding options of :class:`DrafterModule`.
    """

    def __init__(
        self,
        target: str,
        layer_ids: list[int],
        num_hidden_layers: int = 1,
        ttt_length: int = 7,
        step_loss_decay: float = 0.8,
        draft_vocab_size: int | None = None,
        drafter: Eagle3Options | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(target, layer_ids, **kwargs)
        options = Eagle3Options.coerce(drafter)
        self.config = Eagle3Config.from_target(
            self.target_config,
            layer_ids,
            num_hidden_layers=num_hidden_layers,
            ttt_length=ttt_length,
            step_loss_decay=step_loss_decay,
            draft_vocab_size=draft_vocab_size,
            **options.overrides(),
        )
        self.drafter = Eagle3Drafter(self.config)
        steps = range(self.config.ttt_length)
        ratios = [f"accept_rate@{s}" for s in steps] + [f"accuracy@{s}" for s in steps] + ["tau_probabilistic"]
        self.build_ratio_metrics(ratios, terms=[])

    def target_head_attached(self) -> bool:
        return self.drafter.target_attached

    def on_train_start(self) -> None:
        """A reduced vocabulary not yet chosen is taken from the supervised tokens of the training data."""
        drafter = self.drafter
        if not self.config.reduced_vocabulary or not bool(drafter.t2d.all()):
            return
        counts = torch.zeros(self.config.vocab_size, dtype=torch.float64, device=self.device)
        for batch in self.trainer.train_dataloader.dataset:
            ids = batch["input_ids"][batch["loss_mask"].bool()].to(self.device)
            counts += torch.bincount(ids, minlength=self.config.vocab_size).to(counts.dtype)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        drafter.set_vocabulary_mapping(vocabulary_from_counts(counts.cpu(), self.config.draft_vocab_size))

    def step_loss(self, batch: dict[str, Any], generator: torch.Generator | None) -> StepLoss:
        dtype = self.drafter.fc.weight.dtype
        output = self.drafter(
            batch["input_ids"],
            batch["target_hidden_states"].to(dtype),
            batch["loss_mask"],
            batch["target_last_hidden_states"].to(dtype),
        )
        loss = eagle3_loss(
            output.draft_logits,
            output.target_logits,
            output.position_masks,
            step_decay=self.config.step_loss_decay,
            impl=self.hparams.loss_impl,
        )
        positions = output.position_masks[0].numel()
        ratios = {}
        for step in range(self.config.ttt_length):
            ratios[f"accept_rate@{step}"] = (loss.accept_rate_numerator[step], loss.valid_tokens[step])
            ratios[f"accuracy@{step}"] = (loss.correct_tokens[step], loss.valid_tokens[step])
        ratios["tau_probabilistic"] = (loss.tau_numerator, loss.tau_denominator)
        return StepLoss(
            weighted_sum=loss.loss * positions,
            weight=loss.valid_tokens[0],
            ratios=ratios,
            scalars={"supervised_positions": loss.valid_tokens[0]},
        )
