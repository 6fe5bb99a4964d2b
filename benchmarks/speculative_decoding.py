"""τ, tokens/s and wall-clock speedup of speculative decoding on the tiny target, against plain decoding.

Without ``--drafter`` the benchmark trains a DSpark drafter for the tiny target first: the target answers code
prompts (its own samples at T = 1), a target cache is built from those conversations, and a 1-layer drafter
trains on it for ``--steps`` optimizer steps. Then the quickstart's held-out prompts are decoded by the
speculative decoder and autoregressively — same target session, same engine, same fp32 sampling path, same
seeds — in the same run, for every engine (``eager``: HF forward; ``compiled``: static KV buffers and compiled
fixed-shape steps) and temperature. Each run records the round breakdown (ms and plain-step units), the target
forward's cost by token count, τ, acceptance by position, the draft length chosen from measured costs, tokens/s
of both decoders and the speedup. Usage::

    python benchmarks/speculative_decoding.py --drafter runs/quickstart/checkpoints/last.drafter
    python benchmarks/speculative_decoding.py --engines compiled --temperatures 0   # one cell
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import lightning as L
import torch
from transformers import AutoModel

from specdec.data.cache.builder import TokenizeOptions, build_target_cache
from specdec.data.datamodules import TargetCacheDataModule
from specdec.data.prompts.sources import iter_training_conversations
from specdec.decoding import DecodingOptions, autoregressive_generate
from specdec.decoding.evaluate import SpeculativeEvaluator, render_chat, stop_tokens_of
from specdec.lightning import DSparkModule
from specdec.metrics import AcceptanceMetrics, SpeedMetrics
from specdec.targets import TINY_TARGET, load_target, read_target_head

NAMES = [
    "merge_intervals", "parse_header", "flatten", "chunked", "read_config", "normalize_path", "format_bytes",
    "retry", "split_words", "count_lines", "unique_sorted", "deep_update", "camel_to_snake", "safe_divide",
    "parse_version", "is_palindrome", "rotate_list", "group_by", "strip_comments", "parse_duration",
]  # fmt: skip
HELDOUT = Path(__file__).resolve().parents[1] / "configs" / "data" / "tiny_heldout_prompts.jsonl"
TEMPLATES = [
    "Write a Python function `{name}(value)` that does the following: {name} of the given value.",
    "What does the `{name}` helper in this module do?",
    "Write a Python class `{Name}` with a method `run()`.",
]


def prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        name = rng.choice(NAMES)
        out.append(rng.choice(TEMPLATES).format(name=name, Name=name.title().replace("_", "")))
    return out


def answered_conversations(target, questions: list[str], path: Path, max_new_tokens: int) -> Path:
    """The target's own answers (T = 1) to ``questions``, as chat JSONL for the cache builder."""
    options = DecodingOptions(max_new_tokens=max_new_tokens)
    stops = stop_tokens_of(target, options)
    with path.open("w") as handle:
        for start in range(0, len(questions), 16):
            batch = questions[start : start + 16]
            ids = [render_chat(target, [{"role": "user", "content": q}], options) for q in batch]
            output = autoregressive_generate(
                target.model, ids, temperature=1.0, max_new_tokens=max_new_tokens, stop_token_ids=stops,
                generator=torch.Generator().manual_seed(start),
            )  # fmt: skip
            for question, result in zip(batch, output.results, strict=True):
                answer = target.tokenizer.decode([t for t in result.token_ids if t not in stops])
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def train_drafter(target, workdir: Path, args) -> tuple[torch.nn.Module, dict]:
    began = time.perf_counter()
    data = answered_conversations(target, prompts(args.train_prompts, seed=0), workdir / "answers.jsonl", 160)
    build_target_cache(
        target, list(iter_training_conversations([data])), workdir / "cache", args.layer_ids,
        TokenizeOptions(max_length=256), progress=False,
    )  # fmt: skip
    torch.manual_seed(0)
    module = DSparkModule(
        TINY_TARGET, args.layer_ids, num_hidden_layers=1, lr=3e-3, warmup_ratio=0.05,
        drafter={"block_size": args.block_size, "num_anchors": 32, "markov_rank": 64},
    )  # fmt: skip
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=workdir,
    )  # fmt: skip
    trainer.fit(module, datamodule=TargetCacheDataModule(str(workdir / "cache"), batch_size=4, seed=0))
    info = {"train_prompts": args.train_prompts, "steps": args.steps, "seconds": time.perf_counter() - began}
    return module.drafter.eval(), info


