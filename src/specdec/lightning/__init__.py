"""LightningModules of the drafters, their learning-rate schedule, metrics and checkpoint helpers."""

from specdec.lightning.base import DrafterModule, StepLoss
from specdec.lightning.checkpoint import DrafterCheckpoint, drafter_directory_of, save_drafter_directory
from specdec.lightning.dspark import DFlashModule, DSparkModule
from specdec.lightning.eagle3 import Eagle3Module
from specdec.lightning.global_batch import GlobalBatchSize
from specdec.lightning.metrics import RatioMetric
from specdec.lightning.schedule import warmup_cosine, warmup_cosine_scheduler

__all__ = [
    "DFlashModule",
    "DSparkModule",
    "DrafterCheckpoint",
    "DrafterModule",
    "Eagle3Module",
    "GlobalBatchSize",
    "RatioMetric",
    "StepLoss",
    "drafter_directory_of",
    "save_drafter_directory",
    "warmup_cosine",
    "warmup_cosine_scheduler",
]
