"""Answer regeneration on the tiny target through a real loopback server, locally, and across a real SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi import Body, FastAPI
from fastapi.responses import JSONResponse

from specdec.cli import main
from specdec.data import InvalidConversation, read_conversations
from specdec.data.regeneration.openai_client import OpenAIChatBackend, RetryPolicy, ServerSpec
from specdec.data.regeneration.regenerate import (
    LocalGenerateBackend,
    RegenerationOutput,
    SamplingParams,
    failures_path,
    iter_regenerated,
    padded_token_groups,
    regenerate,
    render_prompt,
)
from specdec.data.regeneration.serve import serve_app_in_background, serve_in_background
from specdec.targets import TINY_TARGET, load_target

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, min_p=0.02, max_tokens=16, seed=123)

RECORDS = [
    {
        "messages": [
            {"role": "system", "content": "You write short Python."},
            {"role": "user", "content": "Write a function to add two numbers."},
            {"role": "assistant", "content": "ORIGINAL ANSWER"},
            {"role": "user", "content": "Now make it subtract."},
            {"role": "assistant", "content": "ORIGINAL ANSWER"},
        ]
    },
    {"turns": ["Write a function that reverses a string.", "Add a docstring."]},
    {"conversations": [{"from": "human", "value": "Write a class for a stack."}, {"from": "gpt", "value": "ORIGINAL"}]},
]


def write_prompts(path: Path, records, malformed_at: int | None = None) -> Path:
    lines = [json.dumps(record) for record in records]
    if malformed_at is not None:
        lines.insert(malformed_at - 1, '{"turns": ["unterminated"')
    path.write_text("\n".join(lines) + "\n")
    return path


def single_turn_prompts(count: int):
    topics = ["a list", "a string", "a dict", "a number", "a file", "a class", "a set", "a tuple"]
    return [{"turns": [f"Write a function number {i} that handles {topics[i % len(topics)]}."]} for i in range(count)]


def read_output(path: Path) -> dict[str, dict]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [record["key"] for record in records]
    assert len(keys) == len(set(keys)), "a key is written twice"
    return {record["key"]: record for record in records}


@pytest.fixture(scope="module")
def target():
    return load_target(TINY_TARGET, device="cpu")


@pytest.fixture(scope="module")
def url(target):
    with serve_in_background(target) as base_url:
        yield base_url


def test_regenerate_through_server_answers_every_turn(tmp_path, target, url):
    prompts = write_prompts(tmp_path / "prompts.jsonl", RECORDS)
    conversations, _ = read_conversations(prompts)
    output = tmp_path / "out.jsonl"
    report = regenerate(conversations, output, OpenAIChatBackend([url]), GREEDY, progress=False)
    assert (report.written, report.skipped, report.failed, report.inputs) == (3, 0, 0, 3)
    assert report.completion_tokens > 0
    assert not failures_path(output).exists()

    records = read_output(output)
    regenerated = {c.key: c for c in iter_regenerated(output)}
    assert set(regenerated) == {c.key for c in conversations} == set(records)
    for conversation in conversations:
        back = regenerated[conversation.key]
        assert back.provenance == conversation.provenance  # the ORIGINAL provenance, so the cache keys match
        users = [m.content for m in conversation.messages if m.role == "user"]
        roles = [m.role for m in back.messages]
        assert [m.content for m in back.messages if m.role == "user"] == users
        assert roles[-2:] == ["user", "assistant"]
        assert all(roles[i + 1] == "assistant" for i, role in enumerate(roles) if role == "user")
        assert not any("ORIGINAL" in m.content for m in back.messages)
        generation = records[conversation.key]["generation"]
        assert generation["backend"] == "openai" and generation["model"] == TINY_TARGET
        assert generation["sampling"] == GREEDY.as_dict()
        assert len(generation["finish_reasons"]) == len(generation["completion_tokens"]) == len(users)
        # each turn's prompt was exactly the regenerated history: its token count matches a re-render
        for turn, index in enumerate(i for i, m in enumerate(back.messages) if m.role == "user"):
            history = [m.as_dict() for m in back.messages[: index + 1]]
            prompt = render_prompt(target, history, GREEDY.template_kwargs())
            assert generation["prompt_tokens"][turn] == len(
                target.tokenizer(prompt, add_special_tokens=False).input_ids
            )
    system = regenerated[conversations[0].key].messages[0]
    assert (system.role, system.content) == ("system", "You write short Python.")


def test_same_seed_same_output(tmp_path, url):
    conversations, _ = read_conversations(write_prompts(tmp_path / "prompts.jsonl", RECORDS))
    backend = OpenAIChatBackend([ServerSpec(url, 3)])
    regenerate(conversations, tmp_path / "a.jsonl", backend, SAMPLED, progress=False)
    regenerate(conversations, tmp_path / "b.jsonl", backend, SAMPLED, progress=False)
    other = SamplingParams(**{**SAMPLED.as_dict(), "seed": 124})
    regenerate(conversations, tmp_path / "c.jsonl", backend, other, progress=False)
    a, b, c = ({x.key: x.messages for x in iter_regenerated(tmp_path / f"{n}.jsonl")} for n in "abc")
    assert a == b
    assert a != c


def test_local_batched_greedy_equals_unbatched_and_server(tmp_path, target, url):
    conversations, _ = read_conversations(write_prompts(tmp_path / "prompts.jsonl", RECORDS + single_turn_prompts(3)))
    answers = {}
    for name, backend in [
        ("batch1", LocalGenerateBackend(target, batch_size=1)),
        ("batch4", LocalGenerateBackend(target, batch_size=4)),
        ("batch4-by-tokens", LocalGenerateBackend(target, batch_size=4, max_batch_tokens=64)),
        ("server", OpenAIChatBackend([url])),
    ]:
        report = regenerate(conversations, tmp_path / f"{name}.jsonl", backend, GREEDY, progress=False)
        assert report.written == len(conversations)
        answers[name] = {c.key: c.messages for c in iter_regenerated(tmp_path / f"{name}.jsonl")}
    assert answers["batch4"] == answers["batch1"] == answers["batch4-by-tokens"]
    assert answers["server"] == answers["batch1"]


def test_padded_token_groups_keep_each_forward_within_the_budget():
    lengths = [5, 514, 6, 7, 3, 3, 30]
    groups = padded_token_groups(lengths, max_tokens=20)
    assert sorted(row for group in groups for row in group) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[row] for row in group)
        assert len(group) * longest <= 20 or len(group) == 1, group
    assert groups == [[4, 5, 0], [2, 3], [6], [1]]  # length order: 3, 3, 5 | 6, 7 | 30 | 514
    assert padded_token_groups(lengths, max_tokens=10_000) == [sorted(range(7), key=lengths.__getitem__)]


def test_local_batched_sampling_does_not_depend_on_the_batch(tmp_path, target):
    conversations, _ = read_conversations(write_prompts(tmp_path / "prompts.jsonl", RECORDS))
    answers = []
    for size in (1, 3):
        regenerate(
            conversations, tmp_path / f"{size}.jsonl", LocalGenerateBackend(target, size), SAMPLED, progress=False
        )
        answers.append({c.key: c.messages for c in iter_regenerated(tmp_path / f"{size}.jsonl")})
    assert answers[0] == answers[1]


SHORT = SamplingParams(temperature=0.0, max_tokens=8)


def regenerate_process(prompts: Path, output: Path, url: str) -> subprocess.Popen:
    """``specdec data regenerate`` as a separate process, greedy with SHORT's settings."""
    command = [sys.executable, "-m", "specdec.cli", "data", "regenerate", "--data", str(prompts)]
    command += ["--output", str(output), "--base_url", url, "--concurrency", "2", "--progress", "false"]
    command += ["--temperature", "0", "--max_tokens", str(SHORT.max_tokens)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_writes_each_input_exactly_once(tmp_path, url):
    prompts = write_prompts(tmp_path / "prompts.jsonl", RECORDS + single_turn_prompts(13))
    conversations, _ = read_conversations(prompts)
    reference = tmp_path / "reference.jsonl"
    regenerate(conversations, reference, OpenAIChatBackend([url]), SHORT, progress=False)

    output = tmp_path / "out.jsonl"
    process = regenerate_process(prompts, output, url)
    deadline = time.monotonic() + 60
    while not (output.exists() and output.read_bytes().count(b"\n") >= 3):
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    written_before = output.read_bytes().count(b"\n")
    assert 0 < written_before < len(conversations), "the kill must land mid-run"

    restarted = regenerate_process(prompts, output, url)
    log, _ = restarted.communicate(timeout=120)
    assert restarted.returncode == 0, log
    assert f"({written_before} already done, 0 failed" in log

    expected = read_output(reference)
    got = read_output(output)  # asserts no duplicate keys
    assert set(got) == set(expected) == {c.key for c in conversations}
    assert {k: r["messages"] for k, r in got.items()} == {k: r["messages"] for k, r in expected.items()}


def test_torn_last_line_is_cut_and_redone(tmp_path, url):
    conversations, _ = read_conversations(write_prompts(tmp_path / "prompts.jsonl", RECORDS))
    output = tmp_path / "out.jsonl"
    backend = OpenAIChatBackend([url])
    regenerate(conversations, output, backend, GREEDY, progress=False)
    complete = read_output(output)
    lines = output.read_bytes().splitlines(keepends=True)
    output.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # a write cut mid-line

    with pytest.warns(UserWarning, match="torn last line"):
        assert len(list(iter_regenerated(output))) == len(lines) - 1
    report = regenerate(conversations, output, backend, GREEDY, progress=False)
    assert (report.written, report.skipped) == (1, len(lines) - 1)
    assert report.repaired_bytes == len(lines[-1]) // 2
    assert read_output(output) == complete


def test_too_long_prompt_fails_into_side_file_and_rerun_retries_it(tmp_path, target, url):
    long_prompt = {"turns": ["Explain this code: " + "x = x + 1; " * 80]}
    conversations, _ = read_conversations(write_prompts(tmp_path / "prompts.jsonl", [*RECORDS, long_prompt]))
    output = tmp_path / "out.jsonl"
    with serve_in_background(target, max_model_len=160) as small:
        report = regenerate(conversations, output, OpenAIChatBackend([small]), GREEDY, progress=False)
    assert (report.written, report.failed) == (3, 1)
    (failure,) = [json.loads(line) for line in failures_path(output).read_text().splitlines()]
    assert failure["key"] == conversations[-1].key
    assert failure["source"]["line"] == 4 and failure["turn"] == 0
    assert "HTTP 400" in failure["reason"] and "maximum context length" in failure["reason"]
    assert failure["key"] in report.report()

    report = regenerate(conversations, output, OpenAIChatBackend([url]), GREEDY, progress=False)
    assert (report.written, report.skipped, report.failed) == (1, 3, 0)
    assert not failures_path(output).exists()
    assert set(read_output(output)) == {c.key for c in conversations}


def scripted_server(failures: int, status: int = 503):
    """A real HTTP server that answers ``status`` to its first ``failures`` requests, then a canned answer;
    prompts containing BROKEN always get a 500."""
    app = FastAPI()
    app.state.calls = 0

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "scripted", "object": "model"}]}

    @app.post("/v1/chat/completions")
    def chat(body: dict = Body(...)):  # noqa: B008
        app.state.calls += 1
        last = body["messages"][-1]["content"]
        if app.state.calls <= failures or "BROKEN" in last:
            return JSONResponse({"error": {"message": f"scripted {status}"}}, status_code=status)
        choice = {"index": 0, "message": {"role": "assistant", "content": f"answer to {last}"}, "finish_reason": "stop"}
        return {"id": "x", "choices": [choice], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}

    return app


