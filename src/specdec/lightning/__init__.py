"""LightningModules of the drafters, their learning-rate schedule and drafter-directory helpers."""

from specdec.lightning.base import DrafterModule, StepLoss
from specdec.lightning.drafter_directory import drafter_directory_of, save_drafter_directory
from specdec.lightning.dspark import DFlashModule, DSparkModule
from specdec.lightning.eagle3 import Eagle3Module
from specdec.lightning.protocol import DecodableModule, DrafterHolder, as_decodable, as_drafter_holder
from specdec.lightning.schedule import warmup_cosine, warmup_cosine_scheduler
from specdec.lightning.speculative_test import SpeculativeTest
from specdec.metrics.ratio import RatioMetric

__all__ = [
    "DFlashModule",
    "DSparkModule",
    "DecodableModule",
    "DrafterHolder",
    "DrafterModule",
    "Eagle3Module",
    "RatioMetric",
    "SpeculativeTest",
    "StepLoss",
    "as_decodable",
    "as_drafter_holder",
    "drafter_directory_of",
    "save_drafter_directory",
    "warmup_cosine",
    "warmup_cosine_scheduler",
]
