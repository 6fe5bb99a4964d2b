"""Fit Sequential Temperature Scaling of the confidence head when training ends and before ``specdec test``.

Calibration data are real verification rounds: the callback decodes its own held-out prompts with the
speculative decoder against the target (the module's ``decoding_options``), so the labels are the acceptances
the engine actually observes, not the teacher-forced proxy of the training loss. Give it prompts that are
neither training data nor the test sets. The prompts are split: the first part is fitted on, the rest only
measures ECE / AUROC / Brier before and after, so the logged improvement is a held-out one.

The temperatures go into ``drafter.config.confidence_temperatures``: every later proposal uses them, every
drafter directory written afterwards carries them, and at the end of fit the ``config.json`` of the latest
:class:`~specdec.callbacks.DrafterCheckpoint` drafter directories is rewritten to include them (the ``.ckpt``
files keep the uncalibrated config; ``specdec test`` refits in its own run).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from specdec.callbacks.decoding_inputs import callback_conversations, callback_decoding_options
from specdec.data.prompts.eval_sets import EvalSetsSpec
from specdec.decoding.evaluate import SpeculativeEvaluator
from specdec.decoding.options import DecodingOptions
from specdec.decoding.temperature_scaling import (
    CalibrationReport,
    CalibrationRounds,
    calibrate,
    set_confidence_temperatures,
)
from specdec.lightning.protocol import as_decodable
from specdec.metrics.confidence import log_reliability_wandb, plot_reliability

DEFAULT_PROMPTS = (
    "Write a Python function `chunk_list(items, size)` that splits a list into chunks of a given size.",
    "What does `collections.defaultdict` do?",
    "Write a Python function `read_lines(path)` that returns the non-empty lines of a text file.",
    "Explain the difference between `list.sort()` and `sorted()`.",
    "Write a Python class `Stack` with `push`, `pop` and `peek` methods.",
    "What does the `with` statement do in Python?",
    "Write a Python function `word_counts(text)` that counts how often each word occurs.",
    "How do I parse a JSON string into a dictionary in Python?",
)


def _gather(rounds: CalibrationRounds) -> CalibrationRounds:
    """Every rank's rounds (the fit then runs identically everywhere, so all ranks get the same temperatures)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return rounds
    parts: list[CalibrationRounds | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, rounds)
    return CalibrationRounds.concat([part for part in parts if part is not None])


