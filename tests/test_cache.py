"""Target cache: sample layout, shards any WebDataset reader opens, manifest checks, crash-safe resume, estimator."""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from specdec.data.cache.codecs import HEADER_BYTES
from specdec.data.cache.estimate import (
    compare_layouts,
    deepspec_bytes_per_token,
    estimate_cache_size,
    estimate_deepspec_cache_size,
    format_estimates,
)
from specdec.data.cache.format import CacheSample, CacheSampleError, decode_sample, encode_sample, tar_key
from specdec.data.cache.manifest import (
    MANIFEST_NAME,
    CacheFingerprint,
    CacheMismatchError,
    ManifestError,
    ShardIntegrityError,
    TargetCacheError,
    read_manifest,
    validate_manifest,
    verify_shard,
)
from specdec.data.cache.reader import cache_shard_urls, iter_cache_samples
from specdec.data.cache.writer import TargetCacheWriter, build_cache, finalize_cache, progress_path
from specdec.targets import TINY_TARGET, load_target

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 16
LAYERS = (0, 1)
FINGERPRINT = CacheFingerprint(
    target="synthetic",
    layer_ids=LAYERS,
    hidden_size=HIDDEN,
    max_length=64,
    tokenizer_hash="tok",
    chat_template_hash="ct",
)


def synthetic_sample(index: int, hidden: int = HIDDEN, layers: int = len(LAYERS), length: int | None = None):
    """A deterministic sample whose features are bf16-representable, so bf16 caches must return them exactly."""
    generator = torch.Generator().manual_seed(index)
    length = length or 8 + (index * 37) % 40
    prompt = 1 + index % 5
    return CacheSample(
        key=f"train.jsonl:{index}",
        input_ids=torch.randint(0, 4096, (length,), generator=generator),
        loss_mask=torch.arange(length) >= prompt,
        hidden_states=torch.randn(length, layers * hidden, generator=generator).bfloat16().float(),
        last_hidden_state=torch.randn(length, hidden, generator=generator).bfloat16().float(),
        source={"file": "train.jsonl", "line": index},
    )


def synthetic_samples(count: int, delay: float = 0.0, start: int = 0):
    for index in range(start, start + count):
        if delay:
            time.sleep(delay)
        yield synthetic_sample(index)


def build_synthetic_cache(output_dir: str, delay: float) -> None:
    """The kill test's child process: 200 samples in shards of 10, then the manifest."""
    writer = TargetCacheWriter(output_dir, FINGERPRINT, "bf16", samples_per_shard=10)
    build_cache(synthetic_samples(200, delay), writer, total=200, progress=False)
    writer.finalize()


def write_cache(path: Path, count: int = 10, codec: str = "bf16", **writer_options) -> dict:
    writer = TargetCacheWriter(path, FINGERPRINT, codec, **({"samples_per_shard": 4} | writer_options))
    build_cache(synthetic_samples(count), writer, progress=False)
    return writer.finalize()


def read_all(source, **options) -> dict[str, dict]:
    samples = {}
    for sample in iter_cache_samples(source, **options):
        assert sample["key"] not in samples, sample["key"]
        samples[sample["key"]] = sample
    return samples


def assert_matches_original(sample: dict, original: CacheSample) -> None:
    assert torch.equal(sample["input_ids"], original.input_ids.long())
    assert torch.equal(sample["loss_mask"], original.loss_mask)
    assert torch.equal(sample["target_hidden_states"], original.hidden_states)
    expected_last = original.last_hidden_state * original.loss_mask.unsqueeze(-1)
    assert torch.equal(sample["target_last_hidden_states"], expected_last)


def shard_signature(manifest: dict) -> list[tuple]:
    return [(s["file"], s["samples"], s["bytes"], s["sha256"], s["keys_sha256"]) for s in manifest["shards"]]