FAST_RETRY = RetryPolicy(max_retries=3, backoff=0.01)


def test_retries_with_backoff_until_the_server_recovers(tmp_path):
    conversations, _ = read_conversations(write_prompts(tmp_path / "prompts.jsonl", RECORDS[2:]))
    app = scripted_server(failures=2, status=503)
    with serve_app_in_background(app) as url:
        report = regenerate(
            conversations, tmp_path / "out.jsonl", OpenAIChatBackend([url], retry=FAST_RETRY), GREEDY, progress=False
        )
    assert (report.written, report.failed) == (1, 0)
    assert app.state.calls == 3  # 503, 503, then the answer
    (back,) = iter_regenerated(tmp_path / "out.jsonl")
    assert back.messages[-1].content == "answer to Write a class for a stack."


def test_client_errors_are_not_retried(tmp_path):
    conversations, _ = read_conversations(write_prompts(tmp_path / "prompts.jsonl", RECORDS[2:]))
    app = scripted_server(failures=1, status=422)
    with serve_app_in_background(app) as url:
        report = regenerate(
            conversations, tmp_path / "out.jsonl", OpenAIChatBackend([url], retry=FAST_RETRY), GREEDY, progress=False
        )
    assert (report.written, report.failed, app.state.calls) == (0, 1, 1)
    assert "HTTP 422: scripted 422" in report.failures[0]


