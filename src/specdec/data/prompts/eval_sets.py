"""Evaluation prompt sets: ``{"turns": [...]}`` JSONL files, a task list with sample caps, and their download.

DeepSpec evaluates nine public sets (first user turn only, at most N prompts each, chosen by a seeded shuffle);
here the task list, caps, domains and the turn policy are settings, and MT-Bench can keep all its turns (each
turn is answered by the decoder before the next one is asked).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DOMAINS = ("math", "code", "chat")


@dataclass
class EvalTask:
    """One eval set: its file stem, the most prompts used, and its domain (``math``, ``code`` or ``chat``)."""

    name: str
    max_samples: int | None = None
    domain: str = "chat"

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"eval task {self.name!r}: domain {self.domain!r} is not one of {DOMAINS}")


def deepspec_tasks() -> list[EvalTask]:
    """DeepSpec's nine tasks and caps (gsm8k 500, math500 500, aime25 30, humaneval 164, mbpp 256,
    livecodebench 500, mt-bench 80, alpaca 500, arena-hard-v2 500)."""
    return [
        EvalTask("gsm8k", 500, "math"),
        EvalTask("math500", 500, "math"),
        EvalTask("aime25", 30, "math"),
        EvalTask("humaneval", 164, "code"),
        EvalTask("mbpp", 256, "code"),
        EvalTask("livecodebench", 500, "code"),
        EvalTask("mt-bench", 80, "chat"),
        EvalTask("alpaca", 500, "chat"),
        EvalTask("arena-hard-v2", 500, "chat"),
    ]


@dataclass
class EvalSetsSpec:
    """Which eval prompts ``specdec test`` decodes.

    Args:
        eval_dir: directory of ``<task>.jsonl`` files (``specdec data fetch-evals`` writes them).
        tasks: tasks with caps and domains (default: DeepSpec's nine).
        all_turns: tasks whose conversations keep every user turn (e.g. ``["mt-bench"]``); others use the first.
        seed: seed of the shuffle that picks ``max_samples`` prompts from a larger file.
        max_samples: a cap applied to every task on top of its own (e.g. 4 for a smoke test).
        skip_missing: leave out tasks whose file is absent instead of failing.
        batch_size: prompts per test batch.
    """

    eval_dir: str = "eval_datasets"
    tasks: list[EvalTask] | None = None
    all_turns: list[str] = field(default_factory=list)
    seed: int = 980406
    max_samples: int | None = None
    skip_missing: bool = False
    batch_size: int = 1

    def task_list(self) -> list[EvalTask]:
        return list(self.tasks) if self.tasks is not None else deepspec_tasks()


@dataclass
class EvalPrompt:
    """One conversation to decode: its user turns, its set and domain, and its line in the set's file."""

    dataset: str
    domain: str
    index: int
    turns: list[str]


def read_eval_set(path: str | Path) -> list[list[str]]:
    """The user turns of every line of a ``{"turns": [...]}`` JSONL file (errors name the file and line)."""
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            turns = row.get("turns") if isinstance(row, dict) else None
            if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t for t in turns):
                raise ValueError(f"{path}:{number}: expected an object with a non-empty list of strings under 'turns'")
            rows.append(turns)
    return rows


def load_eval_prompts(spec: EvalSetsSpec) -> list[EvalPrompt]:
    """The prompts of every task, in task order; a file with more rows than its cap is shuffled with
    ``Random(seed)`` and truncated (as DeepSpec does), so the same seed always picks the same prompts."""
    prompts = []
    for task in spec.task_list():
        path = Path(spec.eval_dir) / f"{task.name}.jsonl"
        if not path.exists():
            if spec.skip_missing:
                continue
            raise FileNotFoundError(f"eval set {path} does not exist (fetch it with `specdec data fetch-evals`)")
        rows = list(enumerate(read_eval_set(path)))
        caps = [cap for cap in (task.max_samples, spec.max_samples) if cap is not None]
        cap = min(caps) if caps else None
        if cap is not None and len(rows) > cap:
            random.Random(spec.seed).shuffle(rows)
            rows = rows[:cap]
        keep_all = task.name in spec.all_turns
        prompts.extend(
            EvalPrompt(task.name, task.domain, index, list(turns) if keep_all else turns[:1]) for index, turns in rows
        )
    return prompts


def metric_groups(spec: EvalSetsSpec) -> list[str]:
    """Metric groups of an eval: one per dataset and one per domain present."""
    tasks = spec.task_list()
    return [f"dataset/{task.name}" for task in tasks] + [
        f"domain/{domain}" for domain in dict.fromkeys(task.domain for task in tasks)
    ]


# ---- download and conversion ------------------------------------------------------------------------------

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_PREFIX = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n"
LIVECODEBENCH_PREFIX = (
    "You are an expert Python programmer. You will be given a question (problem specification) and will generate "
    "a correct Python program that matches the specification and passes all tests. You will NOT return anything "
    "except for the program\n\n### Question:\n"
)
LIVECODEBENCH_SUFFIX = (
    "\n\n### Format: Write your code in the following format:\n```python\n# YOUR CODE HERE\n```\n\n"
    "### Answer: (use the provided format with backticks)"
)


def _math(field_name: str) -> Callable[[Mapping[str, Any]], list[str]]:
    return lambda row: [str(row[field_name]) + MATH_SUFFIX]


def _humaneval(row: Mapping[str, Any]) -> list[str]:
    return [HUMANEVAL_PREFIX + str(row["prompt"]) + "\n```"]


def _livecodebench(row: Mapping[str, Any]) -> list[str]:
    return [LIVECODEBENCH_PREFIX + str(row["question_content"]) + LIVECODEBENCH_SUFFIX]


