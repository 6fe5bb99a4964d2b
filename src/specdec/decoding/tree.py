"""Tree drafting: several candidates per position, verified by the target in one forward, still lossless.

A round drafts a token tree under the last committed token (the root): every node's children are drawn from
the drafter's distribution q at that node *without replacement* (child i from q with the earlier siblings'
tokens removed and renormalised — distinct siblings, so no verification slot is spent twice; at T = 0 this is
the draft's top-k). The target scores root and nodes in one forward with a tree attention mask (each node sees
the committed context and its own ancestors, at position = root position + depth).

Verification walks down from the root (recursive rejection over siblings): at a node with target distribution
r = p, child i is accepted iff ``u · q_i(c_i) < r(c_i)``; otherwise r ← norm(max(r − q_i, 0)) and the next child
is tried. On acceptance the walk moves into that child; when every child is rejected (or at a leaf), the
correction/bonus token is drawn from r. Why this is lossless: given the earlier siblings, c_i ~ q_i and the
residual after its rejection does not depend on c_i, so by induction over the remaining siblings the token
leaving a node is distributed as r at that stage — min(q_i, r) + (1 − Σ min(q_i, r)) · norm(max(r − q_i, 0)) = r —
hence as p at the first stage. The subtree of the accepted child was drawn given that child only, so the same
argument applies one level down. Only the accepted path stays in the target's KV cache and the drafter's state.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn
from transformers import PreTrainedModel

from specdec.decoding.engine import DecodeOutput, GenerationResult
from specdec.decoding.proposers import Eagle3State
from specdec.decoding.target_session import TargetSession, TargetStep
from specdec.sampling import accept_draft, draw, residual_distribution, token_probabilities, uniform


# ---- tree shapes ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TreeShape:
    """A static draft-tree topology: ``parents[i - 1]`` is the parent of node ``i`` (node 0 is the root).

    Parents precede their children and siblings are numbered in drawing order (rank 0 first).
    """

    parents: tuple[int, ...]

    def __post_init__(self) -> None:
        for node, parent in enumerate(self.parents, start=1):
            if not 0 <= parent < node:
                raise ValueError(f"node {node} has parent {parent}; parents must precede their children")

    @classmethod
    def chain(cls, length: int) -> TreeShape:
        return cls(tuple(range(length)))

    @classmethod
    def from_branching(cls, branching: Sequence[int]) -> TreeShape:
        """Full tree: every node at depth d has ``branching[d]`` children."""
        parents: list[int] = []
        level = [0]
        for width in branching:
            next_level = []
            for parent in level:
                for _ in range(width):
                    parents.append(parent)
                    next_level.append(len(parents))
            level = next_level
        return cls(tuple(parents))

    @classmethod
    def best_first(cls, budget: int, acceptance: Sequence[float], max_depth: int, max_children: int = 4) -> TreeShape:
        """The ``budget`` nodes most likely to be accepted, under a simple acceptance model.

        A rank-r child at depth d is taken to be accepted with probability ``a_d (1 − a_d)^r`` once its parent
        is (``a_d`` = ``acceptance[d - 1]``, the last value repeated); a node's value is the product along its
        path, i.e. its contribution to the expected accepted length, so the greedy top-``budget`` set is the best
        subtree of that model (values only shrink downwards, so it is always a valid tree).
        """
        if budget < 0 or max_depth < 0:
            raise ValueError("budget and max_depth must be >= 0")
        rates = [min(max(float(a), 1e-6), 1.0 - 1e-6) for a in acceptance] or [0.5]

        def rate(depth: int) -> float:
            return rates[min(depth, len(rates)) - 1]

        parents: list[int] = []
        depth_of = [0]
        children = [0]
        value = [1.0]
        heap: list[tuple[float, int, int]] = []  # (-value of the parent's next child, tie-break, parent)

        def push(node: int) -> None:
            depth, rank = depth_of[node] + 1, children[node]
            if depth <= max_depth and rank < max_children:
                candidate = value[node] * rate(depth) * (1 - rate(depth)) ** rank
                heapq.heappush(heap, (-candidate, len(parents), node))

        push(0)
        while heap and len(parents) < budget:
            negative, _, parent = heapq.heappop(heap)
            parents.append(parent)
            depth_of.append(depth_of[parent] + 1)
            children.append(0)
            value.append(-negative)
            children[parent] += 1
            push(parent)
            push(len(parents))
        return cls(tuple(parents))

    @property
    def num_nodes(self) -> int:
        """Draft nodes (the verification budget: tokens verified per round besides the root)."""
        return len(self.parents)

    @cached_property
    def depths(self) -> tuple[int, ...]:
        depths = [0]
        for parent in self.parents:
            depths.append(depths[parent] + 1)
        return tuple(depths)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        children: list[list[int]] = [[] for _ in range(self.num_nodes + 1)]
        for node, parent in enumerate(self.parents, start=1):
            children[parent].append(node)
        return tuple(tuple(c) for c in children)

    def truncated(self, max_depth: int) -> TreeShape:
        """The nodes at depth <= ``max_depth`` (renumbered, order kept)."""
        keep = [node for node in range(1, self.num_nodes + 1) if self.depths[node] <= max_depth]
        new_id = {0: 0, **{node: index for index, node in enumerate(keep, start=1)}}
        return TreeShape(tuple(new_id[self.parents[node - 1]] for node in keep))

    def ancestry(self, device: torch.device | None = None) -> torch.Tensor:
        """[N + 1, N + 1] bool: ``[i, j]`` iff node j is node i or one of its ancestors."""
        size = self.num_nodes + 1
        mask = torch.eye(size, dtype=torch.bool)
        for node, parent in enumerate(self.parents, start=1):
            mask[node] |= mask[parent]
        return mask.to(device)

    def path(self, node: int) -> list[int]:
        """Nodes from the root's first child down to ``node`` (empty for the root)."""
        nodes = []
        while node != 0:
            nodes.append(node)
            node = self.parents[node - 1]
        return nodes[::-1]


