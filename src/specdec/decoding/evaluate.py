"""Decode chat prompts with a drafter and, on the same prompts, without it: what ``specdec test``, the in-loop
speedup callback and the benchmark share.

Conversations go through the target's chat template (user turns only, optional system prompt, DeepSpec's
non-thinking mode by default); with several user turns, each turn is answered by the speculative decoder before
the next one is asked. Both decoders sample through the same fp32 path, seeded identically per prompt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from specdec.decoding.draft_length import RoundCosts, ThroughputDraftLength, measure_round_costs
from specdec.decoding.engine import DecodeOutput, SpeculativeDecoder, _warn_once
from specdec.decoding.options import DecodingOptions
from specdec.decoding.scheduler import DynamicTopK, PrefixScheduler, StepsPerSecond, profile_verification
from specdec.decoding.static_session import StaticTargetSession
from specdec.decoding.tree import TreeShape, TreeSpeculativeDecoder
from specdec.decoding.truncation import DynamicThreshold, StaticThreshold


def stop_tokens_of(target, options: DecodingOptions) -> list[int]:
    """The options' stop tokens, else the target's generation-config eos ids and its tokenizer's eos."""
    if options.stop_token_ids is not None:
        return list(options.stop_token_ids)
    from specdec.data.regeneration.regenerate import stop_token_ids

    return stop_token_ids(target)


def render_chat(target, messages: Sequence[dict[str, str]], options: DecodingOptions) -> list[int]:
    """Token ids of the prompt the chat template writes before the next assistant answer."""
    from specdec.data.regeneration.regenerate import render_prompt

    if options.system_prompt:
        messages = [{"role": "system", "content": options.system_prompt}, *messages]
    kwargs = {} if options.enable_thinking is None else {"enable_thinking": options.enable_thinking}
    text = render_prompt(target, messages, kwargs)
    return target.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass
class TurnOutputs:
    """One turn of a batch of conversations, decoded both ways."""

    speculative: DecodeOutput
    autoregressive: DecodeOutput | None


def build_decoder(target_model, drafter: nn.Module, options: DecodingOptions, stop_token_ids, session=None):
    """The decoder ``options`` ask for: a chain decoder (with its truncation policy) or a tree decoder.

    The prefix scheduler and top-K policies need a measured steps-per-second curve; the evaluator installs them
    (:meth:`SpeculativeEvaluator.prepare_policy`).
    """
    if options.tree is not None:
        if options.engine != "eager":
            _warn_once(f"engine {options.engine!r}: tree drafting and its baseline run the eager HF forward")
        return TreeSpeculativeDecoder(
            target_model,
            drafter,
            TreeShape.from_branching(options.tree),
            temperature=options.temperature,
            max_new_tokens=options.max_new_tokens,
            stop_token_ids=stop_token_ids,
        )
    policies = {"static": StaticThreshold, "dynamic": DynamicThreshold}
    policy = policies[options.truncation](options.threshold) if options.truncation in policies else None
    return SpeculativeDecoder(
        target_model,
        drafter,
        temperature=options.temperature,
        max_new_tokens=options.max_new_tokens,
        stop_token_ids=stop_token_ids,
        max_draft_tokens=options.max_draft_tokens,
        policy=policy,
        engine=options.engine,
        session=session,
        verification=options.verification,
    )


