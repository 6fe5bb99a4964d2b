"""Target-cache read rate through ``TargetCacheDataModule`` at Qwen3-4B geometry, per codec and worker count.

A cache of synthetic features (H = 2560, 5 captured layers, 512-token samples, 60 % supervised) is written per
codec; each configuration then streams one epoch of micro-batches (decode, shuffle buffer, padding) and reports
samples/s and tokens/s. The baseline of the same run is reading the same shards as raw tar members with plain
``webdataset`` (no decoding): the ``vs_raw_tar`` ratio is the share of the disk/tar rate the DataModule keeps.

Run: ``python benchmarks/datamodule_read.py`` (CPU, about two minutes; writes
``benchmarks/results/datamodule_read.json``).
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
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
SAMPLES, TOKENS, SUPERVISED_FRACTION, BATCH_SIZE = 48, 512, 0.6, 4
CODECS = ("bf16", "fp8_e4m3", "fp8_e4m3+zstd")
WORKERS = (0, 2)


def synthetic_samples() -> list[CacheSample]:
    generator = torch.Generator().manual_seed(0)
    samples = []
    for index in range(SAMPLES):
        loss_mask = torch.zeros(TOKENS, dtype=torch.bool)
        loss_mask[int(TOKENS * (1 - SUPERVISED_FRACTION)) :] = True
        samples.append(
            CacheSample(
                key=f"bench:{index}",
                input_ids=torch.randint(0, 151_000, (TOKENS,), generator=generator),
                loss_mask=loss_mask,
                hidden_states=torch.randn(TOKENS, len(LAYER_IDS) * HIDDEN, generator=generator),
                last_hidden_state=torch.randn(int(loss_mask.sum()), HIDDEN, generator=generator),
            )
        )
    return samples


def write_cache(directory: Path, codec: str, samples: list[CacheSample]) -> int:
    fingerprint = CacheFingerprint(
        target="synthetic-qwen3-4b", layer_ids=LAYER_IDS, hidden_size=HIDDEN, max_length=TOKENS
    )
    writer = TargetCacheWriter(directory, fingerprint, codec, samples_per_shard=8)
    build_cache(samples, writer, progress=False)
    writer.finalize()
    return sum(path.stat().st_size for path in directory.glob("*.tar"))


def timed(fn) -> tuple[float, int]:
    started = time.perf_counter()
    count = fn()
    return time.perf_counter() - started, count


def raw_tar_epoch(directory: Path) -> int:
    dataset = wds.WebDataset(cache_shard_urls(directory), shardshuffle=False)
    return sum(1 for _ in dataset)


def datamodule_epoch(directory: Path, num_workers: int) -> int:
    datamodule = TargetCacheDataModule(str(directory), batch_size=BATCH_SIZE, num_workers=num_workers)
    datamodule.setup("fit")
    count = 0
    for batch in datamodule.train_dataloader():
        count += batch["input_ids"].shape[0]
    return count


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    samples = synthetic_samples()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for codec in CODECS:
            directory = Path(scratch) / codec.replace("+", "_")
            size = write_cache(directory, codec, samples)
            raw_tar_epoch(directory)  # warm the page cache so both readers see the same storage
            raw_seconds, raw_count = timed(lambda d=directory: raw_tar_epoch(d))
            for workers in WORKERS:
                seconds, count = timed(lambda d=directory, w=workers: datamodule_epoch(d, w))
                rows.append(
                    {
                        "codec": codec,
                        "num_workers": workers,
                        "cache_bytes": size,
                        "samples": count,
                        "seconds": round(seconds, 3),
                        "samples_per_s": round(count / seconds, 1),
                        "tokens_per_s": round(count * TOKENS / seconds),
                        "raw_tar_samples_per_s": round(raw_count / raw_seconds, 1),
                        "vs_raw_tar": round((count / seconds) / (raw_count / raw_seconds), 3),
                    }
                )
                print(json.dumps(rows[-1]))
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
        "sample_tokens": TOKENS,
        "supervised_fraction": SUPERVISED_FRACTION,
        "batch_size": BATCH_SIZE,
        "rows": rows,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
