"""Target cache built by running the tiny target, streamed by the DataModules: equal per-rank batches, seeded
epochs, mid-epoch resume from a Lightning checkpoint, cached == online batches, bad caches refused."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from specdec.data.buffers import TICKET_KEY
from specdec.data.cache.builder import TokenizeOptions, build_target_cache, target_features
from specdec.data.cache.manifest import CacheMismatchError, ShardIntegrityError, read_manifest
from specdec.data.cache.reader import iter_cache_samples
from specdec.data.cache.stream import TargetCacheStream, shuffle_buffer
from specdec.data.cache.writer import progress_path
from specdec.data.datamodules import OnlineTargetDataModule, TargetCacheDataModule, check_drafter_match
from specdec.data.prompts.sources import iter_training_conversations
from specdec.data.resumable import ResumableDataLoader
from specdec.drafters import DSparkConfig
from specdec.targets import TINY_TARGET, load_target

ROOT = Path(__file__).resolve().parents[1]
LAYER_IDS = [1, 3, 4]
WORDS = [
    "the",
    "a",
    "list",
    "of",
    "numbers",
    "sum",
    "loop",
    "value",
    "returns",
    "function",
    "python",
    "prime",
    "even",
    "odd",
    "string",
    "count",
]
FEATURES = ("input_ids", "attention_mask", "loss_mask", "target_hidden_states", "target_last_hidden_states")


def write_conversations(path: Path, count: int, seed: int = 0, words: int = 24) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for index in range(count):
            question = f"Question {index}: " + " ".join(rng.choices(WORDS, k=8)) + "?"
            answer = " ".join(rng.choices(WORDS, k=words + index % 7)) + "."
            record = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
            handle.write(json.dumps(record) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny():
    return load_target(TINY_TARGET)


@pytest.fixture(scope="module")
def conversations_file(tmp_path_factory):
    return write_conversations(tmp_path_factory.mktemp("data") / "train.jsonl", 23)


@pytest.fixture(scope="module")
def cache_dir(tiny, conversations_file, tmp_path_factory):
    directory = tmp_path_factory.mktemp("cache")
    conversations = list(iter_training_conversations(conversations_file))
    build_target_cache(
        tiny, conversations, directory, LAYER_IDS, TokenizeOptions(max_length=96), samples_per_shard=4, progress=False
    )
    return directory


def stream(cache_dir, batch_size=3, **options) -> TargetCacheStream:
    from specdec.data.cache.reader import cache_shard_urls

    return TargetCacheStream(
        cache_shard_urls(cache_dir), read_manifest(cache_dir / "manifest.json"), batch_size, **options
    )


def worker_batches(dataset, num_workers: int):
    """The loader's round-robin order over workers, computed in-process (no worker processes)."""
    per_worker = [list(dataset.iter_worker(w, num_workers, 0)) for w in range(num_workers)]
    merged = []
    for step in range(max(map(len, per_worker))):
        merged.extend(batches[step] for batches in per_worker if step < len(batches))
    return merged


def test_cache_holds_the_targets_own_features(tiny, cache_dir, conversations_file):
    manifest = read_manifest(cache_dir / "manifest.json")
    assert manifest["fingerprint"]["layer_ids"] == LAYER_IDS
    assert manifest["totals"]["samples"] == 23
    samples = {sample["key"]: sample for sample in iter_cache_samples(cache_dir, dtype=torch.bfloat16)}
    for conversation in list(iter_training_conversations(conversations_file))[:5]:
        sample = samples[conversation.key]
        hidden, last = target_features(tiny, sample["input_ids"], LAYER_IDS)
        assert torch.equal(sample["target_hidden_states"], hidden.bfloat16())  # bf16: exact
        mask = sample["loss_mask"]
        assert mask.any() and not mask.all()
        assert torch.equal(sample["target_last_hidden_states"][mask], last[mask].bfloat16())
        assert not sample["target_last_hidden_states"][~mask].any()


def worst_layer_error(tiny, cache) -> float:
    """The largest per-token relative L2 error of any captured layer's cached features against the target's."""
    errors = []
    for sample in iter_cache_samples(cache):
        hidden, _ = target_features(tiny, sample["input_ids"], LAYER_IDS)
        for layer in range(len(LAYER_IDS)):
            block = slice(layer * 256, (layer + 1) * 256)
            exact, decoded = hidden[:, block], sample["target_hidden_states"][:, block]
            errors.append(float(((decoded - exact).norm(dim=-1) / exact.norm(dim=-1)).max()))
    return max(errors)


