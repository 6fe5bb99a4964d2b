"""Answer one prompt with a target through its chat template and report decoding speed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from specdec.targets import TINY_TARGET, Target, load_target

DEFAULT_PROMPT = "Write a Python function `is_palindrome(text)` that returns True when text reads the same backwards."


@dataclass
class DemoResult:
    answer: str
    prompt_tokens: int
    new_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


@torch.no_grad()
def answer_once(
    target: Target, prompt: str, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0
) -> DemoResult:
    """Generate the target's answer to ``prompt`` in non-thinking mode and time the generation."""
    input_ids = target.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        enable_thinking=False,
        return_tensors="pt",
        return_dict=False,
    ).to(target.runtime.device)
    torch.manual_seed(seed)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    )
    started = time.perf_counter()
    output = target.model.generate(input_ids, max_new_tokens=max_new_tokens, **sampling)
    seconds = time.perf_counter() - started
    new = output[0, input_ids.shape[1] :]
    return DemoResult(
        answer=target.tokenizer.decode(new, skip_special_tokens=True),
        prompt_tokens=input_ids.shape[1],
        new_tokens=new.numel(),
        seconds=seconds,
    )


def demo(
    target: str = TINY_TARGET,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    seed: int = 0,
    device: str = "auto",
) -> None:
    """Load a target, answer one prompt through its chat template, and print tokens/s.

    Args:
        target: ``specdec-tiny`` (the embedded target), a local HF model directory, or a hub id.
        prompt: the user message.
        max_new_tokens: upper bound on the answer length.
        temperature: 0 for greedy decoding, otherwise sampling at this temperature.
        seed: random seed for sampling.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    loaded = load_target(target, device=device)
    result = answer_once(loaded, prompt, max_new_tokens, temperature, seed)
    print(
        f"target: {loaded.location.name} ({loaded.runtime.device}, {str(loaded.runtime.dtype).removeprefix('torch.')})"
    )
    print(f"user: {prompt}")
    print(f"assistant: {result.answer}")
    print(
        f"{result.new_tokens} new tokens after a {result.prompt_tokens}-token prompt in {result.seconds:.2f} s: "
        f"{result.tokens_per_second:.1f} tokens/s"
    )
