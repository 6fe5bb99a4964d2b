"""Checkpoints that also leave a servable drafter: an HF directory next to every Lightning checkpoint.

The Lightning ``.ckpt`` holds what resuming needs (weights, optimizer, schedule, data position); the directory
beside it holds only the drafter (``config.json`` + safetensors, no frozen target tensors) plus a provenance
file, which is what evaluation, export and ``AutoModel.from_pretrained`` read.

Checkpoints are written atomically (a ``.partial`` file, fsynced, then renamed), so a process killed while
saving leaves the previous checkpoint intact rather than a truncated one; a damaged checkpoint given to resume
from is refused naming the file and the newest intact checkpoint beside it.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from specdec.lightning.drafter_directory import drafter_directory_of, save_drafter_directory

PARTIAL_SUFFIX = ".partial"


class CorruptCheckpointError(RuntimeError):
    """A checkpoint file that cannot be read back (truncated, half-written by an older writer, damaged)."""


def _is_local(path: Any) -> bool:
    return "://" not in str(path)


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def intact_checkpoints(directory: Path, excluding: Path | None = None) -> list[Path]:
    """``.ckpt`` files in ``directory`` whose zip structure and member CRCs check out, newest first."""
    found = []
    for path in sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True):
        if excluding is not None and path.resolve() == excluding.resolve():
            continue
        try:
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is None:
                    found.append(path)
        except (OSError, zipfile.BadZipFile):
            continue
    return found


def _unreadable(path: Path, problem: str) -> CorruptCheckpointError:
    others = intact_checkpoints(path.parent, excluding=path)
    advice = (
        f"the newest intact checkpoint beside it is {others[0]}: resume with --ckpt_path {others[0]}"
        if others
        else "no intact checkpoint lies beside it"
    )
    size = path.stat().st_size if path.exists() else 0
    return CorruptCheckpointError(
        f"checkpoint {path} cannot be read ({size} bytes; truncated or damaged: {problem}); {advice}"
    )


def check_checkpoint_readable(path: Any) -> None:
    """Refuse a local checkpoint whose zip structure or member CRCs are broken (remote paths and Lightning's
    ``"last"``/``"best"`` keywords are left to Lightning)."""
    path = Path(str(path))
    if not _is_local(path) or not path.is_file():
        return
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        raise _unreadable(path, str(error)) from error
    if broken is not None:
        raise _unreadable(path, f"member {broken} fails its CRC")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` checkpoints written to a temporary name and renamed into place; damaged ones named on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        partial = path.with_name(path.name + PARTIAL_SUFFIX)
        super().save_checkpoint(checkpoint, partial, storage_options)
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, path)
        _fsync_directory(path.parent)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
            if not _is_local(path):
                raise
            raise _unreadable(Path(path), str(error).splitlines()[0]) from error


class DrafterCheckpoint(ModelCheckpoint):
    """:class:`ModelCheckpoint` that writes the HF drafter directory next to each ``.ckpt`` and prunes it with it."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make it atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        state = trainer.strategy.lightning_module_state_dict()  # gathers sharded weights (collective)
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
