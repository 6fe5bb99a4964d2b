"""Import prompt data (JSONL, ShareGPT JSON, HF datasets on disk) as validated conversations.

Records stream one at a time, so a file of millions of lines is never held in memory (a ShareGPT JSON
file is a single JSON value and is parsed whole). A bad record never stops an import: it is counted in the
``ImportSummary`` with its file, line and field, unless ``strict`` asks for the first one to be raised.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from specdec.data.prompts.conversations import (
    EMPTY_CONVERSATION,
    MALFORMED_JSON,
    UNKNOWN_ROLE,
    Conversation,
    InvalidConversation,
    Message,
    Role,
    make_conversation,
)

# Source role names → specdec roles. System messages are kept (they are part of what the target sees).
ROLE_ALIASES: dict[str, Role] = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
MESSAGE_LIST_FIELDS = ("conversations", "messages")  # [{role, content}] or ShareGPT [{from, value}]
TURNS_FIELD = "turns"  # a list of user strings: the eval prompt format
HF_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


@dataclass(frozen=True)
class Rejection:
    """One refused record: where it is and why."""

    source: str
    line: int
    unit: str
    field: str | None
    kind: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}, {self.unit} {self.line}"
        if self.field is not None:
            where += f", field {self.field!r}"
        return f"{where}: {self.reason}"


@dataclass
class ImportSummary:
    """Counts of an import, and the first ``max_reported`` rejections in full."""

    sources: int = 0
    conversations: int = 0
    blank_lines: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    rejections: list[Rejection] = field(default_factory=list)
    max_reported: int = 1000

    @property
    def num_rejected(self) -> int:
        return sum(self.rejected.values())

    def reject(self, error: InvalidConversation) -> None:
        self.rejected[error.kind] += 1
        if len(self.rejections) < self.max_reported:
            self.rejections.append(
                Rejection(
                    source=error.source or "?",
                    line=error.line if error.line is not None else 0,
                    unit=error.unit,
                    field=error.field,
                    kind=error.kind,
                    reason=error.reason,
                )
            )

    def report(self) -> str:
        """A human-readable summary: totals, rejections by kind, then each reported rejection."""
        lines = [
            f"imported {self.conversations} conversations from {self.sources} sources; "
            f"rejected {self.num_rejected}; skipped {self.blank_lines} blank lines"
        ]
        if self.rejected:
            lines.append("rejected by kind: " + ", ".join(f"{kind}={n}" for kind, n in sorted(self.rejected.items())))
        lines.extend(f"  {rejection}" for rejection in self.rejections)
        if self.num_rejected > len(self.rejections):
            lines.append(f"  … and {self.num_rejected - len(self.rejections)} more")
        return "\n".join(lines)


def _role(value: object, field_name: str) -> Role:
    if not isinstance(value, str):
        raise InvalidConversation(f"role must be a string, got {type(value).__name__}", field=field_name)
    role = ROLE_ALIASES.get(value.strip().lower())
    if role is None:
        raise InvalidConversation(f"unknown role {value!r}", field=field_name, kind=UNKNOWN_ROLE)
    return role


def _content(value: object, field_name: str) -> str:
    if not isinstance(value, str):
        raise InvalidConversation(f"content must be a string, got {type(value).__name__}", field=field_name)
    if not value.strip():
        raise InvalidConversation("content is empty", field=field_name)
    return value


def _message_list(value: object, name: str) -> list[Message]:
    if not isinstance(value, list):
        raise InvalidConversation(f"expected a list of messages, got {type(value).__name__}", field=name)
    if not value:
        raise InvalidConversation("the conversation has no messages", field=name, kind=EMPTY_CONVERSATION)
    messages = []
    for index, item in enumerate(value):
        where = f"{name}[{index}]"
        if not isinstance(item, Mapping):
            raise InvalidConversation(f"expected a message object, got {type(item).__name__}", field=where)
        role_key = "role" if "role" in item else "from"
        content_key = "content" if "content" in item else "value"
        if role_key not in item:
            raise InvalidConversation("message has neither 'role' nor 'from'", field=where)
        if content_key not in item:
            raise InvalidConversation("message has neither 'content' nor 'value'", field=where)
        role = _role(item[role_key], f"{where}.{role_key}")
        messages.append(Message(role=role, content=_content(item[content_key], f"{where}.{content_key}")))
    return messages


def _turns(value: object) -> list[Message]:
    if not isinstance(value, list):
        raise InvalidConversation(f"expected a list of strings, got {type(value).__name__}", field=TURNS_FIELD)
    if not value:
        raise InvalidConversation("the conversation has no turns", field=TURNS_FIELD, kind=EMPTY_CONVERSATION)
    return [Message(role="user", content=_content(turn, f"{TURNS_FIELD}[{i}]")) for i, turn in enumerate(value)]


def messages_from_record(record: object) -> tuple[str, list[Message]]:
    """The field holding the messages of one record (``conversations``, ``messages``, then ``turns``) and them."""
    if not isinstance(record, Mapping):
        raise InvalidConversation(f"expected a JSON object, got {type(record).__name__}")
    for name in MESSAGE_LIST_FIELDS:
        if name in record:
            return name, _message_list(record[name], name)
    if TURNS_FIELD in record:
        return TURNS_FIELD, _turns(record[TURNS_FIELD])
    raise InvalidConversation(f"no {', '.join(repr(n) for n in (*MESSAGE_LIST_FIELDS, TURNS_FIELD))} field")


def conversation_from_record(record: object, source: str, line: int, unit: str = "line") -> Conversation:
    """Map roles, validate and attach provenance; errors name ``source``, ``line`` and the field."""
    try:
        name, messages = messages_from_record(record)
    except InvalidConversation as error:
        raise error.located(source, line, unit) from None
    return make_conversation(messages, source, line, unit, field=name)


# A reader yields (position, unit, parsed record or the error that prevented parsing it).
_Item = tuple[int, str, object]


def _read_jsonl(path: Path, summary: ImportSummary) -> Iterator[_Item]:
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                yield number, "line", InvalidConversation(f"not UTF-8 ({error.reason})", kind=MALFORMED_JSON)
                continue
            if not text.strip():
                summary.blank_lines += 1
                continue
            try:
                yield number, "line", json.loads(text)
            except json.JSONDecodeError as error:
                yield number, "line", InvalidConversation(f"malformed JSON: {error}", kind=MALFORMED_JSON)


def _read_json_list(path: Path, summary: ImportSummary) -> Iterator[_Item]:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        yield (
            line,
            "line",
            InvalidConversation(
                f"not UTF-8 ({error.reason}); the whole file is one JSON document", kind=MALFORMED_JSON
            ),
        )
        return
    if not text.strip():
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        yield error.lineno, "line", InvalidConversation(f"malformed JSON: {error}", kind=MALFORMED_JSON)
        return
    if not isinstance(records, list):
        yield 1, "line", InvalidConversation(f"expected a JSON list of records, got {type(records).__name__}")
        return
    for number, record in enumerate(records, start=1):
        yield number, "item", record


def _read_hf_dataset(path: Path, source: str) -> Iterator[tuple[str, int, str, object]]:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            f"{source} is an HF dataset saved with save_to_disk; reading it needs the `datasets` package "
            "(pip install datasets)"
        ) from error
    loaded = datasets.load_from_disk(str(path))
    splits = [(f"{source}/{name}", loaded[name]) for name in loaded] if isinstance(loaded, dict) else [(source, loaded)]
    for split_source, dataset in splits:
        for row, record in enumerate(dataset):
            yield split_source, row, "row", record


def _is_hf_dataset(path: Path) -> bool:
    return any((path / marker).exists() for marker in HF_DATASET_MARKERS)


def _expand(paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Files and HF dataset directories to read, in order; a plain directory means its *.jsonl and *.json files."""
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    expanded: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"prompt source {path} does not exist")
        if path.is_dir() and not _is_hf_dataset(path):
            files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".jsonl", ".json"))
            if not files:
                raise FileNotFoundError(f"{path} holds no .jsonl or .json files and is not an HF dataset")
            expanded.extend(files)
        elif path.is_file() and path.suffix not in (".jsonl", ".json"):
            raise ValueError(f"{path}: unsupported prompt file; expected .jsonl, .json or an HF dataset directory")
        else:
            expanded.append(path)
    return expanded


