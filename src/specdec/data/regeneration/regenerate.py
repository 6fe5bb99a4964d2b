"""Answer regeneration: every user turn of every prompt answered by the target, written exactly once per input.

A drafter learns the target's own distribution best from the target's own answers, so the original assistant
messages are dropped and each user turn is answered in order, the prompt holding the earlier *regenerated*
answers. The output is one JSONL line per conversation, keyed by the input's provenance key. Lines are appended
whole and fsynced; a restart cuts a torn last line and skips the keys already written, so a crash at any moment
followed by a rerun yields every input exactly once, whatever order the answers finished in. (Counting output
lines and skipping that many inputs, as some pipelines do, duplicates and drops samples when answers finish out
of order.)

Two backends answer turns: :class:`~specdec.data.regeneration.openai_client.OpenAIChatBackend`
(OpenAI-compatible servers such as vLLM or SGLang) and :class:`LocalGenerateBackend` (the target loaded here,
batched HF ``generate``).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from specdec.data.prompts.conversations import Conversation, InvalidConversation, Provenance, validate_messages
from specdec.data.regeneration.turns import (
    Completion,
    Failed,
    Outcome,
    Regenerated,
    RegenerationBackend,
    SamplingParams,
    TurnWalk,
)
from specdec.sampling import draw, token_probabilities

if TYPE_CHECKING:
    from specdec.targets import Target

FAILURES_SUFFIX = ".failures.jsonl"
SETTINGS_FIELDS = ("backend", "model", "sampling")  # a restart must match these; transport settings may change


def filter_probabilities(
    probabilities: torch.Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> torch.Tensor:
    """Zero the tokens that top-k, top-p (nucleus) and min-p exclude ([N, V] fp32), then renormalise."""
    probabilities = probabilities.clone()
    vocab = probabilities.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(probabilities, top_k, dim=-1).values[..., -1:]
        probabilities[probabilities < kth] = 0.0
    if top_p < 1.0:
        ordered, order = torch.sort(probabilities, dim=-1, descending=True)
        before = torch.cumsum(ordered, dim=-1) - ordered  # mass of the strictly more likely tokens
        ordered[before >= top_p * ordered.sum(dim=-1, keepdim=True)] = 0.0
        probabilities = torch.zeros_like(probabilities).scatter(-1, order, ordered)
    if min_p > 0.0:
        floor = min_p * probabilities.max(dim=-1, keepdim=True).values
        probabilities[probabilities < floor] = 0.0
    return probabilities / probabilities.sum(dim=-1, keepdim=True)


class _SeededSampler:
    """A logits processor that draws each row's next token with that row's own ``torch.Generator``.

    HF ``generate`` samples every row from one global RNG, so an answer would depend on which other prompts share
    its batch. Drawing here and handing ``generate`` a one-hot score (it then runs in greedy mode) keeps each
    answer a function of its own prompt and seed only.
    """

    def __init__(self, sampling: SamplingParams, generators: Sequence[torch.Generator]) -> None:
        self.sampling = sampling
        self.generators = generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        probabilities = filter_probabilities(token_probabilities(scores, s.temperature), s.top_k, s.top_p, s.min_p)
        chosen = torch.stack(  # CPU generators: the same seed draws the same token on any device
            [draw(row.cpu(), generator) for row, generator in zip(probabilities, self.generators, strict=True)]
        ).to(scores.device)
        picked = torch.full_like(scores, float("-inf"))
        picked.scatter_(-1, chosen.unsqueeze(-1), 0.0)
        return picked


# ------------------------------------------------------------------------------------------ local generation


def stop_token_ids(target: Target) -> list[int]:
    """Token ids that end a turn: the tokenizer's eos and every eos of the model's generation config."""
    ids = set()
    configured = target.model.generation_config.eos_token_id
    if configured is not None:
        ids.update([configured] if isinstance(configured, int) else configured)
    if target.tokenizer.eos_token_id is not None:
        ids.add(target.tokenizer.eos_token_id)
    if not ids:
        raise ValueError(f"target {target.location.name!r} defines no eos token; cannot tell where an answer ends")
    return sorted(ids)


def context_length(target: Target) -> int:
    """Positions the target was built for (``max_position_embeddings``)."""
    config = target.model.config.get_text_config()
    return int(getattr(config, "max_position_embeddings", None) or 1 << 30)


def render_prompt(target: Target, messages: Sequence[Mapping[str, str]], template_kwargs: Mapping[str, Any]) -> str:
    """The prompt text the target's chat template writes before the next assistant answer."""
    text = target.tokenizer.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=True, **dict(template_kwargs)
    )
    if not isinstance(text, str):
        raise ValueError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
    return text


