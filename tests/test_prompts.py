"""Prompt import: every accepted format, role mapping, provenance, and bad records counted with file and line."""

import hashlib
import json
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.data import InvalidConversation, Message, iter_conversations, read_conversations, validate_messages
from specdec.data.prompts.conversations import content_hash
from specdec.data.prompts.importing import ImportSummary, conversation_from_record

EVAL_DATASETS = Path(__file__).resolve().parent.parent.parent / "shared" / "eval_datasets"
needs_eval_datasets = pytest.mark.skipif(
    not EVAL_DATASETS.is_dir(), reason=f"shared eval prompt sets not present at {EVAL_DATASETS}"
)


def write_jsonl(path: Path, lines: list[object | str]) -> Path:
    """Each item is a JSON value, or a raw string written as is (blank and malformed lines)."""
    path.write_text("".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in lines))
    return path


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


@needs_eval_datasets
def test_every_eval_prompt_set_imports_without_rejections():
    files = sorted(EVAL_DATASETS.glob("*.jsonl"))
    assert files
    conversations, summary = read_conversations(files, strict=True)
    non_blank = sum(1 for f in files for line in f.read_bytes().split(b"\n") if line.strip())
    assert summary.conversations == len(conversations) == non_blank
    assert summary.num_rejected == 0 and summary.sources == len(files)
    assert all(m.role == "user" for c in conversations for m in c.messages)
    assert len({c.key for c in conversations}) == len(conversations)


@needs_eval_datasets
def test_eval_turns_keep_order_and_line_numbers():
    path = EVAL_DATASETS / "mt-bench.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    conversations = list(iter_conversations(path))
    lines = path.read_bytes().split(b"\n")
    for conversation in conversations:
        record = json.loads(lines[conversation.provenance.line - 1])
        assert [m.content for m in conversation.messages] == record["turns"]
        assert conversation.provenance.source == str(path.resolve()) and conversation.provenance.unit == "line"
    assert any(len(c.messages) > 1 for c in conversations)


def test_messages_and_sharegpt_records_map_roles_and_keep_system(tmp_path):
    sharegpt = [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "What is 2+2?"},
        {"from": "gpt", "value": "4"},
    ]
    path = write_jsonl(
        tmp_path / "p.jsonl", [{"messages": CHAT}, {"conversations": sharegpt}, {"id": 7, "turns": ["a"]}]
    )
    first, second, third = iter_conversations(path, strict=True)
    expected = tuple(Message(**m) for m in CHAT)
    assert first.messages == second.messages == expected
    assert first.provenance.content_hash == second.provenance.content_hash
    assert first.key != second.key  # same messages, different line
    assert (first.provenance.line, second.provenance.line, third.provenance.line) == (1, 2, 3)
    assert third.messages == (Message("user", "a"),)


@pytest.mark.parametrize(
    ("source_role", "role"),
    [("human", "user"), ("gpt", "assistant"), ("chatgpt", "assistant"), ("bing", "assistant"), ("bard", "assistant"),
     ("model", "assistant"), ("system", "system"), ("user", "user"), ("assistant", "assistant"), ("Human", "user")],
)  # fmt: skip
def test_role_mapping(source_role, role):
    messages = [{"from": "human", "value": "q"}, {"from": source_role, "value": "x"}]
    conversation = conversation_from_record({"conversations": messages}, "f.jsonl", 1)
    assert conversation.messages[1].role == role


def test_sharegpt_json_list_uses_item_positions(tmp_path):
    path = tmp_path / "share.json"
    path.write_text(
        json.dumps([{"conversations": [{"from": "human", "value": "hi"}]}, {"turns": ["b"]}, {"turns": []}])
    )
    summary = ImportSummary()
    conversations = list(iter_conversations(path, summary=summary))
    assert [(c.provenance.unit, c.provenance.line) for c in conversations] == [("item", 1), ("item", 2)]
    assert summary.rejected == {"empty_conversation": 1}
    assert str(summary.rejections[0]) == f"{path.resolve()}, item 3, field 'turns': the conversation has no turns"


def test_blank_lines_are_skipped_not_counted_and_empty_files_yield_nothing(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ["", {"turns": ["a"]}, "   ", {"turns": ["b"]}, ""])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    summary = ImportSummary()
    conversations = list(iter_conversations([path, empty], summary=summary))
    assert [c.provenance.line for c in conversations] == [2, 4]
    assert (summary.conversations, summary.blank_lines, summary.num_rejected, summary.sources) == (2, 3, 0, 2)
    assert list(iter_conversations(empty)) == []


def test_bad_records_are_counted_with_file_line_and_field(tmp_path):
    path = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {"turns": ["fine"]},
            '{"turns": ["unterminated"',
            {"conversations": [{"from": "human", "value": "q"}, {"from": "tool", "value": "x"}]},
            {"messages": []},
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
            {"messages": [{"role": "user", "content": "  "}]},
            {"messages": [{"role": "user", "content": ["parts"]}]},
            {"messages": [{"role": "system", "content": "only a system prompt"}]},
            {"prompt": "no known field"},
            [1, 2],
            {"turns": ["also fine"]},
        ],
    )
    summary = ImportSummary()
    conversations = list(iter_conversations(path, summary=summary))
    assert [c.provenance.line for c in conversations] == [1, 11]
    assert summary.rejected == {"malformed_json": 1, "unknown_role": 1, "empty_conversation": 1, "invalid_record": 6}
    where = [(r.line, r.field) for r in summary.rejections]
    assert where == [
        (2, None),
        (3, "conversations[1].from"),
        (4, "messages"),
        (5, "messages[0]"),
        (6, "messages[0].content"),
        (7, "messages[0].content"),
        (8, "messages"),
        (9, None),
        (10, None),
    ]
    assert all(r.source == str(path.resolve()) for r in summary.rejections)
    assert "unknown role 'tool'" in summary.rejections[1].reason
    report = summary.report()
    assert "imported 2 conversations" in report and f"{path.resolve()}, line 3, field 'conversations[1].from'" in report


