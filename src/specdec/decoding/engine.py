"""Lossless speculative decoding: prefill, propose, verify in one target forward, commit, and its baseline.

Each round the drafter proposes ``n`` tokens after the last committed one (the anchor); the target scores the
anchor and all drafts in one forward; drafts are accepted left to right while ``u · q(d) < p(d)``; at the first
rejection a token is drawn from ``norm(max(p - q, 0))``, and when all drafts pass a bonus token is drawn from the
target's next distribution. The committed tokens are then distributed exactly as the target's own samples. p
and q both come from :func:`specdec.sampling.token_probabilities` (fp32), which is also what drew the
drafts, and what :func:`autoregressive_generate` samples from.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from specdec.decoding.compiled import CompiledStep
from specdec.decoding.options import VERIFICATIONS
from specdec.decoding.proposers import DraftRequest, DSparkProposer, Proposal, proposer_for
from specdec.decoding.static_proposer import StaticDSparkProposer
from specdec.decoding.static_session import StaticTargetSession, round_up_to_bucket, supports_static_session
from specdec.decoding.target_session import TargetSession
from specdec.decoding.truncation import FixedLength, TruncationPolicy, truncate
from specdec.sampling import accept_draft, draw, residual_distribution, token_probabilities, uniform

ENGINES = ("eager", "static", "compiled")
VERIFICATION_TIMING_REPEATS = 5
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def static_session_for(
    target: PreTrainedModel, layer_ids: Sequence[int] | None, engine: str, capacity: int = 256
) -> StaticTargetSession | None:
    """The static (``engine='static'``) or compiled session of ``target``, or None for the eager HF path."""
    if engine == "eager":
        return None
    reason = supports_static_session(target)
    if reason is not None:
        _warn_once(f"engine {engine!r}: the target runs its eager HF forward ({reason})")
        return None
    return StaticTargetSession(target, layer_ids, capacity=capacity, compile=engine == "compiled")


def _check_shared_session(session: StaticTargetSession, target: PreTrainedModel, layer_ids, engine: str) -> None:
    if session.model is not target:
        raise ValueError("the shared session drives another target model")
    if list(session.layer_ids) != list(layer_ids):
        raise ValueError(f"the shared session returns layers {list(session.layer_ids)}, the drafter reads {layer_ids}")
    if engine == "eager" or session.step.enabled != (engine == "compiled"):
        compiled = "compiled" if session.step.enabled else "uncompiled"
        raise ValueError(f"engine {engine!r} cannot verify on a shared {compiled} static session")


@dataclass
class GenerationResult:
    """One request's generated tokens and, per verification round, its draft statistics."""

    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    proposed: list[int] = field(default_factory=list)  # drafts verified in each round
    accepted: list[int] = field(default_factory=list)  # leading drafts accepted in each round
    committed: list[int] = field(default_factory=list)  # tokens committed (accepted + bonus/correction)
    # per round, the confidence logits of the verified drafts ([proposed], fp32, calibrated) or None without a head
    confidence_logits: list[torch.Tensor | None] = field(default_factory=list)
    stopped: bool = False  # ended on a stop token (else on max_new_tokens)

    @property
    def rounds(self) -> int:
        return len(self.proposed)


@dataclass
class DecodeOutput:
    """Results of a batch and where its wall-clock time went (seconds, device-synchronised)."""

    results: list[GenerationResult]
    seconds: float = 0.0  # the whole call, prefill included
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0  # drafter: context injection and proposals
    verify_seconds: float = 0.0  # target verification forwards and the acceptance test
    target_forwards: int = 0  # forwards after the prefill (verification rounds, or decode steps)

    @property
    def new_tokens(self) -> int:
        return sum(len(result.token_ids) for result in self.results)


