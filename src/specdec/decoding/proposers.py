"""Draft proposals of each algorithm, with the exact fp32 distribution every drafted token was drawn from.

A proposer keeps one draft state per request. Before each round the engine hands it the target features of the
positions committed since the last round (``pending``); the proposer injects them into its own cache and drafts
from the last committed token (the anchor, at ``position``).

- DSpark / DFlash: one parallel block forward, then slot-by-slot sampling through the Markov head (DSpark);
  both anchor conventions (DeepSpec: all block slots predict; z-lab: the mask slots predict).
- Eagle3: a chain, one draft forward per token, with the drafter's own KV cache; step-0 entries pair the target
  feature at t with the token at t + 1, chained entries are dropped again after the round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from specdec.sampling import draw, token_probabilities

if TYPE_CHECKING:  # the drafters import the sampling path of this package, so no import cycle at run time
    from specdec.drafters import DraftContextCache, DSparkDrafter, Eagle3Drafter


@dataclass
class Proposal:
    """Drafted tokens of one request and the distributions they were drawn from (q of the acceptance test)."""

    tokens: torch.Tensor  # [n] long
    probabilities: torch.Tensor  # [n, V] fp32, over the target vocabulary
    confidence_logits: torch.Tensor | None = None  # [n] fp32 (calibrated), for drafters with a confidence head


@dataclass
class DraftRequest:
    """What a proposer needs about one request this round."""

    state: Any  # the proposer's per-request state (from ``new_state``)
    tokens: torch.Tensor  # [position + 1] committed token ids, the anchor last
    pending: torch.Tensor  # [T, L*H] target features of positions position - T .. position - 1
    limit: int  # at most this many drafts


class DSparkProposer:
    """Block drafting for DSpark and DFlash (any anchor convention, with or without a Markov head)."""

    def __init__(self, drafter: DSparkDrafter) -> None:
        self.drafter = drafter
        self.num_predictions = drafter.config.num_predictions

    def new_state(self) -> DraftContextCache:
        return self.drafter.new_cache()

    def begin(self, batch: int, capacity: int = 0) -> list[DraftContextCache]:
        """Fresh states for a batch of requests (the context caches grow as needed)."""
        return [self.new_state() for _ in range(batch)]

    @torch.no_grad()
    def propose(
        self,
        requests: Sequence[DraftRequest],
        temperature: float,
        generator: torch.Generator | None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[Proposal]:
        hidden: list[torch.Tensor | None] = [None] * len(requests)
        for rows in _groups(requests, lambda r: (r.tokens.shape[0], r.pending.shape[0])).values():
            group = [requests[row] for row in rows]
            cache = _stack_caches([request.state for request in group])
            anchors = torch.stack([request.tokens[-1] for request in group])
            pending = torch.stack([request.pending for request in group])
            block = self.drafter.block_hidden(anchors, group[0].tokens.shape[0] - 1, pending, cache)
            for index, (row, request) in enumerate(zip(rows, group, strict=True)):
                request.state.keys = [keys[index : index + 1] for keys in cache.keys]
                request.state.values = [values[index : index + 1] for values in cache.values]
                hidden[row] = block[index : index + 1]
        anchors = torch.stack([request.tokens[-1] for request in requests])
        block = self.drafter.sample_block(torch.cat(hidden), anchors, temperature, generator)
        confidence = block.confidence_logits
        return [
            Proposal(
                tokens=block.tokens[row, : request.limit],
                probabilities=block.probabilities[row, : request.limit],
                confidence_logits=None if confidence is None else confidence[row, : request.limit],
            )
            for row, request in enumerate(requests)
        ]


def _groups(requests: Sequence[DraftRequest], key) -> dict[Any, list[int]]:
    """Request indices grouped by ``key``: requests at the same place run as one batch."""
    groups: dict[Any, list[int]] = {}
    for row, request in enumerate(requests):
        groups.setdefault(key(request), []).append(row)
    return groups


def _stack_caches(caches: Sequence[DraftContextCache]) -> DraftContextCache:
    from specdec.drafters import DraftContextCache

    if not caches[0].keys:
        return DraftContextCache(keys=[], values=[])
    keys = [torch.cat(layer) for layer in zip(*(cache.keys for cache in caches), strict=True)]
    values = [torch.cat(layer) for layer in zip(*(cache.values for cache in caches), strict=True)]
    return DraftContextCache(keys=keys, values=values)


@dataclass
class Eagle3State:
    """Per-layer (keys, values) of the step-0 entries injected so far."""

    past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    length: int = 0


class Eagle3Proposer:
    """Chain drafting for Eagle3: ``ttt_length`` tokens at most, stopping early at a drafted stop token."""

    def __init__(self, drafter: Eagle3Drafter) -> None:
        self.drafter = drafter
        self.num_predictions = drafter.config.ttt_length
        self.vocab_size = drafter.config.vocab_size

    def new_state(self) -> Eagle3State:
        return Eagle3State()

    def begin(self, batch: int, capacity: int = 0) -> list[Eagle3State]:
        """Fresh states for a batch of requests (the draft KV caches grow as needed)."""
        return [self.new_state() for _ in range(batch)]

    def _draw(self, hidden: torch.Tensor, temperature: float, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A token from the draft head at ``hidden`` [1, H] and its distribution over the target vocabulary."""
        q_draft = token_probabilities(self.drafter.logits(hidden), temperature)
        index = draw(q_draft, generator)
        if self.drafter.lm_head is None:
            return index, q_draft
        ids = self.drafter.draft_token_ids()
        q = torch.zeros(q_draft.shape[0], self.vocab_size, device=q_draft.device, dtype=q_draft.dtype)
        q[:, ids] = q_draft
        return ids[index], q

    @torch.no_grad()
    def propose(
        self,
        requests: Sequence[DraftRequest],
        temperature: float,
        generator: torch.Generator | None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[Proposal]:
        proposals: list[Proposal | None] = [None] * len(requests)
        key = lambda r: (r.tokens.shape[0], r.pending.shape[0], r.limit)  # noqa: E731
        for rows in _groups(requests, key).values():
            group = [requests[row] for row in rows]
            drafted = self._propose_group(group, temperature, generator, stop_token_ids)
            for row, proposal in zip(rows, drafted, strict=True):
                proposals[row] = proposal
        return proposals

    def _propose_group(self, group: Sequence[DraftRequest], temperature: float, generator, stop_token_ids):
        """Requests at the same position with the same number of pending features and the same limit."""
        drafter = self.drafter
        first = group[0]
        device = first.tokens.device
        position = first.tokens.shape[0] - 1
        count = first.pending.shape[0]
        start = position - count
        for request in group:
            if request.state.length != start:
                raise ValueError(
                    f"Eagle3 draft cache covers {request.state.length} positions; pending features start at {start}"
                )
        # Step-0 entries: feature at t paired with the token at t + 1, RoPE position t, causal within the chunk.
        features = torch.stack([request.pending for request in group]).to(drafter.fc.weight.dtype)
        tokens = torch.stack([request.tokens[start + 1 : position + 1] for request in group])
        positions = torch.arange(start, position, device=device).expand(len(group), -1)
        query = torch.arange(count, device=device)[:, None]
        key = torch.arange(start + count, device=device)[None]
        mask = ((key < start) | (key - start <= query))[None, None]
        past = None
        if start > 0:
            past = [
                (torch.cat([r.state.past[i][0] for r in group]), torch.cat([r.state.past[i][1] for r in group]))
                for i in range(len(drafter.layers))
            ]
        hidden, past = drafter.step(drafter.fc(features), tokens, positions, past, mask)
        for index, request in enumerate(group):
            request.state.past = [(k[index : index + 1], v[index : index + 1]) for k, v in past]
            request.state.length = position
        limit = first.limit
        if limit == 0:
            empty = Proposal(
                torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, self.vocab_size, device=device)
            )
            return [empty for _ in group]
        stops = torch.tensor(list(stop_token_ids) or [-1], device=device)
        hidden = hidden[:, -1:]
        drafted, distributions = [], []
        stopped = torch.zeros(len(group), dtype=torch.bool, device=device)
        chain = past
        for step in range(limit):
            token, q = self._draw(hidden[:, -1], temperature, generator)
            drafted.append(token)
            distributions.append(q)
            stopped = stopped | torch.isin(token, stops)
            if step + 1 == limit or bool(stopped.all()):
                break
            step_positions = torch.full((len(group), 1), position + step, device=device)
            hidden, chain = drafter.step(hidden, token[:, None], step_positions, chain, None)
        tokens = torch.stack(drafted, dim=1)  # [G, n]
        probabilities = torch.stack(distributions, dim=1)
        proposals = []
        for index in range(len(group)):
            # A drafted stop token ends the proposal (nothing after it could be committed).
            hits = torch.isin(tokens[index], stops).nonzero()
            length = int(hits[0]) + 1 if hits.numel() else tokens.shape[1]
            proposals.append(Proposal(tokens[index, :length], probabilities[index, :length]))
        return proposals


def proposer_for(drafter: torch.nn.Module) -> DSparkProposer | Eagle3Proposer:
    """The proposer of a drafter (DSpark/DFlash or Eagle3)."""
    from specdec.drafters import DSparkDrafter, Eagle3Drafter

    if isinstance(drafter, DSparkDrafter):
        return DSparkProposer(drafter)
    if isinstance(drafter, Eagle3Drafter):
        return Eagle3Proposer(drafter)
    raise TypeError(f"no speculative proposer for {type(drafter).__name__}; expected DSparkDrafter or Eagle3Drafter")
