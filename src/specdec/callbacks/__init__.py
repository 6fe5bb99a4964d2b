"""Lightning callbacks for side concerns of drafter training: serving-export parity, evaluation, calibration."""

from specdec.callbacks.acceptance import AcceptanceSimulation
from specdec.callbacks.calibration import ConfidenceCalibration
from specdec.callbacks.export_gate import ExportParityCheck
from specdec.callbacks.speedup import SpeedupEvaluation

__all__ = ["AcceptanceSimulation", "ConfidenceCalibration", "ExportParityCheck", "SpeedupEvaluation"]
