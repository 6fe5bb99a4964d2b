"""In-loop speedup evaluation: real speculative decoding of a few prompts against the target while training.

Every ``every_n_steps`` optimizer steps and when training ends, the module's drafter decodes the prompts with
the target (lossless rejection sampling, the module's ``decoding_options``) and the target decodes them alone;
τ (bonus included), #propose, prefix survival, tokens/s of both, the wall-clock speedup and the ideal speedup
are logged under ``speedup/`` to every logger, and printed when training ends.
"""

from __future__ import annotations

import lightning as L
import torch

from specdec.callbacks.decoding_inputs import callback_conversations, callback_decoding_options
from specdec.data.prompts.eval_sets import EvalSetsSpec
from specdec.decoding.evaluate import SpeculativeEvaluator
from specdec.decoding.options import DecodingOptions
from specdec.lightning.protocol import DecodableModule, as_decodable
from specdec.metrics import AcceptanceMetrics, SpeedMetrics

DEFAULT_PROMPTS = (
    "Write a Python function `merge_intervals(intervals)` that merges overlapping intervals.",
    "What does the `functools.lru_cache` decorator do?",
    "Write a Python function `parse_header(line)` that splits an HTTP header line into name and value.",
    "Explain what `os.path.join` returns on POSIX systems.",
)


