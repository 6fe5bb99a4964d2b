"""``specdec cache …``: plan, build and verify a target cache."""

from __future__ import annotations

import sys
from pathlib import Path

from specdec.targets import TINY_TARGET


def cache_estimate(
    target: str | None = None,
    hidden_size: int | None = None,
    layer_ids: list[int] | None = None,
    num_layers: int | None = None,
    tokens: int | None = None,
    num_samples: int | None = None,
    avg_tokens: float | None = None,
    supervised_fraction: float = 0.6,
) -> None:
    """Print bytes/token and total size of a target cache per codec, next to DeepSpec's layout, before building.

    Args:
        target: a target (``specdec-tiny``, local directory or hub id) to read the hidden size from its config.
        hidden_size: the target hidden size, when no target is given.
        layer_ids: captured layer ids (their count is the number of feature layers).
        num_layers: number of captured layers, when layer_ids is not given.
        tokens: total tokens of the data set (give two of tokens, num_samples, avg_tokens).
        num_samples: number of samples.
        avg_tokens: average tokens per sample.
        supervised_fraction: share of tokens under the loss mask (only those store a last hidden state).
    """
    from specdec.data.cache.estimate import compare_layouts, format_estimates

    if target is not None:
        from transformers import AutoConfig

        from specdec.targets import TargetGeometry, resolve_target, validate_layer_ids

        geometry = TargetGeometry.from_config(AutoConfig.from_pretrained(resolve_target(target).path))
        hidden_size = geometry.hidden_size
        if layer_ids is not None:
            validate_layer_ids(layer_ids, geometry.num_hidden_layers)
    if hidden_size is None:
        raise ValueError("give --target or --hidden_size")
    count = len(layer_ids) if layer_ids is not None else num_layers
    if count is None:
        raise ValueError("give --layer_ids or --num_layers")
    estimates = compare_layouts(
        hidden_size,
        count,
        tokens=tokens,
        num_samples=num_samples,
        avg_tokens=avg_tokens,
        supervised_fraction=supervised_fraction,
    )
    print(format_estimates(estimates))


def cache_build(
    data: list[str] | str,
    output_dir: Path,
    layer_ids: list[int],
    target: str = TINY_TARGET,
    max_length: int = 2048,
    codec: str = "bf16",
    samples_per_shard: int | None = None,
    max_shard_bytes: int | None = None,
    enable_thinking: bool | None = False,
    min_loss_tokens: int = 1,
    device: str = "auto",
    progress: bool = True,
) -> None:
    """Build a target cache (resumable; under torchrun each rank writes its own shards, rank 0 the manifest).

    Args:
        data: conversation files: regenerated answers (``specdec data regenerate``) or prompt files with answers.
        output_dir: the cache directory; rerunning with the same arguments resumes an interrupted build.
        layer_ids: target layer ids whose outputs are stored (e.g. the drafter config's target_layer_ids).
        target: ``specdec-tiny``, a local HF model directory, or a hub id.
        max_length: tokens per sample (longer conversations are truncated).
        codec: feature codec: bf16, fp16, fp8_e4m3 or fp4_e2m1, optionally with +zstd (e.g. fp8_e4m3+zstd).
        samples_per_shard: samples per tar shard.
        max_shard_bytes: bytes per tar shard (default 1 GiB when neither limit is given).
        enable_thinking: the chat template's thinking switch.
        min_loss_tokens: conversations with fewer supervised tokens are skipped and counted.
        device: where the target runs: auto, cpu, cuda or cuda:N.
        progress: show a progress bar.
    """
    from specdec.data.cache.builder import TokenizeOptions, build_target_cache
    from specdec.data.prompts.importing import ImportSummary
    from specdec.data.prompts.sources import iter_training_conversations
    from specdec.targets import load_target

    loaded = load_target(target, device=device)
    imported = ImportSummary()
    conversations = list(iter_training_conversations(data, summary=imported))
    if imported.num_rejected:
        print(imported.report(), file=sys.stderr)
    options = TokenizeOptions(max_length=max_length, min_loss_tokens=min_loss_tokens, enable_thinking=enable_thinking)
    report = build_target_cache(
        loaded,
        conversations,
        output_dir,
        layer_ids,
        options,
        codec=codec,
        samples_per_shard=samples_per_shard,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
    )
    print(report.tokenize.report())
    build = report.build
    print(f"wrote {build.written} samples ({build.skipped} already stored); {build.shards} shards, {build.bytes} bytes")
    if report.manifest is not None:
        shards = report.manifest["shards"]
        samples = sum(shard["samples"] for shard in shards)
        print(f"manifest: {output_dir / 'manifest.json'} ({len(shards)} shards, {samples} samples)")


def cache_verify(cache: str) -> None:
    """Read every sample of a target cache and check sizes, sha256, hashes, shapes and key lists against the manifest.

    Args:
        cache: the cache directory or its manifest.json URL.
    """
    from specdec.data.cache.reader import iter_cache_samples

    samples = tokens = 0
    for sample in iter_cache_samples(cache, verify_sha256=True):
        samples += 1
        tokens += sample["input_ids"].numel()
    print(f"{cache}: {samples} samples, {tokens} tokens: every shard matches its manifest entry")
