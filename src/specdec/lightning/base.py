"""The shared LightningModule of every drafter: target head, optimizer, schedule and step-exact loss scaling.

Each algorithm module builds its drafter and turns a micro-batch into a :class:`StepLoss` (a weighted *sum* over
supervised slots and the weight it was summed over). The base backpropagates the sum and, once the accumulation
window is complete, divides the gradients by the total weight of the whole optimizer step across micro-batches
and ranks. The gradient is then that of one weighted mean over every slot of the step, however the step is split
into devices × accumulation: two processes with accumulation 1 step exactly like one process with accumulation 2.
"""

from __future__ import annotations

import hashlib
from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from transformers import PretrainedConfig, PreTrainedModel

from specdec.decoding.options import DecodingOptions
from specdec.drafters.options import DrafterOptions
from specdec.lightning.schedule import warmup_cosine_scheduler
from specdec.lightning.speculative_test import SpeculativeTest
from specdec.metrics.ratio import RatioMetric
from specdec.targets import read_target_head
from specdec.targets.known import target_config


@dataclass
class StepLoss:
    """One micro-batch's contribution to an optimizer step.

    ``weighted_sum`` (differentiable) over ``weight`` is this micro-batch's loss; ``terms`` are further weighted
    sums over the same weight, logged as means; ``ratios`` are (numerator, denominator) pairs for
    :class:`RatioMetric` (accept rates, τ, …) and ``scalars`` are plain per-micro-batch values.
    """

    weighted_sum: torch.Tensor
    weight: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)
    ratios: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)


