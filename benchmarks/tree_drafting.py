"""τ of tree drafting against chain drafting at an equal verification budget, on the tiny target, in one run.

The same drafter, prompts and seeds decode with a chain of ``--budget`` drafts (the engine), with a chain-shaped
tree of the same length (the tree decoder, a consistency check: its τ must match the chain's within noise), and
with the best-first tree of ``--budget`` nodes shaped by the chain's measured conditional acceptance per depth
(:meth:`specdec.decoding.tree.TreeShape.best_first`). Every decoder verifies ``--budget`` drafted tokens per
round (fewer only where ``max_new_tokens`` cuts the last round). Wall-clock speedup against plain decoding is
reported too (batch size 1, CPU). Uses ``--drafter DIR`` (default: the quickstart's ``last.drafter`` when it
exists), else trains a drafter like ``benchmarks/speculative_decoding.py``. Usage::

    python benchmarks/tree_drafting.py       # writes benchmarks/results/tree_drafting.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import AutoModel

import specdec.drafters  # noqa: F401  (registers the drafter classes with AutoModel)
from specdec.decoding import DecodingOptions, SpeculativeDecoder, autoregressive_generate
from specdec.decoding.evaluate import render_chat, stop_tokens_of
from specdec.decoding.tree import TreeShape, TreeSpeculativeDecoder
from specdec.metrics import AcceptanceMetrics, SpeedMetrics
from specdec.targets import TINY_TARGET, load_target, read_target_head

QUICKSTART_DRAFTER = Path(__file__).resolve().parent.parent / "runs" / "quickstart" / "checkpoints" / "last.drafter"


def decode_all(decoder, prompts: list[list[int]], baselines, args) -> dict:
    """Every prompt with its own seed (the same seeds for every decoder); ``baselines``: plain decodes of the
    same prompts in the same run, for the wall-clock speedup."""
    acceptance, speed = AcceptanceMetrics(max(1, args.budget)), SpeedMetrics()
    new_tokens = 0
    for index, (prompt, baseline) in enumerate(zip(prompts, baselines, strict=True)):
        output = decoder.generate([prompt], torch.Generator().manual_seed(args.seed + index))
        acceptance.update_from(output.results)
        speed.update(output, baseline)
        new_tokens += output.new_tokens
    values = {name: float(value) for name, value in {**acceptance.compute(), **speed.compute()}.items()}
    keys = ("tau", "propose", "verify_rate", "draft_acceptance_rate", "rounds", "tokens_per_second")
    keys += ("ar_tokens_per_second", "speedup", "draft_ms_per_round", "verify_ms_per_round")
    return {key: values[key] for key in keys} | {
        "new_tokens": new_tokens,
        "cond_accept": [values[f"cond_accept@{k}"] for k in range(args.budget)],
    }


def run(target, drafter, temperature: float, prompts, args) -> dict:
    stops = stop_tokens_of(target, DecodingOptions())
    common = dict(temperature=temperature, max_new_tokens=args.max_new_tokens, stop_token_ids=stops)
    for prompt in prompts[:1]:  # warm-up, untimed
        SpeculativeDecoder(target.model, drafter, **common).generate([prompt], torch.Generator().manual_seed(0))
    baselines = [
        autoregressive_generate(
            target.model, [prompt], generator=torch.Generator().manual_seed(args.seed + index), **common
        )
        for index, prompt in enumerate(prompts)
    ]
    chain = SpeculativeDecoder(target.model, drafter, max_draft_tokens=args.budget, **common)
    chain_result = decode_all(chain, prompts, baselines, args)
    depth = min(args.budget, chain.max_draft_tokens)
    # The chain's measured conditional acceptance per depth shapes the tree (floored: a position never reached
    # still gets a small rate rather than none).
    rates = [max(rate, 0.05) for rate in chain_result["cond_accept"][:depth]]
    best = TreeShape.best_first(args.budget, rates, max_depth=depth, max_children=args.max_children)
    runs = {"chain": {"shape": "chain", "nodes": args.budget, **chain_result}}
    for name, shape in (("tree_as_chain", TreeShape.chain(args.budget)), ("tree_best_first", best)):
        decoder = TreeSpeculativeDecoder(target.model, drafter, shape, **common)
        runs[name] = {
            "shape": list(decoder.shape.parents),
            "nodes": decoder.shape.num_nodes,
            "depth": decoder.shape.max_depth,
            **decode_all(decoder, prompts, baselines, args),
        }
    return {
        "temperature": temperature,
        "budget": args.budget,
        "tau_gain_tree_over_chain": runs["tree_best_first"]["tau"] / runs["chain"]["tau"],
        **runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", help="an HF drafter directory for the tiny target")
    parser.add_argument("--budget", type=int, default=7, help="drafted tokens verified per round (chain and tree)")
    parser.add_argument("--max-children", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.0])
    parser.add_argument("--seed", type=int, default=980406)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (tiny tensors: 1 avoids stalls)")
    parser.add_argument("--train", action="store_true", help="train a drafter even if the quickstart's exists")
    parser.add_argument("--steps", type=int, default=300, help="training steps when no drafter is given")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "tree_drafting.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    target = load_target(TINY_TARGET, device="cpu")
    drafter_dir = args.drafter or (str(QUICKSTART_DRAFTER) if QUICKSTART_DRAFTER.exists() and not args.train else None)
    if drafter_dir:
        drafter = AutoModel.from_pretrained(drafter_dir).eval()
        drafter.attach_target_head(read_target_head(TINY_TARGET))
        training = {"drafter": drafter_dir}
    else:
        from speculative_decoding import train_drafter  # the sibling benchmark's recipe

        train_args = argparse.Namespace(steps=args.steps, train_prompts=160, block_size=8, layer_ids=[1, 3])
        with tempfile.TemporaryDirectory() as workdir:
            drafter, training = train_drafter(target, Path(workdir), train_args)

    from speculative_decoding import prompts as eval_questions

    options = DecodingOptions()
    prompts = [
        render_chat(target, [{"role": "user", "content": question}], options)
        for question in eval_questions(args.eval_prompts, seed=12345)  # held out: another seed than training's
    ]
    runs = [run(target, drafter, temperature, prompts, args) for temperature in args.temperatures]
    result = {
        "benchmark": "tree_drafting",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "target": TINY_TARGET,
        "drafter": {"algorithm": type(drafter).__name__, **training},
        "eval_prompts": args.eval_prompts,
        "max_new_tokens": args.max_new_tokens,
        "runs": runs,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
