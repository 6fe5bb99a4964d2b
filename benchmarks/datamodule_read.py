"""Target-cache read rate through ``TargetCacheDataModule`` at Qwen3-4B geometry, per codec, sample length and workers.

For each sample length (512 and 1,024 tokens, the same number of tokens per cache) and each codec a cache of
synthetic features (H = 2560, 5 captured layers, 60 % supervised) is written; each configuration then sets up
one DataModule and streams whole epochs of micro-batches through its train loader, as a trainer does (checksum,
decode into bf16 batch tensors, shuffle buffer, padding, worker hand-off), one warm-up epoch and ``REPEATS``
timed ones. It reports the median and spread of the sustained rate (``samples_per_s``, ``tokens_per_s``: from
the first batch to the last), the whole-epoch rate including the workers' start (``epoch_tokens_per_s``; the
workers restart every epoch) and the time to the first batch. The baseline of the same run is reading the same
shards as raw tar members with plain ``webdataset`` (no checksum, no decoding): ``vs_raw_tar`` is the share of
the tar rate the DataModule keeps. ``bytes_per_token`` is the measured cache size
over the tokens it stores; DeepSpec's layout stores 30,726 bytes/token at this geometry.

Run: ``python benchmarks/datamodule_read.py`` (CPU, about twenty minutes; writes
``benchmarks/results/datamodule_read.json``).
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import webdataset as wds

from specdec.data.cache.format import CacheSample
from specdec.data.cache.manifest import CacheFingerprint
from specdec.data.cache.reader import cache_shard_urls
from specdec.data.cache.writer import TargetCacheWriter, build_cache
from specdec.data.datamodules import TargetCacheDataModule

RESULTS = Path(__file__).parent / "results" / "datamodule_read.json"
HIDDEN, LAYER_IDS = 2560, (1, 9, 17, 25, 33)
TOKENS_PER_CACHE, SUPERVISED_FRACTION, BATCH_TOKENS = 98_304, 0.6, 2048
SAMPLE_TOKENS = (512, 1024)
CODECS = ("bf16", "fp8_e4m3", "fp8_e4m3+zstd", "fp4_e2m1")
WORKERS = (0, 1, 2)
REPEATS = 5
DEEPSPEC_BYTES_PER_TOKEN = 30_726


def synthetic_samples(tokens: int) -> Iterator[CacheSample]:
    """Seeded samples of ``tokens`` tokens, produced one at a time so the cache, not the inputs, fills memory."""
    for index in range(TOKENS_PER_CACHE // tokens):
        generator = torch.Generator().manual_seed(index)
        loss_mask = torch.zeros(tokens, dtype=torch.bool)
        loss_mask[int(tokens * (1 - SUPERVISED_FRACTION)) :] = True
        yield CacheSample(
            key=f"bench:{index}",
            input_ids=torch.randint(0, 151_000, (tokens,), generator=generator),
            loss_mask=loss_mask,
            hidden_states=torch.randn(tokens, len(LAYER_IDS) * HIDDEN, generator=generator),
            last_hidden_state=torch.randn(int(loss_mask.sum()), HIDDEN, generator=generator),
        )


def write_cache(directory: Path, codec: str, tokens: int) -> int:
    fingerprint = CacheFingerprint(
        target="synthetic-qwen3-4b", layer_ids=LAYER_IDS, hidden_size=HIDDEN, max_length=tokens
    )
    writer = TargetCacheWriter(directory, fingerprint, codec, samples_per_shard=max(1, 4096 // tokens))
    build_cache(synthetic_samples(tokens), writer, progress=False)
    writer.finalize()
    return sum(path.stat().st_size for path in directory.iterdir() if path.is_file())


def rates(epoch: Callable[[], int]) -> list[float]:
    """Samples/s of ``REPEATS`` timed epochs."""
    measured = []
    for _ in range(REPEATS):
        started = time.perf_counter()
        count = epoch()
        measured.append(count / (time.perf_counter() - started))
    return measured


def raw_tar_epoch(directory: Path) -> int:
    dataset = wds.WebDataset(cache_shard_urls(directory), shardshuffle=False)
    return sum(1 for _ in dataset)


def datamodule_epochs(directory: Path, batch_size: int, num_workers: int) -> list[dict[str, float]]:
    """One warm-up and ``REPEATS`` timed epochs of one DataModule's train loader: samples, seconds, first batch."""
    datamodule = TargetCacheDataModule(str(directory), batch_size=batch_size, num_workers=num_workers)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    epochs = []
    for epoch in range(REPEATS + 1):
        loader.set_epoch(epoch)
        started = time.perf_counter()
        first = None
        count = 0
        for batch in loader:
            if first is None:
                first = time.perf_counter()
                first_size = batch["input_ids"].shape[0]
            count += batch["input_ids"].shape[0]
        ended = time.perf_counter()
        epochs.append(
            {
                "sustained": (count - first_size) / (ended - first),
                "epoch": count / (ended - started),
                "first_batch_s": first - started,
            }
        )
    return epochs[1:]


