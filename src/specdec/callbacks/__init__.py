"""Lightning callbacks of drafter training: checkpoints, global batch, evaluation, calibration, export parity."""

from specdec.callbacks.acceptance import AcceptanceSimulation
from specdec.callbacks.checkpoint import DrafterCheckpoint
from specdec.callbacks.confidence_calibration import ConfidenceCalibration
from specdec.callbacks.export_gate import ExportParityCheck
from specdec.callbacks.global_batch import GlobalBatchSize
from specdec.callbacks.speedup import SpeedupEvaluation

__all__ = [
    "AcceptanceSimulation",
    "ConfidenceCalibration",
    "DrafterCheckpoint",
    "ExportParityCheck",
    "GlobalBatchSize",
    "SpeedupEvaluation",
]