def _field(name: str) -> Callable[[Mapping[str, Any]], list[str]]:
    return lambda row: [str(row[name])]


def _turns(name: str) -> Callable[[Mapping[str, Any]], list[str]]:
    return lambda row: [str(turn) for turn in row[name]]


@dataclass(frozen=True)
class EvalSource:
    """Where a public eval set lives on the Hugging Face hub and how one of its rows becomes user turns."""

    repo_id: str
    split: str
    convert: Callable[[Mapping[str, Any]], list[str]]
    config: str | None = None


EVAL_SOURCES: dict[str, EvalSource] = {
    "gsm8k": EvalSource("openai/gsm8k", "test", _math("question"), config="main"),
    "math500": EvalSource("HuggingFaceH4/MATH-500", "test", _math("problem")),
    "aime24": EvalSource("HuggingFaceH4/aime_2024", "train", _math("problem")),
    "aime25": EvalSource("math-ai/aime25", "test", _math("problem")),
    "humaneval": EvalSource("openai/openai_humaneval", "test", _humaneval),
    "mbpp": EvalSource("google-research-datasets/mbpp", "test", _field("prompt"), config="sanitized"),
    "livecodebench": EvalSource("livecodebench/code_generation_lite", "test", _livecodebench),
    "mt-bench": EvalSource("HuggingFaceH4/mt_bench_prompts", "train", _turns("prompt")),
    "alpaca": EvalSource("tatsu-lab/alpaca_eval", "eval", _field("instruction"), config="alpaca_eval"),
    "arena-hard-v2": EvalSource("lmarena-ai/arena-hard-auto", "test", _field("prompt")),
}


def convert_rows(name: str, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, list[str]]]:
    """``{"turns": [...]}`` records of an eval set's raw hub rows (the prompt formats DeepSpec evaluates)."""
    if name not in EVAL_SOURCES:
        raise KeyError(f"no hub source for eval set {name!r}; known: {', '.join(EVAL_SOURCES)}")
    convert = EVAL_SOURCES[name].convert
    records = []
    for number, row in enumerate(rows):
        try:
            records.append({"turns": convert(row)})
        except KeyError as missing:
            raise ValueError(f"{name} row {number}: field {missing} is missing") from None
    return records


def write_eval_set(path: str | Path, records: Sequence[Mapping[str, list[str]]]) -> Path:
    """Write records as JSONL (atomically: a partial download never looks like a finished set)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    partial.replace(path)
    return path


def fetch_evals(output_dir: str = "eval_datasets", tasks: list[str] | None = None, overwrite: bool = False) -> None:
    """Download the public eval sets from the Hugging Face hub as ``<output_dir>/<task>.jsonl``.

    Needs internet and the ``datasets`` package (``pip install datasets``). Existing files are kept unless
    ``overwrite``.

    Args:
        output_dir: where the ``{"turns": [...]}`` files go (``specdec test`` reads them from ``eval_dir``).
        tasks: which sets (default: DeepSpec's nine tasks).
        overwrite: replace files that already exist.
    """
    try:
        from datasets import load_dataset
    except ImportError:
        raise RuntimeError("`specdec data fetch-evals` needs the `datasets` package: pip install datasets") from None
    names = tasks or [task.name for task in deepspec_tasks()]
    for name in names:
        target = Path(output_dir) / f"{name}.jsonl"
        if target.exists() and not overwrite:
            print(f"{target} exists; kept")
            continue
        if name not in EVAL_SOURCES:
            raise KeyError(f"no hub source for eval set {name!r}; known: {', '.join(EVAL_SOURCES)}")
        source = EVAL_SOURCES[name]
        rows = load_dataset(source.repo_id, source.config, split=source.split)
        write_eval_set(target, convert_rows(name, rows))
        print(f"{target}: {len(rows)} prompts from {source.repo_id}")


class EvalPromptBatches:
    """This rank's eval prompts in batches (prompt ``i`` goes to rank ``i % world_size``, as DeepSpec shards).

    Iterable, so Lightning adds no distributed sampler (which would pad ranks with repeated prompts and count
    them twice).
    """

    def __init__(self, prompts: Sequence[EvalPrompt], batch_size: int = 1, rank: int = 0, world_size: int = 1):
        self.prompts = list(prompts)[rank::world_size]
        self.batch_size = batch_size

    def __iter__(self):
        for start in range(0, len(self.prompts), self.batch_size):
            yield self.prompts[start : start + self.batch_size]

    def __len__(self) -> int:
        return -(-len(self.prompts) // self.batch_size)


def eval_dataloader(spec: EvalSetsSpec, rank: int = 0, world_size: int = 1):
    """A DataLoader of ``list[EvalPrompt]`` batches for ``specdec test``."""
    from torch.utils.data import DataLoader, IterableDataset

    class _Batches(IterableDataset):
        def __init__(self, batches: EvalPromptBatches) -> None:
            self.batches = batches

        def __iter__(self):
            return iter(self.batches)

        def __len__(self) -> int:
            return len(self.batches)

    batches = EvalPromptBatches(load_eval_prompts(spec), spec.batch_size, rank, world_size)
    return DataLoader(_Batches(batches), batch_size=None, collate_fn=lambda batch: batch)


__all__ = [
    "DOMAINS",
    "EVAL_SOURCES",
    "EvalPrompt",
    "EvalPromptBatches",
    "EvalSetsSpec",
    "EvalSource",
    "EvalTask",
    "convert_rows",
    "deepspec_tasks",
    "eval_dataloader",
    "fetch_evals",
    "load_eval_prompts",
    "metric_groups",
    "read_eval_set",
    "write_eval_set",
]