class SpeedupEvaluation(L.Callback):
    """Measure τ and wall-clock speedup of the drafter being trained, by decoding a few prompts for real.

    Both decoders run on the module's decoding engine (``decoding_options.engine``) and share one target
    session; evaluators (sessions, compiled steps, measured costs) are kept for the whole run.

    Args:
        every_n_steps: how often (optimizer steps); 0 = only when training ends.
        prompts: user prompts (default: a few code-assistant prompts, or ``eval_sets`` when given).
        eval_sets: take the prompts from eval sets instead (capped by ``num_prompts``).
        num_prompts: at most this many prompts per evaluation (split across ranks).
        max_new_tokens: tokens per prompt (default: the module's ``decoding_options``).
        temperature: sampling temperature (default: the module's ``decoding_options``).
        temperatures: decode at each of these instead (e.g. ``[0.0, 1.0]``): metrics go to
            ``speedup/T<t>/…`` (the first temperature's also to ``speedup/…``) and the final line reports each.
    """

    def __init__(
        self,
        every_n_steps: int = 0,
        prompts: list[str] | None = None,
        eval_sets: EvalSetsSpec | None = None,
        num_prompts: int = 4,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        temperatures: list[float] | None = None,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.prompts = prompts
        self.eval_sets = eval_sets
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.temperatures = list(temperatures) if temperatures else None
        self.last: dict[str, float] = {}
        self._last_step = -1
        self._evaluators: dict[float | None, SpeculativeEvaluator] = {}

    def _conversations(self) -> list[list[str]]:
        return callback_conversations(self.prompts, self.eval_sets, DEFAULT_PROMPTS, self.num_prompts)

    def _options(self, pl_module, temperature: float | None) -> DecodingOptions:
        return callback_decoding_options(
            pl_module, measure_speedup=True, max_new_tokens=self.max_new_tokens, temperature=temperature
        )

    def _evaluator(self, pl_module: DecodableModule, temperature: float | None) -> SpeculativeEvaluator:
        """The evaluator at ``temperature``, built (and warmed up: compiled, costs measured) once per run."""
        module = as_decodable(pl_module, "SpeedupEvaluation")
        options = self._options(module, temperature)
        evaluator = self._evaluators.get(temperature)
        if evaluator is None or evaluator.decoder.drafter is not module.drafter or evaluator.options != options:
            target = module.load_target()
            evaluator = SpeculativeEvaluator(target, module.drafter, options, self._shared_session(target, options))
            if options.warmup_prompts:
                evaluator.warmup()
            self._evaluators[temperature] = evaluator
        return evaluator

    def _shared_session(self, target, options: DecodingOptions):
        """A kept evaluator's static session of the same target and engine (its compiled steps are reused)."""
        for evaluator in self._evaluators.values():
            session = evaluator.decoder.session
            if session is not None and session.model is target.model and evaluator.options.engine == options.engine:
                return session
        return None

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        """Decode this rank's share of the prompts both ways at each temperature; values are summed over ranks."""
        if self.temperatures is None:
            return self._evaluate_at(trainer, pl_module, self.temperature, "speedup/")
        logged: dict[str, float] = {}
        for index, temperature in enumerate(self.temperatures):
            values = self._evaluate_at(trainer, pl_module, temperature, f"speedup/T{temperature:g}/")
            logged.update(values)
            if index == 0:
                logged.update({name.replace(f"/T{temperature:g}/", "/"): value for name, value in values.items()})
        return logged

    def _evaluate_at(self, trainer, pl_module, temperature: float | None, prefix: str) -> dict[str, float]:
        evaluator = self._evaluator(pl_module, temperature)
        options = evaluator.options
        acceptance = AcceptanceMetrics(evaluator.max_drafts).to(pl_module.device)
        speed = SpeedMetrics().to(pl_module.device)
        conversations = self._conversations()[trainer.global_rank :: trainer.world_size]
        for index, turns in enumerate(conversations):
            for outputs in evaluator.conversations([turns], options.seed + index):
                acceptance.update_from(outputs.speculative.results)
                speed.update(outputs.speculative, outputs.autoregressive)
        values = {**acceptance.compute(), **speed.compute()}
        keep = ("tau", "propose", "verify_rate", "accept_rate@0", "tokens_per_second", "ar_tokens_per_second")
        keep += ("speedup", "ideal_speedup")
        keep += tuple(f"accept_rate@{k}" for k in range(1, evaluator.max_drafts))  # what `specdec plan` reads
        logged = {f"{prefix}{name}": float(values[name]) for name in keep}
        policy = evaluator.draft_policy
        logged[f"{prefix}draft_length"] = float(policy.typical_length if policy else evaluator.max_drafts)
        logged[f"{prefix}compile_seconds"] = evaluator.compile_seconds
        return logged

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last = self.evaluate(trainer, pl_module)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(self.last, step=trainer.global_step)
                logger.save()
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in self.last.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self._run(trainer, pl_module)
        if trainer.is_global_zero:
            print(self.summary(trainer.global_step))

    def summary(self, step: int) -> str:
        """The line printed when training ends: τ and speedup at each temperature, draft length, engine."""
        last = self.last
        temperatures = self.temperatures or [None]
        parts = []
        for temperature in temperatures:
            prefix = "speedup/" if temperature is None else f"speedup/T{temperature:g}/"
            label = "" if temperature is None else f"T={temperature:g}: "
            parts.append(
                f"{label}τ {last[prefix + 'tau']:.2f} (incl. bonus)  speedup {last[prefix + 'speedup']:.2f}x "
                f"wall-clock ({last[prefix + 'tokens_per_second']:.1f} vs {last[prefix + 'ar_tokens_per_second']:.1f} "
                f"tokens/s), ideal {last[prefix + 'ideal_speedup']:.2f}x, {int(last[prefix + 'draft_length'])} drafts"
            )
        kernel = any(getattr(e.decoder, "verification_path", None) == "kernel" for e in self._evaluators.values())
        verification = ", Triton acceptance test" if kernel else ""
        return " | ".join(parts) + f"  [{self._engine_summary()}{verification}] at step {step}"

    def _engine_summary(self) -> str:
        evaluators = list(self._evaluators.values())
        if not evaluators:
            return ""
        engine = evaluators[0].options.engine
        if engine != "compiled":
            return f"engine {engine}, plain decoding on the same engine"
        session = evaluators[0].decoder.session
        if session is None or not session.step.compiled:
            return "engine compiled→eager (see the warning), plain decoding on the same engine"
        warmup = sum(evaluator.warmup_seconds for evaluator in evaluators)
        return f"engine compiled (warm-up {warmup:.0f} s), plain decoding on the same engine"
