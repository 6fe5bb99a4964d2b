"""LightningCLI of ``specdec fit / validate / test / predict`` over any drafter module and DataModule."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from specdec.lightning.base import DrafterModule


class SpecdecCLI(LightningCLI):
    """Models and DataModules are chosen by ``class_path`` in YAML (e.g. ``specdec.lightning.DSparkModule``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            model_class=DrafterModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )
