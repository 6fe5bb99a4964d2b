"""DSpark / DFlash drafting against preallocated context buffers: one fixed-shape (compilable) graph per round.

The eager proposer keeps each request's injected context in tensors that grow by concatenation and samples the
block slot by slot with small eager ops; every round then costs hundreds of dispatches. Here each draft layer's
context keys and values live in buffers of fixed capacity, and a round is a single function of tensors:

1. inject the features of the positions committed last round (padded to ``num_predictions + 1`` rows, the
   most a round can commit) at their slots;
2. run the block ``[anchor, mask, …]`` over the whole buffer under a validity mask;
3. sample the block through the Markov head, with its uniforms drawn beforehand from the request's
   generator (:func:`specdec.sampling.draw`), so no generator enters the graph.

Its shapes never change within an evaluation, so it compiles once. The prompt's features (the first round's
long pending chunk) are injected eagerly before the first round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from specdec.decoding.compiled import CompiledStep
from specdec.decoding.proposers import DraftRequest, Proposal
from specdec.decoding.static_session import LayerKVBuffers, buffer_capacity
from specdec.sampling import uniform


@dataclass
class StaticDraftState:
    """A request's row in the context buffers and how many positions of it are injected."""

    row: int
    length: int = 0


class _DraftRound(LayerKVBuffers):
    """Injection, block forward and sampling of one round, for all rows at once (see the module docstring)."""

    def __init__(self, drafter: nn.Module, temperature: float) -> None:
        super().__init__(len(drafter.layers))
        self.drafter = drafter
        self.temperature = temperature

    def inject(self, features: torch.Tensor, start: torch.Tensor) -> None:
        """Write context keys/values of ``features`` [B, T, L*H] at slots ``start[b] + 0 .. T - 1``."""
        drafter = self.drafter
        context = drafter.context(features)
        slots = start[:, None] + torch.arange(features.shape[1], device=features.device)  # [B, T]
        rotary = drafter.rotary_emb(context, slots)
        for index, layer in enumerate(drafter.layers):
            keys, values = layer.self_attn.context_key_values(context, rotary)  # [B, kv, T, D]
            where = slots[:, None, :, None].expand_as(keys)
            key_buffer, value_buffer = self.kv(index)
            key_buffer.scatter_(2, where, keys.to(key_buffer.dtype))
            value_buffer.scatter_(2, where, values.to(value_buffer.dtype))

    def forward(
        self,
        pending: torch.Tensor,  # [B, W, L*H] features of the positions committed last round, zero-padded
        pending_count: torch.Tensor,  # [B] how many rows of ``pending`` are real
        start: torch.Tensor,  # [B] positions injected before this round (where ``pending`` goes)
        anchors: torch.Tensor,  # [B] the last committed token of each row
        uniforms: torch.Tensor,  # [B, P] U[0, 1) draws of the block's sampling
    ):
        drafter = self.drafter
        config = drafter.config
        self.inject(pending, start)
        anchor_position = start + pending_count  # [B]: the anchor's position = context length
        capacity = self.keys_0.shape[2]
        batch, block = anchors.shape[0], config.block_size
        context_valid = torch.arange(capacity, device=anchors.device)[None] < anchor_position[:, None]  # [B, S]
        mask = torch.cat(
            [
                context_valid[:, None, :].expand(batch, block, capacity),
                torch.ones(batch, block, block, dtype=torch.bool, device=anchors.device),
            ],
            dim=-1,
        )[:, None]  # [B, 1, K, S + K]
        block_ids = torch.cat(
            [anchors[:, None], torch.full((batch, block - 1), config.mask_token_id, device=anchors.device)], dim=1
        )
        embeddings = drafter.target_head.embed(block_ids).to(drafter.fc.weight.dtype)
        positions = anchor_position[:, None] + torch.arange(block, device=anchors.device)
        rotary = drafter.rotary_emb(embeddings, positions)
        hidden = embeddings
        for index, layer in enumerate(drafter.layers):
            hidden = layer(hidden, rotary, *self.kv(index), mask)
        hidden = drafter.norm(hidden)[:, config.first_prediction_slot :]
        drafted = drafter.sample_block(hidden, anchors, self.temperature, uniforms=uniforms)
        return drafted.tokens, drafted.probabilities, drafted.confidence_logits


