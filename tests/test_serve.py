"""The loopback OpenAI-compatible server: a real uvicorn server over real HTTP on the tiny target."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from specdec.data.regeneration import serve
from specdec.targets import TINY_TARGET, load_target

PROMPT = [{"role": "user", "content": "Write a function that reverses a string."}]


@pytest.fixture(scope="module")
def target():
    return load_target(TINY_TARGET, device="cpu")


@pytest.fixture(scope="module")
def url(target):
    with serve.serve_in_background(target) as base_url:
        yield base_url


def chat(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={"messages": PROMPT, **body}, timeout=60)


def test_models_and_health(url):
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    listed = httpx.get(f"{url}/v1/models").json()
    assert listed["object"] == "list"
    assert [card["id"] for card in listed["data"]] == [TINY_TARGET]


def test_chat_completion_fields(url):
    response = chat(
        url, model=TINY_TARGET, temperature=0, max_tokens=12, chat_template_kwargs={"enable_thinking": False}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == TINY_TARGET
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 12
    assert usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_length_limit_and_stop_string(url):
    capped = chat(url, temperature=0, max_completion_tokens=3).json()
    assert capped["choices"][0]["finish_reason"] == "length"
    assert capped["usage"]["completion_tokens"] == 3
    full = chat(url, temperature=0, max_tokens=24).json()["choices"][0]["message"]["content"]
    stop = full[4:7]  # a string the greedy answer is known to contain
    stopped = chat(url, temperature=0, max_tokens=24, stop=[stop]).json()["choices"][0]
    assert stopped["finish_reason"] == "stop"
    assert stopped["message"]["content"] == full[: full.index(stop)]


def test_seed_makes_sampling_reproducible(url):
    def answer(seed):
        body = chat(url, temperature=1.0, top_k=50, top_p=0.95, min_p=0.01, max_tokens=16, seed=seed).json()
        return body["choices"][0]["message"]["content"]

    first = answer(7)
    assert answer(7) == first
    assert any(answer(seed) != first for seed in (8, 9, 10))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"n": 2}, "n=1"),
        ({"stream": True}, "stream"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1_000_000}, "maximum context length"),
    ],
)
def test_bad_requests_get_400(url, body, message):
    response = chat(url, **body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_invalid_json_and_unknown_model(url):
    response = httpx.post(
        f"{url}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert chat(url, model="another-model").status_code == 404


def test_missing_extra_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(ImportError, match=r"specdec\[serve\]"):
        serve._require_serving_packages()


@pytest.mark.slow
def test_serve_command_with_port_zero(tmp_path: Path):
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [sys.executable, "-m", "specdec.cli", "data", "serve", "--port", "0", "--port_file", str(port_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the server never wrote its port"
            time.sleep(0.05)
        port = int(port_file.read_text())
        assert port > 0
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok"}
    finally:
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/v1" in output
