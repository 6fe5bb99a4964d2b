"""Chat rendering and loss masks: the supervised tokens are exactly the assistant contents plus end of turn.

Checked on the tiny target's own tokenizer and on the real chat templates of Qwen/Qwen3-4B,
google/gemma-4-*-it (release revision) and meta-llama/Llama-3.1-8B-Instruct, kept verbatim in
tests/data/chat_templates and hosted by a copy of the tiny tokenizer with those models' special tokens.
"""

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import TemplateError
from transformers import AutoTokenizer

from specdec.data import (
    ChatTemplateError,
    InvalidConversation,
    TokenizeSummary,
    iter_conversations,
    render_conversation,
    tokenize_conversation,
    tokenize_conversations,
)
from specdec.data.prompts.chat import loss_mask_from_offsets
from specdec.targets import TINY_TARGET_PATH

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
EMPTY_THINK = "<think>\n\n</think>\n\n"
GEMMA_EMPTY_CHANNEL = "<|channel>thought\n<channel|>"

# name → (template file or None for the tiny target's own, extra special tokens, BOS token, end-of-turn text)
HOSTS = {
    "tiny": (None, [], None, "<|im_end|>\n"),
    "qwen3": ("qwen3-4b.jinja", [], None, "<|im_end|>\n"),
    "gemma4": (
        "gemma-4-it.jinja",
        ["<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"],
        "<bos>",
        "<turn|>\n",
    ),
    "llama3": (
        "llama-3.1-8b-instruct.jinja",
        ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        "<|eot_id|>",
    ),
}


def host_tokenizer(name: str):
    template, specials, bos, _ = HOSTS[name]
    tokenizer = AutoTokenizer.from_pretrained(TINY_TARGET_PATH)
    if specials:
        tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if bos:
        tokenizer.add_special_tokens({"bos_token": bos})
    if template:
        tokenizer.chat_template = (TEMPLATES / template).read_text(encoding="utf-8")
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers():
    return {name: host_tokenizer(name) for name in HOSTS}


def supervised_runs(tokenizer, sample) -> list[str]:
    """Decoded text of each maximal run of supervised tokens."""
    runs, current = [], []
    for token, supervised in zip(sample.input_ids.tolist(), sample.loss_mask.tolist(), strict=True):
        if supervised:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def assistant_contents(messages) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "assistant"]


TRICKY = [
    {"role": "system", "content": "You are a terse assistant. ☕"},
    {"role": "user", "content": "Render <|im_end|> and <|eot_id|> for me."},
    {"role": "assistant", "content": "Sure: <|im_end|>\n<|im_start|>user\nfake turn<|eot_id|><turn|> — done ✓"},
    {"role": "user", "content": "Now in 中文, with <think>tags</think>?"},
    {"role": "assistant", "content": "好的 🌍: {{ not jinja }} {% raw %} <|start_header_id|>assistant"},
]


@pytest.mark.parametrize("enable_thinking", [None, False, True])
@pytest.mark.parametrize("name", list(HOSTS))
def test_supervised_tokens_are_exactly_assistant_contents_plus_end_of_turn(tokenizers, name, enable_thinking):
    tokenizer, end_of_turn = tokenizers[name], HOSTS[name][3]
    sample = tokenize_conversation(tokenizer, TRICKY, 4096, enable_thinking=enable_thinking)
    assert supervised_runs(tokenizer, sample) == [c + end_of_turn for c in assistant_contents(TRICKY)]
    assert [sample.text[s:e] for s, e in sample.spans] == [c + end_of_turn for c in assistant_contents(TRICKY)]
    assert tokenizer.decode(sample.input_ids) == sample.text  # one tokenisation of the whole text
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    rendered = tokenizer.apply_chat_template(TRICKY, tokenize=False, **kwargs)
    if name == "gemma4" and not enable_thinking:  # the last turn is given its generation prompt (see below)
        cut = rendered.rindex("<|turn>model\n") + len("<|turn>model\n")
        rendered = rendered[:cut] + GEMMA_EMPTY_CHANNEL + rendered[cut:]
    assert sample.text == rendered


def test_every_supervised_token_lies_inside_a_span_and_straddlers_are_not_supervised(tokenizers):
    tokenizer = tokenizers["tiny"]
    # "\n" closes the assistant header and "    " opens the content: the BPE merges them into one token.
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "    return answer"},
        {"role": "user", "content": "thanks"},
    ]
    sample = tokenize_conversation(tokenizer, messages, 4096)
    ((start, end),) = sample.spans
    assert sample.text[start:end] == "    return answer<|im_end|>\n"
    inside = (sample.offsets[:, 0] >= start) & (sample.offsets[:, 1] <= end)
    assert torch.equal(sample.loss_mask, inside)
    straddling = (sample.offsets[:, 0] < start) & (sample.offsets[:, 1] > start)
    assert straddling.any() and not sample.loss_mask[straddling].any()
    offsets = torch.tensor([[0, 3], [3, 5], [5, 9], [9, 12], [12, 12]])
    assert loss_mask_from_offsets(offsets, [(4, 12)]).tolist() == [False, False, True, True, False]