# ---- drafted trees and their verification ------------------------------------------------------------------
@dataclass
class DraftTree:
    """Tokens of root and nodes, and the exact fp32 distribution (over the target vocabulary) each was drawn from."""

    shape: TreeShape
    tokens: torch.Tensor  # [N + 1] long, the root (last committed token) first
    probabilities: torch.Tensor  # [N + 1, V] fp32; row 0 unused


def draw_children(
    logits: torch.Tensor, counts: Sequence[int], temperature: float, generator: torch.Generator | None
) -> tuple[list[list[int]], list[list[torch.Tensor]]]:
    """Children of several parents, each parent's drawn without replacement from its own ``logits`` row.

    Child r of a parent is drawn from ``token_probabilities`` of the logits with the parent's earlier children
    masked out — the q_r the acceptance test uses for it. Returns per parent the token indices (in the logits'
    vocabulary) and their q_r rows.
    """
    logits = logits.float().clone()
    tokens: list[list[int]] = [[] for _ in counts]
    distributions: list[list[torch.Tensor]] = [[] for _ in counts]
    for rank in range(max(counts, default=0)):
        rows = [row for row, count in enumerate(counts) if count > rank]
        if rank >= logits.shape[-1]:
            raise ValueError(f"{rank + 1} children requested from a vocabulary of {logits.shape[-1]}")
        q = token_probabilities(logits[rows], temperature)
        drawn = draw(q, generator)
        for index, row in enumerate(rows):
            token = int(drawn[index])
            tokens[row].append(token)
            distributions[row].append(q[index])
            logits[row, token] = float("-inf")
    return tokens, distributions


@dataclass
class TreeVerdict:
    """The accepted path (node ids, root excluded) and the token that follows it (None after a stop token)."""

    path: list[int]
    next_token: int | None


