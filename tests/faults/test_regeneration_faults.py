"""Regeneration under faults, against the tiny target served on loopback: throttling, server errors, slow and
reset connections, answers lost after the server did the work, the server killed and restarted, the client
killed again and again. Every case ends with each input answered exactly once, equal to an undisturbed run."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from specdec.data import read_conversations
from specdec.data.regeneration.openai_client import OpenAIChatBackend, RetryPolicy, ServerSpec
from specdec.data.regeneration.regenerate import SamplingParams, regenerate
from specdec.data.regeneration.serve import serve_in_background
from specdec.targets import TINY_TARGET, load_target
from tests.faults.proxy import FAULTS, faulty_proxy

pytestmark = pytest.mark.faults

SAMPLED = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, max_tokens=8, seed=7)
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
PATIENT = RetryPolicy(max_retries=40, backoff=0.01, max_backoff=0.05)


def prompts_file(path: Path, count: int) -> Path:
    records = [{"turns": [f"Write function number {i}.", "Now add a test."]} for i in range(count // 4)]
    records += [{"turns": [f"Explain item {i} in one line."]} for i in range(count - len(records))]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def answers(path: Path) -> dict[str, list]:
    """Key → messages of an output file; fails on a key written twice."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    keys = [record["key"] for record in records]
    assert len(keys) == len(set(keys)), "a key is written twice"
    return {record["key"]: record["messages"] for record in records}


def undisturbed_run(tmp_path: Path, url: str, count: int, sampling: SamplingParams):
    """Prompts, their conversations and the output of a run with nothing injected, to compare against."""
    prompts = prompts_file(tmp_path / "prompts.jsonl", count)
    conversations, _ = read_conversations(prompts)
    reference = tmp_path / "reference.jsonl"
    regenerate(conversations, reference, OpenAIChatBackend([url]), sampling, progress=False)
    return prompts, conversations, reference


@pytest.fixture(scope="module")
def url():
    with serve_in_background(load_target(TINY_TARGET, device="cpu")) as base_url:
        yield base_url


def test_injected_faults_at_random_leave_every_answer_exactly_once(tmp_path, url):
    _, conversations, reference = undisturbed_run(tmp_path, url, 16, SAMPLED)

    rates = {"slow": 0.1, "throttle": 0.1, "error": 0.1, "reset": 0.1, "lost": 0.1}
    output = tmp_path / "out.jsonl"
    with faulty_proxy(url, rates, seed=3, delay=0.05) as (proxied, proxy):
        backend = OpenAIChatBackend([ServerSpec(proxied, concurrency=4)], retry=PATIENT)
        report = regenerate(conversations, output, backend, SAMPLED, progress=False)
    assert all(proxy.counts[fault] > 0 for fault in FAULTS), proxy.counts  # every kind of fault happened
    assert (report.written, report.failed) == (len(conversations), 0)
    assert answers(output) == answers(reference)  # seeded sampling: lost answers are redone identically


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "specdec.cli", "data", "serve", "--port", str(port), "--device", "cpu"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, "the server died while starting"
        assert time.monotonic() < deadline, "the server never answered /health"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.1)


def lines_in(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run(tmp_path, url):
    _, conversations, reference = undisturbed_run(tmp_path, url, 24, GREEDY)

    port = free_port()
    server = start_server(port)
    output = tmp_path / "out.jsonl"
    retry = RetryPolicy(max_retries=200, backoff=0.05, max_backoff=0.2)  # outlasts a restart of the server
    backend = OpenAIChatBackend([f"http://127.0.0.1:{port}"], retry=retry)
    outcome = {}
    client = threading.Thread(
        target=lambda: outcome.update(report=regenerate(conversations, output, backend, GREEDY, progress=False))
    )
    client.start()
    try:
        deadline = time.monotonic() + 60
        while lines_in(output) < 4:
            assert time.monotonic() < deadline and client.is_alive()
            time.sleep(0.01)
        server.kill()
        server.wait()
        written_while_down = lines_in(output)
        time.sleep(0.5)  # the client meets refused connections meanwhile
        server = start_server(port)
        client.join(120)
        assert not client.is_alive()
    finally:
        server.kill()
        server.wait()
    assert written_while_down < len(conversations), "the kill must land mid-run"
    assert (outcome["report"].written, outcome["report"].failed) == (len(conversations), 0)
    assert answers(output) == answers(reference)


def regenerate_process(prompts: Path, output: Path, url: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "specdec.cli", "data", "regenerate", "--data", str(prompts)]
    command += ["--output", str(output), "--base_url", url, "--concurrency", "3"]
    command += ["--temperature", "0", "--max_tokens", str(GREEDY.max_tokens), "--progress", "false"]
    command += ["--max_retries", "40", "--retry_backoff", "0.01"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_client_killed_at_random_points_again_and_again_behind_a_faulty_network(tmp_path, url):
    prompts, _, reference = undisturbed_run(tmp_path, url, 40, GREEDY)

    output = tmp_path / "out.jsonl"
    rng = random.Random(11)
    kills = 0
    rates = {"slow": 0.05, "throttle": 0.05, "error": 0.05, "reset": 0.05, "lost": 0.05}
    with faulty_proxy(url, rates, seed=5, delay=0.05) as (proxied, _):
        for _ in range(3):
            before = lines_in(output)
            process = regenerate_process(prompts, output, proxied)
            wanted = before + rng.randint(1, 6)  # a random point: after a few more answers
            deadline = time.monotonic() + 90
            while lines_in(output) < wanted and process.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.002)
            if process.poll() is not None:
                break  # it finished before this kill
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            kills += 1
        final = regenerate_process(prompts, output, proxied)
        log, _ = final.communicate(timeout=180)
    assert final.returncode == 0, log
    assert kills >= 2, "most kills must land mid-run"
    assert answers(output) == answers(reference)
