"""Target-cache bytes per token and codec error: specdec's layout per codec next to DeepSpec's 30,726 B/token.

Three measurements, one run (writes ``benchmarks/results/cache_bytes.json`` and prints the tables):

1. codec error on real activations: the tiny target's layer features and final-normed last hidden states on
   Python source it was trained on (per-token relative L2 and max-abs error, encoded bytes, zstd ratio);
2. a real cache written at Qwen3-4B geometry (H = 2560, 5 layers) from synthetic features, 1,000-token samples
   with 60 % supervised positions: measured bytes per token per codec, against the estimator;
3. the estimator's table for DeepSpec's data set size (1.235 M samples × 1,000 tokens), zstd rows using the
   compression ratios measured in 1 (activations of a real 4B target will compress differently).

Run: ``python benchmarks/cache_bytes.py`` (CPU, about a minute).
"""

from __future__ import annotations

import inspect
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from specdec.data.cache.codecs import CODECS, decode_tensor, encode_tensor, measure_codec_error
from specdec.data.cache.estimate import compare_layouts, estimate_cache_size, format_estimates
from specdec.data.cache.format import CacheSample
from specdec.data.cache.manifest import CacheFingerprint
from specdec.data.cache.writer import TargetCacheWriter, build_cache
from specdec.targets import TINY_TARGET, capture_target_features, load_target

RESULTS = Path(__file__).parent / "results" / "cache_bytes.json"
TINY_LAYERS = (0, 1, 2, 3, 4)
SOURCES = ("json.decoder", "textwrap", "fractions", "heapq")
TOKENS_PER_SOURCE = 512
QWEN3_4B = {"hidden_size": 2560, "layer_ids": (1, 9, 17, 25, 33)}
SAMPLE_TOKENS, SUPERVISED_FRACTION, SAMPLES = 1000, 0.6, 3
DEEPSPEC_SAMPLES = 1_235_000
ALL_SPECS = [*CODECS, *(f"{name}+zstd" for name in CODECS)]


def tiny_features() -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, 5·256] and last hidden states [N, 256] of the tiny target on stdlib source."""
    import importlib

    target = load_target(TINY_TARGET, device="cpu")
    features, last = [], []
    for name in SOURCES:
        text = inspect.getsource(importlib.import_module(name))
        input_ids = target.tokenizer(text, return_tensors="pt")["input_ids"][:, :TOKENS_PER_SOURCE]
        captured = capture_target_features(target.model, input_ids, TINY_LAYERS)
        features.append(captured.hidden_states[0])
        last.append(captured.last_hidden_state[0])
    return torch.cat(features), torch.cat(last)


def per_layer_rel_l2(x: torch.Tensor, spec: str, hidden: int, scale_group: int | None) -> list[float]:
    """Mean per-token relative L2 error of each layer's block: where a per-token scale hurts, it shows here."""
    error = decode_tensor(encode_tensor(x, spec, scale_group=scale_group)) - x
    blocks = []
    for start in range(0, x.shape[1], hidden):
        block = slice(start, start + hidden)
        blocks.append(float((error[:, block].norm(dim=-1) / x[:, block].norm(dim=-1)).mean()))
    return blocks


def codec_errors() -> dict:
    features, last = tiny_features()
    hidden = last.shape[1]
    rows = []
    for spec in ALL_SPECS:
        entry = {"codec": spec}
        for name, x, group in (("features", features, hidden), ("last_hidden", last, None)):
            stats = measure_codec_error(x, spec, scale_group=group)
            raw = measure_codec_error(x, spec.removesuffix("+zstd"), scale_group=group)
            entry[name] = {
                "rel_l2_mean": stats.rel_l2_mean,
                "rel_l2_max": stats.rel_l2_max,
                "max_abs_mean": stats.max_abs_mean,
                "max_abs_max": stats.max_abs_max,
                "bytes_per_token": stats.bytes_per_row,
                "zstd_ratio": raw.bytes_per_row / stats.bytes_per_row,
            }
        rows.append(entry)
    fp8_scales = {
        "per_token": per_layer_rel_l2(features, "fp8_e4m3", hidden, None),
        "per_token_per_layer": per_layer_rel_l2(features, "fp8_e4m3", hidden, hidden),
    }
    return {
        "target": TINY_TARGET,
        "layer_ids": list(TINY_LAYERS),
        "hidden_size": hidden,
        "tokens": features.shape[0],
        "text": f"first {TOKENS_PER_SOURCE} tokens of the source of {', '.join(SOURCES)}",
        "feature_abs_max": float(features.abs().max()),
        "codecs": rows,
        "fp8_rel_l2_by_layer": fp8_scales,
    }