def verify_tree(
    tree: DraftTree,
    p: torch.Tensor,
    generator: torch.Generator | None,
    stop_token_ids: Sequence[int] = (),
) -> TreeVerdict:
    """Recursive rejection over siblings, from the root down (see the module docstring for why it is lossless).

    ``p`` [N + 1, V]: the target's fp32 distribution after each node (row 0: after the root).
    """
    stops = set(stop_token_ids)
    children = tree.shape.children
    tokens = tree.tokens.tolist()
    node, path = 0, []
    while True:
        remaining = p[node]
        for child in children[node]:
            token = tokens[child]
            u = uniform((), p.device, generator)
            q_child = tree.probabilities[child]
            if bool(accept_draft(remaining[token], q_child[token], u)):
                break
            remaining = residual_distribution(remaining, q_child)
        else:
            return TreeVerdict(path, int(draw(remaining, generator)))
        path.append(child)
        node = child
        if token in stops:
            return TreeVerdict(path, None)


class TreeTargetSession(TargetSession):
    """A :class:`TargetSession` that can verify a token tree and keep only its accepted path."""

    def extend_tree(self, input_ids: torch.Tensor, shape: TreeShape) -> TargetStep:
        """Append the tree ``input_ids`` [B, N + 1] (root first): node i at position next + depth(i), seeing the
        committed context and its own ancestors. Logits and features of all N + 1 slots."""
        if self.cache is None:
            raise RuntimeError("prefill() before extend_tree()")
        batch, width = input_ids.shape
        depths = torch.tensor(shape.depths, device=self.device)
        positions = self.next_position[:, None] + depths[None]
        ancestry = shape.ancestry(self.device)
        past = self.valid.shape[1]
        allowed = torch.cat([self.valid[:, None, :].expand(batch, width, past), ancestry.expand(batch, -1, -1)], -1)
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]  # additive: eager and SDPA alike
        self._chunk_start = past
        self._captured.clear()
        output = self.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_argument: self.cache},
        )
        self.valid = torch.cat([self.valid, torch.ones(batch, width, dtype=torch.bool, device=self.device)], dim=1)
        features = torch.cat([self._captured[i] for i in self.layer_ids], dim=-1) if self.layer_ids else None
        self._captured.clear()
        return TargetStep(logits=output.logits, features=features)

    def keep_paths(self, paths: Sequence[Sequence[int]]) -> None:
        """After :meth:`extend_tree`, keep per row the slots ``paths[r]`` (root and accepted nodes, ascending)."""
        start = self._chunk_start
        width = self.valid.shape[1] - start
        order = torch.zeros(len(paths), width, dtype=torch.long, device=self.device)
        for row, path in enumerate(paths):
            rest = [slot for slot in range(width) if slot not in set(path)]
            order[row] = torch.tensor(list(path) + rest, device=self.device)
        for layer in self.cache.layers:
            index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = torch.cat([layer.keys[:, :, :start], layer.keys[:, :, start:].gather(2, index)], dim=2)
            layer.values = torch.cat([layer.values[:, :, :start], layer.values[:, :, start:].gather(2, index)], dim=2)
        self.keep(torch.tensor([len(path) for path in paths], device=self.device))


# ---- drafting ------------------------------------------------------------------------------------------------
def _check_target(target: PreTrainedModel) -> None:
    layer_types = getattr(target.config, "layer_types", None) or []
    if any("sliding" in str(kind) for kind in layer_types) or getattr(target.config, "use_sliding_window", False):
        raise ValueError(
            "tree verification passes one dense 4-D mask to every layer; targets with sliding-window layers "
            "are not supported"
        )