# ------------------------------------------------------------------------------------------------ sample layout
def test_sample_round_trip_is_dense_and_exact():
    original = synthetic_sample(3)
    files = encode_sample(original, "bf16", LAYERS, HIDDEN)
    assert sorted(files) == [
        "__key__",
        "features.bf16",
        "input_ids.npy",
        "last_hidden.bf16",
        "loss_mask.npy",
        "meta.json",
    ]
    meta = json.loads(files["meta.json"])
    assert meta["key"] == "train.jsonl:3" and meta["source"] == {"file": "train.jsonl", "line": 3}
    assert (meta["length"], meta["supervised"]) == (len(original.input_ids), int(original.loss_mask.sum()))
    sample = decode_sample(files)
    assert_matches_original(sample, original)
    assert sample["input_ids"].dtype == torch.int64 and sample["loss_mask"].dtype == torch.bool
    # last hidden given only at the supervised rows is stored the same way
    rows_only = CacheSample(
        **{**original.__dict__, "last_hidden_state": original.last_hidden_state[original.loss_mask]}
    )
    assert encode_sample(rows_only, "bf16", LAYERS, HIDDEN) == files
    assert decode_sample(files, dtype=torch.bfloat16)["target_hidden_states"].dtype == torch.bfloat16


def test_tar_keys_are_safe_distinct_and_webdataset_groupable():
    keys = ["conv-0001", "train.jsonl:12", "a/b c.d", "__meta__", "ü" * 80, "x" * 200, "x" * 201, "a.b", "a_b"]
    tar_keys = [tar_key(key) for key in keys]
    assert tar_keys[0] == "conv-0001" and tar_keys[-1] == "a_b"
    assert len(set(tar_keys)) == len(keys)
    for name in tar_keys:
        assert (
            name
            and len(name) <= 65
            and set(name) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
        )
        assert not name.startswith("_")


def test_inconsistent_samples_are_refused():
    good = synthetic_sample(1)
    shape_error = r"hidden_states has shape \(45, 32\); expected \(45, 48\) = \(tokens, 3 layers × hidden 16\)"
    with pytest.raises(ValueError, match=shape_error):
        encode_sample(good, "bf16", (0, 1, 2), HIDDEN)
    with pytest.raises(ValueError, match="last_hidden_state has shape"):
        encode_sample(CacheSample(**{**good.__dict__, "last_hidden_state": torch.zeros(3, HIDDEN)}), "bf16", LAYERS, 16)
    with pytest.raises(ValueError, match="loss_mask has shape"):
        encode_sample(
            CacheSample(**{**good.__dict__, "loss_mask": torch.ones(2, dtype=torch.bool)}), "bf16", LAYERS, 16
        )
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        encode_sample(CacheSample(**{**good.__dict__, "source": {"x": object()}}), "bf16", LAYERS, HIDDEN)
    with pytest.raises(ValueError, match="non-empty string"):
        encode_sample(CacheSample(**{**good.__dict__, "key": ""}), "bf16", LAYERS, HIDDEN)
    files = encode_sample(good, "bf16", LAYERS, HIDDEN)
    with pytest.raises(CacheSampleError, match="hidden_size is 16; the cache manifest says 32"):
        decode_sample(files, expected={"hidden_size": 32})
    with pytest.raises(CacheSampleError, match=r"file input_ids\.npy is missing"):
        decode_sample({name: data for name, data in files.items() if name != "input_ids.npy"})


def test_samples_written_with_crc32_checksums_still_read_and_are_checked():
    """Sample version 1 stored CRC-32 per file; version 2 stores XXH3-64. Both are verified, neither mixed up."""
    original = synthetic_sample(2)
    files = encode_sample(original, "fp8_e4m3", LAYERS, HIDDEN)
    meta = json.loads(files["meta.json"])
    assert meta["version"] == 2 and set(meta["xxh3_64"]) == {n for n in files if n not in ("__key__", "meta.json")}
    old = {**meta, "version": 1, "crc32": {name: zlib.crc32(files[name]) for name in meta["xxh3_64"]}}
    del old["xxh3_64"]
    old_files = {**files, "meta.json": json.dumps(old).encode()}
    assert torch.equal(decode_sample(old_files)["target_hidden_states"], decode_sample(files)["target_hidden_states"])
    flipped = bytearray(files["features.fp8_e4m3"])
    flipped[HEADER_BYTES + 100] ^= 1
    with pytest.raises(CacheSampleError, match=r"features\.fp8_e4m3 fails its CRC-32 check"):
        decode_sample({**old_files, "features.fp8_e4m3": bytes(flipped)})
    with pytest.raises(CacheSampleError, match=r"features\.fp8_e4m3 fails its XXH3-64 check"):
        decode_sample({**files, "features.fp8_e4m3": bytes(flipped)})
    with pytest.raises(CacheSampleError, match="lacks field"):  # a version-2 meta must carry XXH3 checksums
        decode_sample({**files, "meta.json": json.dumps({**old, "version": 2}).encode()})