def step_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from integers, identical on every machine (Python's ``hash`` is salted per process)."""
    digest = hashlib.blake2b("/".join(str(part) for part in (seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class DrafterModule(L.LightningModule):
    """Base of the drafter LightningModules (see the module docstring for the loss scaling).

    It satisfies :class:`~specdec.lightning.protocol.DecodableModule`, so ``specdec test`` (its
    :class:`SpeculativeTest`) and the decoding callbacks can run its drafter against the target.

    Args:
        target: the target the drafter serves (``specdec-tiny``, a local HF directory or a hub id).
        layer_ids: captured target layer ids (must equal the cache's).
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        betas: AdamW betas.
        warmup_ratio: share of the optimizer steps spent in linear warmup.
        min_lr_ratio: final learning rate as a share of ``lr``.
        loss_impl: vocabulary-loss path: ``auto``, ``reference``, ``chunked`` or ``triton``.
        seed: seed of the per-micro-batch randomness (anchor sampling), so runs and resumes are repeatable.
        compile: wrap the drafter's training forward in ``torch.compile``.
        decoding: how ``specdec test`` and the in-loop evaluation callbacks decode (temperature, lengths, …).
    """

    drafter: PreTrainedModel

    def __init__(
        self,
        target: str,
        layer_ids: list[int],
        lr: float = 6e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_ratio: float = 0.04,
        min_lr_ratio: float = 0.0,
        loss_impl: str = "auto",
        seed: int = 0,
        compile: bool = False,
        decoding: DecodingOptions | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # collects the subclass's arguments too
        for name, value in self.hparams.items():  # plain values in checkpoints and hparams.yaml
            if isinstance(value, DrafterOptions):
                self.hparams[name] = value.overrides()
        self.target_name = target
        self.layer_ids = list(layer_ids)
        self.target_config: PretrainedConfig = target_config(target)
        self.decoding_options = decoding if decoding is not None else DecodingOptions()
        self._loaded_target = None
        self._window: list[torch.Tensor] = []  # per micro-batch [weight, weighted_sum, terms...] of this step
        self._window_terms: list[str] = []
        self._micro_in_window = 0
        self.compiled_forward = CompiledForward()
        self.speculative_test = SpeculativeTest()
        self.speculative_test_results: dict[str, dict[str, float]] | None = None

    # ---- building ------------------------------------------------------------------------------------------
    def build_ratio_metrics(self, ratios: list[str], terms: list[str]) -> None:
        """Register the Σnum/Σden metrics: each ratio per stage, and the validation means of loss and terms."""
        names = [f"{stage}_{name}" for stage in ("train", "val") for name in ratios]
        names += [f"val_{name}_mean" for name in ("loss", *terms)]
        self.ratio_metrics = torch.nn.ModuleDict({_metric_key(name): RatioMetric() for name in names})

    def configure_model(self) -> None:
        """Attach the target's frozen embedding and LM head (read from its safetensors, nothing else)."""
        self.attach_target_head()

    def attach_target_head(self) -> None:
        if not self.target_head_attached():
            self.drafter.attach_target_head(read_target_head(self.target_name))

    @abstractmethod
    def target_head_attached(self) -> bool:
        """Whether the drafter already holds the target's embedding and LM head."""

    def load_target(self):
        """The target model itself (for speculative decoding), loaded once on this module's device."""
        if self._loaded_target is None or self._loaded_target.runtime.device != self.device:
            from specdec.targets import load_target

            device = str(self.device) if self.device.type != "cpu" else "cpu"
            self._loaded_target = load_target(self.target_name, device=device)
        return self._loaded_target

    # ---- the loss ------------------------------------------------------------------------------------------
    @abstractmethod
    def step_loss(self, batch: dict[str, Any], generator: torch.Generator | None) -> StepLoss:
        """The micro-batch's weighted loss sum and diagnostics (see :class:`StepLoss`)."""

    def micro_batch_generator(self, stage: str, batch_idx: int) -> torch.Generator:
        """Randomness of one micro-batch, fixed by (seed, step, micro-batch within the step, rank).

        The index counts micro-batches of the step across ranks as ``micro · world + rank``, so the same global
        micro-batch draws the same anchors whether it ran on another rank or in another accumulation slot.
        """
        trainer = self.trainer
        world, rank = trainer.world_size, trainer.global_rank
        if stage == "train":
            index = self._micro_in_window * world + rank
            parts = (0, trainer.global_step, index)
        else:
            parts = (1, trainer.global_step, batch_idx * world + rank)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(step_seed(self.hparams.seed, *parts))
        return generator

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.step_loss(batch, self.micro_batch_generator("train", batch_idx))
        self._micro_in_window += 1
        self._window_terms = list(loss.terms)
        values = [loss.weight.detach().float(), loss.weighted_sum.detach().float()]
        values += [loss.terms[name].detach().float() for name in self._window_terms]
        self._window.append(torch.stack(values))
        self._log_diagnostics("train", loss, batch["input_ids"].shape[0])
        return loss.weighted_sum

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self.step_loss(batch, self.micro_batch_generator("val", batch_idx))
        weight = loss.weight.detach().float()
        size = batch["input_ids"].shape[0]
        self._log_weighted_mean("val/loss", loss.weighted_sum, weight, size)
        for name, value in loss.terms.items():
            self._log_weighted_mean(f"val/{name}", value, weight, size)
        self._log_diagnostics("val", loss, size)

    def _log_weighted_mean(self, name: str, total: torch.Tensor, weight: torch.Tensor, size: int) -> None:
        metric = self.ratio_metrics[_metric_key(name + "_mean")]
        metric(total.detach(), weight)
        self.log(name, metric, on_step=False, on_epoch=True, batch_size=size, sync_dist=False)

    def _log_diagnostics(self, stage: str, loss: StepLoss, size: int) -> None:
        on_step = stage == "train"
        for name, (numerator, denominator) in loss.ratios.items():
            metric = self.ratio_metrics[_metric_key(f"{stage}_{name}")]
            metric(numerator, denominator)
            self.log(
                f"{stage}/{name}",
                metric,
                on_step=on_step,
                on_epoch=not on_step,
                prog_bar=name == "tau_probabilistic",
                batch_size=size,
            )
        for name, value in loss.scalars.items():
            self.log(f"{stage}/{name}", value.detach().float(), on_step=on_step, on_epoch=not on_step, batch_size=size)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the accumulated gradient of Σ weighted sums into that of the step's global weighted mean."""
        if not self._window:
            return
        totals = torch.stack(self._window).sum(dim=0).to(self.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        weight = totals[0].clamp_min(torch.finfo(torch.float32).tiny)
        # Lightning divided each micro-batch loss by accumulate_grad_batches and DDP averaged over ranks.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / weight
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scale.to(parameter.grad.dtype))
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = (
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            if grads
            else 0.0
        )
        step_metrics = {"train/loss": totals[1] / weight, "train/grad_norm": norm, "train/weight": totals[0]}
        for index, name in enumerate(self._window_terms):
            step_metrics[f"train/{name}"] = totals[2 + index] / weight
        step_metrics["train/lr"] = torch.tensor(optimizer.param_groups[0]["lr"])
        self.log_dict(step_metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self.log("loss", totals[1] / weight, on_step=True, on_epoch=False, prog_bar=True, logger=False)
        self._window.clear()
        self._micro_in_window = 0

    # ---- specdec test ----------------------------------------------------------------------------------------
    def on_test_epoch_start(self) -> None:
        self.speculative_test.start(self)

    def test_step(self, batch: list, batch_idx: int = 0) -> None:
        self.speculative_test.step(self, batch)

    def on_test_epoch_end(self) -> None:
        self.speculative_test_results = self.speculative_test.end(self)

    # ---- optimizer -----------------------------------------------------------------------------------------
    def configure_optimizers(self):
        trainable = [parameter for parameter in self.drafter.parameters() if parameter.requires_grad]
        hparams = self.hparams
        optimizer = torch.optim.AdamW(trainable, lr=hparams.lr, weight_decay=hparams.weight_decay, betas=hparams.betas)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = warmup_cosine_scheduler(optimizer, total, hparams.warmup_ratio, hparams.min_lr_ratio)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints ---------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["drafter_config"] = self.drafter.config.to_dict()
        checkpoint["target"] = self.target_name
        checkpoint["world_size"] = self.trainer.world_size

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming on another number of ranks: re-express the epoch's per-rank micro-batch count.

        Lightning counts micro-batches per rank and derives the accumulation boundary from that count. A step
        of ``W`` ranks consumed ``W`` global micro-batches per rank-batch, so the same position on ``W'`` ranks
        is ``count · W / W'`` (the data loader's saved position is converted the same way).
        """
        saved = checkpoint.get("world_size")
        trainer = self._trainer
        if saved is None or trainer is None or saved == trainer.world_size:
            return
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if progress is None:
            return
        for counts in (progress["total"], progress["current"]):
            unfinished = counts["processed"] - counts["completed"]
            processed = counts["processed"] * saved // trainer.world_size
            counts.update(ready=processed, started=processed, processed=processed, completed=processed - unfinished)

    def save_drafter(self, directory: str, **provenance: Any) -> None:
        """Write the drafter as an HF directory (config.json + safetensors), without the frozen target tensors."""
        from specdec.lightning.drafter_directory import save_drafter_directory

        save_drafter_directory(self, directory, trainer=self._trainer, **provenance)


class CompiledForward:
    """``torch.compile`` of a drafter's training forward, built on first use and held outside the module tree
    (registered as a submodule, it would duplicate every drafter tensor in the ``state_dict``)."""

    def __init__(self) -> None:
        self._compiled: torch.nn.Module | None = None

    def __call__(self, module: torch.nn.Module, *args: Any) -> Any:
        if self._compiled is None:
            self._compiled = torch.compile(module, dynamic=None)
        return self._compiled(*args)


def _metric_key(name: str) -> str:
    """A ModuleDict key for a logged name (module names cannot hold dots or slashes)."""
    return name.replace("/", "_").replace(".", "_").replace("@", "_at_")
