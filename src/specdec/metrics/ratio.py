"""Ratio metrics reduced as Σnumerator / Σdenominator over steps and ranks.

Averaging per-rank ratios (or per-step ratios) weights a rank with 3 valid blocks like one with 300; the
acceptance diagnostics of the losses come with numerator and denominator for exactly this reduction.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class RatioMetric(Metric):
    """Σnum / Σden, elementwise over a fixed shape (a scalar, or e.g. ``[K]`` per block position)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, shape: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("numerator", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("denominator", torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, numerator: torch.Tensor, denominator: torch.Tensor) -> None:
        self.numerator += numerator.detach().to(torch.float64)
        self.denominator += denominator.detach().to(torch.float64)

    def compute(self) -> torch.Tensor:
        return (self.numerator / self.denominator.clamp_min(1e-12)).to(torch.float32)