# ------------------------------------------------------------------------------------- shards and plain readers
def test_plain_webdataset_reads_the_shards(tmp_path):
    """No specdec code: WebDataset + numpy + the documented 20-byte codec header recover every sample."""
    manifest = write_cache(tmp_path, count=10)
    urls = [str(tmp_path / shard["file"]) for shard in manifest["shards"]]
    seen = 0
    for record in wds.WebDataset(urls, shardshuffle=False).decode():
        meta = record["meta.json"]
        original = synthetic_sample(meta["source"]["line"])
        assert record["__key__"] == tar_key(meta["key"])
        assert record["input_ids.npy"].dtype == np.int32
        assert np.array_equal(record["input_ids.npy"], original.input_ids.numpy())
        assert np.array_equal(record["loss_mask.npy"].astype(bool), original.loss_mask.numpy())
        for name, tensor in (("features.bf16", original.hidden_states), ("last_hidden.bf16", None)):
            data = record[name]
            rows, cols = struct.unpack_from("<II", data, 8)
            values = (np.frombuffer(data[HEADER_BYTES:], dtype="<u2").astype(np.uint32) << 16).view(np.float32)
            values = values.reshape(rows, cols)
            reference = tensor if tensor is not None else original.last_hidden_state[original.loss_mask]
            assert np.array_equal(values, reference.numpy())
        seen += 1
    assert seen == 10


def test_writer_shards_by_count_and_by_bytes(tmp_path):
    manifest = write_cache(tmp_path / "count", count=10, samples_per_shard=4)
    assert [shard["samples"] for shard in manifest["shards"]] == [4, 4, 2]
    assert [shard["file"] for shard in manifest["shards"]] == [f"shard-r000-00000{i}.tar" for i in range(3)]
    totals = manifest["totals"]
    assert totals["samples"] == 10 and totals["shards"] == 3
    assert totals["tokens"] == sum(len(synthetic_sample(i).input_ids) for i in range(10))
    assert totals["bytes"] == sum((tmp_path / "count" / shard["file"]).stat().st_size for shard in manifest["shards"])
    for shard in manifest["shards"]:
        verify_shard(tmp_path / "count" / shard["file"], shard)
    limit = 24_000
    by_bytes = write_cache(tmp_path / "bytes", count=20, samples_per_shard=None, max_shard_bytes=limit)
    assert len(by_bytes["shards"]) > 2 and sum(shard["samples"] for shard in by_bytes["shards"]) == 20
    assert all(shard["bytes"] <= limit + 10_240 for shard in by_bytes["shards"])  # tar pads its end record
    assert read_manifest(tmp_path / "bytes") == by_bytes
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob(".*tmp*"))


# ------------------------------------------------------------------------------------------------------ reader
@pytest.mark.parametrize("codec", ["bf16", "fp16+zstd", "fp8_e4m3"])
def test_reader_yields_dense_checked_samples(tmp_path, codec):
    manifest = write_cache(tmp_path, count=9, codec=codec)
    samples = read_all(tmp_path)
    assert sorted(samples) == sorted(f"train.jsonl:{i}" for i in range(9))
    for index in range(9):
        original, sample = synthetic_sample(index), samples[f"train.jsonl:{index}"]
        length = len(original.input_ids)
        assert sample["target_hidden_states"].shape == (length, len(LAYERS) * HIDDEN)
        assert sample["target_last_hidden_states"].shape == (length, HIDDEN)
        assert not sample["target_last_hidden_states"][~original.loss_mask].any()
        if codec == "bf16":
            assert_matches_original(sample, original)
        else:
            tolerance = 0.07 if codec.startswith("fp8") else 1e-3
            torch.testing.assert_close(sample["target_hidden_states"], original.hidden_states, rtol=tolerance, atol=0.3)
    urls = cache_shard_urls(tmp_path)
    assert read_all(urls, manifest=manifest).keys() == samples.keys()
    assert read_all(str(tmp_path / MANIFEST_NAME), verify_sha256=True).keys() == samples.keys()
    with pytest.raises(CacheMismatchError, match=r"layer_ids mismatch: cache has \[0, 1\], expected \[0, 2\]"):
        next(iter_cache_samples(tmp_path, expected={"layer_ids": (0, 2)}))