class _Clock:
    """Wall-clock sections that wait for the device first, so asynchronous kernels are counted where they run."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def acceptance_test(temperature: float):
    """The acceptance test of one verified round, as a pure function of tensors (compiled once, at the widest
    round's bucket: its cost hardly depends on the width, while every extra graph costs seconds to compile).

    ``logits`` [A, W, V] are the target's at the anchor and each draft, ``q`` [A, W, V] the drafter's
    distributions, ``drafts`` [A, W - 1] with ``counts`` [A] of them verified, ``u`` [A, W - 1] the acceptance
    uniforms and ``u_next`` [A] the uniform of the residual (after a rejection) or bonus (after full
    acceptance) draw. Returns accepted drafts, the next token, whether a stop token ended the row among its
    accepted drafts (then no token follows), and whether the next token is a stop token.
    """

    def run(logits, q, drafts, counts, u, u_next, stops):
        rows, width = logits.shape[0], logits.shape[1]
        p = token_probabilities(logits, temperature)
        slot = torch.arange(width - 1, device=logits.device)
        proposed = slot[None] < counts[:, None]
        p_draft = p[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
        q_draft = q[:, :-1].gather(-1, drafts[..., None]).squeeze(-1)
        passed = accept_draft(p_draft, q_draft, u) & proposed
        accepted = passed.long().cumprod(dim=-1).sum(dim=-1)  # [A]
        # A stop token among the accepted drafts ends the request right there (no bonus token after it).
        stop_hit = torch.isin(drafts, stops) & (slot[None] < accepted[:, None])
        sentinel = torch.ones(rows, 1, dtype=torch.bool, device=logits.device)
        first_stop = torch.cat([stop_hit, sentinel], dim=-1).long().argmax(dim=-1)  # width - 1 when there is none
        stopped_early = first_stop < width - 1
        accepted = torch.where(stopped_early, first_stop + 1, accepted)
        index = torch.arange(rows, device=logits.device)
        following = residual_distribution(p[index, accepted], q[index, accepted])
        next_tokens = draw(following, uniforms=u_next)
        return accepted, next_tokens, stopped_early, torch.isin(next_tokens, stops)

    return run


def _kernel_acceptance_test(temperature: float, verification: str, device: torch.device) -> Callable | None:
    """The Triton acceptance test where ``verification`` may use it on ``device``, else None (``'kernel'``
    where it cannot run raises). ``auto`` considers it on CUDA only: the CPU interpreter is no fast path."""
    if verification == "reference" or (verification == "auto" and device.type != "cuda"):
        return None
    from specdec import kernels

    if not kernels.kernels_usable_on(device.type):
        if verification == "kernel":
            reason = (
                "Triton is not installed"
                if not kernels.TRITON_AVAILABLE
                else f"Triton kernels run on CUDA, or on CPU only with TRITON_INTERPRET=1 (device {device.type!r})"
            )
            raise ValueError(f"verification='kernel' cannot run here: {reason}")
        return None
    from specdec.kernels.verification import verify_round

    def run(logits, q, drafts, counts, u, u_next, stops):
        return verify_round(logits, q, drafts, counts, u, u_next, stops, temperature)

    return run


def _first_tokens(session: TargetSession | StaticTargetSession, prompts, temperature, generator, reserve: int = 0):
    step = session.prefill(prompts, reserve=reserve)
    probabilities = token_probabilities(step.logits[:, 0], temperature)
    return step, draw(probabilities, generator)


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class SpeculativeDecoder:
    """Speculative decoding of a target with a DSpark / DFlash / Eagle3 drafter (batch size 1 or more).

    Args:
        target: the HF causal LM (frozen, eval mode).
        drafter: a ``DSparkDrafter`` or ``Eagle3Drafter`` with the target's head attached, on the same device.
        temperature: sampling temperature of target and drafter; below 1e-5 greedy.
        max_new_tokens: tokens generated per request (never exceeded: the last rounds draft fewer tokens).
        stop_token_ids: a committed stop token ends its request (it is part of the output).
        max_draft_tokens: cap on drafts per round (default: all the drafter predicts).
        policy: a truncation policy (``specdec.decoding.truncation`` / ``scheduler``) choosing, after drafting,
            how many drafts of each active row are verified; told each round's acceptance after verification.
        engine: ``eager`` — the HF forward with a growing cache and the eager proposers (the reference);
            ``static`` — preallocated KV and draft-context buffers driven at fixed shapes, run eagerly;
            ``compiled`` — the same fixed-shape steps compiled with ``torch.compile`` (one graph per token-count
            bucket, compiled on first use; a compiler failure warns once and runs them eagerly). Targets and
            drafters the static path does not drive (:func:`supports_static_session`; Eagle3 drafts) keep
            their eager half, with a warning.
        capacity: positions per request the static buffers hold before they must grow (prompt + answer).
        session: a static session of ``target`` to verify on instead of building one (decoders at several
            temperatures share the target's compiled steps this way); it must return ``drafter``'s layers and
            be compiled exactly when ``engine='compiled'``.
        verification: how the acceptance test runs: ``reference`` — :func:`acceptance_test` (compiled with
            the engine); ``kernel`` — the fused Triton kernels of ``specdec.kernels.verification`` (CUDA, or
            CPU under ``TRITON_INTERPRET=1``; elsewhere a ValueError); ``auto`` — the kernel only where it
            is measured faster: on CUDA both are timed on the first round :meth:`warm_up` verifies, elsewhere
            the reference. ``verification_path`` says which one runs.
    """

    def __init__(
        self,
        target: PreTrainedModel,
        drafter: nn.Module,
        *,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        stop_token_ids: Sequence[int] = (),
        max_draft_tokens: int | None = None,
        policy: TruncationPolicy | None = None,
        engine: str = "eager",
        capacity: int = 256,
        session: StaticTargetSession | None = None,
        verification: str = "auto",
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: expected one of {ENGINES}")
        if verification not in VERIFICATIONS:
            raise ValueError(f"verification {verification!r}: expected one of {VERIFICATIONS}")
        self.target = target
        self.drafter = drafter
        self.engine = engine
        self.layer_ids = list(drafter.config.target_layer_ids)
        if session is not None:
            _check_shared_session(session, target, self.layer_ids, engine)
        self.session = session if session is not None else static_session_for(target, self.layer_ids, engine, capacity)
        self.proposer = proposer_for(drafter)
        if engine != "eager":
            if isinstance(self.proposer, DSparkProposer):
                self.proposer = StaticDSparkProposer(
                    drafter, temperature, capacity=capacity, compile=engine == "compiled"
                )
            else:
                _warn_once(f"engine {engine!r}: {type(drafter).__name__} drafts with its eager proposer")
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = list(stop_token_ids)
        limit = self.proposer.num_predictions
        self.max_draft_tokens = limit if max_draft_tokens is None else min(limit, max_draft_tokens)
        self.policy = policy
        device = _device_of(target)
        compile_acceptance = engine == "compiled" and self.session is not None
        self._acceptance = CompiledStep(
            acceptance_test(temperature), enabled=compile_acceptance, name="acceptance test", device=device
        )
        self.verification = verification
        self._kernel_acceptance = _kernel_acceptance_test(temperature, verification, device)
        self.verification_path = "kernel" if verification == "kernel" else "reference"
        # auto on CUDA: decided by timing both paths at the first round verified during warm_up
        self._verification_undecided = verification == "auto" and self._kernel_acceptance is not None
        self._warming_up = False
        self._rows_warmed: set[int] = set()  # batch sizes whose row buckets the warm-up has compiled
        self.verification_seconds: dict[str, float] = {}  # median per path where auto timed them

    @property
    def compile_seconds(self) -> float:
        """Time spent compiling the target and draft steps so far (zero unless ``engine='compiled'``)."""
        parts = (self.session, self.proposer, self._acceptance)
        return sum(getattr(part, "compile_seconds", 0.0) for part in parts)

    @torch.no_grad()
    def warm_up(self, prompts: Sequence[Sequence[int]]) -> None:
        """Decode ``prompts`` (one batch) at every verification bucket and plainly, so every compiled shape exists.

        Compilation then happens here, before any timed decode (a bucket first met in a timed decode would
        put seconds of compilation inside it).
        """
        saved = self.policy, self.max_new_tokens
        widths = range(2, self.max_draft_tokens + 2)
        buckets = {round_up_to_bucket(w, self.session.buckets) for w in widths} if self.session else {max(widths)}
        self._warming_up = True
        try:
            for bucket in sorted(buckets):
                drafts = min(bucket - 1, self.max_draft_tokens)
                self.policy, self.max_new_tokens = FixedLength(drafts), 2 * (drafts + 1) + 1
                self.generate(prompts, torch.Generator(device=_device_of(self.target)).manual_seed(0))
        finally:
            self.policy, self.max_new_tokens = saved
            self._warming_up = False
        self.autoregressive(prompts, torch.Generator(device=_device_of(self.target)).manual_seed(0))

    def _session(self) -> TargetSession | StaticTargetSession:
        return self.session if self.session is not None else TargetSession(self.target, self.layer_ids)

    def autoregressive(self, prompts: Sequence[Sequence[int]], generator: torch.Generator | None = None):
        """Plain decoding of the same prompts on this decoder's own target session (the equal-footing baseline)."""
        return autoregressive_generate(
            self.target,
            prompts,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            stop_token_ids=self.stop_token_ids,
            generator=generator,
            session=self.session,
        )

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], generator: torch.Generator | None = None) -> DecodeOutput:
        device = _device_of(self.target)
        clock = _Clock(device)
        began = clock.now()
        results = [GenerationResult(prompt_ids=list(prompt)) for prompt in prompts]
        output = DecodeOutput(results=results)
        stops = torch.tensor(self.stop_token_ids or [-1], device=device)
        reserve = self.max_new_tokens + self.max_draft_tokens + 1
        with self._session() as session:
            step, first = _first_tokens(session, prompts, self.temperature, generator, reserve)
            output.prefill_seconds = clock.now() - began
            tokens = [torch.cat([torch.as_tensor(p, device=device), first[i : i + 1]]) for i, p in enumerate(prompts)]
            pending = [step.features[row, : len(prompt)] for row, prompt in enumerate(prompts)]
            states = self.proposer.begin(len(prompts), max(len(p) for p in prompts) + reserve)
            active = []
            for row, result in enumerate(results):
                result.token_ids.append(int(first[row]))
                result.stopped = bool(torch.isin(first[row], stops))
                active.append(not result.stopped and self.max_new_tokens > 1)

            while any(active):
                rows = [row for row in range(len(prompts)) if active[row]]
                tick = clock.now()
                requests = [
                    DraftRequest(
                        state=states[row],
                        tokens=tokens[row],
                        pending=pending[row],
                        limit=min(self.max_draft_tokens, self.max_new_tokens - len(results[row].token_ids) - 1),
                    )
                    for row in rows
                ]
                proposals = self.proposer.propose(requests, self.temperature, generator, self.stop_token_ids)
                if self.policy is not None:  # decided from the drafts alone, before verification: lossless
                    proposals = truncate(proposals, self.policy.lengths(proposals))
                tock = clock.now()
                output.draft_seconds += tock - tick
                kept, new_tokens, finished, features = self._verify(session, rows, tokens, proposals, stops, generator)
                output.verify_seconds += clock.now() - tock
                output.target_forwards += 1
                for index, row in enumerate(rows):
                    result = results[row]
                    accepted = int(kept[row]) - 1
                    committed = new_tokens[index]
                    result.proposed.append(len(proposals[index].tokens))
                    confidence = proposals[index].confidence_logits
                    if confidence is not None:
                        confidence = confidence[: len(proposals[index].tokens)].detach().float().cpu()
                    result.confidence_logits.append(confidence)
                    result.accepted.append(accepted)
                    result.committed.append(len(committed))
                    result.token_ids.extend(committed)
                    tokens[row] = torch.cat([tokens[row], torch.tensor(committed, device=device)])
                    pending[row] = features[row, : accepted + 1]
                    result.stopped = finished[index]
                    active[row] = not finished[index] and len(result.token_ids) < self.max_new_tokens
                if self.policy is not None:
                    verified = [results[row].proposed[-1] for row in rows]
                    self.policy.observe(verified, [results[row].accepted[-1] for row in rows])
        output.seconds = clock.now() - began
        return output

    def _verify(self, session, rows, tokens, proposals: list[Proposal], stops, generator):
        """One target forward over [anchor, drafts] of every active row, the acceptance test and the commit."""
        batch = len(tokens)
        device = stops.device
        counts = torch.zeros(batch, dtype=torch.long, device=device)
        for index, row in enumerate(rows):
            counts[row] = len(proposals[index].tokens)
        width = int(counts.max()) + 1
        input_ids = torch.zeros(batch, width, dtype=torch.long, device=device)
        lengths = torch.zeros(batch, dtype=torch.long, device=device)
        for index, row in enumerate(rows):
            drafts = proposals[index].tokens
            input_ids[row, 0] = tokens[row][-1]
            input_ids[row, 1 : 1 + len(drafts)] = drafts
            lengths[row] = 1 + len(drafts)
        step = session.extend(input_ids, lengths)

        active = torch.tensor(rows, device=device)
        logits = step.logits[active]  # [A, width, V]
        q = torch.zeros(len(rows), width, logits.shape[-1], device=device)
        for index in range(len(rows)):
            drafted = proposals[index].probabilities
            q[index, : drafted.shape[0]] = drafted.to(device)
        drafts = input_ids[active, 1:]  # [A, width - 1]
        u = uniform(tuple(drafts.shape), device, generator)
        u_next = uniform((len(rows),), device, generator)  # the residual / bonus draw's
        verified = counts[active]
        inputs = (logits, q, drafts, verified, u, u_next, stops)
        if self._warming_up:
            self._warm_acceptance(inputs, batch)
        if self.verification_path == "kernel":  # any shape: nothing to pad
            accepted, next_tokens, stopped_early, next_is_stop = self._kernel_acceptance(*inputs)
        elif self._acceptance.compiled:  # few graphs: padded rows and slots are never verified
            outputs = self._acceptance(*self._padded(inputs, batch))
            accepted, next_tokens, stopped_early, next_is_stop = (output[: len(rows)] for output in outputs)
        else:
            accepted, next_tokens, stopped_early, next_is_stop = self._acceptance(*inputs)

        kept = torch.zeros(batch, dtype=torch.long, device=device)
        kept[active] = accepted + 1
        session.keep(kept)
        new_tokens, finished = [], []
        accepted_list, early_list = accepted.tolist(), stopped_early.tolist()
        for position, count in enumerate(accepted_list):
            committed = drafts[position, :count].tolist()
            if not early_list[position]:
                committed.append(int(next_tokens[position]))
            new_tokens.append(committed)
            finished.append(bool(early_list[position] or next_is_stop[position]))
        return kept, new_tokens, finished, step.features

    def _padded(self, inputs: tuple[torch.Tensor, ...], batch: int) -> tuple[torch.Tensor, ...]:
        """Round inputs as the compiled reference takes them: slots padded to the widest round's bucket (with a
        session) or width, active rows to a power of two (at most ``batch``), so rows finishing one after another
        meet graphs the warm-up compiled. Padded slots and rows verify nothing (count 0, u = 1)."""
        logits, q, drafts, verified, u, u_next, stops = inputs
        widest = self.max_draft_tokens + 1
        width = round_up_to_bucket(widest, self.session.buckets) if self.session is not None else widest
        rows = min(batch, 1 << (logits.shape[0] - 1).bit_length())
        grow_slots, grow_rows = max(width - logits.shape[1], 0), rows - logits.shape[0]
        logits, q = F.pad(logits, (0, 0, 0, grow_slots, 0, grow_rows)), F.pad(q, (0, 0, 0, grow_slots, 0, grow_rows))
        drafts, u = F.pad(drafts, (0, grow_slots, 0, grow_rows)), F.pad(u, (0, grow_slots, 0, grow_rows), value=1.0)
        verified, u_next = F.pad(verified, (0, grow_rows)), F.pad(u_next, (0, grow_rows), value=0.5)
        return logits, q, drafts, verified, u, u_next, stops

    def _warm_acceptance(self, inputs: tuple[torch.Tensor, ...], batch: int) -> None:
        """During the warm-up: choose the verification path (``auto``) and compile the reference for every row
        bucket below ``batch`` (the warm-up's rows all run to the end; real rows finish one after another)."""
        if self._verification_undecided:
            self._choose_verification(inputs, batch)
        if self.verification_path != "reference" or not self._acceptance.compiled or batch in self._rows_warmed:
            return
        rows = 1
        while rows < min(batch, inputs[0].shape[0]):
            self._acceptance(*self._padded(tuple(value[:rows] for value in inputs[:6]) + inputs[6:], batch))
            rows *= 2
        self._rows_warmed.add(batch)  # every later round of the warm-up would meet the same graphs

    def _choose_verification(self, inputs: tuple[torch.Tensor, ...], batch: int) -> None:
        """Time the reference and the kernel on this round's rows at the widest round's width (what the compiled
        reference always runs at), each once untimed (compilation) and then a median of synchronised repeats,
        and keep the faster."""
        padded = self._padded(inputs, batch)
        clock = _Clock(padded[0].device)
        for path, run in (("reference", self._acceptance), ("kernel", self._kernel_acceptance)):
            run(*padded)
            seconds = []
            for _ in range(VERIFICATION_TIMING_REPEATS):
                began = clock.now()
                run(*padded)
                seconds.append(clock.now() - began)
            self.verification_seconds[path] = statistics.median(seconds)
        faster = min(self.verification_seconds, key=self.verification_seconds.get)
        self.verification_path = faster
        self._verification_undecided = False


