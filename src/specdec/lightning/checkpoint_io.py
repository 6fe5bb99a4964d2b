"""Checkpoint files written atomically and refused clearly when damaged (Lightning ``CheckpointIO``).

A checkpoint is written to a ``.partial`` name, fsynced and renamed into place, so a process killed while saving
leaves the previous checkpoint whole; a checkpoint that cannot be read back is refused naming the file and the
newest intact checkpoint beside it.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

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