class ConfidenceCalibration(L.Callback):
    """Fit STS temperatures of a DSpark confidence head on held-out decoding rounds; log ECE before / after.

    Args:
        prompts: user prompts to decode (default: a few code-assistant prompts, or ``eval_sets`` when given).
        eval_sets: take the prompts from eval sets instead (capped by ``num_prompts``).
        num_prompts: at most this many prompts (split across ranks).
        holdout_fraction: share of the prompts (the last ones) kept out of the fit to measure it.
        max_new_tokens: tokens per prompt (default: the module's ``decoding_options``).
        temperature: sampling temperature (default: the module's ``decoding_options``).
        on_fit_end: fit when training ends.
        on_test: fit before ``specdec test`` decodes its eval sets.
        plot_dir: also write reliability diagrams (before / after, per draft position) as PNGs here.
    """

    def __init__(
        self,
        prompts: list[str] | None = None,
        eval_sets: EvalSetsSpec | None = None,
        num_prompts: int = 8,
        holdout_fraction: float = 0.5,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        on_fit_end: bool = True,
        on_test: bool = True,
        plot_dir: str | None = None,
    ) -> None:
        if not 0 <= holdout_fraction < 1:
            raise ValueError(f"ConfidenceCalibration.holdout_fraction = {holdout_fraction}; must be in [0, 1)")
        self.prompts = prompts
        self.eval_sets = eval_sets
        self.num_prompts = num_prompts
        self.holdout_fraction = holdout_fraction
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.fit_on_fit_end = on_fit_end
        self.fit_on_test = on_test
        self.plot_dir = plot_dir
        self.reports: dict[str, CalibrationReport] = {}

    def _conversations(self) -> list[list[str]]:
        return callback_conversations(self.prompts, self.eval_sets, DEFAULT_PROMPTS, self.num_prompts)

    def _options(self, pl_module) -> DecodingOptions:
        return callback_decoding_options(
            pl_module, measure_speedup=False, max_new_tokens=self.max_new_tokens, temperature=self.temperature
        )

    @torch.no_grad()
    def _rounds(self, trainer: L.Trainer, pl_module, conversations, first_index: int) -> CalibrationRounds:
        """This rank's share of ``conversations`` decoded for real, gathered over ranks."""
        module = as_decodable(pl_module, "ConfidenceCalibration")
        drafter = module.drafter
        options = self._options(module)
        evaluator = SpeculativeEvaluator(module.load_target(), drafter, options)
        current = drafter.config.confidence_temperatures  # the logits come out scaled by these: undone below
        results = []
        for offset, turns in enumerate(conversations):
            if offset % trainer.world_size != trainer.global_rank:
                continue
            for outputs in evaluator.conversations([turns], options.seed + first_index + offset):
                results.extend(outputs.speculative.results)
        return _gather(CalibrationRounds.from_results(results, evaluator.max_drafts, current))

    def calibrate(self, trainer: L.Trainer, pl_module, stage: str) -> CalibrationReport | None:
        """Decode the prompts, fit STS on the first part, measure on the rest, set the temperatures, log."""
        drafter = as_decodable(pl_module, "ConfidenceCalibration").drafter
        if getattr(drafter, "confidence_head", None) is None:
            rank_zero_warn("ConfidenceCalibration: the drafter has no confidence head; nothing to calibrate")
            return None
        conversations = self._conversations()
        fitted = max(1, round(len(conversations) * (1 - self.holdout_fraction)))
        fit = self._rounds(trainer, pl_module, conversations[:fitted], 0)
        heldout = (
            self._rounds(trainer, pl_module, conversations[fitted:], fitted) if fitted < len(conversations) else None
        )
        if fit.logits.shape[0] == 0:
            rank_zero_warn("ConfidenceCalibration: the calibration prompts gave no round with drafts")
            return None
        report = calibrate(fit, heldout)
        set_confidence_temperatures(drafter, report.temperatures)
        self.reports[stage] = report
        self._log(trainer, stage, report, heldout if heldout is not None and heldout.logits.shape[0] else fit)
        return report

    def _log(self, trainer: L.Trainer, stage: str, report: CalibrationReport, measured: CalibrationRounds) -> None:
        values = {f"calibration/{stage}/{name}": value for name, value in report.summary().items()}
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in values.items()})
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
            logger.save()
        curves = {"before STS": measured.metrics(), "after STS": measured.metrics(report.temperatures)}
        if self.plot_dir is not None:
            plot_reliability(curves, Path(self.plot_dir) / f"reliability_{stage}.png", title=f"STS ({stage})")
        log_reliability_wandb(trainer.loggers, f"calibration/{stage}", curves)
        summary = report.summary()
        temperatures = ", ".join(f"{t:.2f}" for t in report.temperatures)
        print(
            f"STS ({stage}): ECE {100 * summary['ece_before']:.2f}% -> {100 * summary['ece_after']:.2f}% held out, "
            f"Brier {summary['brier_before']:.4f} -> {summary['brier_after']:.4f}, temperatures [{temperatures}]"
        )

    def _refresh_drafter_directories(self, trainer: L.Trainer, pl_module) -> None:
        """Rewrite config.json of the latest checkpoint drafter directories so they carry the temperatures."""
        from specdec.callbacks.checkpoint import DrafterCheckpoint
        from specdec.lightning.drafter_directory import drafter_directory_of

        if not trainer.is_global_zero:
            return
        for callback in trainer.callbacks:
            if not isinstance(callback, DrafterCheckpoint):
                continue
            for path in {callback.last_model_path, callback.best_model_path} - {""}:
                directory = drafter_directory_of(path)
                if directory.is_dir():
                    pl_module.drafter.config.save_pretrained(directory)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.fit_on_fit_end and self.calibrate(trainer, pl_module, "fit") is not None:
            self._refresh_drafter_directories(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.fit_on_test:
            self.calibrate(trainer, pl_module, "test")
