"""DSpark training throughput (tokens/s) and peak memory at a fixed mid-size config, per loss path.

One optimizer step = drafter forward over ``num_anchors`` blocks per sequence, the DSpark loss, backward and an
AdamW step, on synthetic target features (the step's cost does not depend on their values). Each case runs in
its own process so its peak resident memory (``ru_maxrss``) is its own; the reference loss path is the baseline
the others are compared with in the same run.

    python benchmarks/training_throughput.py [--steps 6] [--output benchmarks/results/training_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

# Mid-size: a 1024-wide, 32k-vocabulary target; 2 draft layers; DeepSpec's block of 7.
CONFIG = dict(
    vocab_size=32_000,
    hidden_size=1024,
    intermediate_size=2816,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    num_hidden_layers=2,
    target_layer_ids=[1, 5, 9],
    target_num_hidden_layers=12,
    block_size=7,
    num_anchors=64,
    markov_rank=128,
    mask_token_id=3,
)
SEQUENCE_LENGTH = 1024
BATCH = 2
CASES = ("reference", "chunked")


def run_case(loss_impl: str, steps: int) -> dict[str, float]:
    from specdec.drafters import DSparkConfig, DSparkDrafter
    from specdec.losses import dspark_loss
    from specdec.targets import TargetHead

    torch.manual_seed(0)
    config = DSparkConfig(**CONFIG)
    drafter = DSparkDrafter(config)
    vocab, hidden = config.vocab_size, config.hidden_size
    embed = torch.randn(vocab, hidden) * 0.02
    drafter.attach_target_head(TargetHead(embed, torch.randn(vocab, hidden) * 0.02, False, "embed", "lm_head"))
    optimizer = torch.optim.AdamW([p for p in drafter.parameters() if p.requires_grad], lr=1e-4)
    input_ids = torch.randint(4, vocab, (BATCH, SEQUENCE_LENGTH))
    loss_mask = torch.zeros(BATCH, SEQUENCE_LENGTH, dtype=torch.bool)
    loss_mask[:, SEQUENCE_LENGTH // 4 :] = True  # a prompt, then a supervised answer
    features = torch.randn(BATCH, SEQUENCE_LENGTH, len(config.target_layer_ids) * hidden)
    last_hidden = torch.randn(BATCH, SEQUENCE_LENGTH, hidden)

    def step(seed: int) -> None:
        output = drafter(input_ids, features, loss_mask, last_hidden, generator=torch.Generator().manual_seed(seed))
        loss = dspark_loss(
            output.draft_logits,
            output.target_logits,
            output.target_ids,
            output.eval_mask,
            output.confidence_logits,
            impl=loss_impl,
        )
        loss.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # warm-up (allocator, first-call overheads)
    started = time.perf_counter()
    for index in range(steps):
        step(index + 1)
    seconds = (time.perf_counter() - started) / steps
    slots = BATCH * config.num_anchors * config.num_predictions
    return {
        "seconds_per_step": seconds,
        "tokens_per_second": BATCH * SEQUENCE_LENGTH / seconds,
        "draft_slots_per_second": slots / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable_parameters": sum(p.numel() for p in drafter.parameters() if p.requires_grad),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "training_throughput.json")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args.steps)))
        return
    results = {}
    for case in CASES:
        done = subprocess.run(
            [sys.executable, __file__, "--case", case, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[case] = json.loads(done.stdout.strip().splitlines()[-1])
        print(case, results[case])
    baseline = results["reference"]
    ratios = {
        case: {
            "throughput_vs_reference": values["tokens_per_second"] / baseline["tokens_per_second"],
            "peak_rss_vs_reference": values["peak_rss_mb"] / baseline["peak_rss_mb"],
        }
        for case, values in results.items()
    }
    report = {
        "benchmark": "dspark_training_step",
        "config": {**CONFIG, "sequence_length": SEQUENCE_LENGTH, "batch_size": BATCH, "dtype": "float32"},
        "machine": {"processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "torch": torch.__version__,
        "steps": args.steps,
        "results": results,
        "ratios": ratios,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