def test_strict_raises_on_the_first_bad_record(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"turns": ["ok"]}, {"messages": [{"role": "bot", "content": "x"}]}])
    with pytest.raises(InvalidConversation) as raised:
        list(iter_conversations(path, strict=True))
    error = raised.value
    assert (error.source, error.line, error.field, error.kind) == (
        str(path.resolve()),
        2,
        "messages[0].role",
        "unknown_role",
    )
    assert str(error) == f"{path.resolve()}, line 2, field 'messages[0].role': unknown role 'bot'"


def test_undecodable_line_and_byte_order_mark(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"turns": ["caf\xc3\xa9"]}\n{"turns": ["\xff"]}\n')
    summary = ImportSummary()
    (conversation,) = iter_conversations(path, summary=summary)
    assert conversation.messages == (Message("user", "café"),)
    assert summary.rejected == {"malformed_json": 1} and summary.rejections[0].line == 2


def test_malformed_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"turns": ["a"]},\n{oops}\n]')
    summary = ImportSummary()
    assert list(iter_conversations(path, summary=summary)) == []
    assert summary.rejected == {"malformed_json": 1} and summary.rejections[0].line == 3
    not_a_list = tmp_path / "object.json"
    not_a_list.write_text('{"turns": ["a"]}')
    with pytest.raises(InvalidConversation, match="expected a JSON list"):
        list(iter_conversations(not_a_list, strict=True))


def test_directories_missing_paths_and_unknown_formats(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"turns": ["second"]}])
    (tmp_path / "a.json").write_text(json.dumps([{"turns": ["first"]}]))
    (tmp_path / "notes.txt").write_text("ignored")
    assert [c.messages[0].content for c in iter_conversations(tmp_path)] == ["first", "second"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_conversations(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="unsupported prompt file"):
        list(iter_conversations(tmp_path / "notes.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.jsonl or \.json files"):
        list(iter_conversations(tmp_path / "empty"))


def test_content_hash_is_sha256_of_canonical_json_and_keys_are_stable(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"messages": CHAT}])
    (conversation,) = iter_conversations(path)
    canonical = json.dumps(CHAT, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    assert conversation.provenance.content_hash == hashlib.sha256(canonical.encode()).hexdigest()
    assert conversation.key == f"{path.resolve()}:line1:{conversation.provenance.content_hash[:16]}"
    (again,) = iter_conversations(str(path))
    assert again.key == conversation.key and again == conversation
    assert conversation.as_dicts() == CHAT


def test_validate_messages_rules():
    assert validate_messages([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    for messages, field in [
        ([], "messages"),
        ([{"role": "system", "content": "s"}], "messages"),
        ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], "messages[1]"),
        ([{"role": "user", "content": ""}], "messages[0].content"),
        ([{"role": "human", "content": "q"}], "messages[0].role"),
        (["not a message"], "messages[0]"),
    ]:
        with pytest.raises(InvalidConversation) as raised:
            validate_messages(messages)
        assert raised.value.field == field


def test_hf_dataset_without_datasets_package_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="needs the `datasets` package"):
        list(iter_conversations(tmp_path))


def test_hf_datasets_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` package is not installed")
    rows = {"conversations": [CHAT, [{"role": "user", "content": "only a question"}], []]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    summary = ImportSummary()
    conversations = list(iter_conversations(tmp_path / "single", summary=summary))
    assert [(c.provenance.unit, c.provenance.line) for c in conversations] == [("row", 0), ("row", 1)]
    assert conversations[0].as_dicts() == CHAT and summary.rejected == {"empty_conversation": 1}
    assert summary.rejections[0].line == 2
    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"turns": [["t"]]}),
            "test": datasets.Dataset.from_dict({"turns": [["e"]]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    sources = {Path(c.provenance.source).name: c.messages[0].content for c in iter_conversations(tmp_path / "dict")}
    assert sources == {"train": "t", "test": "e"}


texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20).filter(str.strip)


@settings(max_examples=30, deadline=None)
@given(first=texts, rest=st.lists(st.tuples(st.sampled_from(["user", "assistant", "system"]), texts), max_size=4))
def test_messages_and_sharegpt_formats_round_trip_to_the_same_conversation(tmp_path_factory, first, rest):
    messages = [("user", first), *rest]
    aliases = {"user": "human", "assistant": "gpt", "system": "system"}
    path = tmp_path_factory.mktemp("round") / "p.jsonl"
    write_jsonl(
        path,
        [
            {"messages": [{"role": r, "content": c} for r, c in messages]},
            {"conversations": [{"from": aliases[r], "value": c} for r, c in messages]},
        ],
    )
    a, b = iter_conversations(path, strict=True)
    assert a.messages == b.messages == tuple(Message(r, c) for r, c in messages)
    assert a.provenance.content_hash == b.provenance.content_hash == content_hash(a.messages)
