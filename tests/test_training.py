"""Training: schedule, Σnum/Σden metrics, the drafter modules learning, exact resume, checkpoints as HF drafters."""

import math
from itertools import pairwise

import lightning as L
import pytest
import torch
from transformers import AutoModel

from specdec.callbacks import DrafterCheckpoint, GlobalBatchSize
from specdec.data.cache.builder import TokenizeOptions, build_target_cache
from specdec.data.datamodules import TargetCacheDataModule
from specdec.data.prompts.sources import iter_training_conversations
from specdec.lightning import (
    DFlashModule,
    DSparkModule,
    Eagle3Module,
    RatioMetric,
    drafter_directory_of,
    warmup_cosine,
)
from specdec.lightning.drafter_directory import PROVENANCE_FILE
from specdec.targets import TINY_TARGET, load_target
from tests.test_datamodules import write_conversations

LAYER_IDS = [1, 3, 4]
SMALL_DSPARK = {"block_size": 4, "num_anchors": 8, "markov_rank": 16}


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
        samples_per_shard=6,
        progress=False,
    )
    return directory / "cache"


class RecordStepLoss(L.Callback):
    """The global step loss the module logs once per optimizer step."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if "train/loss" in trainer.callback_metrics:
            self.losses[trainer.global_step] = trainer.callback_metrics["train/loss"].item()


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return L.Trainer(
        accelerator="cpu",
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_dspark_module_learns_and_keeps_the_target_head_out_of_state(cache, tmp_path):
    torch.manual_seed(0)
    module = DSparkModule(TINY_TARGET, LAYER_IDS, num_hidden_layers=1, drafter=SMALL_DSPARK, lr=3e-3, warmup_ratio=0.1)
    assert not any(name.startswith("drafter.target_head") and "weight" in name for name in module.state_dict())
    record = RecordStepLoss()
    trainer = quiet_trainer(tmp_path, max_steps=40, callbacks=[record])
    trainer.fit(module, datamodule=TargetCacheDataModule(str(cache), batch_size=4, seed=1))
    head = module.drafter.target_head
    assert head.attached and head.embed_weight.abs().sum() > 0
    frozen = {id(head.embed_weight), id(head.lm_head_weight)}
    optimizer = trainer.optimizers[0]
    assert not any(id(p) in frozen for group in optimizer.param_groups for p in group["params"])
    losses = [record.losses[step] for step in sorted(record.losses)]
    assert sum(losses[-8:]) / 8 < 0.6 * losses[0]
    logged = trainer.callback_metrics
    assert 0 < logged["train/accept_rate@0"] <= 1 and logged["train/tau_probabilistic"] >= 1
    assert 0 <= logged["train/confidence_abs_error"] <= 1 and logged["train/anchors_per_sequence"] > 0
    assert logged["train/grad_norm"] > 0 and logged["train/weight"] > 0
    assert trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0] < 3e-3 * 0.05  # decayed to ~0


@pytest.mark.parametrize("module_class", [DFlashModule, Eagle3Module])
def test_dflash_and_eagle3_modules_learn(cache, tmp_path, module_class):
    torch.manual_seed(0)
    if module_class is DFlashModule:
        module = DFlashModule(TINY_TARGET, LAYER_IDS, num_hidden_layers=1, drafter={"block_size": 4, "num_anchors": 8})
        assert module.config.is_dflash and module.hparams.ce_alpha == 1.0 and module.hparams.l1_alpha == 0.0
    else:
        module = Eagle3Module(TINY_TARGET, LAYER_IDS, ttt_length=3, lr=3e-3)
    module.hparams.lr = 3e-3
    record = RecordStepLoss()
    val = TargetCacheDataModule(str(cache), batch_size=4, seed=1, val_cache=str(cache))
    trainer = quiet_trainer(tmp_path, max_steps=24, callbacks=[record], limit_val_batches=2, check_val_every_n_epoch=3)
    trainer.fit(module, datamodule=val)
    losses = [record.losses[step] for step in sorted(record.losses)]
    assert sum(losses[-4:]) / 4 < 0.8 * losses[0]
    metrics = trainer.callback_metrics
    assert 0 < metrics["train/accept_rate@0"] <= 1 and metrics["val/tau_probabilistic"] >= 1
    assert metrics["val/loss"] > 0


def test_eagle3_reduced_vocabulary_is_taken_from_the_training_tokens(cache, tmp_path):
    module = Eagle3Module(TINY_TARGET, LAYER_IDS, ttt_length=2, draft_vocab_size=256)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=TargetCacheDataModule(str(cache), batch_size=4))
    drafter = module.drafter
    assert int(drafter.t2d.sum()) == 256
    ids = drafter.draft_token_ids()
    assert bool((ids[1:] > ids[:-1]).all()) and bool(drafter.t2d[ids].all())


class Crash(L.Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("simulated crash")


def _resume_run(cache, directory, max_steps, crash_at=None, ckpt_path=None):
    torch.manual_seed(0)
    module = DSparkModule(TINY_TARGET, LAYER_IDS, num_hidden_layers=1, drafter=SMALL_DSPARK, lr=2e-3, seed=5)
    record = RecordStepLoss()
    checkpoints = DrafterCheckpoint(dirpath=directory, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    callbacks = [record, checkpoints] + ([Crash(crash_at)] if crash_at is not None else [])
    trainer = quiet_trainer(directory, max_steps=max_steps, callbacks=callbacks, enable_checkpointing=True)
    data = TargetCacheDataModule(str(cache), batch_size=2, seed=7, shuffle_buffer=4)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module, record.losses


def test_killed_and_resumed_training_equals_an_uninterrupted_run(cache, tmp_path):
    # 16 samples / batch 2 = 8 batches per epoch: step 12 is mid-way through the second epoch.
    reference, reference_losses = _resume_run(cache, tmp_path / "full", max_steps=12)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _resume_run(cache, tmp_path / "crashed", max_steps=12, crash_at=6)
    checkpoint = tmp_path / "crashed" / "step=4.ckpt"
    assert checkpoint.exists() and not (tmp_path / "crashed" / "step=8.ckpt").exists()
    resumed, resumed_losses = _resume_run(cache, tmp_path / "crashed", max_steps=12, ckpt_path=str(checkpoint))
    assert sorted(resumed_losses) == list(range(5, 13))
    for step in range(5, 13):
        assert resumed_losses[step] == pytest.approx(reference_losses[step], rel=1e-5, abs=1e-6), step
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)

    # Each checkpoint has an HF drafter directory beside it: weights without the frozen target tensors.
    directory = drafter_directory_of(tmp_path / "full" / "step=12.ckpt")
    assert (directory / "config.json").exists() and (directory / PROVENANCE_FILE).exists()
    loaded = AutoModel.from_pretrained(directory)
    saved = dict(loaded.state_dict())
    assert not any("target_head.embed_weight" in name or "lm_head_weight" in name for name in saved)
    for name, tensor in reference.drafter.state_dict().items():
        torch.testing.assert_close(saved[name], tensor, msg=name)


def test_global_batch_size_derives_accumulation(cache, tmp_path):
    assert GlobalBatchSize(512).accumulation(world_size=8, micro_batch_size=1) == 64
    with pytest.raises(ValueError, match="not a multiple"):
        GlobalBatchSize(512).accumulation(world_size=3, micro_batch_size=1)
    module = DSparkModule(TINY_TARGET, LAYER_IDS, num_hidden_layers=1, drafter=SMALL_DSPARK)
    trainer = quiet_trainer(tmp_path, max_steps=1, callbacks=[GlobalBatchSize(8)])
    trainer.fit(module, datamodule=TargetCacheDataModule(str(cache), batch_size=2))
    assert trainer.accumulate_grad_batches == 4


def test_wandb_offline_tensorboard_and_csv_loggers_receive_the_metrics(cache, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    loggers = [
        WandbLogger(project="specdec-test", save_dir=str(tmp_path), offline=True),
        TensorBoardLogger(str(tmp_path), name="tb"),
        CSVLogger(str(tmp_path), name="csv"),
    ]
    module = DSparkModule(TINY_TARGET, LAYER_IDS, num_hidden_layers=1, drafter=SMALL_DSPARK)
    trainer = quiet_trainer(tmp_path, max_steps=3, logger=loggers, log_every_n_steps=1)
    trainer.fit(module, datamodule=TargetCacheDataModule(str(cache), batch_size=2))
    loggers[0].experiment.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert runs and runs[0].stat().st_size > 0
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    header = next((tmp_path / "csv").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "train/loss" in header and "train/accept_rate@0" in header


def test_compiled_training_step_matches_eager(cache, tmp_path):
    losses = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        module = DSparkModule(
            TINY_TARGET, LAYER_IDS, num_hidden_layers=1, drafter=SMALL_DSPARK, compile=compiled, seed=3
        )
        record = RecordStepLoss()
        trainer = quiet_trainer(tmp_path, max_steps=3, callbacks=[record])
        trainer.fit(module, datamodule=TargetCacheDataModule(str(cache), batch_size=2, shuffle=False))
        losses[compiled] = [record.losses[step] for step in sorted(record.losses)]
        assert not any("compiled" in name for name in module.state_dict())
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
