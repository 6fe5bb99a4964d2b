"""Training: LightningModules for the drafters, their learning-rate schedule and DDP-correct metrics."""

from specdec.training.dspark_module import DSparkModule
from specdec.training.metrics import RatioMetric
from specdec.training.schedule import warmup_cosine, warmup_cosine_scheduler

__all__ = ["DSparkModule", "RatioMetric", "warmup_cosine", "warmup_cosine_scheduler"]