@torch.no_grad()
def autoregressive_generate(
    target: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 256,
    stop_token_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    session: StaticTargetSession | None = None,
) -> DecodeOutput:
    """Plain decoding of the target, one token per forward, through the same cache and sampling path.

    ``session``: a static session to decode on (the one the speculative decoder verifies with, so both
    decoders run the same compiled forwards); default a fresh HF session.
    """
    device = _device_of(target)
    clock = _Clock(device)
    began = clock.now()
    results = [GenerationResult(prompt_ids=list(prompt)) for prompt in prompts]
    output = DecodeOutput(results=results)
    stops = torch.tensor(list(stop_token_ids) or [-1], device=device)
    with session if session is not None else TargetSession(target) as session:
        _, token = _first_tokens(session, prompts, temperature, generator, max_new_tokens)
        output.prefill_seconds = clock.now() - began
        active = torch.ones(len(prompts), dtype=torch.bool, device=device)
        while True:
            for row in active.nonzero().flatten().tolist():
                results[row].token_ids.append(int(token[row]))
            done = torch.isin(token, stops)
            for row in (active & done).nonzero().flatten().tolist():
                results[row].stopped = True
            active = active & ~done
            lengths = torch.tensor([len(result.token_ids) for result in results], device=device)
            active = active & (lengths < max_new_tokens)
            if not bool(active.any()):
                break
            kept = active.long()
            step = session.extend(token[:, None], kept)
            session.keep(kept)
            output.target_forwards += 1
            token = draw(token_probabilities(step.logits[:, 0], temperature), generator)
    output.seconds = clock.now() - began
    return output
