"""Conversation records: messages, provenance and the validation every imported record must pass.

Every later stage (regeneration, the target cache) writes one output per input and must be able to tell,
after a crash, which inputs are done. So each conversation carries where it came from (file and line) and
a hash of its messages, and the stable ``key`` built from them names it everywhere downstream.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")

# Why a record was refused; the import summary counts rejections by these kinds.
MALFORMED_JSON = "malformed_json"
UNKNOWN_ROLE = "unknown_role"
EMPTY_CONVERSATION = "empty_conversation"
INVALID_RECORD = "invalid_record"


class InvalidConversation(ValueError):
    """A record that cannot become a conversation: says which file, line and field, and why."""

    def __init__(
        self,
        reason: str,
        *,
        field: str | None = None,
        kind: str = INVALID_RECORD,
        source: str | None = None,
        line: int | None = None,
        unit: str = "line",
    ) -> None:
        self.reason = reason
        self.field = field
        self.kind = kind
        self.source = source
        self.line = line
        self.unit = unit
        super().__init__(str(self))

    def located(self, source: str, line: int, unit: str = "line") -> InvalidConversation:
        """The same error, now naming the file and line it was found at."""
        return InvalidConversation(self.reason, field=self.field, kind=self.kind, source=source, line=line, unit=unit)

    def __str__(self) -> str:
        where = []
        if self.source is not None:
            where.append(self.source)
        if self.line is not None:
            where.append(f"{self.unit} {self.line}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        return f"{', '.join(where)}: {self.reason}" if where else self.reason


@dataclass(frozen=True)
class Message:
    """One turn of a conversation."""

    role: Role
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Provenance:
    """Where a conversation came from.

    ``line`` is the 1-based line of a JSONL file, the 1-based item of a JSON list, or the 0-based row of an
    HF dataset; ``unit`` says which ("line", "item" or "row").
    """

    source: str
    line: int
    content_hash: str
    unit: str = "line"

    @property
    def key(self) -> str:
        """Stable identity of this input: the same file, position and messages always give the same key."""
        return f"{self.source}:{self.unit}{self.line}:{self.content_hash[:16]}"


@dataclass(frozen=True)
class Conversation:
    """Validated messages plus their provenance."""

    messages: tuple[Message, ...]
    provenance: Provenance

    @property
    def key(self) -> str:
        return self.provenance.key

    def as_dicts(self) -> list[dict[str, str]]:
        """The messages as ``apply_chat_template`` expects them."""
        return [message.as_dict() for message in self.messages]


def content_hash(messages: Iterable[Message]) -> str:
    """sha256 of the canonical JSON of the messages (sorted keys, no spaces, UTF-8): independent of source format."""
    canonical = json.dumps(
        [message.as_dict() for message in messages], ensure_ascii=False, sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def validate_messages(
    messages: Iterable[Message | Mapping[str, object]], field: str = "messages"
) -> tuple[Message, ...]:
    """Check the rules every conversation obeys, and return the messages as ``Message`` objects.

    Rules: at least one message; roles are system, user or assistant; contents are non-empty strings (not
    only whitespace); the first non-system message is a user message (so at least one user message exists).
    Errors name the offending message as ``field[index]``.
    """
    name = field
    checked: list[Message] = []
    for index, item in enumerate(messages):
        field = f"{name}[{index}]"
        if isinstance(item, Message):
            role, content = item.role, item.content
        elif isinstance(item, Mapping):
            role, content = item.get("role"), item.get("content")
        else:
            raise InvalidConversation(f"expected a message object, got {type(item).__name__}", field=field)
        if role not in ROLES:
            raise InvalidConversation(
                f"unknown role {role!r}; expected one of {', '.join(ROLES)}", field=f"{field}.role", kind=UNKNOWN_ROLE
            )
        if not isinstance(content, str):
            raise InvalidConversation(
                f"content must be a string, got {type(content).__name__}", field=f"{field}.content"
            )
        if not content.strip():
            raise InvalidConversation("content is empty", field=f"{field}.content")
        checked.append(Message(role=role, content=content))
    if not checked:
        raise InvalidConversation("the conversation has no messages", field=name, kind=EMPTY_CONVERSATION)
    first = next((i for i, message in enumerate(checked) if message.role != "system"), None)
    if first is None:
        raise InvalidConversation("the conversation has no user message", field=name)
    if checked[first].role != "user":
        raise InvalidConversation(
            f"the first non-system message is {checked[first].role!r}; it must be 'user'", field=f"{name}[{first}]"
        )
    return tuple(checked)


def make_conversation(
    messages: Iterable[Message | Mapping[str, object]],
    source: str,
    line: int,
    unit: str = "line",
    field: str = "messages",
) -> Conversation:
    """Validate ``messages`` and attach their provenance; errors name ``source``, ``line`` and ``field``."""
    try:
        checked = validate_messages(messages, field)
    except InvalidConversation as error:
        raise error.located(source, line, unit) from None
    return Conversation(checked, Provenance(source=source, line=line, content_hash=content_hash(checked), unit=unit))
