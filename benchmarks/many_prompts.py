"""100,000 prompts through import and regeneration bookkeeping: time and peak memory of each phase.

A seeded prompt file of ``PROMPTS`` records (single- and multi-turn, a few long ones) is imported, answered by
the tiny target with the local backend (two greedy tokens per turn, so the bookkeeping — streaming the input,
the done-key set, the append-only output, the progress — is what is measured, not generation), answered again
after a SIGKILL halfway (the rerun must skip exactly what was written), and answered a last time when everything
is done. Each phase runs in its own process; its peak RSS is the process's ``ru_maxrss``. The run checks the
exactly-once invariant on the output: every key once, none missing.

Run: ``python benchmarks/many_prompts.py`` (CPU, about 55 minutes on 2 cores; writes
``benchmarks/results/many_prompts.json``).
"""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "many_prompts.json"
PROMPTS = 100_000
WORDS = ["list", "sum", "loop", "value", "prime", "string", "count", "even", "odd", "function", "sort", "tree"]
PHASE = """
import json, resource, sys, time
started = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - started,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""
IMPORT = """
from specdec.data import read_conversations
conversations, summary = read_conversations(sys.argv[1])
assert len(conversations) == int(sys.argv[2]), (len(conversations), summary)
"""
REGENERATE = """
from specdec.cli import main
main(["data", "regenerate", "--data", sys.argv[1], "--output", sys.argv[2], "--backend", "local",
      "--batch_size", "64", "--device", "cpu", "--temperature", "0", "--max_tokens", "2", "--progress", "false"])
"""


def write_prompts(path: Path, count: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as handle:
        for index in range(count):
            words = " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))
            if index % 1000 == 0:
                words = " ".join(rng.choices(WORDS, k=400))  # a long prompt now and then
            turns = [f"Prompt {index}: {words}?"] + (["And a test?"] if index % 5 == 0 else [])
            handle.write(json.dumps({"turns": turns}) + "\n")


def phase(body: str, *args: str) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", PHASE.format(body=body), *args], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        prompts, output = Path(scratch) / "prompts.jsonl", Path(scratch) / "answers.jsonl"
        write_prompts(prompts, PROMPTS)
        phases = {"import": phase(IMPORT, str(prompts), str(PROMPTS))}

        command = [sys.executable, "-c", PHASE.format(body=REGENERATE), str(prompts), str(output)]
        killed = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.perf_counter()
        while lines(output) < PROMPTS // 2 and killed.poll() is None:
            time.sleep(0.05)
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait()
        written_before_kill = lines(output)
        phases["regenerate_until_killed"] = {"seconds": time.perf_counter() - started, "written": written_before_kill}
        phases["regenerate_rerun"] = phase(REGENERATE, str(prompts), str(output))
        phases["regenerate_all_done"] = phase(REGENERATE, str(prompts), str(output))

        keys = [json.loads(line)["key"] for line in output.read_text().splitlines()]
        exactly_once = len(keys) == len(set(keys)) == PROMPTS
        prompt_bytes, output_bytes = prompts.stat().st_size, output.stat().st_size
    result = {
        "benchmark": "many_prompts",
        "command": "python benchmarks/many_prompts.py",
        "environment": {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__},
        "prompts": PROMPTS,
        "prompt_file_bytes": prompt_bytes,
        "output_file_bytes": output_bytes,
        "phases": {name: {k: round(v, 2) for k, v in values.items()} for name, values in phases.items()},
        "peak_rss_mb_max": round(max(v.get("peak_rss_mb", 0) for v in phases.values()), 1),
        "exactly_once": exactly_once,
    }
    print(json.dumps(result, indent=2))
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    if not exactly_once:
        raise SystemExit("the output does not hold every key exactly once")


if __name__ == "__main__":
    main()