class SpeculativeEvaluator:
    """Decode conversations against ``target`` (a :class:`specdec.targets.Target`) with and without ``drafter``.

    ``session``: another evaluator's static target session to share (same target and layers, same engine), so
    evaluations at several temperatures compile the target's steps once.
    """

    def __init__(
        self,
        target,
        drafter: nn.Module,
        options: DecodingOptions | None = None,
        session: StaticTargetSession | None = None,
    ) -> None:
        self.target = target
        self.options = options or DecodingOptions()
        self.stop_token_ids = stop_tokens_of(target, self.options)
        self.decoder = build_decoder(target.model, drafter, self.options, self.stop_token_ids, session)
        self.device = next(target.model.parameters()).device
        self.steps_per_second: StepsPerSecond | None = None  # measured for the prefix scheduler / top-K
        self.costs: RoundCosts | None = None  # measured by warmup() when the draft length is chosen from costs
        self.warmup_seconds = 0.0  # warm-up, compilation and cost measurement (outside every timed decode)

    @property
    def draft_policy(self) -> ThroughputDraftLength | None:
        policy = self.decoder.policy
        return policy if isinstance(policy, ThroughputDraftLength) else None

    @property
    def chooses_draft_length(self) -> bool:
        options = self.options
        chain = options.tree is None and options.truncation == "none"
        return chain and options.draft_length == "auto" and self.decoder.max_draft_tokens > 1

    @property
    def mode(self) -> str:
        return self.options.mode

    def prepare_policy(self) -> None:
        """Measure ``SPS(B)`` on the decoder's own session and install the prefix scheduler / top-K policy."""
        if self.options.truncation not in ("prefix", "topk") or self.decoder.policy is not None:
            return
        rows = self.options.batch_size
        widths = range(1, self.decoder.max_draft_tokens + 2)
        was_training = self.decoder.drafter.training
        self.decoder.drafter.eval()
        try:
            self.steps_per_second = profile_verification(
                self.target.model, [rows * width for width in widths], rows=rows, session=self.decoder.session
            )
        finally:
            self.decoder.drafter.train(was_training)
        sps = self.steps_per_second
        self.decoder.policy = PrefixScheduler(sps) if self.options.truncation == "prefix" else DynamicTopK(sps)

    @property
    def max_drafts(self) -> int:
        return self.decoder.max_draft_tokens

    def _generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def decode(self, prompts: Sequence[Sequence[int]], seed: int, measure_speedup: bool | None = None) -> TurnOutputs:
        """One batch of token prompts, speculative then (when measuring) autoregressive, from the same seed."""
        measure = self.options.measure_speedup if measure_speedup is None else measure_speedup
        self.prepare_policy()
        was_training = self.decoder.drafter.training
        self.decoder.drafter.eval()
        try:
            speculative = self.decoder.generate(prompts, self._generator(seed))
            autoregressive = None
            if measure:  # on the decoder's own target session: the same compiled forwards
                autoregressive = self.decoder.autoregressive(prompts, self._generator(seed))
        finally:
            self.decoder.drafter.train(was_training)
        return TurnOutputs(speculative, autoregressive)

    def answer_text(self, token_ids: Sequence[int]) -> str:
        ids = [token for token in token_ids if token not in self.stop_token_ids]
        return self.target.tokenizer.decode(ids, skip_special_tokens=True)

    def conversations(self, conversations: Sequence[Sequence[str]], seed: int) -> list[TurnOutputs]:
        """Decode every user turn of each conversation (in batches per turn); one entry per turn index."""
        histories: list[list[dict[str, str]]] = [[] for _ in conversations]
        outputs = []
        for turn in range(max(len(turns) for turns in conversations)):
            rows = [row for row, turns in enumerate(conversations) if turn < len(turns)]
            prompts = []
            for row in rows:
                histories[row].append({"role": "user", "content": conversations[row][turn]})
                prompts.append(render_chat(self.target, histories[row], self.options))
            decoded = self.decode(prompts, seed + turn)
            for row, result in zip(rows, decoded.speculative.results, strict=True):
                histories[row].append({"role": "assistant", "content": self.answer_text(result.token_ids)})
            outputs.append(decoded)
        return outputs

    def warmup(self, prompts: int | None = None) -> None:
        """Untimed decodes of a short prompt by both decoders (compilation, allocators, lazy initialisation).

        With ``draft_length='auto'`` it then measures the round costs on the same session and installs a
        :class:`ThroughputDraftLength` policy that chooses the draft length from them.
        """
        began = time.perf_counter()
        count = self.options.warmup_prompts if prompts is None else prompts
        ids = render_chat(self.target, [{"role": "user", "content": "Hello"}], self.options)
        was_training = self.decoder.drafter.training
        self.decoder.drafter.eval()
        try:
            self.decoder.warm_up([ids] * self.options.batch_size)  # every compiled shape, before anything is timed
        finally:
            self.decoder.drafter.train(was_training)
        self.prepare_policy()
        for index in range(count):
            self.decode([ids], seed=index)
        if self.chooses_draft_length and self.costs is None:
            was_training = self.decoder.drafter.training
            self.decoder.drafter.eval()
            try:
                self.costs = measure_round_costs(self.decoder, ids)
            finally:
                self.decoder.drafter.train(was_training)
            self.decoder.policy = ThroughputDraftLength(self.costs, self.decoder.max_draft_tokens)
        self.warmup_seconds += time.perf_counter() - began

    @property
    def compile_seconds(self) -> float:
        return self.decoder.compile_seconds
