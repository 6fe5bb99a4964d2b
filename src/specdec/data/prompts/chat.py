"""Render a conversation with the target's own chat template, tokenise it once, and mark the loss tokens.

The drafter learns exactly what the target generates: each assistant message's content as the template
renders it, plus the end-of-turn text the template writes after it (``<|im_end|>\\n`` for Qwen,
``<|eot_id|>`` for Llama 3, ``<turn|>\\n`` for Gemma 4). Those character spans are found in the rendered
text by rendering the conversation again with one assistant content swapped for a placeholder: the text
before and after the placeholder is the template's own scaffolding, so the span is located by exact prefix
and suffix comparison, never by searching for marker strings that the content itself may contain.

The text is tokenised once with character offsets and a token is supervised when its characters lie
inside a span. Re-tokenising text prefixes to count tokens (which drifts where BPE merges across a span
boundary) is never needed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from jinja2 import TemplateError

from specdec.data.prompts.conversations import Conversation, InvalidConversation, Message, validate_messages

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Private-use code points: untouched by the trim/strip filters templates apply, absent from real text.
PLACEHOLDER = "\ue000specdec-assistant-content\ue001"

MessagesLike = Conversation | Sequence[Message] | Sequence[Mapping[str, str]]
Span = tuple[int, int]


class ChatTemplateError(ValueError):
    """The chat template cannot be used to locate assistant turns (or is missing)."""


@dataclass(frozen=True)
class AssistantTurn:
    """Where one assistant turn lies in the rendered text (character offsets).

    ``content_start:content_end`` is the content as rendered; ``content_end:end`` the end-of-turn text.
    ``exact`` says the text around it is the template's scaffolding for a plain content, character for
    character; it is False where the template rewrote the content's surroundings (Qwen3 lifting a
    ``<think>`` block out of the content), and the span is then what lies between the common parts.
    ``prompt_end`` is where the generation prompt for this turn ends when the rendered text continues it
    (None otherwise); text between it and ``content_start`` was inserted by the template, e.g. Qwen3's
    empty think block. ``prompt_extension`` is what the generation prompt adds beyond the rendered header,
    e.g. Gemma 4's empty thought channel when thinking is off.
    """

    content_start: int
    content_end: int
    end: int
    exact: bool
    prompt_end: int | None
    prompt_extension: str

    def loss_start(self, train_on_empty_think: bool) -> int:
        """Where supervision starts: the content, or the end of the generation prompt when the text in
        between is wanted (``train_on_empty_think``) or holds the start of the content's own reasoning."""
        if self.prompt_end is not None and (train_on_empty_think or not self.exact):
            return self.prompt_end
        return self.content_start


@dataclass(frozen=True)
class RenderedConversation:
    """The rendered conversation and the character spans the loss covers, in order."""

    text: str
    spans: tuple[Span, ...]
    turns: tuple[AssistantTurn, ...]


@dataclass(frozen=True)
class TokenizedConversation:
    """Token ids, loss mask and character offsets of one conversation, truncated to ``max_length``."""

    input_ids: torch.Tensor  # int64 [S]
    loss_mask: torch.Tensor  # bool [S]
    offsets: torch.Tensor  # int64 [S, 2]: each token's characters in ``text``
    text: str  # the full rendered text (before truncation)
    spans: tuple[Span, ...]  # supervised character spans of ``text``
    num_tokens_untruncated: int  # exact up to max_length + a margin; a longer text counts the tokens of its head

    @property
    def truncated(self) -> bool:
        return self.num_tokens_untruncated > self.input_ids.numel()

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())


def _as_messages(messages: MessagesLike) -> list[dict[str, str]]:
    if isinstance(messages, Conversation):
        return messages.as_dicts()
    return [message.as_dict() for message in validate_messages(messages)]


def _renderer(
    tokenizer: PreTrainedTokenizerBase,
    enable_thinking: bool | None,
    chat_template: str | None,
    template_kwargs: Mapping[str, Any] | None,
) -> Callable[[list[dict[str, str]], bool], str]:
    if chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ChatTemplateError("the tokenizer has no chat template; pass chat_template=")
    kwargs = dict(template_kwargs or {})
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=chat_template, **kwargs
        )
        if not isinstance(text, str):
            raise ChatTemplateError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
        return text

    return render


def _common_prefix(a: str, b: str) -> int:
    limit = min(len(a), len(b))
    if a.startswith(b[:limit]):
        return limit
    lo, hi = 0, limit  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _common_suffix(a: str, b: str) -> int:
    return _common_prefix(a[::-1], b[::-1])


