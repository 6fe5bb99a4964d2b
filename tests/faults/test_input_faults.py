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
    data.write_bytes(b'[\n{"messages":[{"role":"user","content":"a"}]},\n{"messages":[{"role":"user","content":"caf\xe9"}]}]')
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
