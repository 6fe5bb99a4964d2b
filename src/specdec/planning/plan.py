"""Expected tokens/s, speedup over plain decoding, best draft length and cost, per dataset and concurrency.

A chain round with ``L`` drafts commits ``τ(L) = 1 + a_0 + … + a_{L-1}`` tokens per request on average, where
``a_k`` is the measured prefix survival (``accept_rate@k``: drafts ``0..k`` all accepted); with ``R`` concurrent
requests it costs :meth:`LatencyProfile.round_ms`, a plain step :meth:`LatencyProfile.plain_step_ms`. So

    tokens/s = R · τ(L) / round(R, L),    speedup = τ(L) · plain(R) / round(R, L),

and the best ``L`` maximises it per concurrency. Acceptance is read from what an evaluation wrote: ``specdec
test``'s ``speculative_test.json``, or a CSV log (``specdec test``'s ``test/…/accept_rate@k`` columns, the
speedup callback's ``speedup/T…/accept_rate@k``).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from specdec.planning.profile import LatencyProfile


@dataclass
class AcceptanceCurve:
    """One dataset's (or temperature's) prefix survival by draft position, and what was measured with it."""

    name: str
    survival: list[float]  # a_0 .. a_{K-1}
    measured: dict[str, float] = field(default_factory=dict)  # tau, speedup, ... as the evaluation reported them

    def tau(self, drafts: int) -> float:
        return 1.0 + sum(self.survival[:drafts])


@dataclass
class PlanRow:
    """The best setting of one dataset at one concurrency, and the speedup of every draft length."""

    dataset: str
    concurrency: int
    draft_length: int
    tau: float
    tokens_per_second: float  # all requests together
    tokens_per_second_per_user: float
    plain_tokens_per_second: float
    speedup: float
    cost_per_million: float | None  # $ per million output tokens (needs a GPU-hour price)
    plain_cost_per_million: float | None
    speedup_by_length: dict[int, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def predicted_speedup(curve: AcceptanceCurve, profile: LatencyProfile, concurrency: int, drafts: int) -> float:
    """Speedup over plain decoding of ``drafts`` drafts per round at ``concurrency`` (0 drafts: plain, 1.0)."""
    if drafts == 0:
        return 1.0
    return curve.tau(drafts) * profile.plain_step_ms(concurrency) / profile.round_ms(concurrency, drafts)


def plan(
    curves: Sequence[AcceptanceCurve],
    profile: LatencyProfile,
    concurrencies: Sequence[int],
    *,
    gpu_hour_price: float | None = None,
    max_draft_tokens: int | None = None,
) -> list[PlanRow]:
    """A :class:`PlanRow` per curve and concurrency (draft lengths 1 .. the curve's positions, capped)."""
    rows = []
    for curve in curves:
        longest = len(curve.survival) if max_draft_tokens is None else min(len(curve.survival), max_draft_tokens)
        if longest < 1:
            raise ValueError(f"{curve.name}: no acceptance by position to plan with")
        for concurrency in concurrencies:
            if concurrency < 1:
                raise ValueError(f"concurrency {concurrency}: must be >= 1")
            by_length = {n: predicted_speedup(curve, profile, concurrency, n) for n in range(1, longest + 1)}
            best = max(by_length, key=by_length.get)
            round_ms = profile.round_ms(concurrency, best)
            per_user = 1000 * curve.tau(best) / round_ms
            plain = 1000 * concurrency / profile.plain_step_ms(concurrency)
            total = per_user * concurrency
            rows.append(
                PlanRow(
                    dataset=curve.name,
                    concurrency=concurrency,
                    draft_length=best,
                    tau=curve.tau(best),
                    tokens_per_second=total,
                    tokens_per_second_per_user=per_user,
                    plain_tokens_per_second=plain,
                    speedup=by_length[best],
                    cost_per_million=_cost(gpu_hour_price, total),
                    plain_cost_per_million=_cost(gpu_hour_price, plain),
                    speedup_by_length=by_length,
                )
            )
    return rows


def _cost(gpu_hour_price: float | None, tokens_per_second: float) -> float | None:
    if gpu_hour_price is None:
        return None
    return gpu_hour_price / 3600.0 / tokens_per_second * 1e6


# ---- reading what an evaluation measured --------------------------------------------------------------------
MEASURED = ("tau", "speedup", "tokens_per_second", "ar_tokens_per_second", "draft_length")
DECODED_PREFIXES = ("speedup/", "test/")  # acceptance measured by real decoding (the speedup callback, specdec test)
_POSITION = re.compile(r"^(?P<prefix>.*)accept_rate@(?P<k>\d+)$")


def read_acceptance(path: str | Path, mode: str | None = None) -> list[AcceptanceCurve]:
    """Acceptance curves from ``speculative_test.json`` or a CSV metrics log (last value of each column).

    JSON: one curve per dataset of ``mode`` (default: the evaluation's own mode), ``all`` last. CSV: one curve per
    metric prefix with ``accept_rate@k`` columns measured by decoding (``test/dataset/gsm8k/``, ``speedup/T1/`` →
    ``T=1``); training-time acceptance (``train/``, ``val/``, ``sim/``: teacher-forced drafts) is left out.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no evaluation results here (speculative_test.json or a metrics CSV)")
    curves = _from_json(path, mode) if path.suffix == ".json" else _from_csv(path)
    if not curves:
        raise ValueError(f"{path}: no accept_rate@k values found (was it written by specdec test or fit?)")
    return curves


def _from_json(path: Path, mode: str | None) -> list[AcceptanceCurve]:
    data = json.loads(path.read_text())
    modes = data.get("modes")
    if not isinstance(modes, dict) or not modes:
        raise ValueError(f"{path}: expected {{'modes': {{mode: {{group: metrics}}}}}} as specdec test writes it")
    chosen = mode or next(iter(modes))
    if chosen not in modes:
        raise ValueError(f"{path}: no mode {chosen!r}; it holds {sorted(modes)}")
    curves = []
    for group, metrics in modes[chosen].items():
        if not metrics.get("rounds"):
            continue
        survival = _survival(metrics)
        measured = {
            k: metrics[k] for k in ("tau", "speedup", "tokens_per_second", "ar_tokens_per_second") if k in metrics
        }
        curves.append(AcceptanceCurve(group.removeprefix("dataset/"), survival, measured))
    curves.sort(key=lambda curve: curve.name == "all")
    return [curve for curve in curves if curve.survival]


def _survival(metrics: dict[str, float]) -> list[float]:
    positions = sorted(int(m.group("k")) for key in metrics if (m := _POSITION.match(key)))
    return [float(metrics[f"accept_rate@{k}"]) for k in positions]


def _from_csv(path: Path) -> list[AcceptanceCurve]:
    last: dict[str, float] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key and value not in (None, ""):
                    try:
                        last[key] = float(value)
                    except ValueError:
                        continue
    prefixes: dict[str, dict[int, float]] = {}
    for key, value in last.items():
        match = _POSITION.match(key)
        if match and not math.isnan(value):
            prefixes.setdefault(match.group("prefix"), {})[int(match.group("k"))] = value
    simulated = sorted(prefix for prefix in prefixes if not prefix.startswith(DECODED_PREFIXES))
    if simulated and len(simulated) == len(prefixes):
        raise ValueError(
            f"{path}: only training-time acceptance ({', '.join(p + 'accept_rate@k' for p in simulated)}), measured "
            "on teacher-forced drafts rather than by decoding; plan from specdec test's results or a fit with the "
            "SpeedupEvaluation callback (speedup/…)"
        )
    curves = []
    for prefix, positions in prefixes.items():
        if prefix in simulated:
            continue  # teacher-forced / simulated during training: not what decoding achieves
        if prefix == "speedup/" and any(p.startswith("speedup/T") for p in prefixes):
            continue  # the first temperature repeated without its label
        measured = {name: last[prefix + name] for name in MEASURED if prefix + name in last}
        survival = [positions[k] for k in range(max(positions) + 1) if k in positions]
        curves.append(AcceptanceCurve(_name_of(prefix), survival, measured))
    return curves


def _name_of(prefix: str) -> str:
    prefix = prefix.strip("/")
    if prefix.startswith("speedup/T"):
        return "T=" + prefix.removeprefix("speedup/T")
    for head in ("test/dataset/", "test/domain/"):
        if prefix.startswith(head):
            return prefix.removeprefix(head)
    return {"test": "all", "speedup": "all"}.get(prefix, prefix)


# ---- writing the plan ---------------------------------------------------------------------------------------
COLUMNS = (
    "dataset",
    "concurrency",
    "drafts",
    "tau",
    "tok/s",
    "tok/s/user",
    "plain tok/s",
    "speedup",
    "$/M",
    "plain $/M",
)


def table_rows(rows: Sequence[PlanRow]) -> list[list[str]]:
    def money(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    return [
        [
            row.dataset,
            str(row.concurrency),
            str(row.draft_length),
            f"{row.tau:.2f}",
            f"{row.tokens_per_second:.1f}",
            f"{row.tokens_per_second_per_user:.1f}",
            f"{row.plain_tokens_per_second:.1f}",
            f"{row.speedup:.2f}",
            money(row.cost_per_million),
            money(row.plain_cost_per_million),
        ]
        for row in rows
    ]


def plot(rows: Sequence[PlanRow], dataset: str, path: str | Path) -> Path:
    """A PNG for one dataset: tokens/s (speculative at its best length and plain) and speedup by draft length,
    against concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [row for row in rows if row.dataset == dataset]
    if not mine:
        raise ValueError(f"no plan rows for {dataset!r}")
    levels = [row.concurrency for row in mine]
    figure, (speed, gain) = plt.subplots(1, 2, figsize=(10, 4))
    speed.plot(levels, [row.tokens_per_second for row in mine], marker="o", label="speculative (best length)")
    speed.plot(levels, [row.plain_tokens_per_second for row in mine], marker="s", label="plain decoding")
    for row in mine:
        speed.annotate(f"L={row.draft_length}", (row.concurrency, row.tokens_per_second), fontsize=8)
    speed.set(xlabel="concurrent requests", ylabel="output tokens/s", title=f"{dataset}: throughput")
    speed.legend()
    for length in sorted(mine[0].speedup_by_length):
        gain.plot(levels, [row.speedup_by_length[length] for row in mine], marker=".", label=f"L={length}")
    gain.axhline(1.0, color="grey", linewidth=0.8)
    gain.set(xlabel="concurrent requests", ylabel="speedup over plain", title=f"{dataset}: speedup")
    gain.legend(fontsize=7, ncol=2)
    for axis in (speed, gain):  # concurrency levels are usually powers of two: label them as they are
        axis.set_xscale("log", base=2)
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.minorticks_off()
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