def _member_offsets(shard: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(shard) as archive:
        return {member.name: member for member in archive.getmembers()}


def test_reader_names_corrupted_and_truncated_shards(tmp_path):
    manifest = write_cache(tmp_path / "cache", count=10)
    first = manifest["shards"][0]["file"]

    def damaged(edit) -> Path:
        copy = tmp_path / f"damaged-{edit.__name__}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(tmp_path / "cache", copy)
        shard = copy / first
        data = bytearray(shard.read_bytes())
        shard.write_bytes(edit(data, _member_offsets(shard)))
        return copy

    def flip_feature_byte(data, members):
        features = next(m for name, m in members.items() if name.endswith("features.bf16"))
        data[features.offset_data + HEADER_BYTES + 5] ^= 0x40
        return data

    def cut_inside_member(data, members):
        last = max(members.values(), key=lambda m: m.offset)
        return data[: last.offset_data + 10]

    def cut_between_samples(data, members):
        # a cut on a member boundary leaves a tar that simply ends early: no read error, one sample fewer
        metas = sorted((m for name, m in members.items() if name.endswith("meta.json")), key=lambda m: m.offset)
        return data[: metas[-2].offset_data + 512]

    for edit, message in (
        (flip_feature_byte, "fails its XXH3-64 check"),
        (cut_inside_member, "truncated"),
        (cut_between_samples, "holds 3 samples; the manifest records 4"),
    ):
        cache = damaged(edit)
        with pytest.raises(ShardIntegrityError, match=rf"{first}.*{message}") as caught:
            read_all(cache)
        assert first in str(caught.value), edit.__name__
        with pytest.raises(ShardIntegrityError, match=first):
            verify_shard(cache / first, manifest["shards"][0])
    flipped = damaged(flip_feature_byte)
    with pytest.raises(ShardIntegrityError, match="XXH3-64"):
        read_all([flipped / first])  # shard URLs without a manifest are still checked sample by sample


# ---------------------------------------------------------------------------------------------------- manifest
def test_validate_manifest_names_each_mismatching_field(tmp_path):
    manifest = write_cache(tmp_path, count=3)
    validate_manifest(manifest, {"target": "synthetic", "layer_ids": [0, 1], "hidden_size": HIDDEN, "codec": "bf16"})
    with pytest.raises(CacheMismatchError, match=r"layer_ids mismatch: cache has \[0, 1\], expected \[1, 9\]"):
        validate_manifest(manifest, {"layer_ids": (1, 9)})
    with pytest.raises(CacheMismatchError, match="hidden_size mismatch") as caught:
        validate_manifest(manifest, {"hidden_size": 2560, "target": "Qwen/Qwen3-4B"})
    assert "target mismatch" in str(caught.value)
    with pytest.raises(CacheMismatchError, match="hidden_sizes: not in the cache fingerprint"):
        validate_manifest(manifest, {"hidden_sizes": 16})
    broken = json.loads(json.dumps(manifest))
    del broken["fingerprint"]["codec"]
    with pytest.raises(ManifestError, match=r"fingerprint\.codec is missing"):
        validate_manifest(broken, {})
    with pytest.raises(ManifestError, match="format_version 99"):
        validate_manifest({**manifest, "format_version": 99}, {})
    with pytest.raises(ManifestError, match="was the cache finalized"):
        read_manifest(tmp_path / "elsewhere")


def test_fingerprint_of_the_tiny_target():
    target = load_target(TINY_TARGET, device="cpu")
    fingerprint = CacheFingerprint.from_target(target, (0, 2, 4), max_length=512)
    assert fingerprint.target == TINY_TARGET and fingerprint.hidden_size == 256 and fingerprint.layer_ids == (0, 2, 4)
    assert len(fingerprint.tokenizer_hash) == 64 and len(fingerprint.chat_template_hash) == 64
    assert fingerprint.to_dict("fp8_e4m3+zstd")["codec"] == "fp8_e4m3" and fingerprint.to_dict("bf16")["zstd"] is False
    other_template = CacheFingerprint.from_target(target, (0, 2, 4), max_length=512, chat_template="{{ messages }}")
    assert other_template.chat_template_hash != fingerprint.chat_template_hash


# ------------------------------------------------------------------------------------------------------ resume
def test_restart_drops_partial_and_unrecorded_shards_and_matches_a_clean_build(tmp_path):
    reference = write_cache(tmp_path / "reference", count=10)
    cache = tmp_path / "crashed"
    writer = TargetCacheWriter(cache, FINGERPRINT, "bf16", samples_per_shard=4)
    for sample in synthetic_samples(10):
        writer.write(sample)  # 2 shards committed, 2 samples in the open .partial shard
    del writer  # a crash: the rank never closes
    assert (cache / "shard-r000-000002.tar.partial").exists()
    progress = progress_path(cache, 0)
    lines = progress.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3  # start + 2 shard records
    # crash after renaming shard 1 but before its record was appended, while a record was half written
    progress.write_bytes(b"".join(lines[:2]) + lines[2][:40])
    restarted = TargetCacheWriter(cache, FINGERPRINT, "bf16", samples_per_shard=4)
    assert restarted.dropped_files == ["shard-r000-000001.tar", "shard-r000-000002.tar.partial"]
    assert restarted.done_keys() == {f"train.jsonl:{i}" for i in range(4)}
    report = build_cache(synthetic_samples(10), restarted, progress=False)
    assert (report.written, report.skipped, report.shards) == (6, 4, 3)
    manifest = restarted.finalize()
    assert shard_signature(manifest) == shard_signature(reference)
    assert progress.read_bytes().endswith(b"\n")


def test_restart_with_another_fingerprint_is_refused(tmp_path):
    write_cache(tmp_path, count=3)
    with pytest.raises(CacheMismatchError, match="codec mismatch: cache has 'bf16', expected 'fp16'"):
        TargetCacheWriter(tmp_path, FINGERPRINT, "fp16")
    other = CacheFingerprint(target="synthetic", layer_ids=(0, 1), hidden_size=HIDDEN, max_length=128)
    with pytest.raises(CacheMismatchError, match="max_length mismatch"):
        TargetCacheWriter(tmp_path, other, "bf16")


def test_keys_are_never_stored_twice(tmp_path):
    first = write_cache(tmp_path, count=6)
    writer = TargetCacheWriter(tmp_path, FINGERPRINT, "bf16", samples_per_shard=4)
    with pytest.raises(TargetCacheError, match=r"'train.jsonl:2' is already in the cache \(shard-r000-000000.tar\)"):
        writer.write(synthetic_sample(2))
    report = build_cache(synthetic_samples(6), writer, progress=False)
    assert (report.written, report.skipped) == (0, 6)
    assert shard_signature(writer.finalize()) == shard_signature(first)
    fresh = TargetCacheWriter(tmp_path / "dup", FINGERPRINT, "bf16", samples_per_shard=4)
    fresh.write(synthetic_sample(1))
    with pytest.raises(TargetCacheError, match="appears twice in the input"):
        fresh.write(synthetic_sample(1))
    with pytest.raises(ValueError, match="max_length is 64"):
        fresh.write(synthetic_sample(7, length=65))


def test_an_exception_keeps_written_samples_but_not_completion(tmp_path):
    writer = TargetCacheWriter(tmp_path, FINGERPRINT, "bf16", samples_per_shard=4)
    with pytest.raises(RuntimeError, match="target forward failed"), writer:
        for sample in synthetic_samples(5):
            writer.write(sample)
        raise RuntimeError("target forward failed")
    assert [shard["samples"] for shard in writer.shards] == [4, 1]
    with pytest.raises(TargetCacheError, match=r"rank\(s\) \[0\] of 1 have not finished"):
        finalize_cache(tmp_path)
    resumed = TargetCacheWriter(tmp_path, FINGERPRINT, "bf16", samples_per_shard=4)
    assert build_cache(synthetic_samples(10), resumed, progress=False).written == 5
    manifest = resumed.finalize()
    assert manifest["totals"]["samples"] == 10
    assert sorted(read_all(tmp_path)) == sorted(f"train.jsonl:{i}" for i in range(10))


def test_ranks_write_disjoint_shards_and_resume_elastically(tmp_path):
    writers = [
        TargetCacheWriter(tmp_path, FINGERPRINT, "bf16", samples_per_shard=3, rank=r, world_size=2) for r in (0, 1)
    ]
    build_cache(synthetic_samples(5, start=0), writers[0], progress=False)
    with pytest.raises(TargetCacheError, match=r"rank\(s\) \[1\] of 2"):
        writers[0].finalize()
    build_cache(synthetic_samples(5, start=5), writers[1], progress=False)
    with pytest.raises(RuntimeError, match="rank 0 only"):
        writers[1].finalize()
    manifest = writers[0].finalize(verify_sha256=True)
    assert [shard["file"] for shard in manifest["shards"]] == [
        "shard-r000-000000.tar",
        "shard-r000-000001.tar",
        "shard-r001-000000.tar",
        "shard-r001-000001.tar",
    ]
    assert sorted(read_all(tmp_path)) == sorted(f"train.jsonl:{i}" for i in range(10))
    # a later run on one rank sees every rank's finished keys and adds only the new inputs
    single = TargetCacheWriter(tmp_path, FINGERPRINT, "bf16", samples_per_shard=3)
    report = build_cache(synthetic_samples(12), single, progress=False)
    assert (report.written, report.skipped) == (2, 10)
    assert single.finalize()["totals"]["samples"] == 12


def test_sigkill_mid_build_then_restart_equals_an_uninterrupted_build(tmp_path):
    """A real process killed with SIGKILL once two shards are recorded; the restart completes the same cache."""
    reference = tmp_path / "reference"
    build_synthetic_cache(str(reference), delay=0.0)
    cache = tmp_path / "killed"
    command = [
        sys.executable,
        "-c",
        "import sys; from tests.test_cache import build_synthetic_cache; "
        "build_synthetic_cache(sys.argv[1], float(sys.argv[2]))",
        str(cache),
    ]
    child = subprocess.Popen([*command, "0.02"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = progress_path(cache, 0)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and child.poll() is None:
            if progress.exists() and progress.read_bytes().count(b'"type":"shard"') >= 2:
                break
            time.sleep(0.01)
        assert child.poll() is None, "the build finished or died before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert b'"type":"complete"' not in progress.read_bytes() and not (cache / MANIFEST_NAME).exists()
    recorded_before_restart = progress.read_bytes().count(b'"type":"shard"')
    assert 2 <= recorded_before_restart < 20

    subprocess.run([*command, "0"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    manifest, expected = read_manifest(cache), read_manifest(reference)
    assert shard_signature(manifest) == shard_signature(expected)
    assert not list(cache.glob("*.partial"))
    restarted, clean = read_all(cache, verify_sha256=True), read_all(reference)
    assert sorted(restarted) == sorted(clean) == sorted(f"train.jsonl:{i}" for i in range(200))
    for key, sample in restarted.items():
        for name in ("input_ids", "loss_mask", "target_hidden_states", "target_last_hidden_states"):
            assert torch.equal(sample[name], clean[key][name]), (key, name)


# --------------------------------------------------------------------------------------------------- estimator
def test_deepspec_reference_figures_are_exact():
    assert deepspec_bytes_per_token(2560, 5) == 30_726  # Qwen3-4B: 4 + 1 + 1 + 5·2560·2 + 2560·2
    assert deepspec_bytes_per_token(4096, 5) == 49_158  # Qwen3-8B
    assert deepspec_bytes_per_token(5120, 5) == 61_446  # Qwen3-14B
    reference = estimate_deepspec_cache_size(2560, 5, num_samples=1_235_000, avg_tokens=1000)
    assert reference.token_bytes == 30_726
    assert reference.total_bytes == 30_726 * 1_235_000_000 + 56 * 1_235_000
    assert 37.9e12 < reference.total_bytes < 38.0e12  # the "38 TB" of the reference README
    table = format_estimates(compare_layouts(2560, 5, num_samples=1_235_000, avg_tokens=1000))
    assert "30,726.0" in table and "fp8_e4m3" in table


def test_specdec_layout_per_token_bytes():
    bf16 = estimate_cache_size(2560, 5, num_samples=1000, avg_tokens=1000, supervised_fraction=0.6, codec="bf16")
    assert bf16.token_bytes == 4 + 1 + 5 * 2560 * 2 + 0.6 * 2560 * 2
    fp8 = estimate_cache_size(2560, 5, num_samples=1000, avg_tokens=1000, supervised_fraction=0.6, codec="fp8_e4m3")
    assert fp8.token_bytes == pytest.approx(4 + 1 + 5 * 2560 + 5 * 4 + 0.6 * (2560 + 4))
    zstd = estimate_cache_size(2560, 5, tokens=10**6, num_samples=1000, codec="bf16+zstd", compression_ratio=1.25)
    assert zstd.token_bytes == pytest.approx(5 + (5 * 2560 * 2 + 0.6 * 2560 * 2) / 1.25)
    with pytest.raises(ValueError, match="two of"):
        estimate_cache_size(2560, 5, tokens=1000)


@pytest.mark.parametrize("codec", ["bf16", "fp8_e4m3"])
def test_estimate_is_within_a_few_percent_of_a_real_cache(tmp_path, codec):
    hidden, layers = 64, 3
    fingerprint = CacheFingerprint(target="synthetic", layer_ids=(0, 1, 2), hidden_size=hidden, max_length=512)
    samples = [synthetic_sample(i, hidden=hidden, layers=layers, length=40 + (i * 53) % 260) for i in range(24)]
    writer = TargetCacheWriter(tmp_path, fingerprint, codec, samples_per_shard=8)
    build_cache(samples, writer, progress=False)
    totals = writer.finalize()["totals"]
    estimate = estimate_cache_size(
        hidden,
        layers,
        tokens=[len(sample.input_ids) for sample in samples],
        supervised_fraction=totals["supervised_tokens"] / totals["tokens"],
        codec=codec,
        samples_per_shard=8,
    )
    assert estimate.tokens == totals["tokens"] and estimate.num_shards == totals["shards"] == 3
    assert estimate.total_bytes == pytest.approx(totals["bytes"], rel=0.02)


def documented_plain_decoder() -> dict:
    """Execute the numpy decode recipe of docs/data.md (the block after its marker) and return its names."""
    text = (ROOT / "docs" / "data.md").read_text()
    block = text.split("<!-- plain-decode-recipe -->", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    names: dict = {}
    exec(compile(block, "docs/data.md", "exec"), names)
    return names


@pytest.mark.parametrize("codec", ["bf16", "fp16", "fp8_e4m3", "fp4_e2m1", "fp8_e4m3+zstd", "fp4_e2m1+zstd"])
def test_documented_plain_reader_decodes_every_codec_like_specdec(tmp_path, codec):
    manifest = write_cache(tmp_path, count=6, codec=codec)
    recipe = documented_plain_decoder()
    specdec_samples = read_all(tmp_path, dtype=torch.float32)
    urls = [str(tmp_path / shard["file"]) for shard in manifest["shards"]]
    seen = 0
    for key, input_ids, loss_mask, features, last in recipe["read_shards"](urls):
        sample = next(s for s in specdec_samples.values() if tar_key(s["key"]) == key)
        assert np.array_equal(input_ids, sample["input_ids"].numpy())
        assert np.array_equal(loss_mask, sample["loss_mask"].numpy())
        assert features.dtype == np.float32 and np.array_equal(features, sample["target_hidden_states"].numpy())
        assert np.array_equal(last, sample["target_last_hidden_states"][sample["loss_mask"]].numpy())
        seen += 1
    assert seen == 6
