"""Training under faults: `specdec fit` killed with SIGKILL mid-run resumes to the weights and losses of an
uninterrupted run, and a damaged checkpoint is refused naming the checkpoint to resume from instead."""

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from specdec.data.cache.builder import TokenizeOptions, build_target_cache
from specdec.data.prompts.sources import iter_training_conversations
from specdec.targets import TINY_TARGET, load_target
from tests.faults.test_cache_faults import conversations_file

ROOT = Path(__file__).resolve().parents[2]
LAYER_IDS = [0, 2, 4]
MAX_STEPS, EVERY = 24, 4
pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    directory = tmp_path_factory.mktemp("training")
    conversations = list(iter_training_conversations(conversations_file(directory / "data.jsonl", 24)))
    build_target_cache(
        load_target(TINY_TARGET),
        conversations,
        directory / "cache",
        LAYER_IDS,
        TokenizeOptions(max_length=96),
        samples_per_shard=6,
        progress=False,
    )
    return directory / "cache"


def fit_config(cache: Path, run: Path) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": MAX_STEPS,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(run),
            "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(run)}}],
            "callbacks": [
                {
                    "class_path": "specdec.callbacks.DrafterCheckpoint",
                    "init_args": {
                        "dirpath": str(run / "checkpoints"),
                        "filename": "step={step}",
                        "auto_insert_metric_name": False,
                        "every_n_train_steps": EVERY,
                        "save_top_k": -1,
                        "save_last": True,
                    },
                }
            ],
        },
        "model": {
            "class_path": "specdec.lightning.DSparkModule",
            "init_args": {"num_hidden_layers": 1, "drafter": {"block_size": 4, "num_anchors": 4}, "lr": 3e-3},
        },
        "data": {
            "class_path": "specdec.data.TargetCacheDataModule",
            "init_args": {"cache": str(cache), "batch_size": 2, "target": TINY_TARGET, "layer_ids": LAYER_IDS},
        },
    }
    path = run / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def fit(config: Path, *extra: str, **popen) -> subprocess.Popen:
    command = [sys.executable, "-m", "specdec.cli", "fit", "--config", str(config), *extra]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def step_losses(run: Path) -> dict[int, float]:
    """The per-step training loss of every CSV log under ``run`` (a resumed run appends a new version)."""
    losses = {}
    for path in sorted(run.glob("lightning_logs/version_*/metrics.csv")):
        with open(path) as handle:
            for row in csv.DictReader(handle):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.slow
def test_fit_killed_mid_run_resumes_to_the_weights_and_losses_of_an_uninterrupted_run(cache, tmp_path):
    reference_run = tmp_path / "reference"
    reference = fit(fit_config(cache, reference_run))
    log, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, log

    run = tmp_path / "killed"
    config = fit_config(cache, run)
    process = fit(config)
    marker = run / "checkpoints" / f"step={2 * EVERY}.ckpt"
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(random.Random(2).uniform(0.0, 0.2))  # somewhere in the steps after it, or in the next save
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    final = f"step={MAX_STEPS}.ckpt"
    assert not (run / "checkpoints" / final).exists(), "the kill must land before the end"

    resumed = fit(config, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, log
    want, got = weights(reference_run / "checkpoints" / final), weights(run / "checkpoints" / final)
    assert want.keys() == got.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    reference_losses, losses = step_losses(reference_run), step_losses(run)
    assert max(losses) == max(reference_losses)
    for step in range(2 * EVERY + 1, MAX_STEPS):
        assert losses[step] == pytest.approx(reference_losses[step], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_a_damaged_checkpoint_is_refused_naming_the_one_to_resume_from(cache, tmp_path):
    run = tmp_path / "run"
    config = fit_config(cache, run)
    first = fit(config, "--trainer.max_steps", str(2 * EVERY))
    log, _ = first.communicate(timeout=600)
    assert first.returncode == 0, log
    checkpoints = run / "checkpoints"
    damaged = checkpoints / "last.ckpt"
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])  # half-written, as by a crash
    resumed = fit(config, "--ckpt_path", str(damaged))
    log, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 2, log
    assert f"specdec: error: checkpoint {damaged} cannot be read" in log
    assert f"resume with --ckpt_path {checkpoints / f'step={2 * EVERY}.ckpt'}" in log
    assert not list(checkpoints.glob("*.partial"))  # checkpoints are renamed into place, never left half-written
