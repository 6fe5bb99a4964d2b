"""Confidence calibration of a DSpark drafter on the tiny target: ECE / AUROC / Brier per position, before/after STS.

The drafter is the quickstart's (``runs/quickstart/checkpoints/last.drafter`` when it exists, or ``--drafter``);
otherwise one is trained as ``benchmarks/speculative_decoding.py`` does. Real speculative decoding (T = 1, the
engine's lossless verification) produces the rounds; each prompt is decoded ``--samples`` times.

- ``heldout``: the quickstart's held-out eval prompts (``configs/data/tiny_heldout_prompts.jsonl``), never seen in
  training, split by prompt into two folds; STS fitted on one fold is measured on the other and vice versa
  (2-fold cross-fitting), so every number after STS is on prompts the fit never saw. ``temperatures`` are the
  ones fitted on both folds (what a calibrated drafter would ship).
- ``overconfident``: the same rounds with every confidence logit multiplied by 3 (what scaling the head's output
  layer does), cross-fitted the same way: STS on a deliberately miscalibrated head.
- ``shifted``: STS fitted on generated code prompts (another prompt distribution) and measured on all held-out
  prompts: how far temperatures carry across a distribution shift.

Usage::

    python benchmarks/calibration.py                      # writes benchmarks/results/calibration.json
    python benchmarks/calibration.py --drafter path/to/hf_drafter_dir --plot reliability.png
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import AutoModel

from specdec.data.prompts.eval_sets import EvalSetsSpec, EvalTask, load_eval_prompts
from specdec.decoding import DecodingOptions
from specdec.decoding.evaluate import SpeculativeEvaluator, render_chat
from specdec.decoding.temperature_scaling import CalibrationRounds, calibrate, fit_sequential_temperatures
from specdec.metrics.confidence import ConfidenceCalibrationMetrics, plot_reliability
from specdec.targets import TINY_TARGET, load_target, read_target_head

ROOT = Path(__file__).resolve().parent.parent
OVERCONFIDENCE = 3.0
QUICKSTART_DRAFTER = ROOT / "runs" / "quickstart" / "checkpoints" / "last.drafter"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from speculative_decoding import prompts, train_drafter  # noqa: E402  (the sibling benchmark's drafter recipe)


def rounds_of(target, drafter, questions: list[str], args, seed: int) -> tuple[CalibrationRounds, int]:
    """Rounds of real speculative decoding of ``questions`` (each ``--samples`` times), with raw logits."""
    options = DecodingOptions(temperature=1.0, max_new_tokens=args.max_new_tokens, measure_speedup=False)
    evaluator = SpeculativeEvaluator(target, drafter, options)
    results = []
    questions = [question for question in questions for _ in range(args.samples)]
    for start in range(0, len(questions), args.batch_size):
        batch = questions[start : start + args.batch_size]
        ids = [render_chat(target, [{"role": "user", "content": question}], options) for question in batch]
        results.extend(evaluator.decode(ids, seed + start).speculative.results)
    rounds = CalibrationRounds.from_results(results, evaluator.max_drafts, drafter.config.confidence_temperatures)
    return rounds, sum(len(result.token_ids) for result in results)


def cross_fit(first: CalibrationRounds, second: CalibrationRounds):
    """STS fitted on each fold and measured on the other: temperatures per fold, metrics before and after."""
    by_fold = [fit_sequential_temperatures(first), fit_sequential_temperatures(second)]
    before, after = first.metrics(), first.metrics(by_fold[1])  # fold 1 measured with fold 2's temperatures
    before.merge_state(second.metrics())
    after.merge_state(second.metrics(by_fold[0]))
    return by_fold, before, after


def per_position(values: dict[str, float], max_drafts: int) -> dict[str, list[float]]:
    names = ("ece", "auroc", "brier", "pred_mean", "target_mean", "count")
    return {name: [values[f"{name}@{k}"] for k in range(max_drafts)] for name in names}


def summary(values: dict[str, float]) -> dict[str, float]:
    return {name: values[name] for name in ("ece", "auroc", "brier", "pred_mean", "target_mean", "samples")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", help="an HF drafter directory for the tiny target (default: the quickstart's)")
    parser.add_argument("--samples", type=int, default=3, help="decodes of every held-out prompt (T = 1)")
    parser.add_argument("--fit-prompts", type=int, default=32, help="generated code prompts of the shifted fit")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=300, help="training steps when no drafter is found")
    parser.add_argument("--train-prompts", type=int, default=160)
    parser.add_argument("--block-size", type=int, default=7)
    parser.add_argument("--layer-ids", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (tiny tensors: 1 avoids stalls)")
    parser.add_argument("--plot", help="also write reliability diagrams (held-out, before / after) to this PNG")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "calibration.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    target = load_target(TINY_TARGET, device="cpu")
    source = args.drafter or (str(QUICKSTART_DRAFTER) if QUICKSTART_DRAFTER.is_dir() else None)
    with tempfile.TemporaryDirectory() as workdir:
        if source:
            drafter = AutoModel.from_pretrained(source).eval()
            drafter.attach_target_head(read_target_head(TINY_TARGET))
            path = Path(source).resolve()
            origin = {"drafter": str(path.relative_to(ROOT)) if ROOT in path.parents else source}
        else:
            drafter, origin = train_drafter(target, Path(workdir), args)
    if drafter.confidence_head is None:
        raise SystemExit(f"{source}: the drafter has no confidence head")

    began = time.perf_counter()
    task = EvalTask(name="tiny_heldout_prompts", domain="code")
    spec = EvalSetsSpec(eval_dir=str(ROOT / "configs" / "data"), tasks=[task])
    questions = [prompt.turns[0] for prompt in load_eval_prompts(spec)]
    folds = [rounds_of(target, drafter, questions[fold::2], args, seed=1000 * fold) for fold in range(2)]
    shifted_fit, shifted_tokens = rounds_of(target, drafter, prompts(args.fit_prompts, seed=2024), args, seed=5000)
    decode_seconds = time.perf_counter() - began

    (first, first_tokens), (second, second_tokens) = folds
    by_fold, before, after = cross_fit(first, second)
    scaled = [CalibrationRounds(part.logits * OVERCONFIDENCE, part.labels, part.lengths) for part in (first, second)]
    scaled_by_fold, scaled_before, scaled_after = cross_fit(*scaled)
    both = CalibrationRounds.concat([first, second])
    temperatures = fit_sequential_temperatures(both)
    shifted = calibrate(shifted_fit, both)
    max_drafts = both.max_drafts
    if args.plot:
        plot_reliability({"before STS": before, "after STS (cross-fitted)": after}, args.plot, title="tiny target")

    def block(metric: ConfidenceCalibrationMetrics | dict) -> dict:
        values = metric if isinstance(metric, dict) else {k: float(v) for k, v in metric.compute().items()}
        return {"summary": summary(values), "per_position": per_position(values, max_drafts)}

    result = {
        "benchmark": "calibration",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "target": TINY_TARGET,
        "drafter": {"algorithm": "dspark", "block_size": drafter.config.block_size, **origin},
        "protocol": {
            "temperature": 1.0,
            "max_new_tokens": args.max_new_tokens,
            "samples_per_prompt": args.samples,
            "heldout": f"{len(questions)} tiny_heldout_prompts in 2 folds by prompt ({both.logits.shape[0]} rounds, "
            f"{first_tokens + second_tokens} tokens)",
            "shifted_fit": f"{args.fit_prompts} generated code prompts ({shifted_fit.logits.shape[0]} rounds, "
            f"{shifted_tokens} tokens)",
            "decode_seconds": decode_seconds,
            "ece_bins": 20,
            "auroc_bins": 1000,
            "min_class_count": 10,
        },
        "temperatures": temperatures,
        "heldout": {"temperatures_by_fold": by_fold, "before": block(before), "after": block(after)},
        "overconfident": {
            "what": f"the same held-out rounds with every confidence logit × {OVERCONFIDENCE} (the head's output "
            "layer scaled), cross-fitted like heldout",
            "temperatures_by_fold": scaled_by_fold,
            "before": block(scaled_before),
            "after": block(scaled_after),
        },
        "shifted": {
            "temperatures": shifted.temperatures,
            "before": block(shifted.heldout_before),
            "after": block(shifted.heldout_after),
        },
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
