"""In-loop evaluation callbacks: simulated τ on held-out cache batches and real decoding speedup, logged to CSV."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from specdec.callbacks import AcceptanceSimulation, SpeedupEvaluation
from specdec.callbacks.acceptance import simulated_acceptance
from specdec.data.cache.builder import TokenizeOptions, build_target_cache
from specdec.data.datamodules import TargetCacheDataModule
from specdec.data.prompts.sources import iter_training_conversations
from specdec.decoding import DecodingOptions
from specdec.lightning import DSparkModule
from specdec.targets import TINY_TARGET, load_target
from tests.test_datamodules import write_conversations

LAYER_IDS = [1, 3]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_simulated_acceptance_is_expected_prefix_survival():
    target = torch.log(torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]]]) + 1e-12)
    draft = torch.log(torch.tensor([[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]]) + 1e-12)
    survival, _, valid = simulated_acceptance(draft, target, torch.tensor([[True, True]]), 1.0)
    assert survival[0].tolist() == pytest.approx([0.5, 0.25], abs=1e-6)  # Σ min(p, q) per position, multiplied
    masked, _, valid = simulated_acceptance(draft, target, torch.tensor([[False, True]]), 1.0)
    assert masked[0].tolist() == [0.0, 0.0] and valid[0].tolist() == [False, False]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    directory = tmp_path_factory.mktemp("callback-cache")
    target = load_target(TINY_TARGET)
    for split, count, seed in (("train", 12, 3), ("val", 4, 4)):
        data = write_conversations(directory / f"{split}.jsonl", count, seed=seed, words=30)
        build_target_cache(
            target,
            list(iter_training_conversations(data)),
            directory / split,
            LAYER_IDS,
            TokenizeOptions(max_length=96),
            progress=False,
        )
    return directory


def test_callbacks_log_simulated_tau_and_speedup_during_fit(caches, tmp_path, capsys):
    torch.manual_seed(0)
    module = DSparkModule(
        TINY_TARGET,
        LAYER_IDS,
        num_hidden_layers=1,
        drafter={"block_size": 4, "num_anchors": 8, "markov_rank": 16},
        lr=3e-3,
        decoding=DecodingOptions(max_new_tokens=10, warmup_prompts=0),
    )
    trainer = L.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=CSVLogger(tmp_path / "logs"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        callbacks=[
            AcceptanceSimulation(every_n_steps=2, num_batches=1),
            SpeedupEvaluation(every_n_steps=2, num_prompts=2),
        ],
        default_root_dir=tmp_path,
    )
    datamodule = TargetCacheDataModule(str(caches / "train"), batch_size=4, val_cache=str(caches / "val"), seed=1)
    trainer.fit(module, datamodule=datamodule)
    printed = capsys.readouterr().out
    assert "τ " in printed and "speedup " in printed
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = {name for row in rows for name, value in row.items() if value not in ("", None)}
    assert {"sim/tau", "sim/tau_greedy", "sim/accept_rate@0", "speedup/tau", "speedup/speedup"} <= logged
    taus = [float(row["sim/tau"]) for row in rows if row.get("sim/tau")]
    assert all(1.0 <= tau <= 5.0 for tau in taus)
    speedups = [float(row["speedup/tau"]) for row in rows if row.get("speedup/tau")]
    assert len(speedups) >= 2 and all(1.0 <= tau <= 5.0 for tau in speedups)  # step 2 and the end of training