@pytest.mark.parametrize("name", ["tiny", "qwen3"])
def test_empty_think_block_is_context_unless_asked_for(tokenizers, name):
    tokenizer, end_of_turn = tokenizers[name], HOSTS[name][3]
    messages = TRICKY[:3]
    answer = messages[-1]["content"] + end_of_turn
    for enable_thinking in (None, True):
        default = tokenize_conversation(tokenizer, messages, 4096, enable_thinking=enable_thinking)
        assert EMPTY_THINK + messages[-1]["content"] in default.text
        assert supervised_runs(tokenizer, default) == [answer]
        trained = tokenize_conversation(
            tokenizer, messages, 4096, enable_thinking=enable_thinking, train_on_empty_think=True
        )
        assert trained.text == default.text
        assert supervised_runs(tokenizer, trained) == [EMPTY_THINK + answer]
    # With thinking off the empty block is part of the generation prompt: context, never a target.
    prompt = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert prompt.endswith(EMPTY_THINK)
    for train_on_empty_think in (False, True):
        off = tokenize_conversation(
            tokenizer, messages, 4096, enable_thinking=False, train_on_empty_think=train_on_empty_think
        )
        assert off.text.startswith(prompt)
        assert supervised_runs(tokenizer, off) == [answer]


@pytest.mark.parametrize("name", ["tiny", "qwen3"])
def test_reasoning_is_stripped_from_history_and_trained_in_the_last_turn(tokenizers, name):
    tokenizer, end_of_turn = tokenizers[name], HOSTS[name][3]
    messages = [
        {"role": "system", "content": "Think first."},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nplan one\n</think>\n\nanswer one"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nplan two\n</think>\n\nanswer two"},
    ]
    sample = tokenize_conversation(tokenizer, messages, 4096)
    assert "plan one" not in sample.text  # the template drops reasoning from earlier turns
    assert supervised_runs(tokenizer, sample) == [
        "answer one" + end_of_turn,
        "<think>\nplan two\n</think>\n\nanswer two" + end_of_turn,
    ]
    rendered = render_conversation(tokenizer, messages)
    assert [turn.exact for turn in rendered.turns] == [True, False]


def test_gemma_last_turn_is_trained_in_its_generation_prompt_context(tokenizers):
    tokenizer = tokenizers["gemma4"]
    messages = TRICKY[1:3]
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|turn>model\n" + GEMMA_EMPTY_CHANNEL)
    sample = tokenize_conversation(tokenizer, messages, 4096)
    assert sample.text == prompt + messages[-1]["content"] + "<turn|>\n"
    assert supervised_runs(tokenizer, sample) == [messages[-1]["content"] + "<turn|>\n"]
    plain = tokenize_conversation(tokenizer, messages, 4096, match_generation_prompt=False)
    assert plain.text == tokenizer.apply_chat_template(messages, tokenize=False)
    assert supervised_runs(tokenizer, plain) == supervised_runs(tokenizer, sample)
    thinking = tokenize_conversation(tokenizer, messages, 4096, enable_thinking=True)
    assert GEMMA_EMPTY_CHANNEL not in thinking.text and thinking.text.startswith("<bos><|turn>system\n<|think|>")


@pytest.mark.parametrize("name", ["gemma4", "llama3"])
def test_templates_that_trim_content_supervise_the_trimmed_text(tokenizers, name):
    tokenizer, end_of_turn = tokenizers[name], HOSTS[name][3]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n  padded answer \t\n"}]
    sample = tokenize_conversation(tokenizer, messages, 4096)
    assert supervised_runs(tokenizer, sample) == ["padded answer" + end_of_turn]


def test_truncation_keeps_the_mask_prefix(tokenizers):
    tokenizer = tokenizers["qwen3"]
    full = tokenize_conversation(tokenizer, TRICKY, 4096)
    cut = int(full.loss_mask.nonzero()[0]) + 5  # a few tokens into the first answer
    short = tokenize_conversation(tokenizer, TRICKY, cut)
    assert not full.truncated and short.truncated and short.num_tokens_untruncated == full.input_ids.numel()
    assert short.input_ids.numel() == cut and short.offsets.shape == (cut, 2)
    assert torch.equal(short.input_ids, full.input_ids[:cut]) and torch.equal(short.loss_mask, full.loss_mask[:cut])
    assert 0 < short.num_loss_tokens < full.num_loss_tokens
    with pytest.raises(ValueError, match="max_length"):
        tokenize_conversation(tokenizer, TRICKY, 0)


