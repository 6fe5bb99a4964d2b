"""Regeneration through OpenAI-compatible servers (vLLM, SGLang, ``specdec data serve``).

Conversations run concurrently on an asyncio loop, each one turn after another; every request goes to the
least-loaded server. Transient trouble (connection errors, timeouts, 429, 5xx) is retried with exponential
backoff; any other answer fails the conversation at once, since asking again would get the same refusal.
"""

from __future__ import annotations

import asyncio
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from specdec.data.prompts.conversations import Conversation
from specdec.data.regeneration.turns import Completion, Failed, Outcome, SamplingParams, TurnWalk

RETRYABLE_STATUS = frozenset({408, 429})  # and every 5xx


@dataclass(frozen=True)
class ServerSpec:
    """One server: its base URL (with or without ``/v1``) and how many requests it takes at once."""

    base_url: str
    concurrency: int = 32

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency of {self.base_url} must be at least 1; got {self.concurrency}")

    @property
    def api(self) -> str:
        url = self.base_url.rstrip("/")
        return url if url.endswith("/v1") else f"{url}/v1"


@dataclass(frozen=True)
class RetryPolicy:
    """``max_retries`` retries after the first attempt, waiting ``backoff`` · 2^n seconds (±25%, at most
    ``max_backoff``) or what a ``Retry-After`` header asks."""

    max_retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0

    def delay(self, retry: int, retry_after: str | None = None) -> float:
        if retry_after is not None:
            try:
                return min(float(retry_after), self.max_backoff)
            except ValueError:
                pass
        return min(self.backoff * 2**retry, self.max_backoff) * random.uniform(0.75, 1.25)


class RequestFailed(Exception):
    """A request that cannot succeed: a refusal, or transient errors beyond the retry budget."""


class _Server:
    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.in_flight = 0