def _locate_turn(
    render: Callable[[list[dict[str, str]], bool], str], messages: list[dict[str, str]], index: int, text: str
) -> AssistantTurn:
    """Find assistant message ``index`` in ``text`` (the render of all ``messages``)."""
    placeholder = {"role": "assistant", "content": PLACEHOLDER}
    probed = render([*messages[:index], placeholder, *messages[index + 1 :]], False)
    if probed.count(PLACEHOLDER) != 1:
        raise ChatTemplateError(
            f"the chat template renders assistant message {index} {probed.count(PLACEHOLDER)} times; "
            "loss spans need it exactly once"
        )
    at = probed.index(PLACEHOLDER)
    before, after = probed[:at], probed[at + len(PLACEHOLDER) :]
    if index == len(messages) - 1:
        closing = after
    else:  # what the template writes after the content when this turn is the last one: the end of turn
        closed = render([*messages[:index], placeholder], False)
        closing = closed[closed.rindex(PLACEHOLDER) + len(PLACEHOLDER) :]
    exact = len(before) + len(after) <= len(text) and text.startswith(before) and text.endswith(after)
    content_start = _common_prefix(text, before)
    content_end = max(content_start, len(text) - _common_suffix(text, after))
    end = content_end + _common_prefix(text[content_end:], closing)

    prompt = render(messages[:index], True)
    prompt_end = None
    prompt_extension = ""
    if len(prompt) <= content_start and text.startswith(prompt):
        prompt_end = len(prompt)
    elif prompt.startswith(text[:content_start]):
        prompt_extension = prompt[content_start:]
    return AssistantTurn(content_start, content_end, end, exact, prompt_end, prompt_extension)


def render_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: MessagesLike,
    *,
    enable_thinking: bool | None = None,
    train_on_empty_think: bool = False,
    match_generation_prompt: bool = True,
    chat_template: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> RenderedConversation:
    """Render ``messages`` with the tokenizer's chat template and find the character spans to supervise.

    Each span covers one assistant content plus its end-of-turn text. ``enable_thinking`` is passed to the
    template (None: not passed, the template's default). Text the template inserts between the generation
    prompt and the content (Qwen3's ``<think>\\n\\n</think>\\n\\n`` when thinking is enabled) is context by
    default; ``train_on_empty_think`` supervises it too. When the conversation ends with an assistant turn
    whose generation prompt is longer than the rendered header (Gemma 4's empty thought channel with
    thinking off), ``match_generation_prompt`` splices the prompt in so that the last turn is trained in
    exactly the context it is generated in; the spliced text is never supervised.
    """
    chat = _as_messages(messages)
    render = _renderer(tokenizer, enable_thinking, chat_template, template_kwargs)
    text = render(chat, False)
    turns = [_locate_turn(render, chat, i, text) for i, message in enumerate(chat) if message["role"] == "assistant"]
    if match_generation_prompt and turns and chat[-1]["role"] == "assistant" and turns[-1].prompt_extension:
        last = turns[-1]
        text = text[: last.content_start] + last.prompt_extension + text[last.content_start :]
        shift = len(last.prompt_extension)
        turns[-1] = replace(
            last,
            content_start=last.content_start + shift,
            content_end=last.content_end + shift,
            end=last.end + shift,
            prompt_end=last.content_start + shift,
        )
    spans = tuple((turn.loss_start(train_on_empty_think), turn.end) for turn in turns)
    return RenderedConversation(text=text, spans=spans, turns=tuple(turns))


def loss_mask_from_offsets(offsets: torch.Tensor, spans: Iterable[Span]) -> torch.Tensor:
    """True for tokens whose characters lie inside a span; a token straddling a span edge is not supervised."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = torch.zeros(offsets.shape[0], dtype=torch.bool)
    for start, end in spans:
        mask |= (starts >= start) & (ends <= end) & (starts < end)
    return mask


def tokenize_conversation(
    tokenizer: PreTrainedTokenizerBase,
    messages: MessagesLike,
    max_length: int,
    *,
    enable_thinking: bool | None = None,
    train_on_empty_think: bool = False,
    match_generation_prompt: bool = True,
    chat_template: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> TokenizedConversation:
    """Render (see ``render_conversation``), tokenise once with offsets, build the loss mask, truncate.

    The template writes every special token itself (BOS included), so the tokenizer adds none.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("loss masks need character offsets: use a fast (tokenizers-backed) tokenizer")
    rendered = render_conversation(
        tokenizer,
        messages,
        enable_thinking=enable_thinking,
        train_on_empty_think=train_on_empty_think,
        match_generation_prompt=match_generation_prompt,
        chat_template=chat_template,
        template_kwargs=template_kwargs,
    )
    input_ids, offsets = _tokenize_head(tokenizer, rendered.text, max_length)
    loss_mask = loss_mask_from_offsets(offsets, rendered.spans)
    return TokenizedConversation(
        input_ids=input_ids[:max_length],
        loss_mask=loss_mask[:max_length],
        offsets=offsets[:max_length],
        text=rendered.text,
        spans=rendered.spans,
        num_tokens_untruncated=input_ids.numel(),
    )


