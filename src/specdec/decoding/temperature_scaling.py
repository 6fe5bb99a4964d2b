"""Sequential Temperature Scaling (STS) of a DSpark confidence head (DSpark paper §3.2.1).

The head's ``c_k = σ(z_k)`` estimates P(draft k accepted | drafts before it accepted); the prefix survival that
schedulers and truncation policies threshold is ``a_k = Π_{i≤k} c_i``, so a small bias in every ``c_k`` compounds
along the block. STS fits one temperature per draft position on held-out rounds, in order k = 1..γ: with
``T_1..T_{k-1}`` frozen, a grid search picks the ``T_k`` (``c_k ← σ(z_k / T_k)``) that minimises the ECE of
``a_k`` against the observed prefix acceptance. Each ``T_k`` is positive, so the ranking of the per-step ``c_k``
is unchanged (that of the product ``a_k`` can move slightly when the temperatures differ between positions).

The temperatures live in ``DSparkConfig.confidence_temperatures``: they are saved by ``save_pretrained``, read
by ``from_pretrained``, and :meth:`DSparkDrafter.calibrated_confidence` applies them wherever inference computes
confidence (the proposals' ``confidence_logits``, hence the metrics and the truncation policies). Training and
the serving exports do not read them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specdec.metrics.confidence import (
    ECE_BINS,
    PROBABILITY_EPS,
    ConfidenceCalibrationMetrics,
    expected_calibration_error,
    round_labels,
)


def default_grid() -> torch.Tensor:
    """Candidate temperatures: 401 log-spaced values in [1/20, 20] (1.0 among them), float64."""
    return torch.logspace(-math.log10(20), math.log10(20), 401, dtype=torch.float64)


@dataclass
class CalibrationRounds:
    """Held-out verification rounds: raw (uncalibrated) confidence logits and their prefix-acceptance labels.

    ``logits`` [R, K] float64 is padded past each round's effective length ``lengths`` [R]; ``labels`` [R, K]
    holds 1 while drafts were accepted.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor

    @property
    def max_drafts(self) -> int:
        return self.logits.shape[1]

    @classmethod
    def from_results(
        cls, results: Sequence, max_drafts: int, temperatures: Sequence[float] | None = None
    ) -> CalibrationRounds:
        """Rounds of :class:`GenerationResult` objects whose logits were scaled by ``temperatures`` (undone here)."""
        scale = torch.ones(max_drafts, dtype=torch.float64)
        if temperatures:
            count = min(len(temperatures), max_drafts)
            scale[:count] = torch.tensor(list(temperatures)[:count], dtype=torch.float64)
        logits, labels, lengths = [], [], []
        for result in results:
            rounds = zip(result.confidence_logits, result.proposed, result.accepted, result.committed, strict=True)
            for round_logits, proposed, accepted, committed in rounds:
                if round_logits is None or proposed == 0:
                    continue
                length, label = round_labels(int(proposed), int(accepted), int(committed))
                if length == 0:
                    continue
                row = torch.zeros(max_drafts, dtype=torch.float64)
                row[:length] = round_logits[:length].double().cpu() * scale[:length]
                padded = torch.zeros(max_drafts, dtype=torch.float64)
                padded[:length] = label
                logits.append(row)
                labels.append(padded)
                lengths.append(length)
        if not logits:
            empty = torch.zeros(0, max_drafts, dtype=torch.float64)
            return cls(empty, empty.clone(), torch.zeros(0, dtype=torch.long))
        return cls(torch.stack(logits), torch.stack(labels), torch.tensor(lengths))

    @classmethod
    def concat(cls, parts: Sequence[CalibrationRounds]) -> CalibrationRounds:
        return cls(
            torch.cat([part.logits for part in parts]),
            torch.cat([part.labels for part in parts]),
            torch.cat([part.lengths for part in parts]),
        )

    def survival(self, temperatures: Sequence[float] | None = None) -> torch.Tensor:
        """Prefix survival [R, K] (float64) with the logits divided by ``temperatures`` (1 where not given)."""
        scale = torch.ones(self.max_drafts, dtype=torch.float64)
        if temperatures:
            count = min(len(temperatures), self.max_drafts)
            scale[:count] = torch.tensor(list(temperatures)[:count], dtype=torch.float64)
        return torch.sigmoid(self.logits / scale).cumprod(dim=-1)

    def metrics(self, temperatures: Sequence[float] | None = None) -> ConfidenceCalibrationMetrics:
        """ECE / AUROC / Brier of these rounds under ``temperatures`` (see :mod:`specdec.metrics.confidence`)."""
        metric = ConfidenceCalibrationMetrics(self.max_drafts)
        valid = torch.arange(self.max_drafts)[None] < self.lengths[:, None]
        positions = torch.arange(self.max_drafts).expand_as(valid)
        metric.update(self.survival(temperatures)[valid], self.labels[valid], positions[valid])
        return metric


