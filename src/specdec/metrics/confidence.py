"""How well a confidence head predicts prefix acceptance: ECE, AUROC and Brier per draft position.

DeepSpec's definitions (its ``confidence_head.py``), reduced as sums so the result is DDP-correct:

- Prediction at draft position ``k`` (0-based): the prefix survival ``a_k = Π_{i≤k} σ(z_i)`` (float64, clamped to
  ``[1e-8, 1 - 1e-8]``); label: 1 while the rejection test kept accepting (drafts ``0..k`` all accepted).
- Every round with at least one draft counts, over its effective proposal length (the drafts up to an accepted
  stop token, which ends the round).
- ``ece@k``: 20 equal-width bins of ``a_k``, Σ_b (n_b / N) |mean a − mean label| over bins.
- ``auroc@k``: 1000 equal-width bins of positive and negative counts, Mann-Whitney over the histogram: a positive
  beats every negative of a lower bin and half of those in its own bin (ties ½); NaN when a class is missing.
- ``brier@k``: mean (a_k − label)²; ``pred_mean@k`` / ``target_mean@k``: mean prediction and mean label.
- Summaries ``ece``, ``auroc``, ``brier``, ``pred_mean``, ``target_mean``: means over positions weighted by
  each position's count (AUROC over the positions where it is defined).

Reliability diagrams come from the same 20-bin sums, as a PNG (matplotlib, imported only when asked) or as a
W&B plot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torchmetrics import Metric

ECE_BINS = 20
AUROC_BINS = 1000
PROBABILITY_EPS = 1e-8


def prefix_survival(confidence_logits: torch.Tensor) -> torch.Tensor:
    """Predicted prefix survival ``a_k = Π_{i≤k} σ(z_i)`` along the last dimension, in float64."""
    return torch.sigmoid(confidence_logits.double()).cumprod(dim=-1)


def round_labels(proposed: int, accepted: int, committed: int) -> tuple[int, torch.Tensor]:
    """Effective proposal length of a round and its prefix-acceptance labels.

    A round that ended on an accepted stop token commits no bonus token (``committed == accepted``): the drafts
    after the stop token were never in play, so the round counts only up to it.
    """
    length = accepted if committed == accepted else proposed
    labels = (torch.arange(length) < accepted).double()
    return length, labels


def _bin_index(probabilities: torch.Tensor, bins: int) -> torch.Tensor:
    return (probabilities * bins).long().clamp_(0, bins - 1)


def expected_calibration_error(count: torch.Tensor, pred_sum: torch.Tensor, label_sum: torch.Tensor) -> torch.Tensor:
    """ECE from per-bin sums (last dimension = bins): Σ_b n_b |mean pred_b − mean label_b| / Σ_b n_b."""
    gap = (pred_sum - label_sum).abs()  # n_b · |mean pred − mean label|
    total = count.sum(-1)
    return torch.where(total > 0, gap.sum(-1) / total.clamp_min(1e-12), torch.nan)


def histogram_auroc(positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """AUROC from score histograms (last dimension = bins, ascending): Mann-Whitney with ties within a bin ½."""
    below = negatives.cumsum(-1) - negatives
    pairs = (positives * below).sum(-1) + 0.5 * (positives * negatives).sum(-1)
    total = positives.sum(-1) * negatives.sum(-1)
    return torch.where(total > 0, pairs / total.clamp_min(1e-12), torch.nan)


@dataclass
class ReliabilityBin:
    """One non-empty bin of a reliability diagram."""

    lower: float
    upper: float
    mean_prediction: float
    mean_label: float
    count: float


class ConfidenceCalibrationMetrics(Metric):
    """ECE / AUROC / Brier of the predicted prefix survival per draft position ``0..K-1`` (see the module doc).

    Args:
        max_drafts: draft positions tracked (drafts beyond are refused).
        ece_bins: equal-width bins of the ECE and of the reliability diagram (DeepSpec: 20).
        auroc_bins: equal-width bins of the AUROC histogram (DeepSpec: 1000).
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, max_drafts: int, ece_bins: int = ECE_BINS, auroc_bins: int = AUROC_BINS, **kwargs) -> None:
        super().__init__(**kwargs)
        if max_drafts < 1:
            raise ValueError(f"max_drafts = {max_drafts}; must be >= 1")
        self.max_drafts = max_drafts
        self.ece_bins = ece_bins
        self.auroc_bins = auroc_bins
        for name in ("bin_count", "bin_prediction", "bin_label"):
            self.add_state(name, torch.zeros(max_drafts, ece_bins, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("positives", "negatives"):
            self.add_state(name, torch.zeros(max_drafts, auroc_bins, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("squared_error", torch.zeros(max_drafts, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, survival: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor) -> None:
        """Flat observations: predicted survival, 0/1 prefix label and the draft position (0-based) of each."""
        device = self.bin_count.device
        survival = survival.to(device, torch.float64).flatten().clamp(PROBABILITY_EPS, 1 - PROBABILITY_EPS)
        labels = labels.to(device, torch.float64).flatten()
        positions = positions.to(device, torch.long).flatten()
        if survival.numel() == 0:
            return
        if int(positions.max()) >= self.max_drafts or int(positions.min()) < 0:
            raise ValueError(f"draft positions must lie in 0..{self.max_drafts - 1}; got up to {int(positions.max())}")
        coarse = positions * self.ece_bins + _bin_index(survival, self.ece_bins)
        self.bin_count.view(-1).index_add_(0, coarse, torch.ones_like(survival))
        self.bin_prediction.view(-1).index_add_(0, coarse, survival)
        self.bin_label.view(-1).index_add_(0, coarse, labels)
        fine = positions * self.auroc_bins + _bin_index(survival, self.auroc_bins)
        self.positives.view(-1).index_add_(0, fine, labels)
        self.negatives.view(-1).index_add_(0, fine, 1 - labels)
        self.squared_error.index_add_(0, positions, (survival - labels) ** 2)

    def update_rounds(
        self,
        confidence_logits: Sequence[torch.Tensor | None],
        proposed: Sequence[int],
        accepted: Sequence[int],
        committed: Sequence[int],
    ) -> None:
        """Rounds of one request: each round's confidence logits ([proposed]) and its verification counts."""
        survival, labels, positions = [], [], []
        for logits, count, kept, done in zip(confidence_logits, proposed, accepted, committed, strict=True):
            if logits is None or count == 0:
                continue
            length, label = round_labels(int(count), int(kept), int(done))
            if length == 0:
                continue
            survival.append(prefix_survival(logits[:length].cpu()))
            labels.append(label)
            positions.append(torch.arange(length))
        if survival:
            self.update(torch.cat(survival), torch.cat(labels), torch.cat(positions))

    def update_from(self, results: Sequence) -> None:
        """Add the rounds of :class:`specdec.decoding.GenerationResult` objects (rounds without logits skipped)."""
        for result in results:
            self.update_rounds(result.confidence_logits, result.proposed, result.accepted, result.committed)

    def per_position(self) -> dict[str, torch.Tensor]:
        """``count``, ``ece``, ``auroc``, ``brier``, ``pred_mean``, ``target_mean`` as [K] float64 tensors."""
        count = self.bin_count.sum(-1)
        safe = count.clamp_min(1e-12)
        defined = count > 0
        nan = torch.full_like(count, torch.nan)
        return {
            "count": count,
            "ece": expected_calibration_error(self.bin_count, self.bin_prediction, self.bin_label),
            "auroc": histogram_auroc(self.positives, self.negatives),
            "brier": torch.where(defined, self.squared_error / safe, nan),
            "pred_mean": torch.where(defined, self.bin_prediction.sum(-1) / safe, nan),
            "target_mean": torch.where(defined, self.bin_label.sum(-1) / safe, nan),
        }

    def compute(self) -> dict[str, torch.Tensor]:
        values = self.per_position()
        count = values["count"]
        summary: dict[str, torch.Tensor] = {"samples": count.sum()}
        for name in ("ece", "auroc", "brier", "pred_mean", "target_mean"):
            value = values[name]
            weight = torch.where(value.isnan(), torch.zeros_like(count), count)
            total = weight.sum()
            mean = (torch.nan_to_num(value) * weight).sum() / total if total > 0 else torch.tensor(torch.nan)
            summary[name] = mean
        for k in range(self.max_drafts):
            for name in ("ece", "auroc", "brier", "pred_mean", "target_mean", "count"):
                summary[f"{name}@{k}"] = values[name][k]
        return {name: value.float() for name, value in summary.items()}

    def reliability(self, position: int) -> list[ReliabilityBin]:
        """Non-empty bins of the reliability diagram at draft ``position`` (0-based)."""
        bins = []
        for index in range(self.ece_bins):
            count = float(self.bin_count[position, index])
            if count <= 0:
                continue
            bins.append(
                ReliabilityBin(
                    lower=index / self.ece_bins,
                    upper=(index + 1) / self.ece_bins,
                    mean_prediction=float(self.bin_prediction[position, index]) / count,
                    mean_label=float(self.bin_label[position, index]) / count,
                    count=count,
                )
            )
        return bins


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:  # matplotlib is a dev dependency only
        raise ImportError(
            "reliability diagrams as PNG need matplotlib: `pip install matplotlib` (or `pip install -e .[dev]`)"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reliability(
    curves: dict[str, ConfidenceCalibrationMetrics],
    path: str | Path,
    positions: Sequence[int] | None = None,
    title: str = "confidence reliability",
) -> Path:
    """Reliability diagrams (observed vs predicted prefix survival), one panel per draft position, to a PNG.

    ``curves`` maps a label (``"before STS"``, ``"after STS"``, …) to a metric; each panel overlays them, with
    each curve's ECE in its legend and the first curve's bin counts shaded behind.
    """
    plt = _pyplot()
    first = next(iter(curves.values()))
    if positions is None:
        count = first.bin_count.sum(-1)
        positions = [k for k in range(first.max_drafts) if float(count[k]) > 0]
    positions = list(positions) or [0]
    columns = min(4, len(positions))
    rows = -(-len(positions) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.0 * columns, 3.8 * rows), squeeze=False)
    for panel, position in enumerate(positions):
        axis = axes[panel // columns][panel % columns]
        axis.plot([0, 1], [0, 1], "--", color="0.6", linewidth=1)
        shade = first.reliability(position)
        if shade:
            twin = axis.twinx()
            twin.bar(
                [(b.lower + b.upper) / 2 for b in shade],
                [b.count for b in shade],
                width=1 / first.ece_bins,
                color="C0",
                alpha=0.15,
            )
            twin.set_yticks([])
        for index, (label, metric) in enumerate(curves.items()):
            bins = metric.reliability(position)
            ece = float(metric.per_position()["ece"][position])
            axis.plot(
                [b.mean_prediction for b in bins],
                [b.mean_label for b in bins],
                "o-",
                color=f"C{index + 1}",
                markersize=3,
                label=f"{label}: ECE {100 * ece:.1f}%",
            )
        axis.set(xlim=(0, 1), ylim=(0, 1), title=f"draft position {position + 1}")
        axis.set_xlabel("predicted prefix survival")
        axis.set_ylabel("observed prefix acceptance")
        axis.legend(fontsize=7, loc="upper left")
    for panel in range(len(positions), rows * columns):
        axes[panel // columns][panel % columns].axis("off")
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def reliability_rows(curves: dict[str, ConfidenceCalibrationMetrics]) -> list[list]:
    """``[curve, position, bin_lower, mean_prediction, mean_label, count]`` rows of every non-empty bin."""
    rows = []
    for label, metric in curves.items():
        for position in range(metric.max_drafts):
            for b in metric.reliability(position):
                rows.append([label, position, b.lower, b.mean_prediction, b.mean_label, b.count])
    return rows


def log_reliability_wandb(loggers: Sequence, key: str, curves: dict[str, ConfidenceCalibrationMetrics]) -> None:
    """Reliability diagrams as W&B line plots per draft position (one series per curve), plus the raw table."""
    from lightning.pytorch.loggers import WandbLogger

    loggers = [logger for logger in loggers if isinstance(logger, WandbLogger)]
    if not loggers:
        return
    import wandb

    columns = ["curve", "position", "bin_lower", "mean_prediction", "mean_label", "count"]
    rows = reliability_rows(curves)
    first = next(iter(curves.values()))
    for logger in loggers:
        logger.log_table(key=f"{key}/reliability_table", columns=columns, data=rows)
        plots = {}
        for position in range(first.max_drafts):
            xs, ys, names = [], [], []
            for label, metric in curves.items():
                bins = metric.reliability(position)
                if bins:
                    xs.append([b.mean_prediction for b in bins])
                    ys.append([b.mean_label for b in bins])
                    names.append(label)
            if xs:
                plots[f"{key}/reliability@{position}"] = wandb.plot.line_series(
                    xs=xs, ys=ys, keys=names, title=f"reliability, draft position {position + 1}", xname="predicted"
                )
        if plots:
            logger.experiment.log(plots)