def test_cli_exits_nonzero_after_writing_the_others(tmp_path, capsys):
    records = [*RECORDS, {"turns": ["This one is BROKEN."]}]
    prompts = write_prompts(tmp_path / "prompts.jsonl", records, malformed_at=2)
    output = tmp_path / "out.jsonl"
    app = scripted_server(failures=0, status=500)
    with serve_app_in_background(app) as url:
        args = ["data", "regenerate", "--data", str(prompts), "--output", str(output), "--base_url", url]
        args += ["--max_retries", "2", "--retry_backoff", "0.01", "--progress", "false"]
        with pytest.raises(SystemExit) as exit_info:
            main(args)
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert f"{prompts.resolve()}, line 2: malformed JSON" in captured.err  # reported with file and line, not fatal
    assert "rejected 1" in captured.err
    assert "3 conversations" in captured.out and "1 failed" in captured.out
    assert len(read_output(output)) == 3
    (failure,) = [json.loads(line) for line in failures_path(output).read_text().splitlines()]
    assert "HTTP 500" in failure["reason"] and "3 attempts" in failure["reason"]
    assert failure["source"]["line"] == 5


def test_restart_with_other_settings_is_refused(tmp_path, target, url, capsys):
    prompts = write_prompts(tmp_path / "prompts.jsonl", RECORDS[2:])
    conversations, _ = read_conversations(prompts)
    output = tmp_path / "out.jsonl"
    regenerate(conversations, output, OpenAIChatBackend([url]), GREEDY, progress=False)
    hotter = SamplingParams(**{**GREEDY.as_dict(), "temperature": 0.5})
    with pytest.raises(ValueError, match=r"other settings.*temperature"):
        regenerate(conversations, output, OpenAIChatBackend([url]), hotter, progress=False)
    with pytest.raises(ValueError, match="backend: file has 'openai', this run 'local'"):
        regenerate(conversations, output, LocalGenerateBackend(target), GREEDY, progress=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "regenerate", "--data", str(prompts), "--output", str(output), "--base_url", url])
    assert exit_info.value.code == 2
    assert "specdec: error:" in capsys.readouterr().err


