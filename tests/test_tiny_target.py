"""The committed tiny target is a real chat language model, and its model card tells the truth."""

import json
import platform
import re

import pytest
import torch

from specdec.targets import TINY_TARGET, TINY_TARGET_PATH, load_target
from specdec.targets.tiny.corpus import build_corpus
from specdec.targets.tiny.train import heldout_cross_entropy, token_windows, unigram_cross_entropy

SUMMARY = json.loads((TINY_TARGET_PATH / "training_summary.json").read_text())


@pytest.fixture(scope="module")
def tiny():
    return load_target(TINY_TARGET, device="cpu")


def test_layout_is_standard_hf(tiny):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (TINY_TARGET_PATH / name).is_file(), name
    config = json.loads((TINY_TARGET_PATH / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    tokenizer_config = json.loads((TINY_TARGET_PATH / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tokenizer_config["chat_template"]
    assert tiny.tokenizer.mask_token == "<|mask|>" and tiny.tokenizer.mask_token_id < tiny.geometry.vocab_size


def test_chat_template_is_qwen_style(tiny):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    thinking_off = tiny.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert thinking_off == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    history = [*messages, {"role": "assistant", "content": "hello"}]
    rendered = tiny.tokenizer.apply_chat_template(history, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nhello<|im_end|>\n")
    tokens = tiny.tokenizer.convert_ids_to_tokens(tiny.tokenizer(rendered)["input_ids"])
    assert tokens.count("<|im_start|>") == 3 and tokens.count("<|im_end|>") == 3


def test_generates_python_for_a_coding_prompt(tiny):
    prompt = "Write a Python function `count_words(text)` that does the following:\n\nReturn the number of words."
    input_ids = tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        enable_thinking=False,
        return_tensors="pt",
        return_dict=False,
    )
    output = tiny.model.generate(input_ids, max_new_tokens=48, do_sample=False)
    answer = tiny.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert output.shape[1] > input_ids.shape[1]
    assert "def " in answer


def test_model_card_reports_perplexity_far_below_unigram():
    card = (TINY_TARGET_PATH / "README.md").read_text()
    model_ppl = SUMMARY["heldout_perplexity"]
    unigram_ppl = SUMMARY["unigram_perplexity"]
    assert f"{model_ppl:.2f}" in card and f"{unigram_ppl:.1f}" in card
    assert re.search(r"unigram", card)
    assert model_ppl <= unigram_ppl / 2


@pytest.mark.slow
def test_card_perplexity_is_reproduced_from_committed_weights(tiny):
    """Recompute held-out and unigram perplexity from the corpus and the committed weights."""
    train_docs, heldout_docs = build_corpus(seed=SUMMARY["recipe"]["seed"])
    seq_len = SUMMARY["recipe"]["seq_len"]
    heldout = token_windows(heldout_docs, tiny.tokenizer, seq_len)
    train = token_windows(train_docs, tiny.tokenizer, seq_len)
    model_ppl = torch.tensor(heldout_cross_entropy(tiny.model, heldout)).exp().item()
    unigram_ppl = torch.tensor(unigram_cross_entropy(train, heldout, tiny.geometry.vocab_size)).exp().item()
    assert model_ppl <= unigram_ppl / 2
    if platform.python_version() == SUMMARY["python"]:  # the corpus is this Python's standard library
        assert model_ppl == pytest.approx(SUMMARY["heldout_perplexity"], rel=0.02)
        assert unigram_ppl == pytest.approx(SUMMARY["unigram_perplexity"], rel=0.02)
