"""The quickstart config end to end through the real `specdec` program, shortened: fit, then test and export.

`specdec fit --config configs/quickstart.yaml` with a slice of its prompts and fewer epochs: the target answers the
prompts, both caches are built, DSpark trains, the callbacks log to CSV, and the run ends by printing τ and the
speedup. The checkpoint it leaves is then evaluated with `specdec test` and exported for each engine.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def specdec(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    executable = shutil.which("specdec")
    command = [executable] if executable else [sys.executable, "-m", "specdec.cli"]
    result = subprocess.run([*command, *args], capture_output=True, text=True, cwd=cwd, timeout=1200)
    assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def shortened(work: Path) -> list[str]:
    """Quickstart overrides: 40 training and 4 held-out prompts, short answers, 3 epochs, outputs under work/."""
    prompts = (REPO / "configs/data/tiny_train_prompts.jsonl").read_text().splitlines()[:40]
    (work / "train.jsonl").write_text("\n".join(prompts) + "\n")
    heldout = (REPO / "configs/data/tiny_heldout_prompts.jsonl").read_text().splitlines()[:4]
    (work / "tiny_heldout_prompts.jsonl").write_text("\n".join(heldout) + "\n")
    return [
        "--config", str(REPO / "configs/quickstart.yaml"),
        "--trainer.max_epochs", "3",
        "--trainer.default_root_dir", str(work),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(work),
        "--data.init_args.cache", str(work / "cache/train"),
        "--data.init_args.val_cache", str(work / "cache/heldout"),
        "--data.init_args.build.data", json.dumps([str(work / "train.jsonl")]),
        "--data.init_args.build.answers", str(work / "answers/train.jsonl"),
        "--data.init_args.build.sampling.max_tokens", "128",
        "--data.init_args.val_build.data", json.dumps([str(work / "tiny_heldout_prompts.jsonl")]),
        "--data.init_args.val_build.answers", str(work / "answers/heldout.jsonl"),
        "--data.init_args.val_build.sampling.max_tokens", "128",
        "--data.init_args.eval_sets.eval_dir", str(work),
        "--model.init_args.decoding.max_new_tokens", "48",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    work = tmp_path_factory.mktemp("quickstart")
    config = shortened(work)
    # The checkpoint callback's dirpath and the speedup callback's prompt dir are list items: edit a copy.
    values = subprocess.run(
        [shutil.which("specdec") or "specdec", "fit", *config, "--print_config"],
        capture_output=True, text=True, check=True, cwd=work,
    ).stdout  # fmt: skip
    import yaml

    resolved = yaml.safe_load(values)
    for callback in resolved["trainer"]["callbacks"]:
        if callback["class_path"].endswith("DrafterCheckpoint"):
            callback["init_args"]["dirpath"] = str(work / "checkpoints")
        if callback["class_path"].endswith("SpeedupEvaluation"):
            callback["init_args"]["eval_sets"]["eval_dir"] = str(work)
    (work / "config.yaml").write_text(yaml.safe_dump(resolved))
    fit = specdec("fit", "--config", str(work / "config.yaml"), cwd=work)
    return work, fit


def test_fit_runs_the_pipeline_logs_callbacks_and_prints_tau(quickstart):
    work, fit = quickstart
    assert (work / "cache/train/manifest.json").exists() and (work / "cache/heldout/manifest.json").exists()
    answers = [json.loads(line) for line in (work / "answers/train.jsonl").read_text().splitlines()]
    assert len(answers) == 40 and all(row["messages"][-1]["role"] == "assistant" for row in answers)
    last_line = [line for line in fit.stdout.splitlines() if line.strip()][-1]
    assert last_line.startswith("T=0: τ ") and " | T=1: τ " in last_line and "speedup" in last_line
    assert "engine compiled (warm-up" in last_line  # the compiler worked: no fallback to eager
    with next(work.rglob("metrics.csv")).open() as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    assert {"train/loss", "train/tau_probabilistic", "speedup/tau", "speedup/speedup"} <= columns
    assert {"speedup/T0/speedup", "speedup/T1/speedup", "speedup/T1/draft_length"} <= columns
    assert any(name.startswith("sim/") for name in columns), columns
    tau = [float(row["speedup/tau"]) for row in rows if row.get("speedup/tau")]
    assert tau and tau[-1] >= 1.0
    assert (work / "checkpoints" / "last.ckpt").exists()
    assert list((work / "checkpoints").glob("*.drafter/config.json"))


def test_specdec_test_reports_tau_and_speedup_on_the_checkpoint(quickstart):
    work, _ = quickstart
    result = specdec(
        "test", "--config", str(work / "config.yaml"), "--ckpt_path", str(work / "checkpoints" / "last.ckpt"), cwd=work
    )
    lines = result.stdout.splitlines()
    header = next(line for line in lines if line.startswith("dataset"))
    columns = [cell.strip() for cell in header.split("|")]
    row = next(line for line in lines if "dataset/tiny_heldout_prompts" in line)
    values = dict(zip(columns, (cell.strip() for cell in row.split("|")), strict=True))
    assert float(values["accept_len"]) > 1.0  # τ, bonus included: some drafts were accepted
    assert float(values["speedup"]) > 0 and float(values["tok/s"]) > 0 and float(values["ar_tok/s"]) > 0


def test_specdec_plan_runs_from_the_quickstart_outputs(quickstart):
    """A latency profile measured with the trained drafter, then the plan from the fit's CSV log and from the
    JSON `specdec test` leaves: a table, a plot per dataset and a best draft length within the drafter's block."""
    work, _ = quickstart
    drafter = sorted((work / "checkpoints").glob("*.drafter"))[-1]
    profile = work / "plan" / "profile.yaml"
    specdec(
        "plan", "profile", "--drafter", str(drafter), "--output", str(profile), "--concurrency", "[1, 2]",
        "--engine", "static", "--repeats", "3", cwd=work,
    )  # fmt: skip
    metrics = next(work.rglob("metrics.csv"))
    sources = [metrics, *sorted(work.rglob("speculative_test.json"))]
    for index, results in enumerate(sources):
        output = work / "plan" / str(index)
        planned = specdec(
            "plan", "speedup", "--results", str(results), "--profile", str(profile), "--concurrency", "[1, 2, 8]",
            "--gpu_hour_price", "2.0", "--output_dir", str(output), cwd=work,
        )  # fmt: skip
        assert "speedup" in planned.stdout
        rows = json.loads((output / "plan.json").read_text())["rows"]
        assert rows and all(1 <= row["draft_length"] <= 7 and row["speedup"] > 0 for row in rows)
        assert list(output.glob("plan_*.png"))
    assert {"T=0", "T=1"} <= {row["dataset"] for row in json.loads((work / "plan/0/plan.json").read_text())["rows"]}


@pytest.mark.parametrize("engine", ["deepspec", "vllm", "sglang"])
def test_export_the_quickstart_checkpoint(quickstart, engine):
    work, _ = quickstart
    drafter = sorted((work / "checkpoints").glob("*.drafter"))[-1]
    output = work / "exports" / engine
    specdec("export", "--source", str(drafter), "--format", engine, "--output_dir", str(output), cwd=work)
    assert (output / "config.json").exists()
    specdec("export-check", "validate", "--path", str(output), cwd=work)