def test_duplicate_input_key_names_both_lines(tmp_path, url):
    prompts = write_prompts(tmp_path / "prompts.jsonl", RECORDS[2:])
    conversations, _ = read_conversations([prompts, prompts])
    with pytest.raises(ValueError, match=r"appears twice: .*line 1 and .*line 1"):
        regenerate(conversations, tmp_path / "out.jsonl", OpenAIChatBackend([url]), GREEDY, progress=False)


def test_second_writer_is_refused(tmp_path):
    settings = {"backend": "local", "model": TINY_TARGET, "sampling": GREEDY.as_dict()}
    first = RegenerationOutput(tmp_path / "out.jsonl", settings)
    try:
        with pytest.raises(OSError, match="another regeneration process"):
            RegenerationOutput(tmp_path / "out.jsonl", settings)
    finally:
        first.close()


def test_iter_regenerated_names_file_and_line(tmp_path, url):
    conversations, _ = read_conversations(write_prompts(tmp_path / "prompts.jsonl", RECORDS))
    output = tmp_path / "out.jsonl"
    regenerate(conversations, output, OpenAIChatBackend([url]), GREEDY, progress=False)
    lines = output.read_text().splitlines()
    record = json.loads(lines[1])
    record["messages"][1]["content"] = " "
    output.write_text("\n".join([lines[0], json.dumps(record), lines[2]]) + "\n")
    with pytest.raises(InvalidConversation, match=rf"{output}, line 2, field 'messages\[1\].content'"):
        list(iter_regenerated(output))