class OpenAIChatBackend:
    """Answers turns with ``POST /v1/chat/completions`` on one or more servers.

    Sampling goes in the body as vLLM and SGLang accept it: ``top_k`` and ``min_p`` beside the OpenAI fields, the
    thinking switch as ``chat_template_kwargs``, and a per-request ``seed``.
    """

    name = "openai"

    def __init__(
        self,
        servers: Sequence[ServerSpec | str],
        model: str | None = None,
        api_key: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float = 600.0,
    ) -> None:
        if not servers:
            raise ValueError("give at least one server")
        self.servers = [_Server(s if isinstance(s, ServerSpec) else ServerSpec(s)) for s in servers]
        self.retry = retry or RetryPolicy()
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._model = model

    @property
    def model(self) -> str:
        """The served model name; asked of the servers (``GET /v1/models``) when not given."""
        if self._model is None:
            self._model = self._served_model()
        return self._model

    def _served_model(self) -> str:
        """The first model the first answering server lists (a synchronous probe, usable inside notebooks)."""
        problems = []
        with httpx.Client(timeout=self.timeout, headers=self.headers) as client:
            for server in self.servers:
                for attempt in range(self.retry.max_retries + 1):
                    try:
                        response = client.get(f"{server.spec.api}/models")
                        if response.status_code < 300:
                            return str(response.json()["data"][0]["id"])
                        problem = f"HTTP {response.status_code}: {_error_message(response)}"
                        if response.status_code not in RETRYABLE_STATUS and response.status_code < 500:
                            break
                    except httpx.TransportError as error:  # a server still starting up: wait for it
                        problem = f"{type(error).__name__}: {error}"
                    except (ValueError, KeyError, IndexError, TypeError) as error:
                        problem = f"malformed model list ({error!r})"
                        break
                    if attempt < self.retry.max_retries:
                        time.sleep(self.retry.delay(attempt))
                problems.append(f"{server.spec.api}: {problem}")
        raise OSError("no server lists a model (give --model?): " + "; ".join(problems))

    def request_body(self, messages: list[dict[str, str]], sampling: SamplingParams, seed: int | None) -> dict:
        """The JSON body of one chat completion request."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "min_p": sampling.min_p,
            "max_tokens": sampling.max_tokens,
            "n": 1,
            "stream": False,
        }
        if seed is not None:
            body["seed"] = seed
        if sampling.template_kwargs():
            body["chat_template_kwargs"] = sampling.template_kwargs()
        return body

    # ------------------------------------------------------------------------------------------ requests
    def _least_loaded(self) -> _Server:
        return min(self.servers, key=lambda s: (s.in_flight / s.spec.concurrency, s.in_flight))

    async def _post(self, client: httpx.AsyncClient, path: str, body: dict) -> Any:
        """One request with retries, each attempt sent to the least-loaded server."""
        last = ""
        for attempt in range(self.retry.max_retries + 1):
            chosen = self._least_loaded()
            retry_after = None
            chosen.in_flight += 1
            try:
                response = await client.post(chosen.spec.api + path, json=body)
            except httpx.TransportError as error:  # connection refused or reset, timeouts, broken responses
                last = f"{chosen.spec.api}: {type(error).__name__}: {error}"
            else:
                if response.status_code < 300:
                    try:
                        return response.json()
                    except ValueError as error:
                        raise RequestFailed(f"{chosen.spec.api}: response is not JSON: {error}") from None
                message = f"{chosen.spec.api}: HTTP {response.status_code}: {_error_message(response)}"
                if response.status_code not in RETRYABLE_STATUS and response.status_code < 500:
                    raise RequestFailed(message)
                last, retry_after = message, response.headers.get("retry-after")
            finally:
                chosen.in_flight -= 1
            if attempt < self.retry.max_retries:
                await asyncio.sleep(self.retry.delay(attempt, retry_after))
        raise RequestFailed(f"{last} (gave up after {self.retry.max_retries + 1} attempts)")

    async def complete(
        self, client: httpx.AsyncClient, messages: list[dict[str, str]], sampling: SamplingParams, seed: int | None
    ) -> Completion:
        """One answer; RequestFailed when the server refuses or keeps failing, or the answer is malformed."""
        body = await self._post(client, "/chat/completions", self.request_body(messages, sampling, seed))
        try:
            choice = body["choices"][0]
            content = choice["message"]["content"] or ""
            usage = body.get("usage") or {}
            return Completion(
                content=str(content),
                finish_reason=str(choice.get("finish_reason")),
                prompt_tokens=int(usage.get("prompt_tokens", 0)),
                completion_tokens=int(usage.get("completion_tokens", 0)),
            )
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise RequestFailed(f"malformed chat completion ({error!r}): {str(body)[:200]}") from None

    async def _conversation(
        self, client: httpx.AsyncClient, conversation: Conversation, sampling: SamplingParams
    ) -> Outcome:
        walk = TurnWalk(conversation)
        while (messages := walk.next_prompt()) is not None:
            try:
                completion = await self.complete(
                    client, messages, sampling, sampling.request_seed(conversation.key, walk.turn)
                )
            except RequestFailed as error:
                return Failed(conversation, walk.turn, str(error))
            failure = walk.answer(completion)
            if failure is not None:
                return failure
        return walk.result()

    async def _run(
        self,
        conversations: Sequence[Conversation],
        sampling: SamplingParams,
        emit: queue.Queue,
        stop: threading.Event,
    ) -> None:
        capacity = sum(server.spec.concurrency for server in self.servers)
        limits = httpx.Limits(max_connections=capacity, max_keepalive_connections=capacity)
        async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers, limits=limits) as client:
            slots = asyncio.Semaphore(capacity)
            tasks: set[asyncio.Task] = set()

            def finished(task: asyncio.Task) -> None:
                tasks.discard(task)
                slots.release()
                if not task.cancelled():
                    emit.put(task.exception() or task.result())

            try:
                for conversation in conversations:
                    await slots.acquire()
                    if stop.is_set():
                        break
                    task = asyncio.create_task(self._conversation(client, conversation, sampling))
                    tasks.add(task)
                    task.add_done_callback(finished)
                while tasks and not stop.is_set():
                    await asyncio.wait(set(tasks), timeout=0.2)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def regenerate(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> Iterator[Outcome]:
        """Outcomes in completion order. The asyncio loop runs in a worker thread so the caller stays synchronous."""
        _ = self.model  # resolve the served name before any request needs it
        results: queue.Queue = queue.Queue()
        stop = threading.Event()
        done = object()

        def work() -> None:
            try:
                asyncio.run(self._run(conversations, sampling, results, stop))
            except BaseException as error:  # handed to the caller's thread
                results.put(error)
            finally:
                results.put(done)

        worker = threading.Thread(target=work, name="specdec-regenerate", daemon=True)
        worker.start()
        try:
            while (item := results.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join(timeout=30)


def _error_message(response: httpx.Response) -> str:
    """The server's own explanation: OpenAI's ``{"error": {"message"}}``, FastAPI's ``detail``, or the text."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        if "message" in body:
            return str(body["message"])
        if "detail" in body:
            return str(body["detail"])
    return str(body)[:500]
