"""What the in-loop decoding callbacks decode, and how: their prompts and their decoding options.

Both come from the callback's own arguments first, then from the module (its ``decoding_options``), so the
callbacks of one run decode like ``specdec test`` unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from specdec.data.prompts.eval_sets import EvalSetsSpec, load_eval_prompts
from specdec.decoding.options import DecodingOptions
from specdec.lightning.protocol import as_decodable


def callback_conversations(
    prompts: Sequence[str] | None, eval_sets: EvalSetsSpec | None, defaults: Sequence[str], limit: int
) -> list[list[str]]:
    """User turns to decode: explicit prompts, else the eval sets, else ``defaults``; at most ``limit``."""
    if prompts is not None:
        conversations = [[prompt] for prompt in prompts]
    elif eval_sets is not None:
        conversations = [prompt.turns for prompt in load_eval_prompts(eval_sets)]
    else:
        conversations = [[prompt] for prompt in defaults]
    return conversations[:limit]


def callback_decoding_options(
    pl_module, *, measure_speedup: bool, max_new_tokens: int | None, temperature: float | None
) -> DecodingOptions:
    """The module's decoding options with the callback's overrides."""
    options = as_decodable(pl_module, "a decoding callback").decoding_options
    changes: dict = {"measure_speedup": measure_speedup}
    if max_new_tokens is not None:
        changes["max_new_tokens"] = max_new_tokens
    if temperature is not None:
        changes["temperature"] = temperature
    return replace(options, **changes)