def iter_conversations(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    *,
    strict: bool = False,
    summary: ImportSummary | None = None,
) -> Iterator[Conversation]:
    """Stream validated conversations from JSONL files, ShareGPT JSON files and HF datasets on disk.

    Rejected records (malformed JSON, unknown roles, empty conversations, failed validation) are counted
    in ``summary`` with their file, line and field; with ``strict`` the first one is raised instead.
    """
    summary = summary if summary is not None else ImportSummary()
    for path in _expand(paths):
        source = str(path.resolve())
        summary.sources += 1
        if path.is_dir():
            items = _read_hf_dataset(path, source)
        else:
            reader = _read_jsonl if path.suffix == ".jsonl" else _read_json_list
            items = ((source, number, unit, record) for number, unit, record in reader(path, summary))
        for item_source, number, unit, record in items:
            try:
                if isinstance(record, InvalidConversation):
                    raise record.located(item_source, number, unit)
                conversation = conversation_from_record(record, item_source, number, unit)
            except InvalidConversation as error:
                if strict:
                    raise
                summary.reject(error)
                continue
            summary.conversations += 1
            yield conversation


def read_conversations(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]], *, strict: bool = False
) -> tuple[list[Conversation], ImportSummary]:
    """All conversations of ``paths`` in a list, with the import summary."""
    summary = ImportSummary()
    conversations = list(iter_conversations(paths, strict=strict, summary=summary))
    return conversations, summary
