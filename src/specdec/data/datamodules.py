"""Lightning DataModules: training batches from a target cache, or from the target run online.

Both produce the batch contract of :mod:`specdec.data.batches` with the same number of micro-batches on every
rank, resume mid-epoch from a Lightning checkpoint, and check that their layer ids and hidden size match the
drafter being trained (read from the LightningModule's ``drafter.config`` or ``config`` when it has one).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from specdec.data.cache.builder import TokenizeOptions, build_target_cache
from specdec.data.cache.manifest import MANIFEST_NAME, CacheMismatchError, read_manifest
from specdec.data.cache.reader import cache_shard_urls
from specdec.data.cache.stream import TargetCacheStream
from specdec.data.online import ConversationBatches, OnlineTargetFeatures
from specdec.data.prompts.chat import TokenizeSummary, tokenize_conversations
from specdec.data.prompts.eval_sets import EvalSetsSpec, eval_dataloader
from specdec.data.prompts.importing import iter_conversations
from specdec.data.prompts.sources import iter_training_conversations
from specdec.data.regeneration.turns import SamplingParams
from specdec.data.resumable import ResumableDataLoader

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype of a ``feature_dtype`` setting."""
    if name not in DTYPES:
        raise ValueError(f"feature_dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def drafter_config_of(module: Any) -> Any | None:
    """The drafter config of a LightningModule (``module.drafter.config`` or ``module.config``), if any."""
    for candidate in (getattr(getattr(module, "drafter", None), "config", None), getattr(module, "config", None)):
        if candidate is not None and hasattr(candidate, "target_layer_ids"):
            return candidate
    return None


def check_drafter_match(layer_ids: list[int], hidden_size: int, config: Any, source: str) -> None:
    """Refuse data whose target layers or width differ from what the drafter config was built for."""
    problems = []
    if list(config.target_layer_ids) != list(layer_ids):
        expected = list(config.target_layer_ids)
        problems.append(f"layer ids: {source} has {list(layer_ids)}, the drafter expects {expected}")
    expected_hidden = getattr(config, "target_hidden_size", None)
    if expected_hidden is not None and expected_hidden != hidden_size:
        problems.append(f"hidden size: {source} has {hidden_size}, the drafter expects {expected_hidden}")
    if problems:
        raise CacheMismatchError(f"{source} does not fit the drafter: " + "; ".join(problems))


def _eval_prompts_loader(datamodule: L.LightningDataModule):
    """``specdec test`` batches: this rank's eval prompts, as ``list[EvalPrompt]``."""
    if datamodule.eval_sets is None:
        raise ValueError("`specdec test` needs eval prompts: set the DataModule's `eval_sets` (eval_dir, tasks, ...)")
    rank, world_size = _trainer_rank(datamodule)
    return eval_dataloader(datamodule.eval_sets, rank, world_size)


def _trainer_rank(datamodule: L.LightningDataModule) -> tuple[int, int]:
    trainer = getattr(datamodule, "trainer", None)
    if trainer is None:
        return 0, 1
    return trainer.global_rank, trainer.world_size


@dataclass
class CacheBuildSpec:
    """How :meth:`TargetCacheDataModule.prepare_data` builds a missing cache.

    Args:
        data: conversation files: prompt files (JSONL/ShareGPT/HF dataset on disk) or regenerated answers.
        target: the target (default: the DataModule's ``target``, so it is stated once).
        layer_ids: target layer ids to capture (default: the DataModule's ``layer_ids``).
        max_length: tokens per sample (longer conversations are truncated).
        codec: feature codec: ``bf16``, ``fp16``, ``fp8_e4m3`` or ``fp4_e2m1``, each optionally with ``+zstd``.
        samples_per_shard: samples per tar shard (default: 1 GiB shards).
        enable_thinking: the chat template's thinking switch.
        device: where the target runs (``auto``, ``cpu``, ``cuda``).
        min_loss_tokens: conversations with fewer supervised tokens are skipped (and counted).
        answers: if set, ``data`` are prompts: the target first answers every user turn (locally, resumable)
            into this JSONL file, and the cache is built from those answers.
        sampling: how the answers are sampled (default: :class:`SamplingParams` defaults).
        answer_batch_size: conversations answered together.
    """

    data: list[str]
    target: str | None = None
    layer_ids: list[int] | None = None
    max_length: int = 2048
    codec: str = "bf16"
    samples_per_shard: int | None = None
    enable_thinking: bool | None = False
    device: str = "auto"
    min_loss_tokens: int = 1
    answers: str | None = None
    sampling: SamplingParams | None = None
    answer_batch_size: int = 8

    def tokenize_options(self) -> TokenizeOptions:
        return TokenizeOptions(
            max_length=self.max_length, min_loss_tokens=self.min_loss_tokens, enable_thinking=self.enable_thinking
        )


class TargetCacheDataModule(L.LightningDataModule):
    """Micro-batches streamed from a target cache (a directory or a ``manifest.json`` URL).

    Args:
        cache: the cache directory (or its ``manifest.json`` path or URL; shards are opened relative to it, so
            ``pipe:`` and ``http(s)://`` URLs work as in ``webdataset``).
        batch_size: micro-batch size per rank.
        val_cache: an optional held-out cache for validation batches (not shuffled, last batch kept).
        shuffle: draw a new shard order and sample order every epoch from ``seed``.
        seed: the shuffle seed; the same seed, world size and worker count give the same batches.
        shuffle_buffer: samples held by each worker's shuffle buffer.
        num_workers: DataLoader worker processes per rank; their batches sit in shared memory, so the hand-off to
            the training process copies nothing.
        prefetch_factor: batches each worker prepares ahead (DataLoader default when unset).
        pin_memory: copy batches to page-locked memory for asynchronous host-to-GPU transfer; unset: when the
            trainer runs on CUDA.
        feature_dtype: dtype of the decoded features (``bfloat16``, ``float16``, ``float32``).
        pad_token_id: the id written after a sequence's end (never attended to, never supervised).
        target: the target the cache was built from (checked against its manifest; ``build`` defaults to it).
        layer_ids: the captured target layer ids (checked against the manifest; ``build`` defaults to them).
        eval_sets: the eval prompts ``specdec test`` decodes (``test_dataloader`` yields ``list[EvalPrompt]``).
        build: if the cache is missing, ``prepare_data`` builds it from this spec (once per node).
        val_build: the same for ``val_cache``.
    """

    def __init__(
        self,
        cache: str,
        batch_size: int = 4,
        val_cache: str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 256,
        num_workers: int = 0,
        prefetch_factor: int | None = None,
        pin_memory: bool | None = None,
        feature_dtype: str = "bfloat16",
        pad_token_id: int = 0,
        target: str | None = None,
        layer_ids: list[int] | None = None,
        eval_sets: EvalSetsSpec | None = None,
        build: CacheBuildSpec | None = None,
        val_build: CacheBuildSpec | None = None,
    ) -> None:
        super().__init__()
        self.cache = os.fspath(cache)
        self.batch_size = batch_size
        self.val_cache = val_cache
        self.shuffle = shuffle
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.num_workers = num_workers
        self.prefetch_factor = prefetch_factor
        self.pin_memory = pin_memory
        self.dtype = dtype_named(feature_dtype)
        self.pad_token_id = pad_token_id
        self.target = target
        self.layer_ids = None if layer_ids is None else list(layer_ids)
        self.eval_sets = eval_sets
        self.build = build
        self.val_build = val_build
        self.manifest: dict[str, Any] | None = None
        self.train_stream: TargetCacheStream | None = None
        self.val_stream: TargetCacheStream | None = None

    def _manifest_location(self, cache: str) -> str:
        return cache if cache.endswith(MANIFEST_NAME) else str(Path(cache) / MANIFEST_NAME)

    def prepare_data(self) -> None:
        for cache, spec in ((self.cache, self.build), (self.val_cache, self.val_build)):
            if cache is not None and spec is not None:
                self._build_missing(cache, spec)

    def _build_missing(self, cache: str, spec: CacheBuildSpec) -> None:
        if "://" in cache or cache.startswith("pipe:") or Path(self._manifest_location(cache)).exists():
            return
        from specdec.targets import load_target

        target_name = spec.target or self.target
        layer_ids = spec.layer_ids or self.layer_ids
        if target_name is None or layer_ids is None:
            raise ValueError(f"building {cache}: give the DataModule's target and layer_ids (or the build's own)")
        target = load_target(target_name, device=spec.device)
        data = spec.data
        if spec.answers is not None:
            from specdec.data.regeneration.regenerate import LocalGenerateBackend, regenerate

            backend = LocalGenerateBackend(target, batch_size=spec.answer_batch_size)
            prompts = list(iter_conversations(spec.data))
            report = regenerate(prompts, spec.answers, backend, spec.sampling or SamplingParams())
            if report.failed:
                raise RuntimeError(f"{report.failed} conversation(s) could not be answered:\n{report.report()}")
            data = [spec.answers]
        conversations = list(iter_training_conversations(data))
        report = build_target_cache(
            target,
            conversations,
            Path(self._manifest_location(cache)).parent,
            layer_ids,
            spec.tokenize_options(),
            codec=spec.codec,
            samples_per_shard=spec.samples_per_shard,
            rank=0,
            world_size=1,
        )
        print(report.tokenize.report().splitlines()[0])

    def _stream(self, cache: str, shuffle: bool, drop_last: bool) -> TargetCacheStream:
        manifest = read_manifest(self._manifest_location(cache))
        fingerprint = manifest["fingerprint"]
        if self.target is not None and fingerprint["target"] != self.target:
            raise CacheMismatchError(
                f"target cache {cache} was built from {fingerprint['target']!r}, not {self.target!r}"
            )
        if self.layer_ids is not None and list(fingerprint["layer_ids"]) != self.layer_ids:
            raise CacheMismatchError(
                f"target cache {cache} holds layer ids {list(fingerprint['layer_ids'])}, not {self.layer_ids}"
            )
        config = drafter_config_of(getattr(self.trainer, "lightning_module", None)) if self.trainer else None
        if config is not None:
            check_drafter_match(fingerprint["layer_ids"], fingerprint["hidden_size"], config, f"target cache {cache}")
        rank, world_size = _trainer_rank(self)
        return TargetCacheStream(
            cache_shard_urls(cache),
            manifest,
            self.batch_size,
            rank=rank,
            world_size=world_size,
            shuffle=shuffle,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            drop_last=drop_last,
            dtype=self.dtype,
            pad_token_id=self.pad_token_id,
        )

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_stream is None:
            self.train_stream = self._stream(self.cache, self.shuffle, drop_last=True)
            self.manifest = read_manifest(self._manifest_location(self.cache))
        if self.val_cache is not None and self.val_stream is None:
            self.val_stream = self._stream(self.val_cache, shuffle=False, drop_last=False)

    def train_dataloader(self) -> ResumableDataLoader:
        if self.train_stream is None:
            self.setup("fit")
        return ResumableDataLoader(self.train_stream, **self._loader_options())

    def val_dataloader(self) -> ResumableDataLoader | list:
        if self.val_cache is None:
            return []
        if self.val_stream is None:
            self.setup("validate")
        return ResumableDataLoader(self.val_stream, **self._loader_options())

    def _loader_options(self) -> dict[str, Any]:
        pin = self.pin_memory
        if pin is None:
            trainer = self.trainer
            pin = trainer is not None and trainer.strategy.root_device.type == "cuda"
        options: dict[str, Any] = {"num_workers": self.num_workers, "pin_memory": pin}
        if self.num_workers > 0 and self.prefetch_factor is not None:
            options["prefetch_factor"] = self.prefetch_factor
        return options

    def test_dataloader(self):
        return _eval_prompts_loader(self)


class OnlineTargetDataModule(L.LightningDataModule):
    """Micro-batches of tokenised conversations whose target features are computed on the training device.

    The target runs in ``on_after_batch_transfer`` (after Lightning moved the batch to the device), one unpadded
    sequence per forward, so batches equal those of a cache built from the same data with the ``bf16`` codec.

    Args:
        data: conversation files (prompt files or regenerated answers).
        target: the target (``specdec-tiny``, a local HF directory or a hub id).
        layer_ids: target layer ids to capture.
        batch_size: micro-batch size per rank.
        max_length: tokens per sample (longer conversations are truncated).
        val_data: optional held-out conversation files for validation batches.
        shuffle: a new sample order every epoch from ``seed``.
        seed: the shuffle seed.
        num_workers: DataLoader worker processes per rank (tokens only; the target runs in the main process).
        feature_dtype: dtype of the features (``bfloat16`` matches a ``bf16`` cache exactly).
        enable_thinking: the chat template's thinking switch.
        min_loss_tokens: conversations with fewer supervised tokens are skipped (and counted).
        pad_token_id: the id written after a sequence's end.
        target_dtype: dtype the target runs in (``auto``: fp32 on CPU, bf16 on recent GPUs).
        eval_sets: the eval prompts ``specdec test`` decodes (``test_dataloader`` yields ``list[EvalPrompt]``).
    """

    def __init__(
        self,
        data: list[str],
        target: str,
        layer_ids: list[int],
        batch_size: int = 4,
        max_length: int = 2048,
        val_data: list[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        feature_dtype: str = "bfloat16",
        enable_thinking: bool | None = False,
        min_loss_tokens: int = 1,
        pad_token_id: int = 0,
        target_dtype: str = "auto",
        eval_sets: EvalSetsSpec | None = None,
    ) -> None:
        super().__init__()
        self.data = data
        self.target_name = target
        self.layer_ids = list(layer_ids)
        self.batch_size = batch_size
        self.options = TokenizeOptions(
            max_length=max_length, min_loss_tokens=min_loss_tokens, enable_thinking=enable_thinking
        )
        self.val_data = val_data
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self.dtype = dtype_named(feature_dtype)
        self.pad_token_id = pad_token_id
        self.target_dtype = target_dtype
        self.eval_sets = eval_sets
        self.features: OnlineTargetFeatures | None = None
        self.train_batches: ConversationBatches | None = None
        self.val_batches: ConversationBatches | None = None
        self.summaries: dict[str, TokenizeSummary] = {}

    def _tokenized(self, paths: list[str], split: str) -> list[Mapping[str, Any]]:
        summary = self.summaries.setdefault(split, TokenizeSummary())
        tokenized = tokenize_conversations(
            self.features.target.tokenizer,
            iter_training_conversations(paths),
            self.options.max_length,
            min_loss_tokens=self.options.min_loss_tokens,
            summary=summary,
            enable_thinking=self.options.enable_thinking,
        )
        return [
            {"key": conversation.key, "input_ids": sample.input_ids, "loss_mask": sample.loss_mask}
            for conversation, sample in tokenized
        ]

    def setup(self, stage: str | None = None) -> None:
        if stage == "test":
            return  # eval prompts need no target features (the module decodes with its own target)
        if self.features is None:
            from specdec.targets import load_target

            target = load_target(self.target_name, device="cpu", dtype=self.target_dtype)
            self.features = OnlineTargetFeatures(target, self.layer_ids, self.dtype)
            config = drafter_config_of(getattr(self.trainer, "lightning_module", None)) if self.trainer else None
            if config is not None:
                check_drafter_match(
                    list(self.features.layer_ids), target.geometry.hidden_size, config, f"target {self.target_name}"
                )
        rank, world_size = _trainer_rank(self)
        options = {"rank": rank, "world_size": world_size, "seed": self.seed, "pad_token_id": self.pad_token_id}
        if stage in (None, "fit") and self.train_batches is None:
            samples = self._tokenized(self.data, "train")
            self.train_batches = ConversationBatches(samples, self.batch_size, shuffle=self.shuffle, **options)
        if self.val_data is not None and self.val_batches is None:
            samples = self._tokenized(self.val_data, "val")
            self.val_batches = ConversationBatches(samples, self.batch_size, shuffle=False, drop_last=False, **options)

    def train_dataloader(self) -> ResumableDataLoader:
        if self.train_batches is None:
            self.setup("fit")
        return ResumableDataLoader(self.train_batches, num_workers=self.num_workers)

    def val_dataloader(self) -> ResumableDataLoader | list:
        if self.val_data is None:
            return []
        if self.val_batches is None:
            self.setup("validate")
        return ResumableDataLoader(self.val_batches, num_workers=self.num_workers)

    def test_dataloader(self):
        return _eval_prompts_loader(self)

    def on_after_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        if not isinstance(batch, Mapping) or "target_hidden_states" in batch:
            return batch  # eval prompts (``specdec test``) or features computed already
        if self.features is None:
            self.setup()
        return self.features(batch)


__all__ = [
    "CacheBuildSpec",
    "OnlineTargetDataModule",
    "TargetCacheDataModule",
    "check_drafter_match",
    "drafter_config_of",
    "dtype_named",
]
