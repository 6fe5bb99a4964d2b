"""Time and peak memory of the DSpark vocabulary terms (CE + L1), forward + backward, per implementation.

Shape: ``anchors × slots`` rows over the full Qwen3 vocabulary with bf16 logits, the draft requiring grad,
as one DSpark micro-batch sees them. Each implementation runs in a fresh subprocess so peak memory is its own:

- CPU: peak resident memory above the resident memory once the inputs exist (the kernel's high-water mark is
  reset after the inputs are allocated and read after the first forward + backward).
- CUDA: ``torch.cuda.max_memory_allocated`` above the allocation after the inputs exist.

The Triton kernels run on CPU only through the interpreter (``TRITON_INTERPRET=1``); that is a correctness
tool, so its time is reported but not compared. Usage::

    python benchmarks/dspark_loss.py                      # CPU, writes benchmarks/results/dspark_loss.json
    python benchmarks/dspark_loss.py --device cuda --output benchmarks/results/dspark_loss_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from machine import machine_info
from specdec.kernels import TRITON_AVAILABLE

from specdec.losses.chunked import DEFAULT_CHUNK_SIZE

VARIANTS = ("reference", "chunked", "triton")
RESULTS = Path(__file__).parent / "results" / "dspark_loss.json"
MEMORY_RATIO_LIMIT = 0.25
TIME_RATIO_LIMIT = 1.0


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident high-water mark (VmHWM); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _make_inputs(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Logits drawn directly in bf16, so no fp32 temporary raises the resident baseline."""
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (args.anchors, args.slots, args.vocab)
    draft = torch.randn(shape, generator=generator, dtype=torch.bfloat16, device=device).mul_(2.0)
    target = torch.randn(shape, generator=generator, dtype=torch.bfloat16, device=device).mul_(2.0)
    target_ids = torch.randint(0, args.vocab, shape[:-1], generator=generator, device=device)
    slot = torch.arange(args.slots, device=device, dtype=torch.float32)
    weights = torch.exp(-slot / 4.0).expand(shape[:-1])
    return draft.requires_grad_(), target, target_ids, weights


def _worker(args: argparse.Namespace) -> dict[str, object]:
    from specdec.losses import dspark_vocab_terms

    device = torch.device(args.device)
    draft, target, target_ids, weights = _make_inputs(args, device)

    def step() -> None:
        ce, l1 = dspark_vocab_terms(draft, target, target_ids, impl=args.worker, chunk_size=args.chunk_size)
        (weights * (0.1 * ce + 0.9 * l1)).sum().backward()
        draft.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak_bytes = torch.cuda.max_memory_allocated() - baseline
        memory_method = "torch.cuda.max_memory_allocated above the allocation after the inputs"
    else:
        baseline_kib = _status_kib("VmRSS")
        if _reset_peak_rss():
            step()
            peak_kib = _status_kib("VmHWM")
            memory_method = "VmHWM (reset after the inputs) above VmRSS after the inputs"
        else:
            step()
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            memory_method = "ru_maxrss above VmRSS after the inputs"
        peak_bytes = (peak_kib - baseline_kib) * 1024

    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    return {
        "seconds_median": statistics.median(seconds),
        "seconds": seconds,
        "peak_bytes": peak_bytes,
        "memory_method": memory_method,
        "input_bytes": 2 * draft.numel() * draft.element_size(),
        "grad_bytes": draft.numel() * draft.element_size(),
    }


def _triton_block_size() -> int | None:
    if not TRITON_AVAILABLE:
        return None
    from specdec.kernels.vocab_losses import DEFAULT_BLOCK_SIZE

    return DEFAULT_BLOCK_SIZE


def _run_variant(args: argparse.Namespace, variant: str, anchors: int, repeats: int) -> dict[str, object]:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if variant == "triton" and args.device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    command = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--device",
        args.device,
        "--anchors",
        str(anchors),
        "--slots",
        str(args.slots),
        "--vocab",
        str(args.vocab),
        "--repeats",
        str(repeats),
    ]
    if args.chunk_size is not None:
        command += ["--chunk-size", str(args.chunk_size)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant} failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["rows"] = anchors * args.slots
    if env.get("TRITON_INTERPRET") == "1":
        result["mode"] = "TRITON_INTERPRET=1 (interpreter on CPU: a correctness tool, not a fast path)"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--anchors", type=int, default=64)
    parser.add_argument("--slots", type=int, default=7)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--chunk-size", type=int, default=None, help="vocabulary columns per chunk (lean paths)")
    parser.add_argument("--interpret-anchors", type=int, default=64, help="anchors for Triton under the interpreter")
    parser.add_argument("--interpret-repeats", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(_worker(args)))
        return

    variants: dict[str, dict[str, object]] = {}
    for variant in VARIANTS:
        interpreted = variant == "triton" and args.device == "cpu"
        anchors = args.interpret_anchors if interpreted else args.anchors
        repeats = args.interpret_repeats if interpreted else args.repeats
        variants[variant] = _run_variant(args, variant, anchors, repeats)
        print(
            f"{variant}: {variants[variant]['seconds_median']:.3f} s, {variants[variant]['peak_bytes'] / 2**20:.1f} MiB"
        )

    lean = "chunked" if args.device == "cpu" else "triton"
    comparable = [
        name for name in VARIANTS if name != "reference" and variants[name]["rows"] == variants["reference"]["rows"]
    ]
    ratios = {
        f"{name}{' (TRITON_INTERPRET=1)' if 'mode' in variants[name] else ''}/reference": {
            "memory": variants[name]["peak_bytes"] / variants["reference"]["peak_bytes"],
            "time": variants[name]["seconds_median"] / variants["reference"]["seconds_median"],
        }
        for name in comparable
    }
    lean_ratios = ratios[f"{lean}/reference"]
    report = {
        "benchmark": "dspark_vocab_terms (CE + L1) forward + backward, bf16 logits, draft requires grad",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/dspark_loss.py", *sys.argv[1:]]),
        "device": args.device,
        "machine": machine_info(args.device),
        "shape": {
            "anchors": args.anchors,
            "slots": args.slots,
            "rows": args.anchors * args.slots,
            "vocab": args.vocab,
            "dtype": "bfloat16",
        },
        "chunk_size": args.chunk_size or {"chunked": DEFAULT_CHUNK_SIZE, "triton": _triton_block_size()},
        "notes": (
            "peak_bytes includes the bf16 gradient of the draft logits (grad_bytes), which every variant must "
            "produce; reference keeps full fp32 softmaxes for backward. Triton on CPU runs in the interpreter, "
            "so its time measures the interpreter, not the kernel."
        ),
        "repeats": args.repeats,
        "variants": variants,
        "ratios": ratios,
        "acceptance": {
            "lean": lean,
            "memory_ratio_limit": MEMORY_RATIO_LIMIT,
            "time_ratio_limit": TIME_RATIO_LIMIT,
            "met": lean_ratios["memory"] <= MEMORY_RATIO_LIMIT and lean_ratios["time"] <= TIME_RATIO_LIMIT,
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
