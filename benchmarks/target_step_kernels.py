"""What a verification forward costs against a plain step, by kernel choice: the tiny target's compiled step.

The compiled engine runs the target's fixed-shape step through Inductor with its default CPU lowering (linear
layers as extern ``mm`` calls). Inductor can instead freeze the weights and emit its own C++ GEMM templates
(``freezing`` + ``max_autotune`` with the ``CPP`` backend), which removes most of a small model's per-call cost.
This benchmark compiles the static session's step each way, in processes of its own (graphs of one code are
shared within a process), alternating, and times every token-count bucket interleaved (this machine's speed
drifts). The ratio that matters for speculative
decoding is the 8-token forward over the 1-token forward: once per-call overhead is gone, an 8-token forward
is bound by arithmetic and costs about twice a plain step on a small CPU. Usage::

    python benchmarks/target_step_kernels.py            # writes benchmarks/results/target_step_kernels.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch._inductor.config

from specdec.decoding.static_session import StaticTargetSession
from specdec.targets import TINY_TARGET, load_target

LOWERINGS = {
    "inductor-default": None,  # what engine='compiled' runs
    "freezing+cpp-gemm": {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"},
}
MARKER = "RESULT "


def measure(name: str, widths: list[int], rounds: int, calls: int) -> dict:
    """Compile the static session's step under one lowering and time every width (this process only: compiled
    graphs of the same code are shared by every session in a process, whatever Inductor config was set)."""
    target = load_target(TINY_TARGET, device="cpu")
    session = StaticTargetSession(target.model, [0, 2, 4], capacity=256, compile=True)
    session.prefill([list(range(10, 160))], reserve=136)  # a quickstart-sized prompt and the answer room
    compile_seconds = {}
    for width in widths:
        began = time.perf_counter()
        with torch._inductor.config.patch(LOWERINGS[name] or {}):  # compilation happens at the first call
            session.extend(torch.zeros(1, width, dtype=torch.long), torch.tensor([width]))
        session.keep(torch.tensor([0]))
        compile_seconds[str(width)] = round(time.perf_counter() - began, 1)
    if not session.step.compiled:
        raise RuntimeError(f"{name}: compilation failed ({session.step.error})")
    samples = {width: [] for width in widths}
    for _ in range(rounds):
        for width in widths:  # widths interleaved, so drift hits all alike
            ids, lengths, none = torch.zeros(1, width, dtype=torch.long), torch.tensor([width]), torch.tensor([0])
            began = time.perf_counter()
            for _ in range(calls):
                session.extend(ids, lengths)
                session.keep(none)
            samples[width].append((time.perf_counter() - began) / calls * 1e3)
    return {
        "forward_ms": {str(width): statistics.median(values) for width, values in samples.items()},
        "compile_seconds": compile_seconds,
        "capacity": session.capacity,
    }


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per process")
    parser.add_argument("--calls", type=int, default=20, help="calls per width per round")
    parser.add_argument("--repeats", type=int, default=2, help="processes per lowering, in alternating order")
    parser.add_argument("--lowering", choices=list(LOWERINGS), help=argparse.SUPPRESS)  # one measuring process
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "target_step_kernels.json")
    args = parser.parse_args()
    if args.lowering:
        print(MARKER + json.dumps(measure(args.lowering, args.widths, args.rounds, args.calls)))
        return
    runs: dict[str, list[dict]] = {name: [] for name in LOWERINGS}
    for repeat in range(args.repeats):
        for name in LOWERINGS if repeat % 2 == 0 else reversed(LOWERINGS):
            command = [sys.executable, __file__, "--lowering", name, "--widths", *map(str, args.widths)]
            command += ["--rounds", str(args.rounds), "--calls", str(args.calls)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(output.split(MARKER)[-1]))
    results = {}
    for name, measured in runs.items():
        ms = {str(w): round(statistics.median(run["forward_ms"][str(w)] for run in measured), 3) for w in args.widths}
        first, last = ms[str(args.widths[0])], ms[str(args.widths[-1])]
        results[name] = {
            "forward_ms": ms,
            f"forward_{args.widths[-1]}_over_{args.widths[0]}": round(last / first, 3),
            "compile_seconds": measured[0]["compile_seconds"],  # the first process; later ones hit the disk cache
        }
    default, fast = results["inductor-default"], results["freezing+cpp-gemm"]
    report = {
        "benchmark": "target_step_kernels",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "target": TINY_TARGET,
        "capacity": runs["inductor-default"][0]["capacity"],
        "processes_per_lowering": args.repeats,
        "lowerings": results,
        "plain_step_speedup_of_cpp_gemm": round(default["forward_ms"]["1"] / fast["forward_ms"]["1"], 3),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["lowerings"], indent=2))


if __name__ == "__main__":
    main()
