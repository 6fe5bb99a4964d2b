"""Acceptance and speed metrics kept per group: every prompt counts in ``all``, its dataset and its domain.

Groups are declared up front (from the eval task list), so every rank holds the same metric states and the
DDP reduction never waits on a group a rank did not see.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from specdec.metrics.acceptance import AcceptanceMetrics
from specdec.metrics.speed import SpeedMetrics

ALL = "all"


def _key(group: str) -> str:
    return group.replace(".", "_")  # ModuleDict keys cannot hold dots


class GroupedDecodingMetrics(nn.Module):
    """``AcceptanceMetrics`` and ``SpeedMetrics`` per group (``all``, ``dataset/<name>``, ``domain/<name>``)."""

    def __init__(self, groups: Iterable[str], max_drafts: int) -> None:
        super().__init__()
        self.groups = list(dict.fromkeys([ALL, *groups]))
        self.acceptance = nn.ModuleDict({_key(g): AcceptanceMetrics(max_drafts) for g in self.groups})
        self.speed = nn.ModuleDict({_key(g): SpeedMetrics() for g in self.groups})

    def update(self, groups: Sequence[str], speculative, autoregressive=None) -> None:
        """Add one decode call (its prompts all belong to ``groups``; ``all`` is implied)."""
        for group in dict.fromkeys([ALL, *groups]):
            if group not in self.groups:
                raise KeyError(f"metric group {group!r} was not declared; declared: {self.groups}")
            self.acceptance[_key(group)].update_from(speculative.results)
            self.speed[_key(group)].update(speculative, autoregressive)

    def compute(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{group: {metric: value}}`` for every declared group."""
        return {
            group: {**self.acceptance[_key(group)].compute(), **self.speed[_key(group)].compute()}
            for group in self.groups
        }

    def reset(self) -> None:
        for metric in (*self.acceptance.values(), *self.speed.values()):
            metric.reset()
