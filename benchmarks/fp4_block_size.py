"""Choosing the 4-bit feature codec: value format × block size × block-scale format, at a fixed byte budget.

Each candidate quantises ``[tokens, H]`` matrices block by block (``block`` consecutive columns share one scale)
and is scored by the mean per-token relative L2 error and the bytes per token it would store at Qwen3-4B
geometry (H = 2560, 5 layers of features at every token, the last hidden state at 60 % of them). The budget is a
quarter of DeepSpec's 30,726 B/token, ≤ 7,700. Candidates:

* value format: E2M1 (fp4: 0, ±0.5 … ±6) or symmetric int4 (−7 … 7);
* block scale: fp16, e4m3 relative to one fp32 scale per layer of the token (two levels, as in NVFP4), or e8m0
  (a power of two, as in MXFP4);
* block size 16, 32, 64, 128.

Data: Gaussian, Student-t (3 degrees of freedom: heavy tails), Gaussian with three "massive activation" channels
at 300× (as LLM residual streams have), and the tiny target's real layer features. The shipped codec
(``fp4_e2m1``: E2M1, e4m3 block scales, block 32) is measured through specdec itself on the same data, which
checks that the reference quantiser here and the codec agree.

Run: ``python benchmarks/fp4_block_size.py`` (CPU, under a minute; writes ``benchmarks/results/fp4_block_size.json``).
"""

from __future__ import annotations

import inspect
import json
import platform
from pathlib import Path

import torch

from specdec.data.cache.codecs import E2M1_VALUES, FP4_BLOCK, FP8_MAX, measure_codec_error
from specdec.targets import TINY_TARGET, capture_target_features, load_target

RESULTS = Path(__file__).parent / "results" / "fp4_block_size.json"
HIDDEN, LAYERS, SUPERVISED_FRACTION = 2560, 5, 0.6
BUDGET = 7_700
PER_TOKEN_OVERHEAD = 13  # int32 id + uint8 loss mask + container overhead amortised over ~1,000-token samples
BLOCKS = (16, 32, 64, 128)
SCALE_FORMATS = {"fp16": 2, "e4m3": 1, "e8m0": 1}  # bytes per block scale
VALUE_FORMATS = {"e2m1": 6.0, "int4": 7.0}  # largest magnitude


def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    values = torch.tensor(E2M1_VALUES)
    index = torch.bucketize(y.abs(), (values[1:] + values[:-1]) / 2)
    return torch.sign(y) * values[index]


def block_scales(amax: torch.Tensor, top: float, scale_format: str) -> torch.Tensor:
    """The scale of each block ``[rows, blocks]`` as stored (after rounding to its format)."""
    wanted = amax / top
    if scale_format == "fp16":
        scales = wanted.half().float()
    elif scale_format == "e4m3":  # one fp32 scale per row maps the largest block scale to e4m3's top
        row = (wanted.amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        scales = (wanted / row).to(torch.float8_e4m3fn).float() * row
    else:  # e8m0: the next power of two, so the block maximum never clips
        scales = torch.exp2(torch.ceil(torch.log2(wanted.clamp_min(torch.finfo(torch.float32).tiny))))
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def quantise(x: torch.Tensor, block: int, value_format: str, scale_format: str) -> torch.Tensor:
    rows, cols = x.shape
    top = VALUE_FORMATS[value_format]
    blocks = x.reshape(rows, cols // block, block)
    scales = block_scales(blocks.abs().amax(dim=-1), top, scale_format).unsqueeze(-1)
    scaled = (blocks / scales).clamp(-top, top)
    values = e2m1_round(scaled) if value_format == "e2m1" else scaled.round()
    return (values * scales).reshape(rows, cols)


def bytes_per_token(block: int, scale_format: str) -> float:
    per_value = 0.5 + SCALE_FORMATS[scale_format] / block
    row_scale = 4 if scale_format == "e4m3" else 0
    per_row = HIDDEN * per_value + row_scale
    return LAYERS * per_row + SUPERVISED_FRACTION * per_row + PER_TOKEN_OVERHEAD


def rel_l2(x: torch.Tensor, decoded: torch.Tensor) -> float:
    return float(((decoded - x).norm(dim=-1) / x.norm(dim=-1)).mean())


def tiny_target_features() -> torch.Tensor:
    """The tiny target's 5 layer outputs on stdlib source, one layer per row ``[tokens · 5, 256]``."""
    import json as source_module

    target = load_target(TINY_TARGET, device="cpu")
    text = inspect.getsource(source_module.decoder)
    input_ids = target.tokenizer(text, return_tensors="pt")["input_ids"][:, :512]
    features = capture_target_features(target.model, input_ids, (0, 1, 2, 3, 4)).hidden_states[0]
    return features.reshape(-1, features.shape[-1] // 5)


def datasets() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    massive = torch.randn(256, HIDDEN, generator=generator)
    massive[:, [7, 900, 1801]] *= 300
    student_t = torch.distributions.StudentT(3.0).sample((256, HIDDEN))
    return {
        "gaussian": torch.randn(256, HIDDEN, generator=generator),
        "student_t3": student_t,
        "massive_channels": massive,
        "tiny_target_layers": tiny_target_features(),
    }


def main() -> None:
    torch.manual_seed(0)
    data = datasets()
    rows = []
    for value_format in VALUE_FORMATS:
        for scale_format in SCALE_FORMATS:
            for block in BLOCKS:
                size = bytes_per_token(block, scale_format)
                row = {
                    "values": value_format,
                    "block_scale": scale_format,
                    "block": block,
                    "bytes_per_token": round(size),
                    "within_budget": size <= BUDGET,
                }
                row.update(
                    {
                        name: round(rel_l2(x, quantise(x, block, value_format, scale_format)), 4)
                        for name, x in data.items()
                    }
                )
                rows.append(row)
                print(json.dumps(row))
    shipped = {
        name: round(measure_codec_error(x, "fp4_e2m1", scale_group=x.shape[1]).rel_l2_mean, 4)
        for name, x in data.items()
    }
    reference = next(r for r in rows if (r["values"], r["block_scale"], r["block"]) == ("e2m1", "e4m3", FP4_BLOCK))
    best = min((r for r in rows if r["within_budget"]), key=lambda r: sum(r[name] for name in data))
    result = {
        "benchmark": "fp4_block_size",
        "command": "python benchmarks/fp4_block_size.py",
        "environment": {"machine": platform.machine(), "python": platform.python_version(), "torch": torch.__version__},
        "geometry": {"hidden_size": HIDDEN, "layers": LAYERS, "supervised_fraction": SUPERVISED_FRACTION},
        "budget_bytes_per_token": BUDGET,
        "metric": "mean per-token relative L2 error",
        "rows": rows,
        "best_within_budget": {key: best[key] for key in ("values", "block_scale", "block")},
        "shipped_codec": {
            "name": "fp4_e2m1",
            "block": FP4_BLOCK,
            "rel_l2": shipped,
            "reference_rel_l2": {name: reference[name] for name in data},
        },
    }
    print(json.dumps(result["best_within_budget"]), json.dumps(result["shipped_codec"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
