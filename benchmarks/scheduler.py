"""Prefix scheduler vs static verification budgets on the tiny target: measured SPS, recorded rounds, simulation.

1. ``SPS(B)`` is profiled from the target's real verification forward (``TargetSession.extend``) over ``B``
   flattened tokens on top of a prompt-length context.
2. A DSpark drafter (``--drafter``, else the quickstart run's ``last.drafter``, else one trained as in
   ``speculative_decoding.py``) decodes held-out prompts at T = 1 with every draft verified; each round's
   predicted prefix survivals and accepted length are recorded, and the real drafting time per round measured.
3. The rounds are replayed at increasing concurrency under static budgets (0 = plain decoding, 2 = MTP-style,
   the full block), static survival thresholds, Algorithm 1 and the dynamic top-K variant: throughput vs
   tokens/s per user (DSpark Fig. 7 shape) and verification tokens per request (Fig. 8 shape).
4. A threshold sweep over the same rounds gives acceptance rate and τ per threshold (Fig. 5 shape), and a real
   decoding run with the dynamic threshold shows the acceptance rate it reaches against its target.

Usage::

    python benchmarks/scheduler.py            # writes benchmarks/results/scheduler.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

from specdec.decoding import DecodingOptions, SpeculativeDecoder
from specdec.decoding.evaluate import render_chat, stop_tokens_of
from specdec.decoding.scheduler import DynamicTopK, PrefixScheduler, StepsPerSecond, profile_verification
from specdec.decoding.simulator import RoundRecorder, simulate, sweep
from specdec.decoding.truncation import DynamicThreshold, FixedLength, StaticThreshold
from specdec.drafters import DSparkDrafter
from specdec.targets import TINY_TARGET, load_target, read_target_head

QUICKSTART_DRAFTER = Path(__file__).parent.parent / "runs" / "quickstart" / "checkpoints" / "last.drafter"


def load_drafter(target, args) -> tuple[torch.nn.Module, dict]:
    path = args.drafter or (str(QUICKSTART_DRAFTER) if QUICKSTART_DRAFTER.exists() else None)
    if path:
        drafter = DSparkDrafter.from_pretrained(path).eval()
        drafter.attach_target_head(read_target_head(TINY_TARGET))
        return drafter, {"drafter": path}
    sys.path.insert(0, str(Path(__file__).parent))
    from speculative_decoding import train_drafter  # the same recipe as the decoding benchmark

    args.train_prompts, args.block_size, args.layer_ids = 160, 4, [1, 3]
    with tempfile.TemporaryDirectory() as workdir:
        drafter, info = train_drafter(target, Path(workdir), args)
    return drafter, info


def decode(target, drafter, policy, args, seed: int):
    """Held-out prompts (batch ``args.batch_size``) decoded at T = 1 under ``policy``."""
    sys.path.insert(0, str(Path(__file__).parent))
    from speculative_decoding import prompts

    options = DecodingOptions(max_new_tokens=args.max_new_tokens)
    stops = stop_tokens_of(target, options)
    chats = [render_chat(target, [{"role": "user", "content": q}], options) for q in prompts(args.eval_prompts, seed)]
    decoder = SpeculativeDecoder(
        target.model, drafter, temperature=1.0, max_new_tokens=args.max_new_tokens, stop_token_ids=stops,
        policy=policy,
    )  # fmt: skip
    outputs = []
    for start in range(0, len(chats), args.batch_size):
        generator = torch.Generator().manual_seed(start)
        outputs.append(decoder.generate(chats[start : start + args.batch_size], generator))
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", help="an HF DSpark drafter directory for the tiny target")
    parser.add_argument("--steps", type=int, default=300, help="training steps when a drafter must be trained")
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128])
    parser.add_argument("--sim-steps", type=int, default=300)
    parser.add_argument("--target-rate", type=float, default=0.5, help="the dynamic threshold's acceptance target")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "scheduler.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    target = load_target(TINY_TARGET, device="cpu")
    drafter, drafter_info = load_drafter(target, args)
    block = drafter.config.num_predictions

    most = max(args.concurrency) * (1 + block)
    counts = sorted({1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, most} - {0})
    counts = [count for count in counts if count <= most]
    sps = profile_verification(target.model, counts, context_length=128, repeats=5, warmup=2)

    recorder = RoundRecorder()
    outputs = decode(target, drafter, recorder, args, seed=12345)
    rounds = recorder.rounds
    forwards = sum(output.target_forwards for output in outputs)
    draft_seconds = sum(output.draft_seconds for output in outputs) / forwards  # per round, batch args.batch_size
    tau = sum(r.accepted + 1 for r in rounds) / len(rounds)

    policies = {
        "autoregressive": lambda: FixedLength(0),
        "static_2": lambda: FixedLength(2),
        f"static_{block}": lambda: FixedLength(block),
        "threshold_0.3": lambda: StaticThreshold(0.3),
        "threshold_0.6": lambda: StaticThreshold(0.6),
        "prefix_scheduler": lambda: PrefixScheduler(sps),
        "dynamic_top_k": lambda: DynamicTopK(sps, initial_budget=0),
    }
    # Two regimes: verification only (drafting free, as when the target dwarfs the drafter) and with the drafting
    # time measured here per round (on CPU the tiny target and its drafter cost about the same).
    regimes = {"verification_only": 0.0, "measured_draft_cost": draft_seconds}
    curves: dict[str, dict[str, list[dict]]] = {regime: {} for regime in regimes}
    for regime, cost in regimes.items():
        for name, make in policies.items():
            extra = 0.0 if name == "autoregressive" else cost
            points = sweep(rounds, make, sps, args.concurrency, steps=args.sim_steps, draft_seconds=extra, seed=1)
            curves[regime][name] = [point.to_dict() for point in points]

    flat = StepsPerSecond([1], [1.0])  # free verification: the sweep reports acceptance and τ only
    thresholds = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    threshold_sweep = []
    for threshold in thresholds:
        point = simulate(rounds, lambda t=threshold: StaticThreshold(t), flat, 1, steps=len(rounds) * 4, seed=2)
        threshold_sweep.append(
            {"threshold": threshold, "acceptance_rate": point.acceptance_rate, "tau": point.tokens_per_step,
             "verified_drafts": point.verify_tokens_per_request - 1.0}
        )  # fmt: skip

    dynamic = DynamicThreshold(args.target_rate)
    dynamic_outputs = decode(target, drafter, dynamic, args, seed=12345)
    results = [result for output in dynamic_outputs for result in output.results]
    verified = sum(sum(result.proposed) for result in results)
    accepted = sum(sum(result.accepted) for result in results)
    late_verified = sum(sum(result.proposed[result.rounds // 2 :]) for result in results)
    late_accepted = sum(sum(result.accepted[result.rounds // 2 :]) for result in results)
    dynamic_run = {
        "target_rate": dynamic.target_rate,
        "acceptance_rate": accepted / verified if verified else 0.0,
        "acceptance_rate_second_half": late_accepted / late_verified if late_verified else 0.0,
        "final_threshold": dynamic.threshold,
        "tau": sum(sum(result.committed) for result in results) / sum(result.rounds for result in results),
        "verified_drafts_per_round": verified / sum(result.rounds for result in results),
    }

    def ratio(regime: str, policy: str, other: str) -> list[float]:
        mine, theirs = curves[regime][policy], curves[regime][other]
        return [round(m["throughput"] / t["throughput"], 3) for m, t in zip(mine, theirs, strict=True)]

    summary = {
        regime: {
            "concurrency": args.concurrency,
            "scheduler_vs_full_block": ratio(regime, "prefix_scheduler", f"static_{block}"),
            "scheduler_vs_static_2": ratio(regime, "prefix_scheduler", "static_2"),
            "dynamic_top_k_vs_full_block": ratio(regime, "dynamic_top_k", f"static_{block}"),
            "scheduler_vs_autoregressive": ratio(regime, "prefix_scheduler", "autoregressive"),
            "scheduler_verify_tokens_per_request": [
                round(p["verify_tokens_per_request"], 2) for p in curves[regime]["prefix_scheduler"]
            ],
        }
        for regime in regimes
    }
    result = {
        "benchmark": "scheduler",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_average": os.getloadavg(),
        },
        "target": TINY_TARGET,
        "drafter": {"algorithm": "dspark", "block_size": drafter.config.block_size, **drafter_info},
        "sps": sps.to_dict(),
        "recorded": {
            "rounds": len(rounds),
            "prompts": args.eval_prompts,
            "batch_size": args.batch_size,
            "max_new_tokens": args.max_new_tokens,
            "tau_full_block": tau,
            "draft_seconds_per_round": draft_seconds,
        },
        "summary": summary,
        "curves": curves,
        "threshold_sweep": threshold_sweep,
        "dynamic_threshold_run": dynamic_run,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("sps", "recorded", "summary", "dynamic_threshold_run")}, indent=2))
    print(json.dumps(threshold_sweep, indent=1))


if __name__ == "__main__":
    main()