def summary(samples_per_s: list[float], tokens: int) -> dict[str, float]:
    median = statistics.median(samples_per_s)
    return {
        "samples_per_s": round(median, 1),
        "tokens_per_s": round(median * tokens),
        "spread": round((max(samples_per_s) - min(samples_per_s)) / median, 3),
    }


def read_summary(epochs: list[dict[str, float]], tokens: int) -> dict[str, float]:
    return {
        **summary([epoch["sustained"] for epoch in epochs], tokens),
        "epoch_tokens_per_s": round(statistics.median(epoch["epoch"] for epoch in epochs) * tokens),
        "first_batch_s": round(statistics.median(epoch["first_batch_s"] for epoch in epochs), 3),
    }


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for tokens in SAMPLE_TOKENS:
            for codec in CODECS:
                directory = Path(scratch) / f"{codec.replace('+', '_')}_{tokens}"
                size = write_cache(directory, codec, tokens)
                raw_tar_epoch(directory)  # warm the page cache so both readers see the same storage
                raw_rates = rates(lambda d=directory: raw_tar_epoch(d))
                batch_size = BATCH_TOKENS // tokens
                reads = {w: read_summary(datamodule_epochs(directory, batch_size, w), tokens) for w in WORKERS}
                raw = summary(raw_rates + rates(lambda d=directory: raw_tar_epoch(d)), tokens)  # before and after
                for workers, read in reads.items():
                    rows.append(
                        {
                            "sample_tokens": tokens,
                            "codec": codec,
                            "num_workers": workers,
                            "batch_size": batch_size,
                            "cache_bytes": size,
                            "bytes_per_token": round(size / TOKENS_PER_CACHE),
                            "vs_deepspec_bytes": round(size / TOKENS_PER_CACHE / DEEPSPEC_BYTES_PER_TOKEN, 3),
                            **read,
                            "raw_tar_samples_per_s": raw["samples_per_s"],
                            "raw_tar_spread": raw["spread"],
                            "vs_raw_tar": round(read["samples_per_s"] / raw["samples_per_s"], 3),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
                shutil.rmtree(directory)
    result = {
        "benchmark": "datamodule_read",
        "command": "python benchmarks/datamodule_read.py",
        "environment": {
            "machine": platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
        },
        "geometry": {"hidden_size": HIDDEN, "layer_ids": list(LAYER_IDS)},
        "tokens_per_cache": TOKENS_PER_CACHE,
        "supervised_fraction": SUPERVISED_FRACTION,
        "batch_tokens": BATCH_TOKENS,
        "feature_dtype": "bfloat16",
        "repeats": REPEATS,
        "deepspec_bytes_per_token": DEEPSPEC_BYTES_PER_TOKEN,
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    sys.exit(main())
