"""``specdec target …``: inspect a target's geometry, train the tiny embedded target."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from specdec.targets.loading import TINY_TARGET


def target_info(target: str = TINY_TARGET, layer_ids: list[int] | None = None) -> None:
    """Print a target's geometry (the sizes drafter configs are derived from) without loading its weights.

    Args:
        target: ``specdec-tiny``, a local HF model directory, or a hub id.
        layer_ids: optional target layer ids to check against the target's depth.
    """
    from transformers import AutoConfig

    from specdec.targets import TargetGeometry, resolve_target, validate_layer_ids

    location = resolve_target(target)
    geometry = TargetGeometry.from_config(AutoConfig.from_pretrained(location.path))
    report = {"target": location.name, "path": str(location.path), **asdict(geometry)}
    if layer_ids is not None:
        report["layer_ids"] = list(validate_layer_ids(layer_ids, geometry.num_hidden_layers))
    print(json.dumps(report, indent=2))


def train_tiny_target(output_dir: Path, steps: int = 1800, seed: int = 0) -> None:
    """Train the tiny embedded target from scratch on the Python standard library (resumable).

    Args:
        output_dir: where the HF model directory and its model card are written.
        steps: optimizer steps (the committed target used the default).
        seed: seed for corpus prompts, tokenizer, data order and initialisation.
    """
    from specdec.targets.tiny.train import TinyTargetRecipe
    from specdec.targets.tiny.train import train_tiny_target as train

    summary = train(output_dir, TinyTargetRecipe(steps=steps, seed=seed))
    print(f"held-out perplexity {summary['heldout_perplexity']:.2f} (unigram {summary['unigram_perplexity']:.1f})")
