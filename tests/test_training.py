"""Training pieces: the warmup→cosine schedule, Σnum/Σden metrics, and DSpark trained by Lightning on a cache."""

import math
from itertools import pairwise

import lightning as L
import pytest
import torch

from specdec.data.cache_builder import TokenizeOptions, build_target_cache
from specdec.data.datamodules import TargetCacheDataModule
from specdec.data.sources import iter_training_conversations
from specdec.lightning import DSparkModule, RatioMetric, warmup_cosine
from specdec.targets import TINY_TARGET, load_target
from tests.test_datamodules import write_conversations

LAYER_IDS = [1, 3, 4]


def test_warmup_cosine_has_no_glitch_at_the_transition():
    total, warmup = 100, 10
    factors = [warmup_cosine(step, total, warmup) for step in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[warmup - 1] == factors[warmup] == 1.0
    assert all(a <= b for a, b in pairwise(factors[:warmup]))
    assert all(a >= b for a, b in pairwise(factors[warmup:]))
    assert factors[-1] == pytest.approx(0.0, abs=1e-12)
    steps = [abs(b - a) for a, b in pairwise(factors[warmup:])]
    assert max(steps) <= math.pi / 2 / (total - warmup - 1) + 1e-9  # the cosine's largest slope, no jump
    assert warmup_cosine(50, 100, 0, min_lr_ratio=0.1) > 0.1


def test_ratio_metric_is_sum_over_sum():
    metric = RatioMetric()
    metric.update(torch.tensor(3.0), torch.tensor(3.0))
    metric.update(torch.tensor(0.0), torch.tensor(297.0))
    assert metric.compute().item() == pytest.approx(3 / 300)  # not the mean of ratios (0.5)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    directory = tmp_path_factory.mktemp("train-cache")
    data = write_conversations(directory / "train.jsonl", 16, seed=3, words=40)
    target = load_target(TINY_TARGET)
    build_target_cache(
        target,
        list(iter_training_conversations(data)),
        directory / "cache",
        LAYER_IDS,
        TokenizeOptions(max_length=128),
        progress=False,
    )
    return directory / "cache"


def test_dspark_module_learns_and_keeps_the_target_head_out_of_state(cache, tmp_path):
    torch.manual_seed(0)
    module = DSparkModule(
        TINY_TARGET,
        LAYER_IDS,
        num_hidden_layers=1,
        drafter={"block_size": 4, "num_anchors": 8},
        lr=3e-3,
        warmup_ratio=0.1,
    )
    frozen = {id(module.drafter.target_head.embed_weight), id(module.drafter.target_head.lm_head_weight)}
    assert not any(name.startswith("drafter.target_head") and "weight" in name for name in module.state_dict())
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = L.Trainer(
        max_steps=40,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Record()],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=TargetCacheDataModule(str(cache), batch_size=4, seed=1))
    optimizer = trainer.optimizers[0]
    assert not any(id(p) in frozen for group in optimizer.param_groups for p in group["params"])
    assert sum(losses[-8:]) / 8 < 0.6 * losses[0]
    logged = trainer.callback_metrics
    assert 0 < logged["train/accept_rate@0"] <= 1 and logged["train/tau_probabilistic"] >= 1
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] < 3e-3 * 0.05  # decayed to ~0
