"""What regeneration backends share: sampling settings, answers, per-conversation outcomes, the turn walk.

Both backends (the local target and OpenAI-compatible servers) and the resumable writer speak these types, so
they live apart from any one of them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from specdec.data.prompts.conversations import Conversation, Message


@dataclass(frozen=True)
class SamplingParams:
    """How each turn is sampled; recorded with every output line so a resumed run cannot mix settings.

    ``top_k`` ≤ 0, ``top_p`` = 1 and ``min_p`` = 0 switch those filters off; ``temperature`` 0 is greedy.
    ``seed`` None sends no seed (answers are then not reproducible). ``enable_thinking`` is passed to the chat
    template (None: the template's default).
    """

    temperature: float = 0.7
    top_p: float = 0.8
    top_k: int = 20
    min_p: float = 0.0
    max_tokens: int = 4096
    seed: int | None = 0
    enable_thinking: bool | None = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative; got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1]; got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1; got {self.max_tokens}")

    def request_seed(self, key: str, turn: int) -> int | None:
        """The seed of one request: a hash of the base seed, the conversation key and the turn, so a rerun (or a
        resumed run, in any order, on any server) asks for exactly the same draw."""
        if self.seed is None:
            return None
        digest = hashlib.sha256(f"{self.seed}\0{key}\0{turn}".encode()).digest()
        return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF  # int32: every server accepts it

    def template_kwargs(self) -> dict[str, Any]:
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Completion:
    """One generated answer."""

    content: str
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Regenerated:
    """A conversation with every user turn answered."""

    conversation: Conversation
    messages: tuple[Message, ...]
    finish_reasons: tuple[str, ...]
    prompt_tokens: tuple[int, ...]
    completion_tokens: tuple[int, ...]


@dataclass(frozen=True)
class Failed:
    """A conversation that could not be answered: which user turn, and why."""

    conversation: Conversation
    turn: int
    reason: str


Outcome = Regenerated | Failed


class TurnWalk:
    """Walks one conversation turn by turn: the prompt for each user turn, then records its answer.

    System and user messages are kept in place, original assistant messages are dropped, and each user message
    is followed by the target's answer to everything before it.
    """

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation
        self.messages: list[Message] = []
        self.turn = -1
        self._next = 0
        self._finish: list[str] = []
        self._prompt_tokens: list[int] = []
        self._completion_tokens: list[int] = []

    def next_prompt(self) -> list[dict[str, str]] | None:
        """The messages to answer next (system + user + regenerated answers so far), or None when done."""
        source = self.conversation.messages
        while self._next < len(source):
            message = source[self._next]
            self._next += 1
            if message.role == "assistant":
                continue
            self.messages.append(message)
            if message.role == "user":
                self.turn += 1
                return [m.as_dict() for m in self.messages]
        return None

    def answer(self, completion: Completion) -> Failed | None:
        """Record the answer to the current turn; an empty answer fails the conversation."""
        if not completion.content.strip():
            return Failed(self.conversation, self.turn, f"empty answer (finish_reason {completion.finish_reason})")
        self.messages.append(Message("assistant", completion.content))
        self._finish.append(completion.finish_reason)
        self._prompt_tokens.append(completion.prompt_tokens)
        self._completion_tokens.append(completion.completion_tokens)
        return None

    def result(self) -> Regenerated:
        return Regenerated(
            self.conversation,
            tuple(self.messages),
            tuple(self._finish),
            tuple(self._prompt_tokens),
            tuple(self._completion_tokens),
        )


class RegenerationBackend(Protocol):
    """Answers conversations turn by turn; outcomes come back in any order, one per conversation."""

    name: str

    @property
    def model(self) -> str: ...

    def regenerate(self, conversations: Sequence[Conversation], sampling: SamplingParams) -> Iterator[Outcome]: ...