@torch.no_grad()
def generate_completions(
    target: Target,
    prompts: Sequence[str],
    sampling: SamplingParams,
    seeds: Sequence[int | None],
    *,
    max_tokens: Sequence[int] | None = None,
    stop: Sequence[str] = (),
) -> list[Completion]:
    """Answer rendered ``prompts`` in one left-padded batch with HF ``generate``.

    Each row samples with its own generator seeded from ``seeds`` (None: a random seed), so a row's answer does
    not depend on the batch; ``temperature`` 0 is plain greedy decoding. ``max_tokens`` optionally caps each row
    below ``sampling.max_tokens``; ``stop`` strings end an answer early and are cut from it.
    """
    from transformers import GenerationConfig

    tokenizer = target.tokenizer
    eos = stop_token_ids(target)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    encoded = tokenizer(
        list(prompts), add_special_tokens=False, padding=True, padding_side="left", return_tensors="pt"
    ).to(target.runtime.device)
    lengths = encoded["attention_mask"].sum(dim=-1).tolist()
    limits = [sampling.max_tokens] * len(prompts) if max_tokens is None else list(max_tokens)
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max(limits),
        eos_token_id=eos,
        pad_token_id=pad,
        stop_strings=list(stop) or None,
    )
    processors = None
    if sampling.temperature > 0:
        generators = []
        for seed in seeds:
            generator = torch.Generator()
            generator.manual_seed(seed) if seed is not None else generator.seed()
            generators.append(generator)
        from transformers import LogitsProcessorList

        processors = LogitsProcessorList([_SeededSampler(sampling, generators)])
    # generate() merges in the model's own sampling defaults and then warns that greedy mode ignores them
    chatter = logging.getLogger("transformers.generation.configuration_utils")
    level = chatter.level
    chatter.setLevel(logging.ERROR)
    try:
        output = target.model.generate(
            **encoded,
            generation_config=config,
            logits_processor=processors,
            tokenizer=tokenizer if stop else None,
        )
    finally:
        chatter.setLevel(level)
    width = encoded["input_ids"].shape[1]
    completions = []
    for row, (length, limit) in enumerate(zip(lengths, limits, strict=True)):
        new = output[row, width:].tolist()[:limit]
        finish = "length"
        ended = next((i for i, token in enumerate(new) if token in eos), None)
        if ended is not None:
            new, finish = new[: ended + 1], "stop"
        text = tokenizer.decode(new, skip_special_tokens=True)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        completions.append(Completion(text, finish, int(length), len(new)))
    return completions


