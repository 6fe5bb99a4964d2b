"""``specdec test``: real speculative decoding of the eval prompts against the target, with the baseline.

:class:`SpeculativeTest` is a component a LightningModule holds and hands its three test hooks to; the module
must satisfy :class:`~specdec.lightning.protocol.DecodableModule`. Batches are ``list[EvalPrompt]`` from the
DataModule's ``test_dataloader`` (its ``eval_sets``). Metrics are summed over ranks and reported per dataset,
per domain and overall: printed as DeepSpec's table plus our columns, logged, and sent to W&B as tables.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from specdec.data.prompts.eval_sets import EvalPrompt, deepspec_tasks, metric_groups
from specdec.decoding.evaluate import SpeculativeEvaluator
from specdec.lightning.protocol import DecodableModule, as_decodable
from specdec.metrics import ALL, GroupedDecodingMetrics

ACCEPTANCE_COLUMNS = ("#propose", "accept_len", "verify_rate")
RESULTS_FILE = "speculative_test.json"


def _groups_of(trainer) -> list[str]:
    spec = getattr(getattr(trainer, "datamodule", None), "eval_sets", None)
    if spec is not None:
        return metric_groups(spec)
    tasks = deepspec_tasks()
    return [f"dataset/{t.name}" for t in tasks] + [f"domain/{d}" for d in dict.fromkeys(t.domain for t in tasks)]


def format_table(
    values: dict[str, dict[str, torch.Tensor]] | dict[str, dict[str, dict[str, torch.Tensor]]],
    max_drafts: int,
    target: str,
) -> tuple[list, list]:
    """Columns and rows of the result table (groups without rounds are left out).

    ``values`` is ``{group: metrics}``, or ``{mode: {group: metrics}}`` for several proposal modes decoded on
    the same prompts: their rows then sit side by side under each group.
    """
    by_mode = _by_mode(values)
    columns = ["dataset", "mode", "target", *ACCEPTANCE_COLUMNS]
    columns += [f"accept_rate@{k}" for k in range(max_drafts)] + [f"cond_accept@{k}" for k in range(max_drafts)]
    columns += ["draft_accept_rate", "tok/s", "ar_tok/s", "speedup", "ideal_speedup"]
    rows = []
    groups = dict.fromkeys(group for mode_values in by_mode.values() for group in mode_values)
    for group in groups:
        for mode, mode_values in by_mode.items():
            metrics = mode_values.get(group)
            if metrics is None or float(metrics["rounds"]) == 0:
                continue
            row = [group, mode, target, f"{float(metrics['propose']):.2f}+1", f"{float(metrics['tau']):.3f}"]
            row.append(f"{float(metrics['verify_rate']):.3f}")
            row += [_cell(metrics, f"accept_rate@{k}") for k in range(max_drafts)]
            row += [_cell(metrics, f"cond_accept@{k}") for k in range(max_drafts)]
            row.append(f"{float(metrics['draft_acceptance_rate']):.3f}")
            row += [f"{float(metrics[name]):.1f}" for name in ("tokens_per_second", "ar_tokens_per_second")]
            row += [f"{float(metrics[name]):.2f}" for name in ("speedup", "ideal_speedup")]
            rows.append(row)
    return columns, rows


def _by_mode(values) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    first = next(iter(values.values()), {})
    nested = bool(first) and isinstance(next(iter(first.values())), dict)
    return values if nested else {"chain": values}


def _cell(metrics: dict[str, torch.Tensor], name: str) -> str:
    return f"{float(metrics[name]):.3f}" if name in metrics else "-"


def render_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows, strict=True)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(columns), "-+-".join("-" * w for w in widths), *(line(row) for row in rows)])


class SpeculativeTest:
    """Speculative-decoding evaluation of a module's drafter: ``start`` / ``step`` / ``end`` of a test epoch.

    Held by the module (``self.speculative_test = SpeculativeTest()``) and called from its ``on_test_epoch_start``,
    ``test_step`` and ``on_test_epoch_end``. The evaluator and the metrics live here, outside the module tree, so
    they never reach the module's ``state_dict``. Besides the module's own decoding options, every proposal mode
    in ``decoding.compare`` decodes the same prompts with its own evaluator (sharing the compiled target session
    where the engine allows) and gets rows of its own in the table.
    """

    def __init__(self) -> None:
        self.evaluators: dict[str, SpeculativeEvaluator] = {}
        self.metrics: dict[str, GroupedDecodingMetrics] = {}
        self.results: dict[str, dict[str, float]] | None = None  # the module's own mode, per group
        self.results_by_mode: dict[str, dict[str, dict[str, float]]] | None = None
        self.results_path: Path | None = None  # speculative_test.json, once written

    @property
    def evaluator(self) -> SpeculativeEvaluator | None:
        """The evaluator of the module's own decoding options."""
        return next(iter(self.evaluators.values()), None)

    def start(self, module: DecodableModule) -> None:
        module = as_decodable(module, "specdec test")
        options = module.decoding_options
        target = module.load_target()
        main = SpeculativeEvaluator(target, module.drafter, options)
        self.evaluators = {main.mode: main}
        for spec in options.compare:
            mode_options = options.for_mode(spec)
            if mode_options.mode in self.evaluators:
                continue
            session = main.decoder.session if mode_options.tree is None else None
            self.evaluators[mode_options.mode] = SpeculativeEvaluator(target, module.drafter, mode_options, session)
        max_drafts = max(evaluator.max_drafts for evaluator in self.evaluators.values())
        groups = _groups_of(module.trainer)
        self.metrics = {mode: GroupedDecodingMetrics(groups, max_drafts).to(module.device) for mode in self.evaluators}
        for evaluator in self.evaluators.values():
            if options.measure_speedup and options.warmup_prompts:
                evaluator.warmup()

    def step(self, module: DecodableModule, batch: Sequence[EvalPrompt]) -> None:
        self._started()
        seed = module.decoding_options.seed
        by_set: dict[tuple[str, str], list[EvalPrompt]] = {}
        for prompt in batch:
            by_set.setdefault((prompt.dataset, prompt.domain), []).append(prompt)
        for mode, evaluator in self.evaluators.items():
            metrics = self.metrics[mode]
            for (dataset, domain), prompts in by_set.items():
                turns = evaluator.conversations([p.turns for p in prompts], seed + prompts[0].index)
                groups = [group for group in (f"dataset/{dataset}", f"domain/{domain}") if group in metrics.groups]
                for outputs in turns:
                    metrics.update(groups, outputs.speculative, outputs.autoregressive)

    def end(self, module: DecodableModule) -> dict[str, dict[str, float]]:
        """Reduce over ranks, log, print the table (rank 0) and return the results per group (own mode)."""
        self._started()
        values = {mode: metrics.compute() for mode, metrics in self.metrics.items()}  # summed over ranks
        self.results_by_mode = {
            mode: {g: {k: float(v) for k, v in m.items()} for g, m in mode_values.items()}
            for mode, mode_values in values.items()
        }
        main_mode = next(iter(values))
        self.results = self.results_by_mode[main_mode]
        logged = {}
        for mode, mode_values in values.items():
            for group, group_values in mode_values.items():
                if float(group_values["rounds"]) == 0:
                    continue
                prefix = "test" if mode == main_mode else f"test/{mode}"
                prefix = prefix if group == ALL else f"{prefix}/{group}"
                logged.update({f"{prefix}/{name}": value for name, value in group_values.items() if not value.isnan()})
        module.log_dict(logged, sync_dist=False, rank_zero_only=True)
        max_drafts = max(evaluator.max_drafts for evaluator in self.evaluators.values())
        columns, rows = format_table(values, max_drafts, module.target_name)
        trainer = module.trainer
        if trainer.is_global_zero:
            print(render_table(columns, rows))
            for mode, evaluator in self.evaluators.items():
                print(_mode_summary(mode, evaluator))
        _log_wandb_tables(trainer, columns, rows, values[main_mode], max_drafts)
        if trainer.is_global_zero:
            self._write_results(trainer, module.target_name, max_drafts)
        for metrics in self.metrics.values():
            metrics.reset()
        return self.results

    def _write_results(self, trainer, target: str, max_drafts: int) -> None:
        """``speculative_test.json`` in the run's log directory: every mode's metrics per group (``specdec plan``
        reads acceptance by position from it)."""
        directory = trainer.log_dir or trainer.default_root_dir
        if directory is None:
            return
        path = Path(directory) / RESULTS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"target": target, "max_drafts": max_drafts, "modes": self.results_by_mode}
        path.write_text(json.dumps(record, indent=2, allow_nan=True) + "\n")
        self.results_path = path

    def _started(self) -> None:
        if not self.evaluators or not self.metrics:
            raise RuntimeError("SpeculativeTest.start must run before step and end (on_test_epoch_start)")


