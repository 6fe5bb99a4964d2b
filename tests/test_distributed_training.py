"""`specdec fit` under DDP on CPU (gloo): 2 processes step exactly like 1 process with twice the accumulation.

The global batch is fixed (``GlobalBatchSize``), the base module normalises each optimizer step's loss over every
slot of the step, and anchors are drawn from the global micro-batch index, so a 2-process run and a 1-process
run over the same global micro-batches must log the same step losses; a 2-process checkpoint then resumes on
1 process and continues that same curve.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from specdec.lightning import drafter_directory_of
from specdec.targets import TINY_TARGET
from tests.test_training import LAYER_IDS, SMALL_DSPARK, cache  # noqa: F401  (the cache fixture)

REPO = Path(__file__).parents[1]


def fit_config(directory: Path, cache_dir: Path, max_steps: int) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "max_steps": max_steps,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(directory),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(directory), "name": "logs", "version": 0},
            },
            "callbacks": [
                {"class_path": "specdec.callbacks.GlobalBatchSize", "init_args": {"global_batch_size": 4}},
                {
                    "class_path": "specdec.callbacks.DrafterCheckpoint",
                    "init_args": {
                        "dirpath": str(directory / "checkpoints"),
                        "filename": "{step}",
                        "every_n_train_steps": 3,
                        "save_top_k": -1,
                    },
                },
            ],
        },
        "model": {
            "class_path": "specdec.lightning.DSparkModule",
            "init_args": {
                "num_hidden_layers": 1,
                "drafter": SMALL_DSPARK,
                "lr": 2e-3,
                "seed": 5,
            },
        },
        "data": {
            "class_path": "tests.interleaved_data.InterleavedCacheDataModule",
            "init_args": {
                "cache": str(cache_dir),
                "target": TINY_TARGET,
                "layer_ids": LAYER_IDS,
                "batch_size": 2,
                "repeat": 2,
            },
        },
    }
    path = directory / "config.yaml"
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def run_fit(config: Path, *extra: str) -> None:
    executable = shutil.which("specdec")
    command = [executable] if executable else [sys.executable, "-m", "specdec.cli"]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.pop("WORLD_SIZE", None)
    result = subprocess.run(
        [*command, "fit", "--config", str(config), *extra], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]


def step_losses(directory: Path) -> dict[int, float]:
    with (directory / "logs" / "version_0" / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/loss")]
    return {int(row["step"]): float(row["train/loss"]) for row in rows}


def final_weights(directory: Path, step: int) -> dict[str, torch.Tensor]:
    drafter = drafter_directory_of(directory / "checkpoints" / f"step={step}.ckpt")
    return load_file(drafter / "model.safetensors")


def test_two_processes_match_one_process_with_doubled_accumulation(cache, tmp_path):  # noqa: F811
    single, double = tmp_path / "one-process", tmp_path / "two-processes"
    run_fit(fit_config(single, cache, max_steps=6))
    run_fit(fit_config(double, cache, max_steps=6), "--trainer.devices", "2", "--trainer.strategy", "ddp")

    one, two = step_losses(single), step_losses(double)
    assert sorted(one) == sorted(two) and len(one) == 6
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
    for name, tensor in final_weights(single, 6).items():
        torch.testing.assert_close(final_weights(double, 6)[name], tensor, rtol=1e-3, atol=1e-5, msg=name)

    # The 2-process checkpoint at step 3 resumes on 1 process and continues the same curve.
    checkpoint = double / "checkpoints" / "step=3.ckpt"
    resumed = tmp_path / "resumed-on-one"
    run_fit(fit_config(resumed, cache, max_steps=6), "--ckpt_path", str(checkpoint))
    continued = step_losses(resumed)
    assert sorted(continued) == [3, 4, 5]  # logged before each optimizer step: 0-based
    for step in continued:
        assert continued[step] == pytest.approx(one[step], rel=1e-4, abs=1e-5), step
