"""Does ``specdec plan`` predict the speedup ``specdec test`` measures? Both on the tiny target, in one run.

The drafter (``--drafter``, e.g. the quickstart's ``runs/quickstart/checkpoints/last.drafter``) first decodes the
held-out prompts at its full draft length, which gives the acceptance by position the planner reads; a latency
profile is measured on the same engine (:func:`specdec.planning.measure_profile`); then, for each setting
(concurrency R, fixed draft length L), the prompts are decoded speculatively and plainly by the evaluator
``specdec test`` uses, and the measured wall-clock speedup is set beside the planner's prediction for that setting.
Usage::

    python benchmarks/planner_validation.py --drafter runs/quickstart/checkpoints/last.drafter
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from specdec.decoding import DecodingOptions
from specdec.decoding.evaluate import SpeculativeEvaluator, render_chat
from specdec.export.source import load_drafter
from specdec.metrics import AcceptanceMetrics, SpeedMetrics
from specdec.planning import AcceptanceCurve, measure_profile
from specdec.planning.plan import predicted_speedup
from specdec.targets import TINY_TARGET, load_target

HELDOUT = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_heldout_prompts.jsonl"


def questions(count: int) -> list[str]:
    lines = [json.loads(line) for line in HELDOUT.read_text().splitlines() if line.strip()]
    return [line["turns"][0] for line in lines[:count]]


def measure(target, drafter, options: DecodingOptions, prompts: list[list[int]], session=None) -> tuple[dict, object]:
    """Decode ``prompts`` in batches of ``options.batch_size``, both ways; acceptance and speed as ``specdec test``."""
    evaluator = SpeculativeEvaluator(target, drafter, options, session)
    evaluator.warmup()
    acceptance, speed = AcceptanceMetrics(evaluator.max_drafts), SpeedMetrics()
    for start in range(0, len(prompts), options.batch_size):
        outputs = evaluator.decode(prompts[start : start + options.batch_size], options.seed + start)
        acceptance.update_from(outputs.speculative.results)
        speed.update(outputs.speculative, outputs.autoregressive)
    values = {name: float(value) for name, value in {**acceptance.compute(), **speed.compute()}.items()}
    return values, evaluator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", required=True, help="an HF drafter directory (or .ckpt) for the tiny target")
    parser.add_argument("--engine", default="compiled", choices=["eager", "static", "compiled"])
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--settings", default="1:2,1:4,1:7,4:3", help="concurrency:drafts pairs, comma-separated")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "planner_validation.json"))
    args = parser.parse_args()
    began = time.perf_counter()
    target = load_target(TINY_TARGET, device="cpu")
    drafter = load_drafter(args.drafter, TINY_TARGET)
    settings = [tuple(int(x) for x in pair.split(":")) for pair in args.settings.split(",")]
    base = DecodingOptions(
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, engine=args.engine, draft_length="fixed",
        warmup_prompts=2,
    )  # fmt: skip
    prompts = [render_chat(target, [{"role": "user", "content": q}], base) for q in questions(args.prompts)]

    # 1. acceptance by position at the full draft length (what `specdec test` reports and `specdec plan` reads)
    full, evaluator = measure(target, drafter, base, prompts)
    curve = AcceptanceCurve("heldout", [full[f"accept_rate@{k}"] for k in range(evaluator.max_drafts)])
    session = evaluator.decoder.session
    # 2. the latency profile, on the same engine and session
    levels = sorted({rows for rows, _ in settings})
    for rows in levels:
        evaluator.decoder.warm_up([prompts[0]] * rows)
    profile = measure_profile(evaluator.decoder, prompts[0], levels)
    # 3. each setting measured, beside its prediction
    rows_out = []
    for rows, drafts in settings:
        options = DecodingOptions(**{**base.__dict__, "batch_size": rows, "max_draft_tokens": drafts})
        values, _ = measure(target, drafter, options, prompts, session)
        predicted = predicted_speedup(curve, profile, rows, drafts)
        rows_out.append({
            "concurrency": rows, "draft_length": drafts, "measured_speedup": values["speedup"],
            "predicted_speedup": predicted, "predicted_over_measured": predicted / values["speedup"],
            "measured_tau": values["tau"], "predicted_tau": curve.tau(drafts),
            "tokens_per_second": values["tokens_per_second"], "ar_tokens_per_second": values["ar_tokens_per_second"],
        })  # fmt: skip
        print(json.dumps(rows_out[-1]))
    result = {
        "benchmark": "planner_validation",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "drafter": args.drafter,
        "engine": args.engine,
        "temperature": args.temperature,
        "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "acceptance": curve.survival,
        "full_length_run": {k: full[k] for k in ("tau", "speedup", "tokens_per_second", "ar_tokens_per_second")},
        "profile": profile.to_dict(),
        "settings": rows_out,
        "max_relative_error": max(abs(row["predicted_over_measured"] - 1) for row in rows_out),
        "seconds": time.perf_counter() - began,
    }  # fmt: skip
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"max |predicted / measured - 1| = {result['max_relative_error']:.3f}; written to {args.output}")


if __name__ == "__main__":
    main()
