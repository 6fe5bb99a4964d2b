"""Bad input at the cache build: each case names what it checks and fails on the behaviour it guards against."""

import subprocess
import sys
from pathlib import Path

import pytest

from specdec.data.cache.builder import TokenizeOptions, build_target_cache
from specdec.data.cache.manifest import read_manifest
from specdec.data.prompts.sources import iter_training_conversations
from specdec.targets import TINY_TARGET, load_target

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.faults
GOOD = b'{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}\n'


@pytest.fixture(scope="module")
def tiny():
    return load_target(TINY_TARGET)


def cache_build(data: Path, output: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "specdec.cli", "cache", "build", "--data", str(data), "--output_dir", str(output)]
    command += ["--layer_ids", "[0,2,4]", "--progress", "false", "--device", "cpu"]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)


def test_cache_build_counts_a_non_utf8_line_and_goes_on(tmp_path):
    data = tmp_path / "nu.jsonl"
    data.write_bytes(GOOD + b'{"messages":[{"role":"user","content":"caf\xe9"}]}\n' + GOOD.replace(b'"a"', b'"c"'))
    result = cache_build(data, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert f"{data}, line 2: not UTF-8" in result.stdout + result.stderr
    assert read_manifest(tmp_path / "cache" / "manifest.json")["totals"]["samples"] == 2


def test_non_utf8_json_document_is_reported_with_its_line(tmp_path):
    data = tmp_path / "nu.json"
    data.write_bytes(
        b'[\n{"messages":[{"role":"user","content":"a"}]},\n{"messages":[{"role":"user","content":"caf\xe9"}]}]'
    )
    result = cache_build(data, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert f"{data}, line 3: not UTF-8" in result.stdout + result.stderr


def test_rerun_reports_the_samples_already_stored(tiny, tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_bytes(b"".join(GOOD.replace(b'"a"', f'"question {i}"'.encode()) for i in range(11)))
    conversations = list(iter_training_conversations(data))
    options = TokenizeOptions(max_length=64)
    first = build_target_cache(tiny, conversations[:5], tmp_path / "cache", [0, 2, 4], options, finalize=False)
    assert (first.build.written, first.build.skipped) == (5, 0)
    rerun = build_target_cache(tiny, conversations, tmp_path / "cache", [0, 2, 4], options, progress=False)
    assert (rerun.build.written, rerun.build.skipped) == (6, 5)
    assert rerun.manifest["totals"]["samples"] == 11


class ObservedTokenizer:
    """The tiny target's real tokenizer, recording the length of every text it is asked to tokenise."""

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **options):
        self.lengths.append(len(text))
        return self.tokenizer(text, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def long_record(characters: int) -> list[dict[str, str]]:
    import inspect
    import textwrap

    source = inspect.getsource(textwrap)
    body = (source * (characters // len(source) + 1))[:characters]
    return [{"role": "user", "content": "Explain:\n" + body}, {"role": "assistant", "content": "It wraps text."}]


def test_a_long_record_is_tokenised_only_as_far_as_max_length_needs(tiny):
    from specdec.data.prompts.chat import tokenize_conversation

    messages = long_record(200_000)
    observed = ObservedTokenizer(tiny.tokenizer)
    head = tokenize_conversation(observed, messages, 512)
    assert max(observed.lengths) < 20_000  # the 200 k-character record was not tokenised whole
    whole = tiny.tokenizer(head.text, add_special_tokens=False)["input_ids"]  # the plain path, for reference
    assert head.input_ids.tolist() == whole[:512] and head.truncated
    assert not head.loss_mask.any()  # the answer lies past max_length

    huge = ObservedTokenizer(tiny.tokenizer)
    tokenize_conversation(huge, long_record(10_000_000), 512)
    assert max(huge.lengths) < 20_000
