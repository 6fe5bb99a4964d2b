"""Building the target cache: tokenise conversations, run the frozen target once per sample, write the shards.

The expensive part is the target forward, so finished inputs are skipped *before* it runs (``done_keys`` of
the writer, which knows every rank's committed shards). Each rank takes every ``world_size``-th conversation of
the input and writes its own shards, so ranks never touch the same file; rank 0 writes the manifest after a
barrier. A build killed at any moment and started again ends with exactly the samples of an uninterrupted one.

By default every sample is forwarded on its own, without padding, so the features do not depend on which other
samples shared a batch: the same conversation always gives bit-identical features, here and in
:class:`specdec.data.OnlineTargetDataModule`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from specdec.data.cache.codecs import CodecSpec
from specdec.data.cache.format import CacheSample
from specdec.data.cache.manifest import CacheFingerprint
from specdec.data.cache.writer import BuildReport, TargetCacheWriter, build_cache
from specdec.data.prompts.chat import TokenizeSummary, tokenize_conversations
from specdec.data.prompts.conversations import Conversation
from specdec.targets import Target, capture_target_features


@dataclass(frozen=True)
class TokenizeOptions:
    """How conversations become token ids and loss masks (see :func:`specdec.data.tokenize_conversation`)."""

    max_length: int = 2048
    min_loss_tokens: int = 1
    enable_thinking: bool | None = False
    train_on_empty_think: bool = False


def provenance_of(conversation: Conversation) -> dict[str, Any]:
    """The JSON provenance a cache sample carries."""
    provenance = conversation.provenance
    return {
        "source": provenance.source,
        "line": provenance.line,
        "unit": provenance.unit,
        "content_hash": provenance.content_hash,
    }


@torch.no_grad()
def target_features(
    target: Target, input_ids: torch.Tensor, layer_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Captured layer features ``[S, L·H]`` and last hidden state ``[S, H]`` of one unpadded sequence ``[S]``.

    One sequence per forward keeps the result independent of batch composition (padding changes the kernels'
    shapes and so the last bits of fp32 results).
    """
    device = next(target.model.parameters()).device
    features = capture_target_features(target.model, input_ids.to(device)[None], layer_ids)
    return features.hidden_states[0], features.last_hidden_state[0]


def iter_target_samples(
    target: Target,
    conversations: Iterable[Conversation],
    layer_ids: Sequence[int],
    options: TokenizeOptions = TokenizeOptions(),
    skip_keys: frozenset[str] | set[str] = frozenset(),
    summary: TokenizeSummary | None = None,
) -> Iterator[CacheSample]:
    """Tokenise each conversation not in ``skip_keys`` and run the target on it; yield cache samples."""
    pending = (conversation for conversation in conversations if conversation.key not in skip_keys)
    tokenized = tokenize_conversations(
        target.tokenizer,
        pending,
        options.max_length,
        min_loss_tokens=options.min_loss_tokens,
        summary=summary,
        enable_thinking=options.enable_thinking,
        train_on_empty_think=options.train_on_empty_think,
    )
    for conversation, sample in tokenized:
        hidden_states, last_hidden_state = target_features(target, sample.input_ids, layer_ids)
        loss_mask = sample.loss_mask.to(hidden_states.device)
        yield CacheSample(
            key=conversation.key,
            input_ids=sample.input_ids,
            loss_mask=sample.loss_mask,
            hidden_states=hidden_states.cpu(),
            last_hidden_state=last_hidden_state[loss_mask].cpu(),
            source=provenance_of(conversation),
        )


def distributed_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of an initialised process group, else of torchrun's environment, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world_size: int) -> None:
    if world_size == 1:
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # torchrun's environment; gloo needs no accelerator
    dist.barrier()


@dataclass(frozen=True)
class CacheBuildReport:
    """What one rank did, plus the tokenisation summary (skipped conversations by reason)."""

    build: BuildReport
    tokenize: TokenizeSummary
    manifest: dict[str, Any] | None  # rank 0 with ``finalize``: the written manifest


def build_target_cache(
    target: Target,
    conversations: Iterable[Conversation],
    output_dir: str | os.PathLike[str],
    layer_ids: Sequence[int],
    options: TokenizeOptions = TokenizeOptions(),
    codec: CodecSpec | str = "bf16",
    samples_per_shard: int | None = None,
    max_shard_bytes: int | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    finalize: bool = True,
    progress: bool = True,
) -> CacheBuildReport:
    """Build (or resume building) a target cache from conversations on this rank; rank 0 writes the manifest.

    Under torchrun every rank calls this with the same ``conversations`` in the same order; rank ``r`` handles
    conversations ``r, r + world_size, …``. ``rank``/``world_size`` default to the process group or torchrun's
    environment.
    """
    found_rank, found_world = distributed_rank()
    rank = found_rank if rank is None else rank
    world_size = found_world if world_size is None else world_size
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = CacheFingerprint.from_target(target, layer_ids, options.max_length)
    writer = TargetCacheWriter(
        output_dir,
        fingerprint,
        codec=codec,
        samples_per_shard=samples_per_shard,
        max_shard_bytes=max_shard_bytes,
        rank=rank,
        world_size=world_size,
    )
    mine = [conversation for index, conversation in enumerate(conversations) if index % world_size == rank]
    done = writer.done_keys()
    todo = sum(conversation.key not in done for conversation in mine)
    summary = TokenizeSummary()
    samples = iter_target_samples(target, mine, fingerprint.layer_ids, options, skip_keys=done, summary=summary)
    report = build_cache(samples, writer, total=todo, progress=progress)
    report = replace(report, skipped=report.skipped + len(mine) - todo)  # filtered out before the target ran
    manifest = None
    if finalize:
        _barrier(world_size)
        if rank == 0:
            from specdec.data.cache.writer import finalize_cache

            manifest = finalize_cache(output_dir, world_size=world_size)
        _barrier(world_size)
    return CacheBuildReport(build=report, tokenize=summary, manifest=manifest)
