"""The parity gate: an exported drafter, rebuilt the way its engine reads it, must match the original.

Both drafters run the same training-style forward on the same fixed inputs (random target features,
seeded anchors) in fp32; every draft-logit tensor (Markov-corrected for DSpark, one per TTT step for Eagle3)
and every confidence logit must agree. The reference is the original with its weights rounded to the
export dtype, so a bf16 export is held to exact equality too: any difference is a mapping error, never
rounding.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PretrainedConfig

from specdec.drafters import DSparkDrafter, Eagle3Drafter
from specdec.export.directory import read_tensors
from specdec.export.loaders import load_export
from specdec.targets import TargetHead


class ParityError(AssertionError):
    """The drafter rebuilt from an export does not reproduce the original drafter's logits."""


Drafter = DSparkDrafter | Eagle3Drafter
PARITY_ANCHORS = 6
PARITY_TTT_STEPS = 3


@dataclass
class ParityReport:
    """Largest absolute difference per compared output; ``passed`` when all are within ``atol``."""

    directory: str
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    atol: float = 0.0

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff.values(), default=0.0)

    @property
    def passed(self) -> bool:
        return self.worst <= self.atol

    def summary(self) -> str:
        worst = max(self.max_abs_diff, key=self.max_abs_diff.get) if self.max_abs_diff else "-"
        verdict = "reproduces" if self.passed else "DIFFERS FROM"
        return (
            f"{self.directory}: {verdict} the original drafter (max |Δ| {self.worst:.3g} at {worst}, atol {self.atol})"
        )


def fixed_inputs(
    config: PretrainedConfig, batch: int = 2, length: int = 24, seed: int = 1234
) -> dict[str, torch.Tensor]:
    """Deterministic target features and tokens shaped for the drafter's config."""
    generator = torch.Generator().manual_seed(seed)
    width = getattr(config, "target_hidden_size", None) or config.hidden_size
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=generator)
    loss_mask = torch.ones(batch, length, dtype=torch.bool)
    loss_mask[:, : length // 4] = False
    loss_mask[-1, -3:] = False
    return {
        "input_ids": ids,
        "target_hidden_states": torch.randn(batch, length, len(config.target_layer_ids) * width, generator=generator),
        "loss_mask": loss_mask,
        "target_last_hidden_states": torch.randn(batch, length, width, generator=generator),
    }


@contextmanager
def _small_forward(drafter: Drafter) -> Iterator[None]:
    """Few anchors / TTT steps for the comparison, restored afterwards (they do not change any weight)."""
    config = drafter.config
    name = "ttt_length" if isinstance(drafter, Eagle3Drafter) else "num_anchors"
    value = PARITY_TTT_STEPS if name == "ttt_length" else PARITY_ANCHORS
    saved = getattr(config, name)
    setattr(config, name, min(saved, value))
    try:
        yield
    finally:
        setattr(config, name, saved)


@torch.no_grad()
def drafter_outputs(drafter: Drafter, inputs: dict[str, torch.Tensor], seed: int = 7) -> dict[str, torch.Tensor]:
    """Named output tensors of one fixed forward (anchors drawn from a seeded generator)."""
    with _small_forward(drafter):
        if isinstance(drafter, Eagle3Drafter):
            output = drafter(**inputs)
            return {f"draft_logits[step {s}]": logits for s, logits in enumerate(output.draft_logits)}
        output = drafter(**inputs, generator=torch.Generator().manual_seed(seed))
        named = {"draft_logits": output.draft_logits, "anchors": output.blocks.anchors.float()}
        if output.confidence_logits is not None:
            named["confidence_logits"] = output.confidence_logits
        return named


def rounded_reference(drafter: Drafter, dtype: torch.dtype, round_head: tuple[str, ...] = ()) -> Drafter:
    """A copy of ``drafter`` in fp32 whose weights (and the shipped parts of its target head) went through ``dtype``."""
    reference = copy.deepcopy(drafter).float().cpu().eval()
    with torch.no_grad():
        for parameter in reference.parameters():
            parameter.copy_(parameter.to(dtype).float())
        persistent = set(reference.state_dict())
        for name, buffer in reference.named_buffers():
            if not buffer.is_floating_point():
                continue
            is_head = name.endswith(("embed_weight", "lm_head_weight"))
            shipped = ("embed_tokens.weight" in round_head and name.endswith("embed_weight")) or (
                "lm_head.weight" in round_head and name.endswith("lm_head_weight")
            )
            if (name in persistent and not is_head) or shipped:  # not rotary tables: they are never stored
                buffer.copy_(buffer.to(dtype).float())
    return reference


def compare(original: Drafter, rebuilt: Drafter, directory: str = "", atol: float = 0.0) -> ParityReport:
    """Run both drafters on the same fixed inputs and record the largest difference per output."""
    inputs = fixed_inputs(original.config)
    expected, found = drafter_outputs(original, inputs), drafter_outputs(rebuilt, inputs)
    report = ParityReport(directory=directory, atol=atol)
    for name, tensor in expected.items():
        if name not in found or found[name].shape != tensor.shape:
            shape = tuple(found[name].shape) if name in found else None
            raise ParityError(f"{directory}: output {name} has shape {shape}, expected {tuple(tensor.shape)}")
        report.max_abs_diff[name] = float((found[name].float() - tensor.float()).abs().max())
    return report


def check_export_parity(
    original: Drafter,
    directory: str | Path,
    *,
    target_head: TargetHead | None = None,
    target: str | None = None,
    atol: float = 0.0,
    raise_on_failure: bool = True,
) -> ParityReport:
    """Rebuild the drafter from ``directory`` like its engine would and compare it with ``original``.

    ``target_head`` / ``target`` provide the embedding and LM head the format shares with the target
    (default: the original drafter's own).
    """
    from specdec.export.source import has_target_head, target_head_of

    if target_head is None and target is None and has_target_head(original):
        target_head = target_head_of(original)
    stored = read_tensors(directory)
    dtypes = {tensor.dtype for tensor in stored.values() if tensor.is_floating_point()}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    shipped = tuple(key for key in ("embed_tokens.weight", "lm_head.weight") if key in stored)
    reference = rounded_reference(original, dtype, round_head=shipped)
    rebuilt = load_export(directory, target=target, target_head=target_head)
    rebuilt.config.attention_backend = reference.config.attention_backend
    report = compare(reference, rebuilt, str(directory), atol)
    if raise_on_failure and not report.passed:
        raise ParityError(report.summary() + f"; per output: {report.max_abs_diff}")
    return report


def export_and_check(
    drafter: Drafter,
    format_name: str,
    *,
    output_dir: str | Path | None = None,
    atol: float = 0.0,
    **export_options,
) -> ParityReport:
    """Export ``drafter`` (validated), rebuild it from the files and check parity — one call for tests."""
    from specdec.export.api import export_drafter

    if output_dir is None:
        with tempfile.TemporaryDirectory(prefix=f"specdec-{format_name}-") as scratch:
            path = export_drafter(drafter, format_name, scratch, **export_options)
            return check_export_parity(drafter, path, atol=atol)
    path = export_drafter(drafter, format_name, output_dir, **export_options)
    return check_export_parity(drafter, path, atol=atol)