def test_fp8_cache_error_stays_within_the_documented_bound(tiny, conversations_file, tmp_path):
    """fp8 e4m3 with a per-token-per-layer scale: ~2.6 % relative L2 per token on the tiny target (docs/data.md)."""
    conversations = list(iter_training_conversations(conversations_file))[:6]
    build_target_cache(
        tiny, conversations, tmp_path, LAYER_IDS, TokenizeOptions(max_length=96), codec="fp8_e4m3", progress=False
    )
    worst = worst_layer_error(tiny, tmp_path)
    assert 0.005 < worst < 0.05


def test_cached_and_online_batches_are_equal_for_bf16(cache_dir, conversations_file):
    cached = TargetCacheDataModule(str(cache_dir), batch_size=4, shuffle=False)
    cached.setup("fit")
    online = OnlineTargetDataModule([str(conversations_file)], TINY_TARGET, LAYER_IDS, batch_size=4, max_length=96)
    online.shuffle = False
    online.setup("fit")
    cached_batches = list(cached.train_dataloader())
    online_batches = [online.on_after_batch_transfer(batch, 0) for batch in online.train_dataloader()]
    assert len(cached_batches) == len(online_batches) == 23 // 4
    for a, b in zip(cached_batches, online_batches, strict=True):
        assert a["keys"] == b["keys"]
        for name in FEATURES:
            assert a[name].dtype == b[name].dtype
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [1, 2])
def test_every_rank_gets_the_same_number_of_disjoint_batches(cache_dir, world_size, num_workers):
    seen = Counter()
    counts = []
    for rank in range(world_size):
        dataset = stream(cache_dir, rank=rank, world_size=world_size, shuffle_buffer=5)
        batches = worker_batches(dataset, num_workers)
        counts.append((len(dataset), len(batches)))
        for batch in batches:
            assert batch["input_ids"].shape[0] == 3
            seen.update(batch["keys"])
    expected = (23 // world_size) // 3
    assert counts == [(expected, expected)] * world_size
    assert max(seen.values()) == 1
    assert sum(seen.values()) == expected * 3 * world_size


def test_real_worker_processes_yield_the_planned_order(cache_dir):
    dataset = stream(cache_dir, shuffle_buffer=4)
    dataset.set_epoch(3)
    loaded = list(ResumableDataLoader(dataset, num_workers=2))
    planned = worker_batches(dataset, 2)
    assert [batch["keys"] for batch in loaded] == [batch["keys"] for batch in planned]
    for got, want in zip(loaded, planned, strict=True):
        assert torch.equal(got["target_hidden_states"], want["target_hidden_states"])
        assert got["target_hidden_states"].is_shared()  # decoded into shared memory: the hand-off copies nothing
    assert not planned[0]["target_hidden_states"].is_shared()


def _snapshot(batch):
    return {name: batch[name].clone() for name in FEATURES}


def _assert_equal(batch, reference):
    assert batch["keys"] == reference["keys"]
    for name in FEATURES:
        assert torch.equal(batch[name], reference[name]), name


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_held_batches_are_never_overwritten_and_released_memory_is_reused(cache_dir, num_workers):
    dataset = stream(cache_dir, batch_size=2, shuffle_buffer=4)
    loader = ResumableDataLoader(dataset, num_workers=num_workers, prefetch_factor=1 if num_workers else None)
    held, pointers, count = [], set(), 0
    for epoch in range(3):
        loader.set_epoch(epoch)
        planned = worker_batches(dataset, max(1, num_workers))
        for index, batch in enumerate(loader):
            assert TICKET_KEY not in batch
            _assert_equal(batch, planned[index])
            pointers.add(batch["target_hidden_states"].data_ptr())
            count += 1
            if index % 3 == 0:  # the consumer keeps some batches and lets the others go
                held.append((batch, _snapshot(batch)))
            del batch
    for batch, snapshot in held:
        for name in FEATURES:
            assert torch.equal(batch[name], snapshot[name]), name
    if num_workers == 0:
        assert len(pointers) < count  # the same memory came back for later batches
    else:
        assert dataset.buffers.tickets_received > num_workers * (1 + 3)  # more pooled batches than there are slots


def test_an_iteration_left_open_does_not_disturb_the_next_one(cache_dir):
    """Both iterations' workers run at once; each must still yield exactly its planned batches."""
    dataset = stream(cache_dir, batch_size=2, shuffle_buffer=4)
    loader = ResumableDataLoader(dataset, num_workers=2, prefetch_factor=1)
    loader.set_epoch(0)
    old_plan = worker_batches(dataset, 2)
    old = iter(loader)
    old_batches = [next(old)]
    loader.set_epoch(1)
    new_plan = worker_batches(dataset, 2)
    new_batches = []
    for batch in loader:  # the old iteration's workers write their next batches while the new ones do
        new_batches.append((batch, _snapshot(batch)))
        old_batches.append(next(old, None))
    for (batch, snapshot), reference in zip(new_batches, new_plan, strict=True):
        _assert_equal(batch, reference)
        _assert_equal(snapshot | {"keys": batch["keys"]}, reference)
    for batch, reference in zip(old_batches, old_plan, strict=False):
        if batch is not None:
            _assert_equal(batch, reference)


def test_loader_options_prefetch_and_pinning(cache_dir):
    default = TargetCacheDataModule(str(cache_dir), batch_size=4).train_dataloader()
    assert not default.pin_memory  # no trainer on CUDA
    module = TargetCacheDataModule(str(cache_dir), batch_size=4, num_workers=1, prefetch_factor=5, pin_memory=True)
    loader = module.train_dataloader()
    assert loader.prefetch_factor == 5 and loader.pin_memory


def test_epochs_are_seeded(cache_dir):
    def keys(seed, epoch):
        dataset = stream(cache_dir, seed=seed, shuffle_buffer=6)
        dataset.set_epoch(epoch)
        return [key for batch in dataset for key in batch["keys"]]

    assert keys(0, 0) == keys(0, 0)
    assert keys(0, 0) != keys(0, 1)
    assert keys(0, 0) != keys(1, 0)
    assert sorted(keys(0, 0)) != keys(0, 0)  # actually shuffled
    unshuffled = stream(cache_dir, shuffle=False)
    assert [key for batch in unshuffled for key in batch["keys"]] == [
        sample["key"] for sample in iter_cache_samples(cache_dir)
    ][:21]


def test_shuffle_buffer_is_a_permutation():
    items = list(range(100))
    out = list(shuffle_buffer(iter(items), 10, random.Random(0)))
    assert sorted(out) == items and out != items


class KeyRecorder(L.LightningModule):
    """Trains one scalar on the features and records which samples each step saw."""

    def __init__(self, config=None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen: list[list[str]] = []
        if config is not None:
            self.config = config

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["keys"]))
        return (self.weight * batch["target_hidden_states"].float().mean()) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, max_steps):
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_mid_epoch_from_a_lightning_checkpoint(cache_dir, tmp_path, num_workers):
    def datamodule():
        return TargetCacheDataModule(str(cache_dir), batch_size=2, shuffle_buffer=4, num_workers=num_workers)

    full = KeyRecorder()
    trainer(tmp_path, 17).fit(full, datamodule=datamodule())  # 11 batches per epoch: stops in epoch 2
    assert len(full.seen) == 17
    assert sorted(full.seen[:11]) != sorted(full.seen[11:] + full.seen[:5])  # epochs differ
    # stopped by max_steps and saved by hand
    first = KeyRecorder()
    stopped = trainer(tmp_path, 7)
    stopped.fit(first, datamodule=datamodule())
    stopped.save_checkpoint(tmp_path / "step7.ckpt")
    second = KeyRecorder()
    trainer(tmp_path, 17).fit(second, datamodule=datamodule(), ckpt_path=tmp_path / "step7.ckpt")
    assert first.seen + second.seen == full.seen
    # saved mid-epoch by ModelCheckpoint while training on, as a killed run would have left it
    saving = trainer(tmp_path, 9)
    saving.callbacks.append(L.pytorch.callbacks.ModelCheckpoint(tmp_path / "every", every_n_train_steps=4))
    saving.fit(KeyRecorder(), datamodule=datamodule())
    resumed = KeyRecorder()
    trainer(tmp_path, 17).fit(resumed, datamodule=datamodule(), ckpt_path=tmp_path / "every" / "epoch=0-step=8.ckpt")
    assert resumed.seen == full.seen[8:]


