"""Settings of a speculative-decoding evaluation, shared by ``specdec test``, the callbacks and the benchmark."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

TRUNCATIONS = ("none", "static", "dynamic", "prefix", "topk")
VERIFICATIONS = ("auto", "reference", "kernel")


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
        truncation: which drafts of a chain round are verified: ``none`` (all), ``static`` / ``dynamic``
            (cumulative-confidence threshold ``threshold``), ``prefix`` (DSpark's prefix scheduler) or ``topk``.
        threshold: the static threshold, or the dynamic policy's target rate.
        tree: children per depth of a drafted token tree (``[3, 2, 1]``) instead of a chain.
        compare: further proposal modes decoded on the same prompts and reported side by side
            (``chain``, ``static[@t]``, ``dynamic[@t]``, ``prefix``, ``topk``, ``tree@AxBx…``).
        verification: how a chain round's acceptance test runs: ``reference`` (PyTorch, compiled with the
            engine), ``kernel`` (the fused Triton kernels; CUDA, or CPU under ``TRITON_INTERPRET=1``) or
            ``auto`` (the kernel where it is measured faster at the warm-up, on CUDA; the reference elsewhere).
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
    truncation: str = "none"
    threshold: float = 0.5
    tree: list[int] | None = None
    compare: list[str] = field(default_factory=list)
    verification: str = "auto"

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
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"DecodingOptions.truncation = {self.truncation!r}; must be one of {TRUNCATIONS}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"DecodingOptions.threshold = {self.threshold}; must be in [0, 1]")
        if self.tree is not None:
            if not self.tree or any(int(width) < 1 for width in self.tree):
                raise ValueError(f"DecodingOptions.tree = {self.tree}; must list >= 1 children per depth")
            if self.truncation != "none":
                raise ValueError("DecodingOptions: a tree is verified whole; set truncation 'none' with a tree")
        if self.verification not in VERIFICATIONS:
            raise ValueError(f"DecodingOptions.verification = {self.verification!r}; must be one of {VERIFICATIONS}")
        for spec in self.compare:
            parse_mode(spec)  # refuses a bad spec before any decoding starts
        if self.batch_size < 1:
            raise ValueError(f"DecodingOptions.batch_size = {self.batch_size}; must be >= 1")

    @property
    def mode(self) -> str:
        """A short label of what is proposed and verified (``chain``, ``static@0.5``, ``tree@3x2x1``, …)."""
        if self.tree is not None:
            return "tree@" + "x".join(str(int(width)) for width in self.tree)
        if self.truncation == "none":
            return "chain"
        return self.truncation + (f"@{self.threshold:g}" if self.truncation in ("static", "dynamic") else "")

    def for_mode(self, spec: str) -> DecodingOptions:
        """These options with the proposal mode ``spec`` (a ``compare`` entry) instead of their own."""
        truncation, threshold, tree = parse_mode(spec)
        threshold = self.threshold if threshold is None else threshold
        return replace(self, truncation=truncation, threshold=threshold, tree=tree, compare=[])


def parse_mode(spec: str) -> tuple[str, float | None, list[int] | None]:
    """``chain`` / ``static[@t]`` / ``dynamic[@t]`` / ``prefix`` / ``topk`` / ``tree@3x2x1`` → (truncation, threshold,
    tree)."""
    name, _, argument = str(spec).strip().partition("@")
    try:
        if name == "tree":
            widths = [int(width) for width in argument.split("x")]
            if not widths or min(widths) < 1:
                raise ValueError
            return "none", None, widths
        if name == "chain" and not argument:
            return "none", None, None
        if name in ("static", "dynamic"):
            threshold = float(argument) if argument else None
            if threshold is not None and not 0.0 <= threshold <= 1.0:
                raise ValueError
            return name, threshold, None
        if name in ("prefix", "topk") and not argument:
            return name, None, None
    except ValueError:
        pass
    raise ValueError(
        f"DecodingOptions.compare: {spec!r} is not a proposal mode; expected chain, static[@t], dynamic[@t], prefix, "
        "topk or tree@AxBx… (t in [0, 1], children per depth >= 1)"
    )