def padded_token_groups(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices in length order, grouped so that rows × the group's longest length stays within ``max_tokens``
    (a row longer than that alone in its group)."""
    groups: list[list[int]] = []
    for row in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and (len(groups[-1]) + 1) * lengths[row] <= max_tokens:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


# ------------------------------------------------------------------------------------------------ outcomes
class LocalGenerateBackend:
    """The target loaded in this process, answering ``batch_size`` conversations at a time with HF ``generate``.

    A batch is left-padded to its longest prompt, and the prefill's attention grows with rows × length², so one
    long prompt among short ones would cost as much as a batch of long ones (64 rows padded to 514 tokens:
    +815 MB on the tiny target). Each turn's prompts are therefore answered in length order, in forwards of at most
    ``max_batch_tokens`` padded prompt tokens (at least one row each).
    """

    name = "local"

    def __init__(
        self, target: Target | str, batch_size: int = 8, device: str = "auto", max_batch_tokens: int = 8192
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be at least 1; got {max_batch_tokens}")
        if isinstance(target, str):
            from specdec.targets import load_target

            target = load_target(target, device=device)
        self.target = target
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens

    @property
    def model(self) -> str:
        return self.target.location.name

    def regenerate(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> Iterator[Outcome]:
        for start in range(0, len(conversations), self.batch_size):
            yield from self._batch(conversations[start : start + self.batch_size], sampling)

    def _batch(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> Iterator[Outcome]:
        context = context_length(self.target)
        kwargs = sampling.template_kwargs()
        walks = [TurnWalk(conversation) for conversation in conversations]
        pending = [(walk, walk.next_prompt()) for walk in walks]
        while pending:
            ready, prompts, limits, lengths = [], [], [], []
            for walk, messages in pending:
                if messages is None:
                    yield walk.result()
                    continue
                try:
                    text = render_prompt(self.target, messages, kwargs)
                except Exception as error:  # a template that refuses these messages fails only this conversation
                    yield Failed(walk.conversation, walk.turn, f"chat template: {error}")
                    continue
                length = len(self.target.tokenizer(text, add_special_tokens=False)["input_ids"])
                if length >= context:
                    yield Failed(
                        walk.conversation, walk.turn, f"prompt of {length} tokens fills the {context}-token context"
                    )
                    continue
                ready.append(walk)
                prompts.append(text)
                limits.append(min(sampling.max_tokens, context - length))
                lengths.append(length)
            if not ready:
                return
            seeds = [sampling.request_seed(walk.conversation.key, walk.turn) for walk in ready]
            completions: list[Completion | None] = [None] * len(ready)
            for rows in padded_token_groups(lengths, self.max_batch_tokens):
                answered = generate_completions(
                    self.target,
                    [prompts[row] for row in rows],
                    sampling,
                    [seeds[row] for row in rows],
                    max_tokens=[limits[row] for row in rows],
                )
                for row, completion in zip(rows, answered, strict=True):
                    completions[row] = completion
            pending = []
            for walk, completion in zip(ready, completions, strict=True):
                failure = walk.answer(completion)
                if failure is not None:
                    yield failure
                else:
                    pending.append((walk, walk.next_prompt()))


# --------------------------------------------------------------------------------------------- output file
def failures_path(output: str | os.PathLike[str]) -> Path:
    """The side file listing the conversations the latest run could not answer."""
    return Path(f"{output}{FAILURES_SUFFIX}")


def _source_dict(provenance: Provenance) -> dict[str, Any]:
    return {
        "source": provenance.source,
        "line": provenance.line,
        "unit": provenance.unit,
        "content_hash": provenance.content_hash,
    }


def _committed_lines(path: Path) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line, offset) of each newline-terminated line; a torn last line comes as (n, None, offset)."""
    offset = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.endswith(b"\n"):
                yield number, None, offset
                return
            yield number, raw, offset
            offset += len(raw)


class RegenerationOutput:
    """The append-only output file of one run: locked, repaired, and knowing which keys are done.

    Opening it takes an exclusive lock (a second writer is refused), cuts a torn last line, checks every record
    was made with ``settings`` and collects the done keys. ``append`` writes one whole line and fsyncs it.
    """

    def __init__(self, path: str | os.PathLike[str], settings: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.settings = dict(settings)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "ab")  # noqa: SIM115 - held for the run, closed by close()
        try:
            fcntl.flock(self._handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._handle.close()
            raise OSError(f"{self.path} is being written by another regeneration process") from None
        self.done: dict[str, int] = {}  # key → line
        self.repaired_bytes = 0
        self._recover()

    def _recover(self) -> None:
        for number, raw, offset in _committed_lines(self.path):
            if raw is None:  # never committed: cut it so the next append starts a clean line
                self.repaired_bytes = self.path.stat().st_size - offset
                self._handle.truncate(offset)
                self._handle.flush()
                os.fsync(self._handle.fileno())
                break
            try:
                record = json.loads(raw)
                key, generation = record["key"], record["generation"]
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(f"{self.path}:{number}: corrupted regeneration record: {error}") from None
            if key in self.done:
                raise ValueError(f"{self.path}: key {key!r} is written twice, on lines {self.done[key]} and {number}")
            changed = [name for name in SETTINGS_FIELDS if generation.get(name) != self.settings[name]]
            if changed:
                details = "; ".join(
                    f"{n}: file has {generation.get(n)!r}, this run {self.settings[n]!r}" for n in changed
                )
                raise ValueError(
                    f"{self.path}:{number} was regenerated with other settings ({details}). Rerun with the original "
                    "settings to resume, or write to a new --output."
                )
            self.done[key] = number

    def append(self, outcome: Regenerated) -> None:
        record = {
            "key": outcome.conversation.key,
            "messages": [message.as_dict() for message in outcome.messages],
            "source": _source_dict(outcome.conversation.provenance),
            "generation": {
                **self.settings,
                "finish_reasons": list(outcome.finish_reasons),
                "prompt_tokens": list(outcome.prompt_tokens),
                "completion_tokens": list(outcome.completion_tokens),
            },
        }
        self._handle.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.done[outcome.conversation.key] = len(self.done) + 1

    def close(self) -> None:
        self._handle.close()  # also releases the lock


class _FailureLog:
    """``<output>.failures.jsonl``: rewritten by every run, one fsynced line per failed conversation."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()
        self.count = 0

    def append(self, failure: Failed) -> None:
        record = {
            "key": failure.conversation.key,
            "source": _source_dict(failure.conversation.provenance),
            "turn": failure.turn,
            "reason": failure.reason,
        }
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.count += 1

    def close(self) -> None:
        self._handle.close()
        if self.count == 0:
            self.path.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------------- driver
@dataclass
class RegenerationReport:
    """What a run did. ``failed`` > 0 means some conversations still need a rerun."""

    output: Path
    inputs: int = 0
    written: int = 0
    skipped: int = 0  # already in the output from an earlier run
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    repaired_bytes: int = 0  # a torn last line cut on start
    failures: list[str] = field(default_factory=list)  # "key: reason" of the first failures

    def report(self) -> str:
        lines = [
            f"regenerated {self.written} conversations into {self.output} ({self.skipped} already done, "
            f"{self.failed} failed, {self.inputs} inputs); {self.completion_tokens} completion tokens for "
            f"{self.prompt_tokens} prompt tokens"
        ]
        if self.repaired_bytes:
            lines.append(f"cut a torn last line of {self.repaired_bytes} bytes left by an interrupted run")
        if self.failed:
            lines.append(f"failures ({failures_path(self.output)}; a rerun retries them):")
            lines.extend(f"  {failure}" for failure in self.failures)
            if self.failed > len(self.failures):
                lines.append(f"  … and {self.failed - len(self.failures)} more")
        return "\n".join(lines)


def _pending(
    conversations: Iterable[Conversation], done: Mapping[str, int], report: RegenerationReport
) -> list[Conversation]:
    """The conversations not yet in the output; a key seen twice in the input is an error."""
    seen: dict[str, Provenance] = {}
    pending = []
    for conversation in conversations:
        p = conversation.provenance
        first = seen.get(conversation.key)
        if first is not None:
            raise ValueError(
                f"input key {conversation.key!r} appears twice: {first.source}, {first.unit} {first.line} and "
                f"{p.source}, {p.unit} {p.line} (is a file given twice?)"
            )
        seen[conversation.key] = p
        report.inputs += 1
        if conversation.key in done:
            report.skipped += 1
        else:
            pending.append(conversation)
    return pending


def regenerate(
    conversations: Iterable[Conversation],
    output: str | os.PathLike[str],
    backend: RegenerationBackend,
    sampling: SamplingParams | None = None,
    *,
    progress: bool = True,
    max_reported: int = 20,
) -> RegenerationReport:
    """Answer every user turn of ``conversations`` with ``backend`` into ``output``; resumable, exactly once.

    Conversations already in ``output`` are skipped; failures go to ``<output>.failures.jsonl`` and are retried
    by the next run. Raises ValueError when ``output`` was made with another backend, model or sampling, or when
    a key occurs twice in the input.
    """
    sampling = sampling or SamplingParams()
    settings = {"backend": backend.name, "model": backend.model, "sampling": sampling.as_dict()}
    store = RegenerationOutput(output, settings)
    report = RegenerationReport(output=store.path, repaired_bytes=store.repaired_bytes)
    try:
        pending = _pending(conversations, store.done, report)
        failures = _FailureLog(failures_path(store.path))
        bar = tqdm(total=len(pending), desc="regenerate", unit="conv", disable=not progress, file=sys.stderr)
        try:
            for outcome in backend.regenerate(pending, sampling):
                if isinstance(outcome, Failed):
                    failures.append(outcome)
                    report.failed += 1
                    if len(report.failures) < max_reported:
                        report.failures.append(f"{outcome.conversation.key} (turn {outcome.turn}): {outcome.reason}")
                else:
                    store.append(outcome)
                    report.written += 1
                    report.prompt_tokens += sum(outcome.prompt_tokens)
                    report.completion_tokens += sum(outcome.completion_tokens)
                bar.update(1)
                bar.set_postfix(done=report.written, failed=report.failed, refresh=False)
        finally:
            bar.close()
            failures.close()
    finally:
        store.close()
    return report


def iter_regenerated(path: str | os.PathLike[str]) -> Iterator[Conversation]:
    """Read a regeneration output back: the regenerated messages under the ORIGINAL provenance (and key).

    Records are validated like imported prompts; errors name the file and line. A torn last line (an interrupted
    run) is skipped with a warning.
    """
    path = Path(path)
    seen: dict[str, int] = {}
    for number, raw, _ in _committed_lines(path):
        if raw is None:
            warnings.warn(f"{path}:{number}: skipping a torn last line left by an interrupted run", stacklevel=2)
            return
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except ValueError as error:
            raise InvalidConversation(f"malformed JSON: {error}", source=str(path), line=number) from None
        try:
            conversation = _conversation_from_record(record)
        except InvalidConversation as error:
            raise error.located(str(path), number) from None
        if conversation.key in seen:
            raise InvalidConversation(
                f"key {conversation.key!r} already on line {seen[conversation.key]}", source=str(path), line=number
            )
        seen[conversation.key] = number
        yield conversation


def _conversation_from_record(record: object) -> Conversation:
    if not isinstance(record, dict):
        raise InvalidConversation(f"expected a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("key"), str):
        raise InvalidConversation("missing or non-string key", field="key")
    if not isinstance(record.get("messages"), list):
        raise InvalidConversation("expected a list of messages", field="messages")
    source = record.get("source")
    try:
        provenance = Provenance(
            source=str(source["source"]),
            line=int(source["line"]),
            content_hash=str(source["content_hash"]),
            unit=str(source.get("unit", "line")),
        )
    except (TypeError, KeyError, ValueError) as error:
        raise InvalidConversation(f"incomplete provenance: {error!r}", field="source") from None
    if provenance.key != record["key"]:
        raise InvalidConversation(f"key {record['key']!r} does not match its source ({provenance.key!r})", field="key")
    return Conversation(validate_messages(record["messages"]), provenance)


# ------------------------------------------------------------------------------------------------------ CLI
def regenerate_command(
    data: list[str] | str,
    output: Path,
    backend: str = "openai",
    base_url: list[str] | str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    concurrency: list[int] | int = 32,
    max_retries: int = 5,
    retry_backoff: float = 1.0,
    timeout: float = 600.0,
    target: str = "specdec-tiny",
    batch_size: int = 8,
    max_batch_tokens: int = 8192,
    device: str = "auto",
    temperature: float = 0.7,
    top_p: float = 0.8,
    top_k: int = 20,
    min_p: float = 0.0,
    max_tokens: int = 4096,
    seed: int | None = 0,
    enable_thinking: bool | None = False,
    progress: bool = True,
) -> None:
    """Answer every user turn of the prompts with the target (resumable: rerun the same command after a crash).

    Args:
        data: prompt files (JSONL, ShareGPT JSON, HF datasets on disk, or directories of them).
        output: the JSONL file of regenerated conversations; failures go to ``<output>.failures.jsonl``.
        backend: ``openai`` (OpenAI-compatible servers, e.g. vLLM or SGLang) or ``local`` (the target in this process).
        base_url: server URL(s) for the openai backend, e.g. http://127.0.0.1:30000; several as --base_url+ URL.
        model: the served model name (openai backend); default: the first model a server lists.
        api_key: bearer token for the servers (default: the OPENAI_API_KEY environment variable, if set).
        concurrency: requests in flight per server: one number for all, or a list, one per base_url ('[32, 16]').
        max_retries: retries of a request after connection errors, timeouts, 429 and 5xx answers.
        retry_backoff: first retry delay in seconds; doubled on each further retry.
        timeout: seconds one request may take.
        target: the target for the local backend (``specdec-tiny``, a local HF model directory, or a hub id).
        batch_size: conversations answered together by the local backend.
        max_batch_tokens: the local backend's cap on padded prompt tokens per forward (rows × longest prompt):
            long prompts are answered in smaller forwards instead of padding a whole batch to their length.
        device: where the local backend runs: auto, cpu, cuda or cuda:N.
        temperature: sampling temperature; 0 is greedy.
        top_p: nucleus sampling mass (1 disables it).
        top_k: sample among the k most likely tokens (0 or -1 disables it).
        min_p: drop tokens below min_p times the most likely token's probability (0 disables it).
        max_tokens: longest answer per turn, in tokens.
        seed: base seed; each request's seed derives from it, the conversation key and the turn. None: unseeded.
        enable_thinking: the chat template's thinking switch (sent as chat_template_kwargs); None leaves it unset.
        progress: show a progress bar.
    """
    from specdec.data.prompts.importing import ImportSummary, iter_conversations

    sampling = SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        max_tokens=max_tokens,
        seed=seed,
        enable_thinking=enable_thinking,
    )
    if backend == "openai":
        from specdec.data.regeneration.openai_client import OpenAIChatBackend, RetryPolicy, ServerSpec

        if not base_url:
            raise ValueError("the openai backend needs --base_url (one per server)")
        base_url = [base_url] if isinstance(base_url, str) else base_url
        counts = [concurrency] * len(base_url) if isinstance(concurrency, int) else list(concurrency)
        if len(counts) != len(base_url):
            raise ValueError(f"got {len(counts)} concurrency values for {len(base_url)} base URLs")
        chosen: RegenerationBackend = OpenAIChatBackend(
            [ServerSpec(url, count) for url, count in zip(base_url, counts, strict=True)],
            model=model,
            api_key=api_key if api_key is not None else os.environ.get("OPENAI_API_KEY"),
            retry=RetryPolicy(max_retries=max_retries, backoff=retry_backoff),
            timeout=timeout,
        )
    elif backend == "local":
        chosen = LocalGenerateBackend(target, batch_size=batch_size, device=device, max_batch_tokens=max_batch_tokens)
    else:
        raise ValueError(f"unknown backend {backend!r}; expected openai or local")
    imported = ImportSummary()
    conversations = list(iter_conversations(data, summary=imported))
    print(imported.report(), file=sys.stderr)
    result = regenerate(conversations, output, chosen, sampling, progress=progress)
    print(result.report())
    if result.failed:
        raise SystemExit(1)
