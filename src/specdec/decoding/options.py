"""Settings of a speculative-decoding evaluation, shared by ``specdec test``, the callbacks and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DecodingOptions:
    """How prompts are decoded when a drafter is evaluated against its target.

    Args:
        temperature: sampling temperature of both target and drafter (DeepSpec's protocol: 1.0); below 1e-5
            decoding is greedy.
        max_new_tokens: generated tokens per prompt (or per turn of a multi-turn prompt).
        max_draft_tokens: cap on drafted tokens per round (default: all the drafter proposes, i.e. its block
            or TTT length).
        seed: prompt ``i`` is decoded with a generator seeded ``seed + i``, so results do not depend on the
            number of ranks or the batch size.
        batch_size: prompts decoded together (1 = DeepSpec's protocol; larger batches verify in one forward).
        measure_speedup: also decode every prompt autoregressively (same target, same sampling path) and
            report tokens/s of both and the wall-clock speedup, measured in the same run.
        warmup_prompts: prompts decoded first, untimed, by both decoders (allocator and kernel warm-up).
        enable_thinking: the chat template's thinking switch (DeepSpec evaluates non-thinking).
        system_prompt: an optional system message (DeepSpec uses none).
        stop_token_ids: stop tokens (default: the target's generation config eos ids, else its tokenizer's).
        engine: how forwards run (:class:`specdec.decoding.SpeculativeDecoder`): ``compiled`` (default) —
            preallocated KV buffers and fixed-shape steps compiled with ``torch.compile``, compiled during the
            warm-up and falling back to eager execution with a warning if the compiler fails; ``static`` — the
            same steps uncompiled; ``eager`` — the HF forward with a growing cache (the reference). Both decoders
            of a speedup measurement always run on the same engine and the same target session.
        draft_length: ``auto`` — draft the number of tokens that maximises expected tokens per second, from the
            draft and verification costs measured at the start of the evaluation and the acceptance by position
            seen so far (``max_draft_tokens`` caps it); ``fixed`` — always ``max_draft_tokens`` (or the block).
    """

    temperature: float = 1.0
    max_new_tokens: int = 256
    max_draft_tokens: int | None = None
    seed: int = 980406
    batch_size: int = 1
    measure_speedup: bool = True
    warmup_prompts: int = 1
    enable_thinking: bool | None = False
    system_prompt: str | None = None
    stop_token_ids: list[int] | None = field(default=None)
    engine: str = "compiled"
    draft_length: str = "auto"

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"DecodingOptions.temperature = {self.temperature}; must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError(f"DecodingOptions.max_new_tokens = {self.max_new_tokens}; must be >= 1")
        if self.max_draft_tokens is not None and self.max_draft_tokens < 0:
            raise ValueError(f"DecodingOptions.max_draft_tokens = {self.max_draft_tokens}; must be >= 0")
        if self.engine not in ("eager", "static", "compiled"):
            raise ValueError(f"DecodingOptions.engine = {self.engine!r}; must be 'eager', 'static' or 'compiled'")
        if self.draft_length not in ("auto", "fixed"):
            raise ValueError(f"DecodingOptions.draft_length = {self.draft_length!r}; must be 'auto' or 'fixed'")
        if self.batch_size < 1:
            raise ValueError(f"DecodingOptions.batch_size = {self.batch_size}; must be >= 1")
