"""The one sampling path: fp32 probabilities used both to draw a token and as q / p in the acceptance test.

Drawing from a distribution computed in one precision while testing acceptance against another breaks
losslessness, so every drafter and the verifier go through ``token_probabilities``.
"""

from __future__ import annotations

import torch

GREEDY_TEMPERATURE = 1e-5


def token_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """fp32 next-token distribution; one-hot on the argmax when ``temperature`` is (near) zero."""
    logits = logits.float()
    if temperature < GREEDY_TEMPERATURE:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return torch.softmax(logits / temperature, dim=-1)


def draw(probabilities: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``probabilities`` ([..., V] → [...])."""
    flat = probabilities.reshape(-1, probabilities.shape[-1])
    tokens = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return tokens.view(probabilities.shape[:-1])
