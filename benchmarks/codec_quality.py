"""What a feature codec costs in drafter quality: the quickstart drafter trained on bf16, fp8 and fp4 caches.

Each codec gets its own run of ``configs/quickstart.yaml`` (same seed, same steps) in its own directory; the
answers are regenerated once and copied into every run, so the three caches hold the same tokens and differ
only in how the target's features are stored. Every run ends with the quickstart's held-out evaluation (the
16 held-out prompts decoded against the target, greedily and at T = 1); its τ is read from the run's CSV log.
Decoding does not read the cache, so the held-out figures compare the drafters alone. The draft length is fixed
(the drafter's block): the quickstart's default picks it from measured step costs, which would make τ depend on
the machine's load rather than on the drafter.

Run: ``python benchmarks/codec_quality.py [--work_dir DIR]`` (CPU, about 25 minutes; writes
``benchmarks/results/codec_quality.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "codec_quality.json"
CODECS = ("bf16", "fp8_e4m3", "fp4_e2m1")
RUN = Path("runs") / "quickstart"
METRICS = ("speedup/T0/tau", "speedup/T1/tau", "speedup/T0/accept_rate@0", "speedup/T1/accept_rate@0")


def last_values(metrics_csv: Path) -> dict[str, float]:
    """The last logged value of every column of a Lightning CSV log."""
    values: dict[str, float] = {}
    with metrics_csv.open() as handle:
        for row in csv.DictReader(handle):
            values.update({name: float(value) for name, value in row.items() if value not in ("", None)})
    return values


def fit(directory: Path, codec: str) -> dict[str, float]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "configs").unlink(missing_ok=True)
    (directory / "configs").symlink_to(ROOT / "configs")
    command = [
        sys.executable, "-m", "specdec.cli", "fit", "--config", "configs/quickstart.yaml",
        "--data.init_args.build.codec", codec, "--data.init_args.val_build.codec", codec,
        "--model.init_args.decoding.draft_length", "fixed",
    ]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, cwd=directory, check=True)
    seconds = time.perf_counter() - started
    logs = sorted((directory / RUN / "logs").glob("version_*/metrics.csv"))
    values = last_values(logs[-1])
    totals = json.loads((directory / RUN / "cache" / "train" / "manifest.json").read_text())["totals"]
    row = {"codec": codec, "seconds": round(seconds), "step": values.get("step")}
    row.update(train_cache_bytes=totals["bytes"], train_cache_bytes_per_token=totals["bytes_per_token"])
    row.update({name.removeprefix("speedup/"): round(values[name], 4) for name in METRICS if name in values})
    for name in ("val_loss", "val/loss", "val/acceptance/tau", "val/tau"):
        if name in values:
            row[name] = round(values[name], 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", type=Path, default=ROOT / "runs" / "codec_quality")
    args = parser.parse_args()
    rows = []
    answers = args.work_dir / CODECS[0] / RUN / "answers"
    for codec in CODECS:
        directory = args.work_dir / codec
        if codec != CODECS[0]:
            shutil.copytree(answers, directory / RUN / "answers", dirs_exist_ok=True)
        rows.append(fit(directory, codec))
        print(json.dumps(rows[-1]), flush=True)
    reference = rows[0]
    for row in rows:
        for name in ("T0/tau", "T1/tau"):
            if name in row and name in reference:
                row[f"{name}_vs_{CODECS[0]}"] = round(row[name] / reference[name], 4)
    result = {
        "benchmark": "codec_quality",
        "command": "python benchmarks/codec_quality.py",
        "config": "configs/quickstart.yaml",
        "environment": {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