class _DSparkTrees:
    """DSpark / DFlash: one block forward; branches share its slot hidden states, the Markov head conditions
    each node's children on the node's own token (and, for the RNN head, on its path)."""

    def __init__(self, drafter) -> None:
        self.drafter = drafter
        self.max_depth = drafter.config.num_predictions

    def new_state(self):
        return self.drafter.new_cache()

    def draft(self, state, tokens, pending, shape: TreeShape, temperature, generator) -> DraftTree:
        drafter = self.drafter
        position = tokens.shape[0] - 1
        hidden = drafter.block_hidden(tokens[-1:], position, pending[None], state)  # [1, P, H]
        base = drafter.target_head.logits(hidden)[0]  # [P, V]
        head = drafter.markov_head
        markov_state = head.initial_state(hidden[:, 0]) if head is not None else None
        node_tokens = [int(tokens[-1])] + [0] * shape.num_nodes
        node_states = {0: markov_state}
        q_rows = [torch.zeros(base.shape[-1], device=base.device)] * (shape.num_nodes + 1)
        for depth in range(shape.max_depth):
            parents = [n for n in range(shape.num_nodes + 1) if shape.depths[n] == depth and shape.children[n]]
            logits = base[depth].expand(len(parents), -1)
            states = None
            if head is not None:
                prev = torch.tensor([node_tokens[n] for n in parents], device=base.device)
                states = None if markov_state is None else torch.cat([node_states[n] for n in parents])
                bias, states = head.step(hidden[0, depth].expand(len(parents), -1), prev, states)
                logits = logits.float() + bias.float()
            drawn, distributions = draw_children(
                logits, [len(shape.children[n]) for n in parents], temperature, generator
            )
            for index, parent in enumerate(parents):
                for child, token, q in zip(shape.children[parent], drawn[index], distributions[index], strict=True):
                    node_tokens[child] = token
                    q_rows[child] = q
                    node_states[child] = None if states is None else states[index : index + 1]
        return DraftTree(shape, torch.tensor(node_tokens, device=base.device), torch.stack(q_rows))


class _Eagle3Trees:
    """Eagle3: level by level with its step function; tree entries of the draft cache see the injected context
    and their ancestors, and are dropped after the round (only step-0 entries of committed tokens stay)."""

    def __init__(self, drafter) -> None:
        self.drafter = drafter
        self.max_depth = drafter.config.ttt_length
        self.vocab_size = drafter.config.vocab_size

    def new_state(self) -> Eagle3State:
        return Eagle3State()

    def _inject(self, state: Eagle3State, tokens, pending) -> torch.Tensor:
        """Step-0 entries of the newly committed positions; returns the draft hidden at the anchor [H]."""
        drafter = self.drafter
        position = tokens.shape[0] - 1
        count = pending.shape[0]
        start = position - count
        if state.length != start:
            raise ValueError(f"Eagle3 draft cache covers {state.length} positions; pending features start at {start}")
        device = tokens.device
        positions = torch.arange(start, position, device=device)[None]
        query = torch.arange(count, device=device)[:, None]
        key = torch.arange(position, device=device)[None]
        mask = ((key < start) | (key - start <= query))[None, None]
        features = drafter.fc(pending[None].to(drafter.fc.weight.dtype))
        hidden, state.past = drafter.step(features, tokens[start + 1 : position + 1][None], positions, state.past, mask)
        state.length = position
        return hidden[0, -1]

    def draft(self, state: Eagle3State, tokens, pending, shape: TreeShape, temperature, generator) -> DraftTree:
        drafter = self.drafter
        device = tokens.device
        position = tokens.shape[0] - 1
        node_hidden = {0: self._inject(state, tokens, pending)}
        ids = drafter.draft_token_ids()
        node_tokens = [int(tokens[-1])] + [0] * shape.num_nodes
        q_rows = [torch.zeros(self.vocab_size, device=device)] * (shape.num_nodes + 1)
        ancestry = shape.ancestry(device)
        past, entries = state.past, []  # tree entries appended after the step-0 ones, in this node order
        for depth in range(shape.max_depth):
            parents = [n for n in range(shape.num_nodes + 1) if shape.depths[n] == depth and shape.children[n]]
            logits = drafter.logits(torch.stack([node_hidden[n] for n in parents]))
            drawn, distributions = draw_children(
                logits, [len(shape.children[n]) for n in parents], temperature, generator
            )
            level = []
            for index, parent in enumerate(parents):
                for child, token, q in zip(shape.children[parent], drawn[index], distributions[index], strict=True):
                    node_tokens[child] = int(ids[token])
                    q_full = torch.zeros(self.vocab_size, device=device)
                    q_full[ids] = q
                    q_rows[child] = q_full
                    if shape.children[child]:
                        level.append((child, parent))
            if not level:
                continue
            nodes = torch.tensor([child for child, _ in level], device=device)
            hidden_in = torch.stack([node_hidden[parent] for _, parent in level])[None]
            token_in = torch.tensor([node_tokens[child] for child, _ in level], device=device)[None]
            positions = torch.full((1, len(level)), position + depth, device=device)
            seen = ancestry[nodes][:, torch.tensor(entries + [c for c, _ in level], device=device, dtype=torch.long)]
            mask = torch.cat([torch.ones(len(level), state.length, dtype=torch.bool, device=device), seen], dim=1)
            hidden, past = drafter.step(hidden_in, token_in, positions, past, mask[None, None])
            for index, (child, _) in enumerate(level):
                node_hidden[child] = hidden[0, index]
            entries += [child for child, _ in level]
        return DraftTree(shape, torch.tensor(node_tokens, device=device), torch.stack(q_rows))


