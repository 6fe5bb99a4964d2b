"""Eval sets: the ``{"turns": [...]}`` reader, task caps chosen by a seeded shuffle, turn policy, conversion."""

import json
from pathlib import Path

import pytest

from specdec.data.datamodules import OnlineTargetDataModule, TargetCacheDataModule
from specdec.data.prompts.eval_sets import (
    EvalSetsSpec,
    EvalTask,
    convert_rows,
    deepspec_tasks,
    eval_dataloader,
    load_eval_prompts,
    metric_groups,
    read_eval_set,
    write_eval_set,
)

SHARED_EVALS = Path(__file__).parents[2] / "shared" / "eval_datasets"
needs_shared = pytest.mark.skipif(
    not (SHARED_EVALS / "gsm8k.jsonl").exists(), reason=f"the shared eval sets are not at {SHARED_EVALS}"
)


def test_bad_lines_name_file_and_line(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text('{"turns": ["a"]}\n\n{"turns": []}\n')
    with pytest.raises(ValueError, match=r"set\.jsonl:3: .*non-empty list"):
        read_eval_set(path)
    path.write_text('{"turns": ["a"]}\n{not json\n')
    with pytest.raises(ValueError, match=r"set\.jsonl:2: not valid JSON"):
        read_eval_set(path)


def test_caps_pick_the_same_prompts_for_the_same_seed(tmp_path):
    write_eval_set(tmp_path / "many.jsonl", [{"turns": [f"q{i}", f"follow-up {i}"]} for i in range(50)])
    spec = EvalSetsSpec(str(tmp_path), tasks=[EvalTask("many", 10, "math")], seed=3)
    first, again = load_eval_prompts(spec), load_eval_prompts(spec)
    assert [p.index for p in first] == [p.index for p in again] and len(first) == 10
    assert sorted(p.index for p in first) != list(range(10))  # shuffled, then truncated
    assert all(p.turns == [f"q{p.index}"] and p.domain == "math" for p in first)  # first turn by default
    other = load_eval_prompts(EvalSetsSpec(str(tmp_path), tasks=[EvalTask("many", 10, "math")], seed=4))
    assert [p.index for p in other] != [p.index for p in first]
    everything = load_eval_prompts(EvalSetsSpec(str(tmp_path), tasks=[EvalTask("many")], all_turns=["many"]))
    assert len(everything) == 50 and everything[7].turns == ["q7", "follow-up 7"]
    with pytest.raises(FileNotFoundError, match="fetch-evals"):
        load_eval_prompts(EvalSetsSpec(str(tmp_path), tasks=[EvalTask("absent")]))
    assert load_eval_prompts(EvalSetsSpec(str(tmp_path), tasks=[EvalTask("absent")], skip_missing=True)) == []
    with pytest.raises(ValueError, match="domain"):
        EvalTask("x", domain="poetry")


@needs_shared
def test_deepspec_task_list_on_the_shared_sets():
    spec = EvalSetsSpec(str(SHARED_EVALS), skip_missing=True, all_turns=["mt-bench"])
    prompts = load_eval_prompts(spec)
    counts = {}
    for prompt in prompts:
        counts[prompt.dataset] = counts.get(prompt.dataset, 0) + 1
    caps = {task.name: task.max_samples for task in deepspec_tasks()}
    for name, count in counts.items():
        assert count == min(caps[name], len(read_eval_set(SHARED_EVALS / f"{name}.jsonl")))
    assert counts["gsm8k"] == 500 and counts["aime25"] == 30 and counts["mt-bench"] == 80
    assert all(len(p.turns) == 2 for p in prompts if p.dataset == "mt-bench")
    assert {p.domain for p in prompts if p.dataset in ("humaneval", "mbpp", "livecodebench")} == {"code"}
    assert "domain/math" in metric_groups(spec) and "dataset/arena-hard-v2" in metric_groups(spec)


@needs_shared
def test_conversion_reproduces_the_shared_prompt_formats():
    gsm8k = read_eval_set(SHARED_EVALS / "gsm8k.jsonl")[0][0]
    question = gsm8k.split("\nPlease reason step by step")[0]
    assert convert_rows("gsm8k", [{"question": question}]) == [{"turns": [gsm8k]}]
    humaneval = read_eval_set(SHARED_EVALS / "humaneval.jsonl")[0][0]
    body = humaneval.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
    assert convert_rows("humaneval", [{"prompt": body}]) == [{"turns": [humaneval]}]
    livecodebench = read_eval_set(SHARED_EVALS / "livecodebench.jsonl")[0][0]
    content = livecodebench.split("### Question:\n", 1)[1].split("\n\n### Format:", 1)[0]
    assert convert_rows("livecodebench", [{"question_content": content}]) == [{"turns": [livecodebench]}]
    mt_bench = read_eval_set(SHARED_EVALS / "mt-bench.jsonl")[0]
    assert convert_rows("mt-bench", [{"prompt": mt_bench}]) == [{"turns": mt_bench}]
    with pytest.raises(ValueError, match="row 0: field 'question' is missing"):
        convert_rows("gsm8k", [{"problem": "x"}])


def test_dataloader_shards_prompts_across_ranks(tmp_path):
    write_eval_set(tmp_path / "a.jsonl", [{"turns": [f"a{i}"]} for i in range(5)])
    spec = EvalSetsSpec(str(tmp_path), tasks=[EvalTask("a")], batch_size=2)
    ranks = [[p.turns[0] for batch in eval_dataloader(spec, rank, 2) for p in batch] for rank in range(2)]
    assert ranks == [["a0", "a2", "a4"], ["a1", "a3"]]
    assert json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0]) == {"turns": ["a0"]}


def test_both_datamodules_serve_eval_prompts(tmp_path):
    write_eval_set(tmp_path / "a.jsonl", [{"turns": [f"a{i}"]} for i in range(3)])
    spec = EvalSetsSpec(str(tmp_path), tasks=[EvalTask("a", domain="code")])
    for module in (
        TargetCacheDataModule(str(tmp_path / "no-cache"), eval_sets=spec),
        OnlineTargetDataModule([], "specdec-tiny", [1], eval_sets=spec),
    ):
        module.setup("test")
        batches = list(module.test_dataloader())
        assert [[p.turns for p in batch] for batch in batches] == [[["a0"]], [["a1"]], [["a2"]]]
        assert module.on_after_batch_transfer(batches[0], 0) is batches[0]
    with pytest.raises(ValueError, match="eval_sets"):
        TargetCacheDataModule(str(tmp_path)).test_dataloader()
