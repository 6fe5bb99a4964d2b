"""Cache build under faults: a disk that fills up at several points, and kill -9 at random points several times in
a row. Each case ends with a cache equal, sample for sample, to an uninterrupted build, that `cache verify`
accepts."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from specdec.data.cache import writer as writer_module
from specdec.data.cache.builder import TokenizeOptions, build_target_cache
from specdec.data.cache.commands import cache_verify
from specdec.data.cache.manifest import read_manifest
from specdec.data.cache.reader import iter_cache_samples
from specdec.data.cache.writer import progress_path
from specdec.data.prompts.sources import iter_training_conversations
from specdec.targets import TINY_TARGET, load_target

ROOT = Path(__file__).resolve().parents[2]
LAYER_IDS = [0, 2, 4]
pytestmark = [pytest.mark.faults, pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")]


@pytest.fixture(scope="module")
def tiny():
    return load_target(TINY_TARGET)


def conversations_file(path: Path, count: int, words: int = 30) -> Path:
    rng = random.Random(0)
    vocabulary = ["list", "sum", "loop", "value", "prime", "string", "count", "even", "odd", "function"]
    with open(path, "w") as handle:
        for index in range(count):
            answer = " ".join(rng.choices(vocabulary, k=words + index % 5))
            messages = [{"role": "user", "content": f"Question {index}?"}, {"role": "assistant", "content": answer}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


def contents(cache: Path) -> dict[str, tuple[torch.Tensor, ...]]:
    samples = iter_cache_samples(cache, verify_sha256=True)
    return {s["key"]: (s["input_ids"], s["target_hidden_states"], s["target_last_hidden_states"]) for s in samples}


def assert_same_cache(got: Path, expected: Path) -> None:
    cache_verify(str(got))  # sizes, sha256, checksums, shapes and key lists against the manifest
    have, want = contents(got), contents(expected)
    assert have.keys() == want.keys()
    for key, tensors in want.items():
        assert all(torch.equal(a, b) for a, b in zip(have[key], tensors, strict=True)), key
    assert read_manifest(got / "manifest.json")["totals"] == read_manifest(expected / "manifest.json")["totals"]


class _FillingFile:
    """A file whose writes draw on a shared byte budget; past it they write what fits and raise ENOSPC."""

    def __init__(self, handle, disk: "FullDisk") -> None:
        self.handle, self.disk = handle, disk

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.disk.free:
            self.handle.write(data[: self.disk.free])  # a torn write, as a real full disk leaves it
            self.disk.free = 0
            self.disk.hits += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.disk.free -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):  # read, seek, truncate, fileno, flush, close, ...: the real file's
        return getattr(self.handle, name)

    def __enter__(self) -> "_FillingFile":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


class FullDisk:
    """Every file the cache writer opens for writing shares ``free`` bytes."""

    def __init__(self, free: int) -> None:
        self.free, self.hits = free, 0

    def open(self, file, mode="r", *args, **kwargs):
        handle = open(file, mode, *args, **kwargs)  # noqa: SIM115 - the wrapper closes it
        return _FillingFile(handle, self) if any(flag in mode for flag in "wa+") else handle


def test_a_disk_that_fills_up_again_and_again_fails_naming_the_file_then_the_rerun_completes(
    tiny, tmp_path, monkeypatch
):
    conversations = list(iter_training_conversations(conversations_file(tmp_path / "data.jsonl", 30)))
    options = TokenizeOptions(max_length=96)

    def build(output: Path):
        return build_target_cache(tiny, conversations, output, LAYER_IDS, options, samples_per_shard=3, progress=False)

    reference = tmp_path / "reference"
    build(reference)
    total = sum(path.stat().st_size for path in reference.rglob("*") if path.is_file())
    output = tmp_path / "cache"
    for fraction in (0.05, 0.2, 0.15, 0.3):  # inside the first shard, mid-shard, at commits, at progress lines
        disk = FullDisk(int(total * fraction))
        with monkeypatch.context() as patch:
            patch.setattr(writer_module, "open", disk.open, raising=False)
            with pytest.raises(OSError) as failure:
                build(output)
        assert disk.hits == 1
        assert failure.value.errno == errno.ENOSPC and "rerun the same command to resume" in str(failure.value)
        assert str(output) in str(failure.value.filename)  # names the shard or progress file it was writing
        assert not (output / "manifest.json").exists()
    build(output)
    assert_same_cache(output, reference)


def cache_build_command(data: Path, output: Path) -> list[str]:
    command = [sys.executable, "-m", "specdec.cli", "cache", "build", "--data", str(data), "--output_dir", str(output)]
    command += ["--layer_ids", "[0,2,4]", "--max_length", "256", "--samples_per_shard", "2"]
    return [*command, "--progress", "false", "--device", "cpu"]


def shards_recorded(output: Path) -> int:
    path = progress_path(output, 0)
    return path.read_bytes().count(b'"type":"shard"') if path.exists() else 0


@pytest.mark.slow
def test_cache_build_killed_at_random_points_again_and_again(tmp_path):
    data = conversations_file(tmp_path / "data.jsonl", 80, words=100)
    reference = tmp_path / "reference"
    subprocess.run(cache_build_command(data, reference), check=True, cwd=ROOT, capture_output=True)
    output = tmp_path / "cache"
    rng = random.Random(4)
    kills = 0
    for _ in range(3):
        child = subprocess.Popen(
            cache_build_command(data, output), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wanted = shards_recorded(output) + rng.randint(1, 6)
        deadline = time.monotonic() + 120
        while child.poll() is None and shards_recorded(output) < wanted:
            assert time.monotonic() < deadline
            time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.05))  # anywhere inside the next shard, its commit or its progress line
        if child.poll() is not None:
            break
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        kills += 1
        assert not (output / "manifest.json").exists()
    assert kills >= 2, "most kills must land mid-build"
    subprocess.run(cache_build_command(data, output), check=True, cwd=ROOT, capture_output=True)
    assert_same_cache(output, reference)
