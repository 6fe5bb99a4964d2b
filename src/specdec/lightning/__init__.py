"""LightningModules of the drafters, their learning-rate schedule, metrics and checkpoint helpers."""

from specdec.lightning.base import DrafterModule, StepLoss
from specdec.lightning.dspark import DFlashModule, DSparkModule
from specdec.lightning.metrics import RatioMetric
from specdec.lightning.schedule import warmup_cosine, warmup_cosine_scheduler

__all__ = [
    "DFlashModule",
    "DSparkModule",
    "DrafterModule",
    "RatioMetric",
    "StepLoss",
    "warmup_cosine",
    "warmup_cosine_scheduler",
]
