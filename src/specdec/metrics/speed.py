"""Tokens/s of speculative and autoregressive decoding measured side by side, and the speedups they imply.

Sums of tokens and seconds over prompts and ranks (``dist_reduce_fx="sum"``):

- ``tokens_per_second`` / ``ar_tokens_per_second``: generated tokens / wall-clock seconds of the decode calls,
  prefill included, for the speculative decoder and for plain decoding of the same target on the same prompts.
- ``speedup``: their ratio (wall-clock speedup, measured in the same run).
- ``ideal_speedup``: τ · t_step / (t_draft + t_verify) with t_step the measured time of one autoregressive
  decode step and t_draft, t_verify the measured per-round draft and verification times (the DSpark paper's
  per-token latency ``(T_draft + T_verify) / τ`` against one target step); it leaves out prefill and
  bookkeeping, so it bounds what a leaner runtime could reach with the same drafter and target kernels.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

_STATES = (
    "tokens",
    "seconds",
    "draft_seconds",
    "verify_seconds",
    "rounds",
    "round_tokens",
    "ar_tokens",
    "ar_seconds",
    "ar_steps",
    "ar_step_seconds",
    "ar_step_tokens",
)


class SpeedMetrics(Metric):
    """Wall-clock throughput of speculative vs autoregressive decoding and the implied speedups."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in _STATES:
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, speculative, autoregressive=None) -> None:
        """Add one :class:`specdec.decoding.DecodeOutput` of each decoder (the same prompts)."""
        self.tokens += speculative.new_tokens
        self.seconds += speculative.seconds
        self.draft_seconds += speculative.draft_seconds
        self.verify_seconds += speculative.verify_seconds
        self.rounds += speculative.target_forwards
        self.round_tokens += sum(sum(result.committed) for result in speculative.results)
        if autoregressive is not None:
            self.ar_tokens += autoregressive.new_tokens
            self.ar_seconds += autoregressive.seconds
            self.ar_steps += autoregressive.target_forwards
            self.ar_step_seconds += autoregressive.seconds - autoregressive.prefill_seconds
            self.ar_step_tokens += autoregressive.new_tokens - len(autoregressive.results)

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=self.tokens.device)
        rate = self.tokens / self.seconds if self.seconds > 0 else nan
        ar_rate = self.ar_tokens / self.ar_seconds if self.ar_seconds > 0 else nan
        round_time = self.draft_seconds + self.verify_seconds
        # tokens per second of the decode phase alone, from the measured section times
        ideal_rate = self.round_tokens / round_time if round_time > 0 else nan
        ar_step_rate = self.ar_step_tokens / self.ar_step_seconds if self.ar_step_seconds > 0 else nan
        values = {
            "tokens_per_second": rate,
            "ar_tokens_per_second": ar_rate,
            "speedup": rate / ar_rate,
            "ideal_speedup": ideal_rate / ar_step_rate,
            "draft_ms_per_round": 1000 * self.draft_seconds / self.rounds.clamp_min(1),
            "verify_ms_per_round": 1000 * self.verify_seconds / self.rounds.clamp_min(1),
            "ar_ms_per_step": 1000 * self.ar_step_seconds / self.ar_steps if self.ar_steps > 0 else nan,
        }
        return {name: value.float() for name, value in values.items()}