def test_manifest_and_drafter_config_must_agree(cache_dir, tmp_path, tiny):
    config = DSparkConfig.from_target(tiny.model.config, [1, 2, 4], num_hidden_layers=1, mask_token_id=3)
    with pytest.raises(CacheMismatchError, match=r"layer ids: target cache .* has \[1, 3, 4\], the drafter expects"):
        trainer(tmp_path, 1).fit(KeyRecorder(config), datamodule=TargetCacheDataModule(str(cache_dir)))
    good = DSparkConfig.from_target(tiny.model.config, LAYER_IDS, num_hidden_layers=1, mask_token_id=3)
    check_drafter_match(LAYER_IDS, 256, good, "cache")
    with pytest.raises(CacheMismatchError, match="hidden size: cache has 512, the drafter expects 256"):
        check_drafter_match(LAYER_IDS, 512, good, "cache")
    with pytest.raises(CacheMismatchError, match="built from 'specdec-tiny', not 'Qwen/Qwen3-4B'"):
        TargetCacheDataModule(str(cache_dir), target="Qwen/Qwen3-4B").setup("fit")


def damaged_copy(cache_dir, tmp_path, damage):
    copy = tmp_path / "damaged"
    shutil.copytree(cache_dir, copy)
    shard = copy / read_manifest(copy / "manifest.json")["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    shard.write_bytes(damage(data))
    return copy


def read_everything(cache):
    dataset = stream(cache, batch_size=1, shuffle=False)
    return [batch["keys"] for batch in dataset]


@pytest.fixture(scope="module")
def fp4_cache_dir(tiny, conversations_file, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fp4_cache")
    conversations = list(iter_training_conversations(conversations_file))
    options = TokenizeOptions(max_length=96)
    build_target_cache(
        tiny, conversations, directory, LAYER_IDS, options, codec="fp4_e2m1", samples_per_shard=4, progress=False
    )
    return directory


def test_fp4_cache_error_stays_within_the_documented_bound(tiny, fp4_cache_dir):
    """fp4 e2m1 with two-level scales: at most ~12 % relative L2 per token (docs/data.md), never near exact."""
    assert 0.02 < worst_layer_error(tiny, fp4_cache_dir) < 0.15


@pytest.mark.parametrize("cache", ["cache_dir", "fp4_cache_dir"])
def test_corrupted_shard_is_refused_naming_it(cache, request, tmp_path):
    cache_dir = request.getfixturevalue(cache)

    def flip(data):
        data[len(data) // 2] ^= 0x40
        return bytes(data)

    with pytest.raises(ShardIntegrityError, match=r"shard-r000-000001\.tar.*(XXH3-64|not a tar|truncated)"):
        read_everything(damaged_copy(cache_dir, tmp_path, flip))


@pytest.mark.parametrize("cache", ["cache_dir", "fp4_cache_dir"])
def test_truncated_shard_is_refused_naming_it(cache, request, tmp_path):
    cache_dir = request.getfixturevalue(cache)
    with pytest.raises(ShardIntegrityError, match=r"shard-r000-000001\.tar.*(truncated|ends after)"):
        read_everything(damaged_copy(cache_dir, tmp_path, lambda data: bytes(data[: len(data) // 2])))


def test_checksum_mismatch_is_refused_by_verify(cache_dir, tmp_path):
    copy = damaged_copy(cache_dir, tmp_path, bytes)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    result = subprocess.run(
        [sys.executable, "-m", "specdec.cli", "cache", "verify", "--cache", str(copy)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "shard-r000-000000.tar is corrupted" in result.stderr


def test_too_small_cache_for_the_world_is_a_clear_error(cache_dir):
    with pytest.raises(ValueError, match="23 samples: too few for 8 rank"):
        stream(cache_dir, batch_size=4, world_size=8)


def test_plain_dataloader_works_too(cache_dir):
    batches = list(DataLoader(stream(cache_dir, batch_size=5), batch_size=None))
    assert len(batches) == 4 and all(b["target_hidden_states"].shape[-1] == 3 * 256 for b in batches)


def test_cache_build_killed_by_sigkill_then_rerun_equals_an_uninterrupted_build(tmp_path):
    data = write_conversations(tmp_path / "many.jsonl", 120, seed=1, words=120)
    command = [sys.executable, "-m", "specdec.cli", "cache", "build", "--data", str(data), "--max_length", "256"]
    command += ["--layer_ids", "[1,3,4]", "--samples_per_shard", "1", "--progress", "false", "--device", "cpu"]
    reference = tmp_path / "reference"
    subprocess.run([*command, "--output_dir", str(reference)], check=True, cwd=ROOT, capture_output=True)
    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [*command, "--output_dir", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    progress = progress_path(killed, 0)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if progress.exists() and progress.read_bytes().count(b'"type":"shard"') >= 5:
                break
            time.sleep(0.005)
        assert child.poll() is None, "the build finished or died before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not (killed / "manifest.json").exists()
    subprocess.run([*command, "--output_dir", str(killed)], check=True, cwd=ROOT, capture_output=True)

    def contents(cache):
        return {
            sample["key"]: (sample["input_ids"], sample["target_hidden_states"])
            for sample in iter_cache_samples(cache, verify_sha256=True)
        }

    expected, got = contents(reference), contents(killed)
    assert read_manifest(killed / "manifest.json")["totals"]["samples"] == len(expected) == 120
    assert got.keys() == expected.keys()
    for key, (ids, features) in expected.items():
        assert torch.equal(got[key][0], ids) and torch.equal(got[key][1], features)


def test_prepare_data_answers_prompts_and_builds_the_missing_cache_once(tmp_path):
    from specdec.data.datamodules import CacheBuildSpec
    from specdec.data.regeneration.regenerate import SamplingParams

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"Write a function that adds {i}."]}) + "\n" for i in range(6)))
    spec = CacheBuildSpec(
        target=TINY_TARGET,
        data=[str(prompts)],
        layer_ids=LAYER_IDS,
        max_length=128,
        samples_per_shard=4,
        answers=str(tmp_path / "answers.jsonl"),
        sampling=SamplingParams(temperature=0.0, max_tokens=24),
    )
    datamodule = TargetCacheDataModule(str(tmp_path / "cache"), batch_size=2, build=spec)
    datamodule.prepare_data()
    manifest = read_manifest(tmp_path / "cache" / "manifest.json")
    assert manifest["totals"]["samples"] == 6
    written = (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns
    datamodule.prepare_data()  # present: nothing is rebuilt
    assert (tmp_path / "cache" / "manifest.json").stat().st_mtime_ns == written
    datamodule.setup("fit")
    assert len(list(datamodule.train_dataloader())) == 3


def test_cache_is_streamed_through_a_pipe_url(cache_dir):
    direct = TargetCacheDataModule(str(cache_dir), batch_size=4, seed=5)
    piped = TargetCacheDataModule(f"pipe:cat {cache_dir}/manifest.json", batch_size=4, seed=5)
    for datamodule in (direct, piped):
        datamodule.setup("fit")
    assert [b["keys"] for b in piped.train_dataloader()] == [b["keys"] for b in direct.train_dataloader()]


def test_ranks_build_disjoint_shards_that_merge_into_one_cache(tiny, conversations_file, tmp_path):
    from specdec.data.cache.writer import finalize_cache

    conversations = list(iter_training_conversations(conversations_file))
    for rank in (1, 0):  # any order: the manifest is written once both ranks are complete
        report = build_target_cache(
            tiny,
            conversations,
            tmp_path,
            LAYER_IDS,
            TokenizeOptions(max_length=96),
            samples_per_shard=3,
            rank=rank,
            world_size=2,
            finalize=False,
            progress=False,
        )
        assert report.build.written == len(conversations[rank::2])
    manifest = finalize_cache(tmp_path, world_size=2, verify_sha256=True)
    assert {shard["rank"] for shard in manifest["shards"]} == {0, 1}
    keys = [sample["key"] for sample in iter_cache_samples(tmp_path)]
    assert sorted(keys) == sorted(c.key for c in conversations)
