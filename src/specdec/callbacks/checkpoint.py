"""Checkpoints that also leave a servable drafter: an HF directory next to every Lightning checkpoint.

The Lightning ``.ckpt`` holds what resuming needs (weights, optimizer, schedule, data position); the directory
beside it holds only the drafter (``config.json`` + safetensors, no frozen target tensors) plus a provenance
file, which is what evaluation, export and ``AutoModel.from_pretrained`` read.

Checkpoints are written atomically (a ``.partial`` file, fsynced, then renamed), so a process killed while
saving leaves the previous checkpoint intact rather than a truncated one; a damaged checkpoint given to resume
from is refused naming the file and the newest intact checkpoint beside it. Under DeepSpeed the ``.ckpt`` is
DeepSpeed's sharded directory (written by DeepSpeed itself); the drafter directory beside it is still one
consolidated HF directory.
"""

from __future__ import annotations

import shutil

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from specdec.lightning.checkpoint_io import AtomicCheckpointIO, CorruptCheckpointError, check_checkpoint_readable
from specdec.lightning.drafter_directory import drafter_directory_of, save_drafter_directory

__all__ = [
    "AtomicCheckpointIO",
    "CorruptCheckpointError",
    "DrafterCheckpoint",
    "check_checkpoint_readable",
    "full_state_dict",
]


def full_state_dict(trainer: L.Trainer) -> dict:
    """The module's whole ``state_dict`` on every rank, sharded parameters gathered (a collective).

    FSDP and DDP strategies gather in ``lightning_module_state_dict``; DeepSpeed ZeRO-3 partitions parameters
    and its strategy does not, so they are gathered here with DeepSpeed's own context manager.
    """
    strategy = trainer.strategy
    if not getattr(strategy, "zero_stage_3", False):
        return strategy.lightning_module_state_dict()
    import deepspeed

    module = trainer.lightning_module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        return {name: tensor.detach().cpu().clone() for name, tensor in module.state_dict().items()}


class DrafterCheckpoint(ModelCheckpoint):
    """:class:`ModelCheckpoint` that writes the HF drafter directory next to each ``.ckpt`` and prunes it with it."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make it atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        state = full_state_dict(trainer)  # gathers sharded weights (collective)
        if trainer.is_global_zero:
            target = drafter_directory_of(filepath)
            if target.exists():
                shutil.rmtree(target)
            save_drafter_directory(trainer.lightning_module, target, state_dict=state, trainer=trainer)
        trainer.strategy.barrier("drafter_checkpoint")

    def _remove_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        directory = drafter_directory_of(filepath)
        if trainer.is_global_zero and directory.is_dir():
            shutil.rmtree(directory)
