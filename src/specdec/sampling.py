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


def draw(
    probabilities: torch.Tensor, generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None
) -> torch.Tensor:
    """One token per row of ``probabilities`` ([..., V] → [...]), distributed as the row (inverse CDF).

    The token is the first index whose cumulative probability exceeds ``u · total``, ``u ~ U[0, 1)``: a
    zero-probability token is never drawn (its cumulative sum equals its predecessor's) and a one-hot row gives
    its argmax. The cumulative sum runs in fp64 so rounding moves no probability mass that matters, even over
    a 150 k vocabulary. Written this way the draw is a pure function of ``uniforms`` [...], so a compiled
    graph takes them as an input instead of a generator; they are drawn from ``generator`` when not given.
    """
    if uniforms is None:
        uniforms = uniform(tuple(probabilities.shape[:-1]), probabilities.device, generator)
    cdf = probabilities.double().cumsum(dim=-1)
    threshold = (uniforms.double() * cdf[..., -1]).unsqueeze(-1)
    tokens = torch.searchsorted(cdf, threshold, right=True).squeeze(-1)
    return tokens.clamp_max(probabilities.shape[-1] - 1)


def uniform(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """U[0, 1) in fp32 for the acceptance test (drawn from the same generator as the tokens)."""
    return torch.rand(shape, device=device, generator=generator, dtype=torch.float32)


def accept_draft(p_draft: torch.Tensor, q_draft: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The rejection test ``u < min(1, p(d) / q(d))``, written as ``u · q(d) < p(d)`` to avoid dividing.

    ``p_draft`` and ``q_draft`` are the target's and the drafter's probabilities of the drafted token, both fp32
    from :func:`token_probabilities`. A token the drafter could not have drawn (q = 0) is never accepted.
    """
    return (u * q_draft < p_draft) & (q_draft > 0)


def residual_distribution(p: torch.Tensor, q: torch.Tensor, min_mass: float = 1e-8) -> torch.Tensor:
    """``norm(max(p - q, 0))``: what to draw from after a rejection so the committed token is distributed as p.

    When the residual has (numerically) no mass, p and q agree and a rejection was a rounding event; p itself
    is then the right distribution.
    """
    residual = (p - q).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    return torch.where(mass > min_mass, residual / mass.clamp_min(min_mass), p)
