"""A global batch size that stays fixed when devices, nodes or the micro-batch change.

DeepSpec fixes the global batch (512 sequences) and derives gradient accumulation as
``global / (world_size · micro_batch)``; this callback does the same when fitting starts, so a paper config
runs unchanged on 8 GPUs, 2 nodes or one CPU.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback


class GlobalBatchSize(Callback):
    """Set ``trainer.accumulate_grad_batches = global_batch_size / (world_size · micro_batch_size)``.

    Args:
        global_batch_size: sequences per optimizer step over all ranks and accumulation steps.
        micro_batch_size: sequences per rank per forward (default: the DataModule's ``batch_size``).
    """

    def __init__(self, global_batch_size: int, micro_batch_size: int | None = None) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size must be at least 1; got {global_batch_size}")
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size

    def accumulation(self, world_size: int, micro_batch_size: int) -> int:
        per_step = world_size * micro_batch_size
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of world size {world_size} × "
                f"micro-batch {micro_batch_size}"
            )
        return self.global_batch_size // per_step

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        micro = self.micro_batch_size
        if micro is None:
            micro = getattr(trainer.datamodule, "batch_size", None)
        if micro is None:
            raise ValueError("GlobalBatchSize needs micro_batch_size, or a DataModule with a batch_size attribute")
        trainer.accumulate_grad_batches = self.accumulation(trainer.world_size, int(micro))
