"""DeepSpeed ZeRO through Lightning's ``DeepSpeedStrategy``: a few steps on the tiny target, then the drafter
directory DrafterCheckpoint writes, the sharded checkpoint read back by ``load_drafter``, and an export.

Lightning runs DeepSpeed on CUDA only, so these are ``gpu`` tests (and need ``pip install 'specdec[deepspeed]'``).
"""

from __future__ import annotations

import pytest
import torch

from specdec.callbacks import DrafterCheckpoint
from specdec.data.datamodules import TargetCacheDataModule
from specdec.export.api import export_drafter
from specdec.export.source import is_deepspeed_checkpoint, load_drafter
from specdec.lightning import DSparkModule
from specdec.targets import TINY_TARGET
from tests.test_training import LAYER_IDS, SMALL_DSPARK, cache  # noqa: F401  (the module-scoped cache fixture)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_checkpoints_and_exports(cache, tmp_path, stage):  # noqa: F811
    pytest.importorskip("deepspeed")
    import lightning as L
    from lightning.pytorch.strategies import DeepSpeedStrategy

    torch.manual_seed(0)
    module = DSparkModule(TINY_TARGET, LAYER_IDS, num_hidden_layers=1, drafter=SMALL_DSPARK, lr=3e-3)
    checkpoint = DrafterCheckpoint(dirpath=tmp_path / "checkpoints", filename="step={step}", save_last=True)
    trainer = L.Trainer(
        accelerator="cuda", devices=1, strategy=DeepSpeedStrategy(stage=stage, offload_optimizer=True),
        precision="bf16-mixed", max_steps=6, logger=False, callbacks=[checkpoint], enable_progress_bar=False,
        default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module, datamodule=TargetCacheDataModule(str(cache), batch_size=2, seed=0))
    sharded = tmp_path / "checkpoints" / "last.ckpt"
    assert is_deepspeed_checkpoint(sharded)
    directory = tmp_path / "checkpoints" / "last.drafter"
    from_directory = load_drafter(directory, TINY_TARGET)
    from_shards = load_drafter(sharded, TINY_TARGET)
    weights = {k: v for k, v in from_directory.state_dict().items() if "target_head" not in k}
    assert weights and all(v.abs().sum() > 0 for v in weights.values())  # gathered, not empty partitions
    for name, tensor in from_shards.state_dict().items():
        if name in weights:
            torch.testing.assert_close(tensor, weights[name], rtol=1e-2, atol=1e-2)  # bf16 module vs fp32 master
    export_drafter(from_shards, "vllm", tmp_path / "vllm")
    assert (tmp_path / "vllm" / "config.json").exists()