def test_tokenize_conversations_counts_what_it_skips(tmp_path, tokenizers):
    path = tmp_path / "chats.jsonl"
    records = [
        {"messages": TRICKY},
        {"turns": ["a prompt with no answer yet"]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a long answer " * 20}]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = TokenizeSummary()
    tokenizer = tokenizers["tiny"]
    samples = list(tokenize_conversations(tokenizer, iter_conversations(path), 48, min_loss_tokens=4, summary=summary))
    assert [c.provenance.line for c, _ in samples] == [1, 3]
    assert all(s.input_ids.numel() <= 48 and s.num_loss_tokens >= 4 for _, s in samples)
    assert (summary.tokenized, summary.truncated, summary.num_skipped) == (2, 2, 1)
    assert summary.skipped == {"too_few_loss_tokens": 1}
    assert summary.skipped_samples[0].key.startswith(f"{path.resolve()}:line2:")
    assert summary.loss_tokens == sum(s.num_loss_tokens for _, s in samples)
    assert "skipped 1" in summary.report() and "too_few_loss_tokens=1" in summary.report()


def test_template_errors_are_skipped_or_raised(tmp_path, tokenizers):
    tokenizer = host_tokenizer("tiny")
    tokenizer.chat_template = "{{ raise_exception('no system prompts here') if messages[0].role == 'system' }}"
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": TRICKY}) + "\n")
    summary = TokenizeSummary()
    assert list(tokenize_conversations(tokenizer, iter_conversations(path), 64, summary=summary)) == []
    assert summary.skipped == {"template_error": 1} and "no system prompts here" in summary.skipped_samples[0].detail
    with pytest.raises(TemplateError, match="no system prompts here"):
        list(tokenize_conversations(tokenizer, iter_conversations(path), 64, strict=True))


def test_refusals(tokenizers):
    tokenizer = host_tokenizer("tiny")
    messages = TRICKY[1:3]
    twice = "{% for m in messages %}{{ m.content }}{{ m.content }}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="renders assistant message 1 2 times"):
        tokenize_conversation(tokenizer, messages, 64, chat_template=twice)
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenize_conversation(tokenizer, messages, 64)
    with pytest.raises(InvalidConversation, match="must be 'user'"):
        tokenize_conversation(tokenizers["tiny"], messages[::-1], 64)

    class SlowTokenizer:
        is_fast = False

    with pytest.raises(TypeError, match="fast"):
        tokenize_conversation(SlowTokenizer(), messages, 64)


def test_an_explicit_chat_template_is_used_instead_of_the_tokenizers(tokenizers):
    tokenizer = host_tokenizer("llama3")
    tokenizer.chat_template = None
    llama = (TEMPLATES / HOSTS["llama3"][0]).read_text(encoding="utf-8")
    sample = tokenize_conversation(tokenizer, TRICKY, 4096, chat_template=llama)
    hosted = tokenize_conversation(tokenizers["llama3"], TRICKY, 4096)
    assert sample.text == hosted.text and torch.equal(sample.loss_mask, hosted.loss_mask)


piece = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1, max_size=8),
    st.sampled_from(
        ["<|im_end|>", "<|im_start|>", "assistant\n", "<think>", "\n\n", " ", "{{ x }}", "é🌍中", "<|mask|>"]
    ),
)
content = (
    st.lists(piece, min_size=1, max_size=6)
    .map("".join)
    .map(str.strip)
    .filter(bool)
    .filter(
        lambda text: "</think>" not in text  # a closing think tag makes the template move text into a reasoning block
    )
)


@st.composite
def conversations(draw):
    messages = [{"role": "system", "content": draw(content)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages.append({"role": "user", "content": draw(content)})
        messages.append({"role": "assistant", "content": draw(content)})
    if draw(st.booleans()):
        messages.append({"role": "user", "content": draw(content)})
    return messages


@settings(max_examples=25, deadline=None)
@given(messages=conversations(), enable_thinking=st.sampled_from([None, False, True]))
def test_random_conversations_on_the_tiny_tokenizer(tokenizers, messages, enable_thinking):
    tokenizer = tokenizers["tiny"]
    sample = tokenize_conversation(tokenizer, messages, 4096, enable_thinking=enable_thinking)
    assert supervised_runs(tokenizer, sample) == [c + "<|im_end|>\n" for c in assistant_contents(messages)]
    assert sample.num_loss_tokens == int(sample.loss_mask.sum())
