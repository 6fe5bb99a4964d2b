"""DSpark (and DFlash, its ``markov_rank=0`` special case) as a LightningModule.

The module owns the drafter and its loss; the batches come from either DataModule of :mod:`specdec.data`.
The target's embedding and LM head are attached as non-persistent buffers: they are in no optimizer group and
in no checkpoint, and are read again from the target when the module is built.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from transformers import AutoConfig

from specdec.drafters import DSparkConfig, DSparkDrafter
from specdec.losses import dspark_loss
from specdec.targets import read_target_head, resolve_target
from specdec.training.metrics import RatioMetric
from specdec.training.schedule import warmup_cosine_scheduler


def mask_token_of(target: str) -> int:
    """The id of the target tokenizer's mask token (DSpark fills a block's drafted slots with it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_target(target).path)
    if tokenizer.mask_token_id is None:
        raise ValueError(f"the tokenizer of {target} has no mask token: give mask_token_id explicitly")
    return tokenizer.mask_token_id


class DSparkModule(L.LightningModule):
    """Train a DSpark drafter for ``target`` on batches of target features.

    Args:
        target: the target whose features the data holds (``specdec-tiny``, a local HF directory or a hub id).
        layer_ids: captured target layer ids (must equal the cache's).
        num_hidden_layers: drafter depth.
        mask_token_id: the id filling drafted slots (default: the target tokenizer's mask token).
        drafter: further :class:`DSparkConfig` fields (``block_size``, ``num_anchors``, ``markov_rank``, ...).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        warmup_ratio: share of the optimizer steps spent in linear warmup.
        min_lr_ratio: final learning rate as a share of ``lr``.
        gamma: position-weight decay ``exp(-k/gamma)`` of the loss.
        ce_alpha: weight of the soft cross-entropy term.
        l1_alpha: weight of the L1 (total variation) term.
        confidence_alpha: weight of the confidence-head BCE term.
        loss_impl: ``auto``, ``reference``, ``chunked`` or ``triton``.
    """

    def __init__(
        self,
        target: str,
        layer_ids: list[int],
        num_hidden_layers: int = 5,
        mask_token_id: int | None = None,
        drafter: dict[str, Any] | None = None,
        lr: float = 6e-4,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.04,
        min_lr_ratio: float = 0.0,
        gamma: float = 4.0,
        ce_alpha: float = 0.1,
        l1_alpha: float = 0.9,
        confidence_alpha: float = 1.0,
        loss_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        target_config = AutoConfig.from_pretrained(resolve_target(target).path)
        mask = mask_token_id if mask_token_id is not None else mask_token_of(target)
        self.config = DSparkConfig.from_target(
            target_config, layer_ids, num_hidden_layers=num_hidden_layers, mask_token_id=mask, **(drafter or {})
        )
        self.drafter = DSparkDrafter(self.config)
        self.drafter.attach_target_head(read_target_head(target))
        slots = self.config.num_predictions
        self.accept_rate = torch.nn.ModuleList(RatioMetric() for _ in range(slots))
        self.tau = RatioMetric()

    def forward_loss(self, batch: dict[str, Any]):
        dtype = self.drafter.fc.weight.dtype
        output = self.drafter(
            batch["input_ids"],
            batch["target_hidden_states"].to(dtype),
            batch["loss_mask"],
            batch["target_last_hidden_states"].to(dtype),
        )
        hparams = self.hparams
        return dspark_loss(
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
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.forward_loss(batch)
        size = batch["input_ids"].shape[0]
        self.log_dict(
            {"train/loss": loss.loss, "train/ce": loss.ce, "train/l1": loss.l1, "train/confidence": loss.confidence},
            prog_bar=False,
            batch_size=size,
        )
        for slot, metric in enumerate(self.accept_rate):
            metric(loss.accept_rate_numerator[slot], loss.accept_rate_denominator[slot])
            self.log(f"train/accept_rate@{slot}", metric, batch_size=size)
        self.tau(loss.tau_numerator, loss.tau_denominator)
        self.log("train/tau_probabilistic", self.tau, prog_bar=True, batch_size=size)
        return loss.loss

    def configure_optimizers(self):
        trainable = [parameter for parameter in self.drafter.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = warmup_cosine_scheduler(optimizer, total, self.hparams.warmup_ratio, self.hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
