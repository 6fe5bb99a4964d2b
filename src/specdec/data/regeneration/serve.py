"""A local target behind an OpenAI-compatible HTTP API on loopback.

Regeneration talks to vLLM or SGLang in production; this server speaks enough of the same API
(``/v1/models``, non-streaming ``/v1/chat/completions``, ``/health``) to run the same client against a target
on a laptop, in CI, or in tests: a real HTTP server, not a stand-in. Answers go through the target's own chat
template and are sampled with a generator seeded from the request's ``seed``, so one request always gets one
answer. Requests are served one at a time.

FastAPI and uvicorn are the optional extra ``specdec[serve]``; they are imported only when serving.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from specdec.data.regeneration.regenerate import SamplingParams, context_length, generate_completions, render_prompt
from specdec.targets import TINY_TARGET

if TYPE_CHECKING:
    from fastapi import FastAPI

    from specdec.targets import Target

ROLES = ("system", "user", "assistant")
IGNORED_FIELDS = frozenset(
    {"model", "user", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "stream_options"}
)


class BadRequest(ValueError):
    """A request the server cannot honour; answered with HTTP 400 and this message."""


def _require_serving_packages() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"serving a target needs FastAPI and uvicorn ({error.name} is missing): pip install 'specdec[serve]'"
        ) from error


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat completion request."""

    messages: list[dict[str, str]]
    sampling: SamplingParams
    max_tokens: int | None
    stop: tuple[str, ...]
    template_kwargs: dict[str, Any]


def _number(body: Mapping[str, Any], name: str, default: float, kind: type = float) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise BadRequest(f"{name} must be {'an integer' if kind is int else 'a number'}; got {value!r}")
    return kind(value)