def _ece_per_candidate(survival: torch.Tensor, labels: torch.Tensor, bins: int) -> torch.Tensor:
    """ECE of each row of ``survival`` [G, N] against ``labels`` [N], with the metric's binning."""
    survival = survival.clamp(PROBABILITY_EPS, 1 - PROBABILITY_EPS)
    candidates = survival.shape[0]
    index = (survival * bins).long().clamp_(0, bins - 1) + bins * torch.arange(candidates)[:, None]
    index = index.flatten()

    def binned(values: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(candidates * bins, dtype=torch.float64)
        return sums.index_add_(0, index, values.flatten()).view(candidates, bins)

    count = binned(torch.ones_like(survival))
    return expected_calibration_error(count, binned(survival), binned(labels.expand_as(survival)))


def fit_sequential_temperatures(
    rounds: CalibrationRounds, grid: torch.Tensor | None = None, bins: int = ECE_BINS, min_class_count: int = 10
) -> list[float]:
    """STS temperatures ``T_1..T_K`` (one per draft position) minimising the ECE of each prefix survival in turn.

    A position keeps ``T = 1`` when its held-out rounds hold fewer than ``min_class_count`` accepted or rejected
    labels: deep positions of a weak drafter see a handful of acceptances, and a grid search there fits noise
    (it runs to the grid's ends). Among grid values of equal ECE the one closest to 1 wins (ECE is piecewise
    constant in T on finite data), so a calibrated head is left alone.
    """
    grid = default_grid() if grid is None else grid.to(torch.float64)
    order = torch.argsort(grid.log().abs(), stable=True)  # closest to T = 1 first: ties resolve toward it
    grid = grid[order]
    temperatures: list[float] = []
    prefix = torch.ones(rounds.logits.shape[0], dtype=torch.float64)
    for k in range(rounds.max_drafts):
        reached = rounds.lengths > k
        positives = float(rounds.labels[reached, k].sum())
        if min(positives, float(reached.sum()) - positives) < max(1, min_class_count):
            temperatures.append(1.0)
            prefix = prefix * torch.sigmoid(rounds.logits[:, k])
            continue
        logits = rounds.logits[reached, k]
        candidates = prefix[reached][None] * torch.sigmoid(logits[None] / grid[:, None])  # [G, N]
        ece = _ece_per_candidate(candidates, rounds.labels[reached, k], bins)
        best = float(grid[int(torch.argmin(ece))])  # first minimum = the one closest to T = 1
        temperatures.append(best)
        prefix = prefix * torch.sigmoid(rounds.logits[:, k] / best)
    return temperatures


@dataclass
class CalibrationReport:
    """Fitted temperatures and the confidence metrics before and after, on the fit and the held-out rounds."""

    temperatures: list[float]
    fit_before: dict[str, float]
    fit_after: dict[str, float]
    heldout_before: dict[str, float] | None = None
    heldout_after: dict[str, float] | None = None

    def summary(self) -> dict[str, float]:
        """Flat numbers for loggers: held-out ECE / AUROC / Brier before and after (fit split when none)."""
        before = self.heldout_before if self.heldout_before is not None else self.fit_before
        after = self.heldout_after if self.heldout_after is not None else self.fit_after
        values = {}
        for name in ("ece", "auroc", "brier"):
            values[f"{name}_before"] = before[name]
            values[f"{name}_after"] = after[name]
        for k, temperature in enumerate(self.temperatures):
            values[f"temperature@{k}"] = temperature
            values[f"ece_before@{k}"] = before[f"ece@{k}"]
            values[f"ece_after@{k}"] = after[f"ece@{k}"]
        return values


def _floats(metric: ConfidenceCalibrationMetrics) -> dict[str, float]:
    return {name: float(value) for name, value in metric.compute().items()}


def calibrate(
    fit: CalibrationRounds,
    heldout: CalibrationRounds | None = None,
    grid: torch.Tensor | None = None,
    min_class_count: int = 10,
) -> CalibrationReport:
    """Fit STS on ``fit`` and report the metrics before/after on it and on ``heldout`` (rounds not fitted on)."""
    if fit.logits.shape[0] == 0:
        raise ValueError("no rounds with confidence logits to calibrate on (does the drafter have a confidence head?)")
    temperatures = fit_sequential_temperatures(fit, grid, min_class_count=min_class_count)
    report = CalibrationReport(temperatures, _floats(fit.metrics()), _floats(fit.metrics(temperatures)))
    if heldout is not None and heldout.logits.shape[0] > 0:
        report.heldout_before = _floats(heldout.metrics())
        report.heldout_after = _floats(heldout.metrics(temperatures))
    return report


def set_confidence_temperatures(drafter: torch.nn.Module, temperatures: Sequence[float] | None) -> None:
    """Store STS temperatures in the drafter's config (saved with it; ``None`` removes the calibration)."""
    if not hasattr(drafter, "calibrated_confidence"):
        raise TypeError(f"{type(drafter).__name__} has no confidence head to calibrate (DSpark drafters only)")
    values = None if temperatures is None else [float(t) for t in temperatures]
    if values is not None and not all(t > 0 for t in values):
        raise ValueError(f"confidence temperatures must be > 0; got {values}")
    drafter.config.confidence_temperatures = values