class StaticDSparkProposer:
    """Block drafting for DSpark and DFlash with fixed-capacity context buffers and one compiled round graph.

    Proposes exactly what :class:`specdec.decoding.proposers.DSparkProposer` proposes (same block, same
    distributions, same uniforms from the same generator), without its per-round allocations.

    Args:
        drafter: a ``DSparkDrafter`` with the target head attached.
        temperature: sampling temperature (part of the compiled graph).
        capacity: context positions per row to start with; grows to the next power of two when a batch needs
            more (each size compiles once).
        compile: compile the round with ``torch.compile`` (eager on failure).
    """

    def __init__(self, drafter: nn.Module, temperature: float, *, capacity: int = 256, compile: bool = False) -> None:
        self.drafter = drafter
        self.num_predictions = drafter.config.num_predictions
        self.width = self.num_predictions + 1  # a round commits at most every draft plus one token
        self.round = _DraftRound(drafter, temperature)
        parameter = drafter.fc.weight
        self.device, self.dtype = parameter.device, parameter.dtype
        self.step = CompiledStep(self.round, enabled=compile, name="draft step", device=self.device)
        self.batch = 0
        self.capacity = 0
        self._requested_capacity = capacity

    @property
    def compile_seconds(self) -> float:
        return self.step.compile_seconds

    def _reserve(self, batch: int, needed: int) -> None:
        needed += 2 * self.width
        if batch == self.batch and needed <= self.capacity:
            return
        capacity = max(buffer_capacity(needed), self.capacity)
        attention = self.drafter.layers[0].self_attn
        shape = (batch, attention.num_kv_heads, capacity, attention.head_dim)
        self.round.resize(shape, self.device, self.dtype)  # growing: what is injected stays
        self.batch, self.capacity = batch, capacity

    def begin(self, batch: int, capacity: int = 0) -> list[StaticDraftState]:
        """States of a new batch of ``batch`` requests needing up to ``capacity`` positions each."""
        self._reserve(batch, max(capacity, self._requested_capacity))
        return [StaticDraftState(row=row) for row in range(batch)]

    def new_state(self) -> StaticDraftState:
        raise TypeError("StaticDSparkProposer hands out states for a whole batch: use begin(batch)")

    @torch.no_grad()
    def propose(
        self,
        requests: Sequence[DraftRequest],
        temperature: float,
        generator: torch.Generator | None,
        stop_token_ids: Sequence[int] = (),
    ) -> list[Proposal]:
        if temperature != self.round.temperature:
            raise ValueError(f"proposer built for temperature {self.round.temperature}, asked for {temperature}")
        batch, device = self.batch, self.device
        counts = [request.pending.shape[0] for request in requests]
        for request in requests:
            anchor_position = request.tokens.shape[0] - 1
            if request.state.length + request.pending.shape[0] != anchor_position:
                raise ValueError(
                    f"draft context covers {request.state.length} positions plus {request.pending.shape[0]} pending; "
                    f"the anchor is at {anchor_position}"
                )
        needed = max(request.tokens.shape[0] for request in requests) + self.width
        if needed > self.capacity:
            self._reserve(batch, needed)
        start = torch.zeros(batch, dtype=torch.long, device=device)
        for request in requests:
            start[request.state.row] = request.state.length
        if max(counts) > self.width:  # the prompt: inject all but the last ``width`` positions eagerly
            longest = max(counts) - self.width
            chunk = torch.zeros(batch, longest, self.round.drafter.fc.in_features, device=device)
            for request, count in zip(requests, counts, strict=True):
                head = max(count - self.width, 0)
                chunk[request.state.row, :head] = request.pending[:head].to(chunk.dtype)
            self.round.inject(chunk, start)
            for request, count in zip(requests, counts, strict=True):
                head = max(count - self.width, 0)
                request.state.length += head
                start[request.state.row] += head
        pending = torch.zeros(batch, self.width, self.round.drafter.fc.in_features, device=device)
        pending_count = torch.zeros(batch, dtype=torch.long, device=device)
        anchors = torch.zeros(batch, dtype=torch.long, device=device)
        for request in requests:
            remaining = request.tokens.shape[0] - 1 - request.state.length  # positions not yet injected
            row, tail = request.state.row, request.pending[request.pending.shape[0] - remaining :]
            pending[row, : tail.shape[0]] = tail.to(pending.dtype)
            pending_count[row] = tail.shape[0]
            anchors[row] = request.tokens[-1]
        uniforms = uniform((batch, self.num_predictions), device, generator)
        tokens, probabilities, confidence = self.step(pending, pending_count, start, anchors, uniforms)
        proposals = []
        for request in requests:
            row = request.state.row
            request.state.length = request.tokens.shape[0] - 1
            limit = request.limit
            proposals.append(
                Proposal(
                    tokens=tokens[row, :limit],
                    probabilities=probabilities[row, :limit],
                    confidence_logits=None if confidence is None else confidence[row, :limit],
                )
            )
        return proposals
