"""Linear warmup then cosine decay, as one continuous function of the optimizer step.

DeepSpec chains a warmup scheduler into ``CosineAnnealingLR`` and the hand-over step is off by one (the LR
dips at the transition, fixed there only in an unmerged branch). Here the factor is one closed form: step
``W - 1`` and step ``W`` both have factor 1, and the decay reaches ``min_lr_ratio`` at the last step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """LR multiplier at optimizer step ``step`` (0-based): ``(step+1)/W`` while warming up, then cosine to min."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be at least 1; got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, {total_steps}]; got {warmup_steps}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - 1))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.04, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """A per-step ``LambdaLR`` over :func:`warmup_cosine` with ``W = int(warmup_ratio · total_steps)``."""
    warmup_steps = int(warmup_ratio * total_steps)
    return LambdaLR(optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, min_lr_ratio))
