"""Lightning callbacks for side concerns of drafter training: serving-export parity, evaluation, calibration."""

from specdec.callbacks.export_gate import ExportParityCheck

__all__ = ["ExportParityCheck"]
