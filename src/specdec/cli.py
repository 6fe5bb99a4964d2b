"""The ``specdec`` program: one entry point for every step.

``fit`` / ``validate`` / ``test`` / ``predict`` are LightningCLI subcommands (YAML configs with ``class_path`` /
``init_args``, every field overridable on the command line); the other subcommands are tools whose flags come
from their function signatures.
"""

from __future__ import annotations

import sys

from jsonargparse import auto_cli

from specdec.data.cache.commands import cache_build, cache_estimate, cache_verify
from specdec.data.prompts.eval_sets import fetch_evals
from specdec.data.regeneration.regenerate import regenerate_command
from specdec.data.regeneration.serve import serve_command
from specdec.demo import demo
from specdec.export.commands import export_command, import_command, parity_command, validate_command
from specdec.planning.commands import plan_profile, plan_speedup
from specdec.targets.commands import target_info, train_tiny_target

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


COMMANDS = {
    "demo": demo,
    "data": {
        "_help": "Prompt data: regenerate answers with the target, serve a target over an OpenAI-compatible API.",
        "regenerate": regenerate_command,
        "serve": serve_command,
        "fetch-evals": fetch_evals,
    },
    "cache": {
        "_help": "Target-cache tools.",
        "estimate": cache_estimate,
        "build": cache_build,
        "verify": cache_verify,
    },
    "export": export_command,
    "import": import_command,
    "export-check": {
        "_help": "Check an exported drafter: its engine contract, and logit parity with the original.",
        "validate": validate_command,
        "parity": parity_command,
    },
    "plan": {
        "_help": "What a drafter buys on a serving stack: expected tokens/s, speedup and cost per concurrency.",
        "profile": plan_profile,
        "speedup": plan_speedup,
    },
    "target": {
        "_help": "Inspect and build targets.",
        "info": target_info,
        "train-tiny": train_tiny_target,
    },
}


def lightning_main(args: list[str] | None) -> None:
    """``specdec fit|validate|test|predict``: LightningCLI over any drafter module and DataModule."""
    from specdec.lightning.checkpoint_io import CorruptCheckpointError
    from specdec.lightning.cli import SpecdecCLI

    try:
        SpecdecCLI(args=args)
    except CorruptCheckpointError as error:  # names the damaged file and the checkpoint to resume from instead
        print(f"specdec: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


def print_overview() -> None:
    print(
        "specdec: train and evaluate draft models for speculative decoding\n\n"
        "Training and evaluation (LightningCLI; `specdec fit --help`):\n"
        "  fit        train a drafter:    specdec fit --config configs/quickstart.yaml\n"
        "  validate   validation losses and acceptance on held-out cache batches\n"
        "  test       speculative decoding on eval sets: tau, acceptance by position, speedup\n"
        "  predict    run the model's predict step\n\n"
        "Tools:"
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in LIGHTNING_SUBCOMMANDS:
        lightning_main(None if argv is None else args)  # None: LightningCLI reads sys.argv itself
        return
    if not args or args[0] in ("-h", "--help"):
        print_overview()
        args = ["--help"]
    try:
        auto_cli(COMMANDS, args=args, as_positional=False)
    except (OSError, ValueError) as error:  # bad paths, layer ids, arguments: the message says what to fix
        print(f"specdec: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error


if __name__ == "__main__":
    main()