def _mode_summary(mode: str, evaluator: SpeculativeEvaluator) -> str:
    """One line per mode: what chose the verified drafts and on which engine it ran."""
    decoder = evaluator.decoder
    line = f"{mode}: engine {decoder.engine}, warm-up {evaluator.warmup_seconds:.1f} s"
    path = getattr(decoder, "verification_path", None)
    if path is not None:
        timed = ", ".join(f"{name} {1000 * seconds:.2f} ms" for name, seconds in decoder.verification_seconds.items())
        line += f", acceptance test: {path}" + (f" (timed: {timed})" if timed else "")
    policy = evaluator.draft_policy
    if policy is not None:
        line += (
            f"; draft length chosen from measured costs: {policy.typical_length} (rounds by length: "
            f"{dict(sorted(policy.chosen.items()))})"
        )
    budgets = getattr(decoder.policy, "budgets", None)
    if budgets:
        line += f"; drafts admitted per round: mean {sum(budgets) / len(budgets):.2f}"
    threshold = getattr(decoder.policy, "threshold", None)
    if threshold is not None:
        line += f"; survival threshold {threshold:.3f}"
    return line


def _log_wandb_tables(trainer, columns, rows, values, max_drafts: int) -> None:
    """The result table and acceptance by draft position (survival and conditional), per group."""
    from lightning.pytorch.loggers import WandbLogger

    loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
    if not loggers or not trainer.is_global_zero:
        return
    curve: list[list[Any]] = []
    for group, metrics in values.items():
        if float(metrics["rounds"]) == 0:
            continue
        for k in range(max_drafts):
            survival, conditional = metrics[f"accept_rate@{k}"], metrics[f"cond_accept@{k}"]
            curve.append([group, k, float(survival), float(conditional)])
    for logger in loggers:
        logger.log_table(key="test/speculative_decoding", columns=list(columns), data=rows)
        logger.log_table(
            key="test/acceptance_by_position",
            columns=["group", "position", "accept_rate", "cond_accept"],
            data=curve,
        )
