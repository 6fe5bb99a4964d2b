"""torchmetrics Metrics of speculative decoding, DDP-correct (every state a sum, every value a ratio of sums)."""

from specdec.metrics.acceptance import AcceptanceMetrics
from specdec.metrics.confidence import ConfidenceCalibrationMetrics
from specdec.metrics.grouped import ALL, GroupedDecodingMetrics
from specdec.metrics.speed import SpeedMetrics

__all__ = ["ALL", "AcceptanceMetrics", "ConfidenceCalibrationMetrics", "GroupedDecodingMetrics", "SpeedMetrics"]
