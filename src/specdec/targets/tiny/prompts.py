"""Prompt files for the tiny target: "write this function" requests drawn from its own corpus splits.

The quickstart trains a drafter on the tiny target's answers to training-split prompts and evaluates it on
prompts from held-out standard-library modules, so no prompt data has to be downloaded. Regenerate the
committed files with ``python -m specdec.targets.tiny.prompts``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from specdec.targets.tiny.corpus import build_corpus


def corpus_prompts(split: str, count: int, seed: int = 0, max_chars: int = 400) -> list[dict[str, object]]:
    """``count`` single-turn prompts (``{"id", "source", "turns"}``) of the ``train`` or ``heldout`` split."""
    train, held_out = build_corpus(seed=0)
    documents = {"train": train, "heldout": held_out}[split]
    prompts = [d for d in documents if d.is_conversation and len(d.prompt) <= max_chars]
    random.Random(seed).shuffle(prompts)
    if count > len(prompts):
        raise ValueError(f"the {split} split has {len(prompts)} prompts of at most {max_chars} characters")
    return [
        {"id": f"stdlib-{split}-{index:05d}", "source": document.source, "turns": [document.prompt]}
        for index, document in enumerate(prompts[:count])
    ]


def write_prompts(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path("configs/data"))
    parser.add_argument("--train", type=int, default=384, help="training prompts")
    parser.add_argument("--heldout", type=int, default=16, help="held-out evaluation prompts")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_prompts(args.output_dir / "tiny_train_prompts.jsonl", corpus_prompts("train", args.train, args.seed))
    write_prompts(args.output_dir / "tiny_heldout_prompts.jsonl", corpus_prompts("heldout", args.heldout, args.seed))


if __name__ == "__main__":
    main()
