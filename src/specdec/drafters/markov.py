"""Markov heads: a low-rank correction of each draft slot's logits by the previously drafted token.

The block backbone predicts all slots in parallel, so slot k cannot see which token slot k - 1 sampled.
A head adds ``bias(x_{k-1})`` to slot k's logits: teacher-forced with true previous tokens in training,
applied step by step while sampling, so the corrected logits are exactly the q of the acceptance test.
"""

from __future__ import annotations

import torch
from torch import nn

from specdec.drafters.config import DSparkConfig

MarkovState = torch.Tensor | None


class MarkovHead(nn.Module):
    """``vanilla``: bias = W2 · W1[x_prev] (rank r)."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.rank = config.markov_rank
        self.markov_w1 = nn.Embedding(config.vocab_size, config.markov_rank)
        self.markov_w2 = nn.Linear(config.markov_rank, config.vocab_size, bias=False)

    def features(self, prev_ids: torch.Tensor) -> torch.Tensor:
        """W1[x_prev]: the previous-token features also fed to the confidence head."""
        return self.markov_w1(prev_ids)

    def initial_state(self, hidden: torch.Tensor) -> MarkovState:
        return None

    def step(self, hidden: torch.Tensor, prev_ids: torch.Tensor, state: MarkovState):
        """Bias for one slot given the token actually drafted before it: ``(bias [.., V], state)``."""
        return self.markov_w2(self.features(prev_ids)), state

    def teacher_forced(self, hidden: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor:
        """Biases for all slots at once ([..., P, V]) from the true previous tokens ([..., P])."""
        return self.markov_w2(self.features(prev_ids))


class GatedMarkovHead(MarkovHead):
    """``gated``: bias = W2 · (σ(G [h_k ; W1[x_prev]]) ⊙ W1[x_prev]) — the slot's state decides how much to use."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__(config)
        self.gate = nn.Linear(config.hidden_size + config.markov_rank, config.markov_rank)

    def step(self, hidden, prev_ids, state):
        return self.teacher_forced(hidden, prev_ids), state

    def teacher_forced(self, hidden: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor:
        features = self.features(prev_ids)
        gate = torch.sigmoid(self.gate(torch.cat([hidden, features.to(hidden.dtype)], dim=-1)))
        return self.markov_w2(gate * features)


class RNNMarkovHead(MarkovHead):
    """``rnn``: a gated recurrent state over the drafted tokens of the block; bias = W2 · tanh(o_k)."""

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__(config)
        self.cell = nn.Linear(2 * config.markov_rank + config.hidden_size, 3 * config.markov_rank)

    def initial_state(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.new_zeros(*hidden.shape[:-1], self.rank)

    def step(self, hidden, prev_ids, state):
        features = self.features(prev_ids).to(hidden.dtype)
        gate, candidate, output = self.cell(torch.cat([state, features, hidden], dim=-1)).chunk(3, dim=-1)
        keep = torch.sigmoid(gate)
        state = keep * state + (1 - keep) * torch.tanh(candidate)
        return self.markov_w2(torch.tanh(output)), state

    def teacher_forced(self, hidden: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor:
        state = self.initial_state(hidden[..., 0, :])
        biases = []
        for slot in range(hidden.shape[-2]):
            bias, state = self.step(hidden[..., slot, :], prev_ids[..., slot], state)
            biases.append(bias)
        return torch.stack(biases, dim=-2)


MARKOV_HEADS: dict[str, type[MarkovHead]] = {"vanilla": MarkovHead, "gated": GatedMarkovHead, "rnn": RNNMarkovHead}


def build_markov_head(config: DSparkConfig) -> MarkovHead | None:
    return MARKOV_HEADS[config.markov_head_type](config) if config.markov_rank > 0 else None


class ConfidenceHead(nn.Module):
    """Predicts, per slot, the probability that the slot's draft is accepted (trained toward 1 − TV).

    Runs in fp32: its sigmoid is compared against thresholds and calibrated, where bf16 rounding matters.
    """

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        self.with_markov = config.confidence_head_with_markov and config.markov_rank > 0
        extra = config.markov_rank if self.with_markov else 0
        self.proj = nn.Linear(config.hidden_size + extra, 1)

    def forward(self, hidden: torch.Tensor, markov_features: torch.Tensor | None) -> torch.Tensor:
        inputs = hidden.float()
        if self.with_markov:
            inputs = torch.cat([inputs, markov_features.float()], dim=-1)
        return nn.functional.linear(inputs, self.proj.weight.float(), self.proj.bias.float()).squeeze(-1)