def heldout_prompts(path: Path, count: int) -> list[str]:
    """First user turns of the quickstart's held-out prompts (modules the tiny target never trained on)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [line["turns"][0] for line in lines[:count]]


def evaluate(target, drafter, engine: str, temperature: float, questions: list[str], args) -> dict:
    """Held-out prompts decoded both ways (batch 1, same seeds, same session) on ``engine`` at ``temperature``."""
    options = DecodingOptions(
        temperature=temperature, max_new_tokens=args.max_new_tokens, warmup_prompts=2, engine=engine,
        draft_length="fixed" if args.fixed_length else "auto",
    )  # fmt: skip
    evaluator = SpeculativeEvaluator(target, drafter, options)
    evaluator.warmup()
    acceptance, speed = AcceptanceMetrics(evaluator.max_drafts), SpeedMetrics()
    greedy_equal = []
    for index, question in enumerate(questions):
        outputs = evaluator.decode([render_chat(target, [{"role": "user", "content": question}], options)], index)
        acceptance.update_from(outputs.speculative.results)
        speed.update(outputs.speculative, outputs.autoregressive)
        spec, plain = outputs.speculative.results[0].token_ids, outputs.autoregressive.results[0].token_ids
        greedy_equal.append(spec == plain)
    values = {name: float(value) for name, value in {**acceptance.compute(), **speed.compute()}.items()}
    keys = ("tau", "propose", "verify_rate", "tokens_per_second", "ar_tokens_per_second", "speedup", "ideal_speedup")
    step = values["ar_ms_per_step"]
    round_ms = values["draft_ms_per_round"] + values["verify_ms_per_round"]
    policy = evaluator.draft_policy
    costs = evaluator.costs.as_dict() if evaluator.costs is not None else None
    forward = (costs or {}).get("target_forward_ms", {})
    result = {
        "engine": engine,
        "compiled": bool(evaluator.decoder.session is not None and evaluator.decoder.session.step.compiled),
        "temperature": temperature,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": 1,
        **{key: values[key] for key in keys},
        "round": {
            "draft_ms": values["draft_ms_per_round"],
            "verify_ms": values["verify_ms_per_round"],
            "round_ms": round_ms,
            "plain_step_ms": step,
            "draft_steps": values["draft_ms_per_round"] / step,
            "verify_steps": values["verify_ms_per_round"] / step,
            "round_steps": round_ms / step,
        },
        "measured_costs": costs,
        "target_forward_8_over_1": forward[8] / forward[1] if 8 in forward and 1 in forward else None,
        "draft_length": policy.typical_length if policy is not None else evaluator.max_drafts,
        "rounds_by_draft_length": dict(sorted(policy.chosen.items())) if policy is not None else None,
        "warmup_seconds": evaluator.warmup_seconds,
        "compile_seconds": evaluator.compile_seconds,
        "accept_rate": [values[f"accept_rate@{k}"] for k in range(evaluator.max_drafts)],
        "cond_accept": [values[f"cond_accept@{k}"] for k in range(evaluator.max_drafts)],
    }
    if temperature == 0:
        result["greedy_equal_to_plain"] = f"{sum(greedy_equal)}/{len(greedy_equal)}"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", help="an HF drafter directory for the tiny target (default: train one)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--train-prompts", type=int, default=160)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--layer-ids", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--engines", nargs="+", default=["eager", "compiled"], choices=["eager", "static", "compiled"])
    parser.add_argument("--fixed-length", action="store_true", help="always verify every draft (no cost model)")
    parser.add_argument("--heldout", default=str(HELDOUT), help="JSONL of held-out prompts ({'turns': [...]})")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's, all cores)")
    parser.add_argument("--save-drafter", help="also write the trained drafter here (reuse it with --drafter)")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "speculative_decoding.json"))
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    target = load_target(TINY_TARGET, device="cpu")
    with tempfile.TemporaryDirectory() as workdir:
        if args.drafter:
            drafter = AutoModel.from_pretrained(args.drafter).eval()
            drafter.attach_target_head(read_target_head(TINY_TARGET))
            training = {"drafter": args.drafter}
        else:
            drafter, training = train_drafter(target, Path(workdir), args)
            if args.save_drafter:
                drafter.save_pretrained(args.save_drafter)

    questions = heldout_prompts(Path(args.heldout), args.eval_prompts)
    runs = [
        evaluate(target, drafter, engine, temperature, questions, args)
        for temperature in args.temperatures
        for engine in args.engines
    ]
    result = {
        "benchmark": "speculative_decoding",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "target": TINY_TARGET,
        "drafter": {"algorithm": "dspark", "block_size": drafter.config.block_size, **training},
        "eval_prompts": {"file": Path(args.heldout).name, "count": len(questions)},
        "runs": runs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
