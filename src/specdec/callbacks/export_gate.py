"""``ExportParityCheck``: every saved checkpoint must export to the serving formats and load back identically.

"Training metrics look great, serving acceptance is ~1" usually means the exported drafter is not the trained
one (layer ids in the wrong convention, a dropped tensor, a misaligned vocabulary map). This callback exports
the drafter being saved to each format that can express it, validates the files, rebuilds the drafter the way
the engine reads them and requires identical logits — at every checkpoint, not at release time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from specdec.drafters import DSparkDrafter, Eagle3Drafter
from specdec.export.api import export_drafter
from specdec.export.directory import ExportProvenance
from specdec.export.expressible import FORMATS, unsupported_reasons
from specdec.export.parity import ParityError, ParityReport, check_export_parity
from specdec.export.source import Drafter, has_target_head, load_drafter, strip_trainer_prefixes, target_head_of
from specdec.lightning.protocol import as_drafter_holder
from specdec.targets import read_target_head


def _cpu_copy(drafter: Drafter, state_dict: dict[str, torch.Tensor] | None) -> Drafter:
    """A CPU fp32 copy built from the (gathered) checkpoint weights, with the live drafter's target head."""
    copy = type(drafter)(drafter.config).float().eval()
    weights = state_dict if state_dict else drafter.state_dict()
    copy.load_state_dict(
        {
            name: tensor.detach().cpu().float() if tensor.is_floating_point() else tensor.cpu()
            for name, tensor in weights.items()
        }
    )
    if has_target_head(drafter):
        head = target_head_of(drafter)
        head.embed_tokens, head.lm_head = head.embed_tokens.detach().cpu(), head.lm_head.detach().cpu()
        copy.attach_target_head(head)
    return copy


class ExportParityCheck(L.Callback):
    """Export, validate and parity-check the drafter at every checkpoint save (global rank 0).

    Args:
        formats: formats to check (default: all of ``deepspec``, ``vllm``, ``sglang`` that can express the drafter;
            a listed format that cannot is reported once, as a warning).
        dtype: export dtype; the comparison rounds the original to it, so any difference is a mapping error.
        atol: tolerated absolute logit difference.
        every_n_saves: check one save in ``n``.
        strict: raise on a parity or validation failure (otherwise warn).
        export_root: keep the exports under ``export_root/<format>`` (overwritten each save) instead of a temp dir.
        target: the target's name, recorded as the verifier of vLLM exports (default: ``pl_module.target_name``).
    """

    def __init__(
        self,
        formats: Sequence[str] | None = None,
        dtype: str = "bfloat16",
        atol: float = 0.0,
        every_n_saves: int = 1,
        strict: bool = True,
        export_root: str | Path | None = None,
        target: str | None = None,
    ) -> None:
        unknown = [name for name in formats or () if name not in FORMATS]
        if unknown:
            raise ValueError(f"ExportParityCheck.formats: unknown format(s) {unknown}; expected some of {FORMATS}")
        self.formats = list(formats) if formats is not None else None
        self.dtype = dtype
        self.atol = atol
        self.every_n_saves = max(1, every_n_saves)
        self.strict = strict
        self.export_root = Path(export_root) if export_root is not None else None
        self.target = target
        self.saves = 0
        self.last_results: dict[str, ParityReport | str] = {}
        self._warned: set[str] = set()

    # ---- the check itself (usable without a Trainer) -------------------------------------------------
    def check(self, drafter: Drafter, target: str | None = None) -> dict[str, ParityReport | str]:
        """Per format: a :class:`ParityReport`, or the reason the format cannot express the drafter."""
        if any(tensor.device.type != "cpu" for tensor in drafter.state_dict().values()):
            drafter = _cpu_copy(drafter, None)  # the comparison runs on CPU in fp32
        results: dict[str, ParityReport | str] = {}
        provenance = ExportProvenance(target=target or self.target or "unknown-target")
        for name in self.formats or FORMATS:
            reasons = unsupported_reasons(drafter.config, name)
            if reasons:
                results[name] = "; ".join(reasons)
                if self.formats is not None and name not in self._warned:
                    self._warned.add(name)
                    rank_zero_warn(f"ExportParityCheck: {name} cannot express this drafter: {results[name]}")
                continue
            if self.export_root is not None:
                results[name] = self._export_and_compare(drafter, name, self.export_root / name, provenance)
            else:
                with tempfile.TemporaryDirectory(prefix=f"specdec-gate-{name}-") as scratch:
                    results[name] = self._export_and_compare(drafter, name, Path(scratch), provenance)
        self.last_results = results
        return results

    def check_directory(self, directory: str | Path, target: str) -> dict[str, ParityReport | str]:
        """Check a saved HF drafter directory (or Lightning ``.ckpt``) against ``target``'s embedding / LM head."""
        return self.check(load_drafter(directory, target), target)

    def _export_and_compare(self, drafter: Drafter, name: str, directory: Path, provenance) -> ParityReport:
        path = export_drafter(drafter, name, directory, provenance=provenance, dtype=self.dtype)
        return check_export_parity(drafter, path, atol=self.atol, raise_on_failure=False)

    # ---- Lightning hook ---------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.saves += 1
        if not trainer.is_global_zero or (self.saves - 1) % self.every_n_saves:
            return
        module = as_drafter_holder(pl_module, "ExportParityCheck")
        live = module.drafter
        if not isinstance(live, DSparkDrafter | Eagle3Drafter):
            raise TypeError("ExportParityCheck needs pl_module.drafter to be a DSparkDrafter or Eagle3Drafter")
        weights = strip_trainer_prefixes(checkpoint.get("state_dict") or {})
        target = self.target or module.target_name
        drafter = _cpu_copy(live, weights)
        if not has_target_head(drafter):
            if target is None:
                raise RuntimeError("ExportParityCheck: the drafter has no target head and no target name to read it")
            drafter.attach_target_head(read_target_head(target))
        results = self.check(drafter, target)
        summary = {
            name: result.max_abs_diff if isinstance(result, ParityReport) else {"refused": result}
            for name, result in results.items()
        }
        checkpoint["export_parity"] = summary
        metrics = {
            f"export_parity/{name}_max_abs_diff": result.worst
            for name, result in results.items()
            if isinstance(result, ParityReport)
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        failures = [
            result.summary() for result in results.values() if isinstance(result, ParityReport) and not result.passed
        ]
        if failures:
            message = "export parity failed:\n" + "\n".join(failures)
            if self.strict:
                raise ParityError(message)
            rank_zero_warn(message)