def parse_chat_request(body: object) -> ChatRequest:
    """Check a ``/v1/chat/completions`` body; BadRequest says what is wrong or unsupported."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("stream"):
        raise BadRequest("stream=true is not supported; this server answers in one response")
    if _number(body, "n", 1, int) != 1:
        raise BadRequest("only n=1 is supported")
    for name in ("tools", "functions", "response_format", "logit_bias"):
        if body.get(name):
            raise BadRequest(f"{name} is not supported")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"messages[{index}] must be an object with role {', '.join(ROLES)}")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"messages[{index}].content: only text parts are supported")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{index}].content must be a string")
        checked.append({"role": message["role"], "content": content})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise BadRequest(f"max_tokens must be a positive integer; got {max_tokens!r}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"seed must be an integer; got {seed!r}")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop must be a string or a list of non-empty strings")
    template_kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise BadRequest("chat_template_kwargs must be an object")
    try:
        sampling = SamplingParams(
            temperature=_number(body, "temperature", 1.0),
            top_p=_number(body, "top_p", 1.0),
            top_k=_number(body, "top_k", -1, int),
            min_p=_number(body, "min_p", 0.0),
            max_tokens=max_tokens or 1,
            seed=seed,
            enable_thinking=None,
        )
    except ValueError as error:
        raise BadRequest(str(error)) from None
    return ChatRequest(checked, sampling, max_tokens, tuple(stop), dict(template_kwargs))


class TargetServer:
    """The target plus a lock: answers one chat request at a time."""

    def __init__(self, target: Target, served_model_name: str | None = None, max_model_len: int | None = None):
        self.target = target
        self.name = served_model_name or target.location.name
        self.max_model_len = max_model_len or context_length(target)
        self.created = int(time.time())
        self._lock = threading.Lock()

    def chat(self, request: ChatRequest) -> dict[str, Any]:
        """The chat completion response of one request."""
        try:
            prompt = render_prompt(self.target, request.messages, request.template_kwargs)
        except Exception as error:  # the template's own refusal (e.g. an unsupported role order)
            raise BadRequest(f"the chat template cannot render these messages: {error}") from None
        prompt_tokens = len(self.target.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        room = self.max_model_len - prompt_tokens
        wanted = request.max_tokens if request.max_tokens is not None else room
        if room < 1 or wanted > room:
            raise BadRequest(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the messages, {wanted} in the completion)."
            )
        with self._lock:
            (completion,) = generate_completions(
                self.target,
                [prompt],
                request.sampling,
                [request.sampling.seed],
                max_tokens=[wanted],
                stop=request.stop,
            )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": completion.content},
                    "finish_reason": completion.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            },
        }


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def create_app(target: Target, served_model_name: str | None = None, max_model_len: int | None = None) -> FastAPI:
    """The FastAPI application serving ``target``."""
    _require_serving_packages()
    from fastapi import Body, FastAPI
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError

    server = TargetServer(target, served_model_name, max_model_len)
    app = FastAPI(title=f"specdec: {server.name}")

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Any, error: RequestValidationError):
        return _error(400, f"the request body is not valid JSON: {error.errors()[:1]}")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict[str, Any]:
        card = {
            "id": server.name,
            "object": "model",
            "created": server.created,
            "owned_by": "specdec",
            "max_model_len": server.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: Any = Body(None)):  # noqa: B008 - FastAPI's way to take the raw JSON body
        model = body.get("model") if isinstance(body, dict) else None
        if model is not None and model != server.name:
            return _error(404, f"The model `{model}` does not exist; this server serves `{server.name}`.", "NotFound")
        try:
            return await run_in_threadpool(server.chat, parse_chat_request(body))
        except BadRequest as error:
            return _error(400, str(error))

    return app


@contextmanager
def serve_in_background(
    target: Target | str = TINY_TARGET,
    host: str = "127.0.0.1",
    port: int = 0,
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    device: str = "auto",
    log_level: str = "warning",
) -> Iterator[str]:
    """Serve ``target`` with a real uvicorn server in a background thread; yields the base URL.

    ``port`` 0 takes a free port. The server stops when the block exits.
    """
    app = create_app(_loaded(target, device), served_model_name, max_model_len)
    with serve_app_in_background(app, host, port, log_level) as url:
        yield url


@contextmanager
def serve_app_in_background(
    app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"
) -> Iterator[str]:
    """Run any ASGI app under uvicorn in a background thread; yields its base URL (``port`` 0: a free port)."""
    _require_serving_packages()
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="specdec-serve", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise OSError(f"the server on {host}:{bound} stopped while starting")
            time.sleep(0.01)
        yield f"http://{f'[{host}]' if ':' in host else host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _loaded(target: Target | str, device: str) -> Target:
    if isinstance(target, str):
        from specdec.targets import load_target

        return load_target(target, device=device)
    return target


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)


def serve_command(
    target: str = TINY_TARGET,
    host: str = "127.0.0.1",
    port: int = 8000,
    port_file: Path | None = None,
    served_model_name: str | None = None,
    max_model_len: int | None = None,
    device: str = "auto",
) -> None:
    """Serve a target over an OpenAI-compatible API (/v1/models, /v1/chat/completions, /health) until interrupted.

    Args:
        target: ``specdec-tiny``, a local HF model directory, or a hub id.
        host: address to listen on; the default keeps the server on loopback.
        port: port to listen on; 0 picks a free one (printed, and written to port_file).
        port_file: a file that receives the port once the server accepts connections.
        served_model_name: the model name clients send and /v1/models lists (default: the target name).
        max_model_len: longest prompt plus answer in tokens (default: the target's max_position_embeddings).
        device: where the target runs: auto, cpu, cuda or cuda:N.
    """
    _require_serving_packages()
    loaded = _loaded(target, device)
    with serve_in_background(loaded, host, port, served_model_name, max_model_len, log_level="info") as url:
        bound = url.rsplit(":", 1)[1]
        if port_file is not None:
            _write_atomic(Path(port_file), f"{bound}\n")
        print(f"serving {served_model_name or loaded.location.name} at {url}/v1", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("shutting down", flush=True)