HEAD_MARGIN_TOKENS = 64  # tokens kept past max_length so that the cut cannot reach the tokens that are kept
HEAD_CHARS_PER_TOKEN = 8  # first guess of the characters max_length tokens need; grown ×4 until enough


def _tokenize_head(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids and offsets of a prefix of ``text`` holding at least ``max_length`` + margin tokens (or all of it).

    A 10 MB record truncated to 2,048 tokens is thus tokenised in kilobytes, not whole. Tokenisation is local:
    cutting the text changes only the tokens next to the cut, which lie ``HEAD_MARGIN_TOKENS`` past the kept ones.
    """
    needed = max_length + HEAD_MARGIN_TOKENS
    chars = needed * HEAD_CHARS_PER_TOKEN
    while True:
        head = text if chars >= len(text) else text[:chars]
        encoding = tokenizer(head, add_special_tokens=False, return_offsets_mapping=True)
        if head is text or len(encoding["input_ids"]) >= needed:
            break
        chars *= 4
    input_ids = torch.tensor(encoding["input_ids"], dtype=torch.long)
    offsets = torch.tensor(encoding["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    return input_ids, offsets


TOO_FEW_LOSS_TOKENS = "too_few_loss_tokens"
TEMPLATE_ERROR = "template_error"


@dataclass(frozen=True)
class SkippedSample:
    """A conversation that produced no training sample, and why."""

    key: str
    reason: str
    detail: str


@dataclass
class TokenizeSummary:
    """Counts of a tokenisation pass; skipped samples are counted by reason and the first ones kept."""

    tokenized: int = 0
    truncated: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    skipped_samples: list[SkippedSample] = field(default_factory=list)
    max_reported: int = 1000

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skip(self, key: str, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        if len(self.skipped_samples) < self.max_reported:
            self.skipped_samples.append(SkippedSample(key, reason, detail))

    def report(self) -> str:
        lines = [
            f"tokenized {self.tokenized} conversations ({self.truncated} truncated, {self.tokens} tokens, "
            f"{self.loss_tokens} loss tokens); skipped {self.num_skipped}"
        ]
        if self.skipped:
            lines.append("skipped by reason: " + ", ".join(f"{r}={n}" for r, n in sorted(self.skipped.items())))
        lines.extend(f"  {s.key}: {s.reason}: {s.detail}" for s in self.skipped_samples)
        return "\n".join(lines)


def tokenize_conversations(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Iterable[Conversation],
    max_length: int,
    *,
    min_loss_tokens: int = 1,
    strict: bool = False,
    summary: TokenizeSummary | None = None,
    **options: Any,
) -> Iterator[tuple[Conversation, TokenizedConversation]]:
    """Tokenise a stream of conversations; those with fewer than ``min_loss_tokens`` supervised tokens
    (after truncation) or that the template refuses are counted in ``summary`` and skipped, never dropped
    silently. ``options`` are those of ``tokenize_conversation``; ``strict`` raises template errors.
    """
    summary = summary if summary is not None else TokenizeSummary()
    for conversation in conversations:
        try:
            sample = tokenize_conversation(tokenizer, conversation, max_length, **options)
        except (TemplateError, ChatTemplateError, InvalidConversation) as error:
            if strict:
                raise
            summary.skip(conversation.key, TEMPLATE_ERROR, str(error))
            continue
        if sample.num_loss_tokens < min_loss_tokens:
            detail = f"{sample.num_loss_tokens} loss tokens in {sample.input_ids.numel()} (minimum {min_loss_tokens})"
            summary.skip(conversation.key, TOO_FEW_LOSS_TOKENS, detail)
            continue
        summary.tokenized += 1
        summary.truncated += sample.truncated
        summary.tokens += sample.input_ids.numel()
        summary.loss_tokens += sample.num_loss_tokens
        yield conversation, sample
