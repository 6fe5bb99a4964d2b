"""``specdec test``: real speculative decoding of the eval prompts against the target, with the baseline.

The mixin needs from its LightningModule: ``drafter`` (on the module's device, target head attached),
``load_target()`` (a :class:`specdec.targets.Target` on the module's device), ``target_name`` and
``decoding_options`` (:class:`specdec.decoding.DecodingOptions`). Batches are ``list[EvalPrompt]`` from the
DataModule's ``test_dataloader`` (its ``eval_sets``). Metrics are summed over ranks and reported per dataset,
per domain and overall: printed as DeepSpec's table plus our columns, logged, and sent to W&B as tables.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from specdec.data.prompts.eval_sets import EvalPrompt, deepspec_tasks, metric_groups
from specdec.decoding.evaluate import SpeculativeEvaluator
from specdec.decoding.options import DecodingOptions
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


class SpeculativeTestMixin:
    """``on_test_epoch_start`` / ``test_step`` / ``on_test_epoch_end`` of speculative-decoding evaluation."""

    def _decoding_options(self) -> DecodingOptions:
        options = getattr(self, "decoding_options", None)
        return options if options is not None else DecodingOptions()

    def on_test_epoch_start(self) -> None:
        options = self._decoding_options()
        self.__dict__["_speculative_evaluator"] = evaluator = SpeculativeEvaluator(
            self.load_target(), self.drafter, options
        )
        metrics = GroupedDecodingMetrics(_groups_of(self.trainer), evaluator.max_drafts).to(self.device)
        self.__dict__["_speculative_metrics"] = metrics  # kept out of the module tree and its state_dict
        if options.measure_speedup and options.warmup_prompts:
            evaluator.warmup()

    def test_step(self, batch: Sequence[EvalPrompt], batch_idx: int = 0) -> None:
        evaluator: SpeculativeEvaluator = self.__dict__["_speculative_evaluator"]
        metrics: GroupedDecodingMetrics = self.__dict__["_speculative_metrics"]
        seed = self._decoding_options().seed
        by_set: dict[tuple[str, str], list[EvalPrompt]] = {}
        for prompt in batch:
            by_set.setdefault((prompt.dataset, prompt.domain), []).append(prompt)
        for (dataset, domain), prompts in by_set.items():
            turns = evaluator.conversations([p.turns for p in prompts], seed + prompts[0].index)
            groups = [group for group in (f"dataset/{dataset}", f"domain/{domain}") if group in metrics.groups]
            for outputs in turns:
                metrics.update(groups, outputs.speculative, outputs.autoregressive)

    def on_test_epoch_end(self) -> None:
        metrics: GroupedDecodingMetrics = self.__dict__["_speculative_metrics"]
        evaluator: SpeculativeEvaluator = self.__dict__["_speculative_evaluator"]
        values = metrics.compute()  # summed over ranks
        self.speculative_test_results = {g: {k: float(v) for k, v in m.items()} for g, m in values.items()}
        logged = {}
        for group, group_values in values.items():
            if float(group_values["rounds"]) == 0:
                continue
            prefix = "test" if group == ALL else f"test/{group}"
            logged.update({f"{prefix}/{name}": value for name, value in group_values.items() if not value.isnan()})
        self.log_dict(logged, sync_dist=False, rank_zero_only=True)
        columns, rows = format_table(values, evaluator.max_drafts, str(getattr(self, "target_name", "")))
        if self.trainer.is_global_zero:
            print(render_table(columns, rows))
            policy = evaluator.draft_policy
            if policy is not None:
                print(
                    f"draft length chosen from measured costs: {policy.typical_length} (rounds by length: "
                    f"{dict(sorted(policy.chosen.items()))}); engine {evaluator.options.engine}, "
                    f"warm-up {evaluator.warmup_seconds:.1f} s"
                )
        self._log_wandb_tables(columns, rows, values, evaluator.max_drafts)
        metrics.reset()

    def _log_wandb_tables(self, columns, rows, values, max_drafts: int) -> None:
        """The result table and acceptance by draft position (survival and conditional), per group."""
        from lightning.pytorch.loggers import WandbLogger

        loggers = [logger for logger in self.trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers or not self.trainer.is_global_zero:
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
