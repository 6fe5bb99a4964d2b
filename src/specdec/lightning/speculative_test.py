"""``specdec test``: real speculative decoding of the eval prompts against the target, with the baseline.

:class:`SpeculativeTest` is a component a LightningModule holds and hands its three test hooks to; the module
must satisfy :class:`~specdec.lightning.protocol.DecodableModule`. Batches are ``list[EvalPrompt]`` from the
DataModule's ``test_dataloader`` (its ``eval_sets``). Metrics are summed over ranks and reported per dataset,
per domain and overall: printed as DeepSpec's table plus our columns, logged, and sent to W&B as tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from specdec.data.prompts.eval_sets import EvalPrompt, deepspec_tasks, metric_groups
from specdec.decoding.evaluate import SpeculativeEvaluator
from specdec.lightning.protocol import DecodableModule, as_decodable
from specdec.metrics import ALL, GroupedDecodingMetrics

ACCEPTANCE_COLUMNS = ("#propose", "accept_len", "verify_rate")


def _groups_of(trainer) -> list[str]:
    spec = getattr(getattr(trainer, "datamodule", None), "eval_sets", None)
    if spec is not None:
        return metric_groups(spec)
    tasks = deepspec_tasks()
    return [f"dataset/{t.name}" for t in tasks] + [f"domain/{d}" for d in dict.fromkeys(t.domain for t in tasks)]


def format_table(values: dict[str, dict[str, torch.Tensor]], max_drafts: int, target: str) -> tuple[list, list]:
    """Columns and rows of the result table (groups without rounds are left out)."""
    columns = ["dataset", "target", *ACCEPTANCE_COLUMNS]
    columns += [f"accept_rate@{k}" for k in range(max_drafts)] + [f"cond_accept@{k}" for k in range(max_drafts)]
    columns += ["draft_accept_rate", "tok/s", "ar_tok/s", "speedup", "ideal_speedup"]
    rows = []
    for group, metrics in values.items():
        if float(metrics["rounds"]) == 0:
            continue
        row = [group, target, f"{float(metrics['propose']):.2f}+1", f"{float(metrics['tau']):.3f}"]
        row.append(f"{float(metrics['verify_rate']):.3f}")
        row += [f"{float(metrics[f'accept_rate@{k}']):.3f}" for k in range(max_drafts)]
        row += [f"{float(metrics[f'cond_accept@{k}']):.3f}" for k in range(max_drafts)]
        row.append(f"{float(metrics['draft_acceptance_rate']):.3f}")
        row += [f"{float(metrics[name]):.1f}" for name in ("tokens_per_second", "ar_tokens_per_second")]
        row += [f"{float(metrics[name]):.2f}" for name in ("speedup", "ideal_speedup")]
        rows.append(row)
    return columns, rows


def render_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table with aligned columns."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(columns, *rows, strict=True)]
    line = lambda cells: " | ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(columns), "-+-".join("-" * w for w in widths), *(line(row) for row in rows)])


class SpeculativeTest:
    """Speculative-decoding evaluation of a module's drafter: ``start`` / ``step`` / ``end`` of a test epoch.

    Held by the module (``self.speculative_test = SpeculativeTest()``) and called from its ``on_test_epoch_start``,
    ``test_step`` and ``on_test_epoch_end``. The evaluator and the metrics live here, outside the module tree, so
    they never reach the module's ``state_dict``.
    """

    def __init__(self) -> None:
        self.evaluator: SpeculativeEvaluator | None = None
        self.metrics: GroupedDecodingMetrics | None = None
        self.results: dict[str, dict[str, float]] | None = None

    def start(self, module: DecodableModule) -> None:
        module = as_decodable(module, "specdec test")
        options = module.decoding_options
        self.evaluator = SpeculativeEvaluator(module.load_target(), module.drafter, options)
        self.metrics = GroupedDecodingMetrics(_groups_of(module.trainer), self.evaluator.max_drafts).to(module.device)
        if options.measure_speedup and options.warmup_prompts:
            self.evaluator.warmup()

    def step(self, module: DecodableModule, batch: Sequence[EvalPrompt]) -> None:
        evaluator, metrics = self._started()
        seed = module.decoding_options.seed
        by_set: dict[tuple[str, str], list[EvalPrompt]] = {}
        for prompt in batch:
            by_set.setdefault((prompt.dataset, prompt.domain), []).append(prompt)
        for (dataset, domain), prompts in by_set.items():
            turns = evaluator.conversations([p.turns for p in prompts], seed + prompts[0].index)
            groups = [group for group in (f"dataset/{dataset}", f"domain/{domain}") if group in metrics.groups]
            for outputs in turns:
                metrics.update(groups, outputs.speculative, outputs.autoregressive)

    def end(self, module: DecodableModule) -> dict[str, dict[str, float]]:
        """Reduce over ranks, log, print the table (rank 0) and return the results per group."""
        evaluator, metrics = self._started()
        values = metrics.compute()  # summed over ranks
        self.results = {g: {k: float(v) for k, v in m.items()} for g, m in values.items()}
        logged = {}
        for group, group_values in values.items():
            if float(group_values["rounds"]) == 0:
                continue
            prefix = "test" if group == ALL else f"test/{group}"
            logged.update({f"{prefix}/{name}": value for name, value in group_values.items() if not value.isnan()})
        module.log_dict(logged, sync_dist=False, rank_zero_only=True)
        columns, rows = format_table(values, evaluator.max_drafts, module.target_name)
        trainer = module.trainer
        if trainer.is_global_zero:
            print(render_table(columns, rows))
            policy = evaluator.draft_policy
            if policy is not None:
                print(
                    f"draft length chosen from measured costs: {policy.typical_length} (rounds by length: "
                    f"{dict(sorted(policy.chosen.items()))}); engine {evaluator.options.engine}, "
                    f"warm-up {evaluator.warmup_seconds:.1f} s"
                )
        _log_wandb_tables(trainer, columns, rows, values, evaluator.max_drafts)
        metrics.reset()
        return self.results

    def _started(self) -> tuple[SpeculativeEvaluator, GroupedDecodingMetrics]:
        if self.evaluator is None or self.metrics is None:
            raise RuntimeError("SpeculativeTest.start must run before step and end (on_test_epoch_start)")
        return self.evaluator, self.metrics


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
