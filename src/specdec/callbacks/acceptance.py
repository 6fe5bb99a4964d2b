"""In-loop acceptance simulation: expected τ of chain rejection sampling on held-out target-cache batches.

Cheap (one teacher-forced drafter forward per held-out batch, no target forward, no decoding loop): for every
supervised block the drafter's and the target's distributions per draft position give the acceptance
probability ``α_k = Σ_v min(p_k(v), q_k(v)) = 1 − TV(p_k, q_k)`` of rejection sampling, and the expected
accepted length of a chain is ``τ_sim = 1 + Σ_k Π_{j≤k} α_j`` (bonus included). Teacher forcing conditions each
position on the true previous tokens, so τ_sim tracks real τ but is not equal to it; the greedy variant
``τ_greedy`` counts leading argmax agreements plus one. Logged as ``sim/tau``, ``sim/tau_greedy`` and
``sim/accept_rate@k`` (= the mean of Π_{j≤k} α_j, prefix survival, same convention as real decoding).
"""

from __future__ import annotations

import itertools
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from specdec.lightning.protocol import as_decodable
from specdec.metrics.ratio import RatioMetric
from specdec.sampling import GREEDY_TEMPERATURE


def _positions_of(drafter, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draft logits, target logits [N, K, V] and validity [N, K] of a batch, per block (DSpark) or per
    position's TTT chain (Eagle3), from the drafter's teacher-forced training forward."""
    dtype = next(drafter.parameters()).dtype
    output = drafter(
        batch["input_ids"],
        batch["target_hidden_states"].to(dtype),
        batch["loss_mask"],
        batch["target_last_hidden_states"].to(dtype),
    )
    if hasattr(output, "eval_mask"):  # DSpark / DFlash: [B, N, K, V]
        draft, target, valid = output.draft_logits, output.target_logits, output.eval_mask
        return draft.flatten(0, 1), target.flatten(0, 1), valid.flatten(0, 1).bool()
    draft = torch.stack(output.draft_logits, dim=2)  # Eagle3: [B, S, K, V], chain k predicts position t + k + 1
    target = torch.stack(output.target_logits, dim=2)
    valid = torch.stack(output.position_masks, dim=2).bool()
    return draft.flatten(0, 1), target.flatten(0, 1), valid.flatten(0, 1)


def simulated_acceptance(draft: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, temperature: float):
    """Per chain: expected accepted prefix survival [N, K] (rejection sampling) and greedy agreement [N, K]."""
    valid = valid.long().cumprod(dim=-1).bool()  # only a contiguous valid prefix of a chain counts
    if temperature < GREEDY_TEMPERATURE:
        alpha = (draft.argmax(-1) == target.argmax(-1)).float()
    else:
        p = torch.softmax(target.float() / temperature, dim=-1)
        q = torch.softmax(draft.float() / temperature, dim=-1)
        alpha = torch.minimum(p, q).sum(-1)
    greedy = (draft.argmax(-1) == target.argmax(-1)).float()
    survival = torch.cumprod(alpha * valid, dim=-1)
    greedy_survival = torch.cumprod(greedy * valid, dim=-1)
    return survival, greedy_survival, valid


class AcceptanceSimulation(L.Callback):
    """Log the simulated τ of the drafter on held-out batches every ``every_n_steps`` optimizer steps.

    Args:
        every_n_steps: how often (optimizer steps); also after every validation epoch.
        num_batches: held-out batches used (the first ones of the validation dataloader, kept in memory).
        temperature: sampling temperature of the simulation (default: the module's ``decoding_options``).
    """

    def __init__(self, every_n_steps: int = 100, num_batches: int = 4, temperature: float | None = None) -> None:
        self.every_n_steps = every_n_steps
        self.num_batches = num_batches
        self.temperature = temperature
        self._batches: list[dict[str, Any]] | None = None
        self._last_step = -1

    def _held_out(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        if self._batches is None:
            datamodule = trainer.datamodule
            loader = datamodule.val_dataloader() if datamodule is not None else []
            self._batches = list(itertools.islice(iter(loader), self.num_batches)) if loader else []
            if not self._batches:
                print("AcceptanceSimulation: no validation batches (set the DataModule's val_cache / val_data)")
        return self._batches

    def _temperature(self, pl_module) -> float:
        if self.temperature is not None:
            return self.temperature
        return as_decodable(pl_module, "AcceptanceSimulation").decoding_options.temperature

    @torch.no_grad()
    def simulate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Simulated τ (rejection sampling at the temperature, and greedy) and prefix survival per position."""
        batches = self._held_out(trainer)
        if not batches:
            return {}
        drafter = pl_module.drafter
        was_training = drafter.training
        drafter.eval()
        tau, greedy, survival = RatioMetric(), RatioMetric(), None
        try:
            for batch in batches:
                batch = move_data_to_device(batch, pl_module.device)
                datamodule = trainer.datamodule
                if datamodule is not None and hasattr(datamodule, "on_after_batch_transfer"):
                    batch = datamodule.on_after_batch_transfer(batch, 0)
                draft, target, valid = _positions_of(drafter, batch)
                alive, greedy_alive, valid = simulated_acceptance(draft, target, valid, self._temperature(pl_module))
                chains = valid[:, 0]
                if survival is None:
                    survival = RatioMetric(shape=(alive.shape[-1],))
                tau.update((1 + alive.sum(-1))[chains].sum(), chains.sum())
                greedy.update((1 + greedy_alive.sum(-1))[chains].sum(), chains.sum())
                survival.update(alive.sum(0), valid.sum(0))
        finally:
            drafter.train(was_training)
        values = {"sim/tau": float(tau.compute()), "sim/tau_greedy": float(greedy.compute())}
        for k, value in enumerate(survival.compute().tolist()):
            values[f"sim/accept_rate@{k}"] = value
        return values

    def _log(self, trainer: L.Trainer, values: dict[str, float]) -> None:
        if not values or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in values.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self._log(trainer, self.simulate(trainer, pl_module))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, self.simulate(trainer, pl_module))