def tree_drafter_for(drafter: nn.Module) -> _DSparkTrees | _Eagle3Trees:
    from specdec.drafters import DSparkDrafter, Eagle3Drafter

    if isinstance(drafter, DSparkDrafter):
        return _DSparkTrees(drafter)
    if isinstance(drafter, Eagle3Drafter):
        return _Eagle3Trees(drafter)
    raise TypeError(f"no tree drafting for {type(drafter).__name__}; expected DSparkDrafter or Eagle3Drafter")


# ---- the decoder ---------------------------------------------------------------------------------------------
def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class TreeSpeculativeDecoder:
    """Speculative decoding with a draft tree, a batch of requests verified in one target forward per round.

    Each active row drafts its own tree (the drafter runs per row: its tree-state bookkeeping is per request)
    and all trees go through one target forward with a per-row tree mask; rows that finished only pad the
    forward. Near ``max_new_tokens`` the shape is cut to the depth the row with the most room left can use,
    and a row's committed tokens are cut at its own limit (a prefix of a lossless sample is lossless).

    Args:
        target: the HF causal LM (frozen, eval mode; full-attention layers).
        drafter: a ``DSparkDrafter`` or ``Eagle3Drafter`` with the target's head attached.
        shape: the draft tree; nodes deeper than the drafter predicts are dropped. Its node count is the
            verification budget (drafted tokens verified per round, as ``propose`` counts a chain's drafts).
        temperature, max_new_tokens, stop_token_ids: as for :class:`specdec.decoding.SpeculativeDecoder`.

    Tree verification runs the target's eager HF forward (a dense tree mask per round), so the decoder reports
    ``engine = 'eager'`` and its :meth:`autoregressive` baseline decodes on the same eager forward.
    """

    engine = "eager"
    compile_seconds = 0.0
    policy = None  # the tree's shape is the verification budget; no truncation policy applies
    session = None  # no static session: nothing compiled to share with other decoders

    def __init__(
        self,
        target: PreTrainedModel,
        drafter: nn.Module,
        shape: TreeShape,
        *,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        stop_token_ids: Sequence[int] = (),
    ) -> None:
        _check_target(target)
        self.target = target
        self.drafter = drafter
        self.trees = tree_drafter_for(drafter)
        self.shape = shape.truncated(self.trees.max_depth)
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = list(stop_token_ids)
        self.layer_ids = list(drafter.config.target_layer_ids)

    @property
    def max_draft_tokens(self) -> int:
        """The deepest accepted path a round can have (acceptance by position is tracked up to it)."""
        return max(self.shape.max_depth, 1)

    @torch.no_grad()
    def warm_up(self, prompts: Sequence[Sequence[int]]) -> None:
        """Decode ``prompts`` both ways once (allocators, lazy initialisation); nothing is compiled here."""
        device = next(self.target.parameters()).device
        saved = self.max_new_tokens
        self.max_new_tokens = min(saved, 2 * (self.shape.max_depth + 1) + 1)
        try:
            self.generate(prompts, torch.Generator(device=device).manual_seed(0))
            self.autoregressive(prompts, torch.Generator(device=device).manual_seed(0))
        finally:
            self.max_new_tokens = saved

    def autoregressive(self, prompts: Sequence[Sequence[int]], generator: torch.Generator | None = None):
        """Plain decoding on the same eager HF forward and sampling path (the equal-footing baseline)."""
        from specdec.decoding.engine import autoregressive_generate

        return autoregressive_generate(
            self.target,
            prompts,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            generator=generator,
        )

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], generator: torch.Generator | None = None) -> DecodeOutput:
        device = next(self.target.parameters()).device
        began = _now(device)
        results = [GenerationResult(prompt_ids=list(prompt)) for prompt in prompts]
        output = DecodeOutput(results=results)
        stops = set(self.stop_token_ids)
        with TreeTargetSession(self.target, self.layer_ids) as session:
            step = session.prefill([list(prompt) for prompt in prompts])
            first = draw(token_probabilities(step.logits[:, 0], self.temperature), generator).tolist()
            output.prefill_seconds = _now(device) - began
            tokens = [torch.tensor([*p, t], device=device) for p, t in zip(prompts, first, strict=True)]
            pending = [step.features[row, : len(prompt)] for row, prompt in enumerate(prompts)]
            states = [self.trees.new_state() for _ in prompts]
            for result, token in zip(results, first, strict=True):
                result.token_ids.append(token)
                result.stopped = token in stops
            active = [not r.stopped and len(r.token_ids) < self.max_new_tokens for r in results]
            while any(active):
                rows = [row for row, on in enumerate(active) if on]
                room = {row: self.max_new_tokens - len(results[row].token_ids) for row in rows}
                shape = self.shape.truncated(max(room.values()) - 1)
                tick = _now(device)
                trees = {
                    row: self.trees.draft(states[row], tokens[row], pending[row], shape, self.temperature, generator)
                    for row in rows
                }
                tock = _now(device)
                output.draft_seconds += tock - tick
                filler = next(iter(trees.values())).tokens
                input_ids = torch.stack([trees[row].tokens if row in trees else filler for row in range(len(results))])
                step = session.extend_tree(input_ids, shape)
                verdicts = {}
                for row in rows:
                    p = token_probabilities(step.logits[row], self.temperature)
                    verdicts[row] = verify_tree(trees[row], p, generator, self.stop_token_ids)
                kept = [[0, *verdicts[row].path] if row in verdicts else [] for row in range(len(results))]
                session.keep_paths(kept)
                output.verify_seconds += _now(device) - tock
                output.target_forwards += 1
                for row in rows:
                    result, verdict = results[row], verdicts[row]
                    committed = trees[row].tokens[verdict.path].tolist()
                    if verdict.next_token is not None:
                        committed.append(verdict.next_token)
                    committed = committed[: room[row]]
                    result.proposed.append(shape.num_nodes)
                    result.accepted.append(min(len(verdict.path), len(committed)))
                    result.committed.append(len(committed))
                    result.token_ids.extend(committed)
                    tokens[row] = torch.cat([tokens[row], torch.tensor(committed, device=device)])
                    pending[row] = step.features[row, kept[row]]
                    result.stopped = bool(stops.intersection(committed))
                    active[row] = not result.stopped and len(result.token_ids) < self.max_new_tokens
        output.seconds = _now(device) - began
        return output
