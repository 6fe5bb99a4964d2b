"""Time per verified round of the acceptance test: the PyTorch reference (eager and compiled) against the Triton
kernels of ``specdec.kernels.verification``, in one process on the same inputs.

A round: ``rows`` requests, ``width`` = anchor + drafts, the full Qwen3 vocabulary, bf16 target logits, fp32
drafter distributions (zero after the drafts, as the engine lays them out), every draft verified. The
reference compiled is what ``engine='compiled'`` runs (``CompiledStep``: Inductor on CPU, CUDA graphs on CUDA).

On CPU the kernels run only under the Triton interpreter (``TRITON_INTERPRET=1``, set here before Triton is
imported): a correctness tool, so its time is reported and labelled, not compared. Usage::

    python benchmarks/verification_kernel.py                 # CPU, writes benchmarks/results/verification_kernel.json
    python benchmarks/verification_kernel.py --device cuda --output benchmarks/results/verification_kernel_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch
from machine import machine_info

RESULTS = Path(__file__).parent / "results" / "verification_kernel.json"
INTERPRETED = "TRITON_INTERPRET=1 (correctness tool, not a fast path)"


def _inputs(rows: int, width: int, vocab: int, temperature: float, device: torch.device) -> tuple:
    from specdec.sampling import draw, token_probabilities

    generator = torch.Generator(device=device).manual_seed(0)
    shape = (rows, width, vocab)
    logits = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16).mul_(2.0)
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
    q = token_probabilities(logits.float().add_(noise.float()), temperature)
    q[:, -1] = 0  # the slot after the last draft: nothing drafted there, the bonus draw follows p
    drafts = draw(q[:, :-1], uniforms=torch.rand(rows, width - 1, generator=generator, device=device))
    counts = torch.full((rows,), width - 1, device=device)
    u = torch.rand(rows, width - 1, generator=generator, device=device)
    u_next = torch.rand(rows, generator=generator, device=device)
    stops = torch.tensor([vocab - 1], device=device)
    return logits, q, drafts, counts, u, u_next, stops


def _time(run: Callable[[], tuple], repeats: int, warm: bool, device: torch.device) -> tuple[list[float], tuple]:
    def synchronise() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if warm:  # compilation (Inductor, CUDA graphs, Triton JIT) out of the timed calls
        run()
    seconds, output = [], ()
    for _ in range(repeats):
        synchronise()
        began = time.perf_counter()
        output = run()
        synchronise()
        seconds.append(time.perf_counter() - began)
    return seconds, output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rows", default="1,8", help="comma-separated requests per round")
    parser.add_argument("--width", type=int, default=8, help="anchor + drafts")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--temperatures", default="1.0,0.0", help="comma-separated; below 1e-5 greedy")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--interpret-repeats", type=int, default=1, help="timed kernel calls under the interpreter")
    parser.add_argument("--no-compiled", action="store_true", help="skip the compiled reference")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    device = torch.device(args.device)
    interpreted = device.type == "cpu"
    if interpreted:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is first imported (by specdec or transformers)
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    from specdec.kernels import kernels_usable_on
    from specdec.kernels.verification import DEFAULT_BLOCK_SIZE, verify_round

    from specdec.decoding.compiled import CompiledStep
    from specdec.decoding.engine import acceptance_test

    if not kernels_usable_on(device.type):
        raise SystemExit(f"Triton kernels cannot run on {device.type} here")

    measurements = []
    for temperature in (float(value) for value in args.temperatures.split(",")):
        compiled = None
        if not args.no_compiled:
            compiled = CompiledStep(acceptance_test(temperature), enabled=True, name="acceptance test", device=device)
        for rows in (int(value) for value in args.rows.split(",")):
            inputs = _inputs(rows, args.width, args.vocab, temperature, device)
            reference = acceptance_test(temperature)
            runs: dict[str, tuple[Callable[[], tuple], int, bool]] = {
                "reference (eager)": (lambda run=reference, x=inputs: run(*x), args.repeats, True),
            }
            if compiled is not None:
                runs["reference (compiled)"] = (lambda run=compiled, x=inputs: run(*x), args.repeats, True)
            kernel_repeats = args.interpret_repeats if interpreted else args.repeats
            kernel = (lambda x=inputs, t=temperature: verify_round(*x, t), kernel_repeats, not interpreted)
            runs["kernel"] = kernel
            outputs = {}
            for variant, (run, repeats, warm) in runs.items():
                with torch.no_grad():
                    seconds, outputs[variant] = _time(run, repeats, warm, device)
                entry = {
                    "rows": rows,
                    "width": args.width,
                    "temperature": temperature,
                    "variant": variant,
                    "seconds_median": statistics.median(seconds),
                    "seconds": seconds,
                }
                if variant == "kernel" and interpreted:
                    entry["mode"] = INTERPRETED
                measurements.append(entry)
                print(f"T={temperature} rows={rows} {variant}: {1000 * entry['seconds_median']:.2f} ms", flush=True)
            expected, got = outputs["reference (eager)"], outputs["kernel"]
            measurements[-1]["equals_reference"] = {
                "accepted": bool(torch.equal(expected[0], got[0])),
                "next_tokens": bool(torch.equal(expected[1], got[1])),
                "accepted_mean": float(expected[0].float().mean()),
            }

    report = {
        "benchmark": "acceptance test of one verified round: reference (PyTorch) vs fused Triton kernels",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/verification_kernel.py", *sys.argv[1:]]),
        "device": args.device,
        "machine": machine_info(device),
        "shape": {"width": args.width, "vocab": args.vocab, "logits_dtype": "bfloat16", "q_dtype": "float32"},
        "block_size": DEFAULT_BLOCK_SIZE,
        "repeats": args.repeats,
        "notes": (
            "seconds per round, device-synchronised, median of repeats after one untimed call (except under the "
            "interpreter, which compiles nothing). On CPU the kernel runs in the Triton interpreter: its time "
            "measures the interpreter, not the kernel, and the engine's 'auto' never picks it there."
        ),
        "measurements": measurements,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