def synthetic_sample(index: int, hidden: int, layers: int) -> CacheSample:
    generator = torch.Generator().manual_seed(index)
    prompt = round(SAMPLE_TOKENS * (1 - SUPERVISED_FRACTION))
    return CacheSample(
        key=f"bench:{index}",
        input_ids=torch.randint(0, 151_936, (SAMPLE_TOKENS,), generator=generator),
        loss_mask=torch.arange(SAMPLE_TOKENS) >= prompt,
        hidden_states=torch.randn(SAMPLE_TOKENS, layers * hidden, generator=generator) * 4,
        last_hidden_state=torch.randn(SAMPLE_TOKENS, hidden, generator=generator),
        source={"file": "bench.jsonl", "line": index},
    )


def measured_bytes_at_4b(workdir: Path) -> list[dict]:
    hidden, layer_ids = QWEN3_4B["hidden_size"], QWEN3_4B["layer_ids"]
    fingerprint = CacheFingerprint(target="Qwen/Qwen3-4B", layer_ids=layer_ids, hidden_size=hidden, max_length=4096)
    samples = [synthetic_sample(i, hidden, len(layer_ids)) for i in range(SAMPLES)]
    rows = []
    for codec in CODECS:
        writer = TargetCacheWriter(workdir / codec, fingerprint, codec)
        started = time.perf_counter()
        build_cache(samples, writer, progress=False)
        totals = writer.finalize()["totals"]
        seconds = time.perf_counter() - started
        estimate = estimate_cache_size(
            hidden,
            len(layer_ids),
            tokens=[SAMPLE_TOKENS] * SAMPLES,
            supervised_fraction=totals["supervised_tokens"] / totals["tokens"],
            codec=codec,
        )
        rows.append(
            {
                "codec": codec,
                "measured_bytes_per_token": totals["bytes_per_token"],
                "estimated_bytes_per_token": estimate.bytes_per_token,
                "estimate_error": estimate.total_bytes / totals["bytes"] - 1,
                "vs_deepspec_30726": totals["bytes_per_token"] / 30_726,
                "write_tokens_per_s": totals["tokens"] / seconds,
            }
        )
    return rows


def main() -> None:
    errors = codec_errors()
    with tempfile.TemporaryDirectory() as workdir:
        measured = measured_bytes_at_4b(Path(workdir))
    ratios = {row["codec"]: row["features"]["zstd_ratio"] for row in errors["codecs"] if row["codec"].endswith("zstd")}
    estimates = compare_layouts(
        QWEN3_4B["hidden_size"],
        len(QWEN3_4B["layer_ids"]),
        num_samples=DEEPSPEC_SAMPLES,
        avg_tokens=SAMPLE_TOKENS,
        supervised_fraction=SUPERVISED_FRACTION,
        codecs=ALL_SPECS,
        compression_ratios=ratios,
    )
    results = {
        "benchmark": "cache_bytes",
        "command": "python benchmarks/cache_bytes.py",
        "environment": {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine()},
        "geometry": {**QWEN3_4B, "layer_ids": list(QWEN3_4B["layer_ids"])},
        "sample_tokens": SAMPLE_TOKENS,
        "supervised_fraction": SUPERVISED_FRACTION,
        "deepspec_bytes_per_token": estimates[0].token_bytes,
        "measured_at_qwen3_4b": measured,
        "estimate_deepspec_dataset": [
            {
                "layout": estimate.layout,
                "bytes_per_token_data": estimate.token_bytes,
                "bytes_per_token_all_in": estimate.bytes_per_token,
                "total_bytes": estimate.total_bytes,
                "vs_deepspec": estimate.total_bytes / estimates[0].total_bytes,
                "zstd_ratio_assumed": ratios.get(estimate.layout),
            }
            for estimate in estimates
        ],
        "codec_error_tiny_target": errors,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")

    print(f"codec error on {errors['tokens']} tokens of {TINY_TARGET} features (layers {list(TINY_LAYERS)})")
    print(f"{'codec':<15} {'feat relL2 mean':>15} {'max':>8} {'feat maxabs':>11} {'last relL2':>10} {'B/token':>8}")
    for row in errors["codecs"]:
        feat, last = row["features"], row["last_hidden"]
        print(
            f"{row['codec']:<15} {feat['rel_l2_mean']:>15.2e} {feat['rel_l2_max']:>8.2e} {feat['max_abs_max']:>11.3f} "
            f"{last['rel_l2_mean']:>10.2e} {feat['bytes_per_token']:>8.0f}"
        )
    print(f"\nmeasured at Qwen3-4B geometry ({SAMPLES} × {SAMPLE_TOKENS} tokens, {SUPERVISED_FRACTION:.0%} supervised)")
    for row in measured:
        print(
            f"{row['codec']:<10} {row['measured_bytes_per_token']:>10,.1f} B/token  "
            f"estimate {row['estimated_bytes_per_token']:>10,.1f}  ({row['vs_deepspec_30726']:.3f}× DeepSpec)"
        )
    print()
    print(format_estimates(estimates))
    print(f"\nwrote {RESULTS}")


if __name__ == "__main__":
    main()
