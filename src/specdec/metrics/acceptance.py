"""Acceptance statistics of real speculative decoding, reduced as Σ over rounds, prompts and ranks.

Every state is a sum (``dist_reduce_fx="sum"``) and every reported number is a ratio of sums, so the result
does not depend on how prompts were split across ranks or batches. Names carry their convention:

- ``tau``: mean tokens committed per verification round, the bonus/correction token included (DeepSpec's
  ``accept_len``; a round ending on an accepted stop token counts only its drafts).
- ``propose``: mean drafts verified per round (DeepSpec prints it as ``X.XX+1``).
- ``verify_rate``: committed / verified tokens = Σ committed / (Σ drafts + rounds).
- ``draft_acceptance_rate``: Σ accepted drafts / Σ drafts (vLLM's draft acceptance rate).
- ``accept_rate@k``: prefix survival, P(drafts 0..k all accepted | the round drafted > k tokens).
- ``cond_accept@k``: conditional acceptance, P(draft k accepted | drafts 0..k-1 accepted, draft k proposed)
  (the DSpark paper's Fig. 2).
- ``tau_per_request``: τ of each request, averaged over requests (vLLM's per-request view).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric


class AcceptanceMetrics(Metric):
    """τ, #propose, verify rate, prefix survival and conditional acceptance per draft position ``0..K-1``."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, max_drafts: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if max_drafts < 1:
            raise ValueError(f"max_drafts = {max_drafts}; must be >= 1")
        self.max_drafts = max_drafts
        scalar = {"default": torch.zeros((), dtype=torch.float64), "dist_reduce_fx": "sum"}
        for name in ("rounds", "drafted", "accepted", "committed", "requests", "request_tau"):
            self.add_state(name, **{**scalar, "default": scalar["default"].clone()})
        for name in ("survived", "proposed_beyond", "reached"):
            self.add_state(name, torch.zeros(max_drafts, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, proposed: torch.Tensor, accepted: torch.Tensor, committed: torch.Tensor) -> None:
        """One request's rounds: drafts verified, leading drafts accepted and tokens committed per round."""
        proposed = torch.as_tensor(proposed, dtype=torch.float64, device=self.rounds.device).flatten()
        accepted = torch.as_tensor(accepted, dtype=torch.float64, device=self.rounds.device).flatten()
        committed = torch.as_tensor(committed, dtype=torch.float64, device=self.rounds.device).flatten()
        if proposed.numel() == 0:
            return
        self.rounds += proposed.numel()
        self.drafted += proposed.sum()
        self.accepted += accepted.sum()
        self.committed += committed.sum()
        self.requests += 1
        self.request_tau += committed.sum() / proposed.numel()
        k = torch.arange(self.max_drafts, device=proposed.device, dtype=torch.float64)
        self.survived += (accepted[:, None] > k).sum(0)  # drafts 0..k accepted
        self.proposed_beyond += (proposed[:, None] > k).sum(0)  # draft k was proposed
        self.reached += ((proposed[:, None] > k) & (accepted[:, None] >= k)).sum(0)  # ... after 0..k-1 passed

    def update_from(self, results: Sequence) -> None:
        """Add the rounds of :class:`specdec.decoding.GenerationResult` objects."""
        for result in results:
            self.update(torch.tensor(result.proposed), torch.tensor(result.accepted), torch.tensor(result.committed))

    def compute(self) -> dict[str, torch.Tensor]:
        rounds = self.rounds.clamp_min(1)
        values = {
            "tau": self.committed / rounds,
            "propose": self.drafted / rounds,
            "verify_rate": self.committed / (self.drafted + self.rounds).clamp_min(1),
            "draft_acceptance_rate": self.accepted / self.drafted.clamp_min(1),
            "tau_per_request": self.request_tau / self.requests.clamp_min(1),
            "rounds": self.rounds,
        }
        survival = self.survived / self.proposed_beyond.clamp_min(1)
        conditional = self.survived / self.reached.clamp_min(1)
        for k in range(self.max_drafts):
            values[f"accept_rate@{k}"] = survival[k]
            values[f"cond_accept@{k}"] = conditional[k]
        return {name: value.float() for name, value in values.items()}
