"""Feature codecs: exact where they promise it, bounded error where they do not, loud on bad bytes."""

import inspect
import json
import struct

import numpy as np
import pytest
import torch

from specdec.data.cache.codecs import (
    CODECS,
    FP8_MAX,
    HEADER_BYTES,
    CodecError,
    CodecSpec,
    decode_tensor,
    encode_tensor,
    measure_codec_error,
    payload_bytes,
    read_header,
)
from specdec.targets import TINY_TARGET, capture_target_features, load_target

TINY_LAYERS = (0, 1, 2, 3, 4)
ALL_SPECS = [*CODECS, *(f"{name}+zstd" for name in CODECS)]


@pytest.fixture(scope="module")
def tiny_features() -> tuple[torch.Tensor, torch.Tensor]:
    """Layer features and last hidden states of the tiny target on 384 tokens of real Python source."""
    target = load_target(TINY_TARGET, device="cpu")
    text = inspect.getsource(json.decoder)
    input_ids = target.tokenizer(text, return_tensors="pt")["input_ids"][:, :384]
    features = capture_target_features(target.model, input_ids, TINY_LAYERS)
    return features.hidden_states[0], features.last_hidden_state[0]


def _random(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 4


def test_bf16_round_trip_is_bit_exact():
    x = _random(33, 96).to(torch.bfloat16)
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-40, -3e38])  # signed zeros, a subnormal, a huge value
    for spec in ("bf16", "bf16+zstd"):
        decoded = decode_tensor(encode_tensor(x, spec), torch.bfloat16)
        assert torch.equal(decoded.view(torch.int16), x.view(torch.int16)), spec
        assert torch.equal(decode_tensor(encode_tensor(x, spec), torch.float32), x.float())


def test_fp16_round_trip_is_exact_for_fp16_values_and_refuses_overflow():
    x = _random(8, 40).to(torch.float16)
    assert torch.equal(decode_tensor(encode_tensor(x, "fp16"), torch.float16), x)
    with pytest.raises(ValueError, match="exceeds the fp16 range"):
        encode_tensor(torch.full((2, 4), 1e5), "fp16")


def test_fp8_keeps_the_row_maximum_and_zero_rows_exactly():
    x = _random(16, 64)
    x[3] = 0.0
    decoded = decode_tensor(encode_tensor(x, "fp8_e4m3"))
    assert torch.equal(decoded[3], torch.zeros(64))
    peak = x.abs().argmax(dim=-1)
    rows = torch.arange(16)
    torch.testing.assert_close(decoded[rows, peak], x[rows, peak], rtol=1e-6, atol=0)
    relative = (decoded - x).abs() / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
    assert float(relative.max()) <= 2**-4  # half an e4m3 step at the top binade, relative to the row maximum


def test_fp8_scale_groups_protect_small_layers_next_to_large_ones():
    small, large = _random(12, 32, seed=1) * 1e-3, _random(12, 32, seed=2) * 1e3
    x = torch.cat([small, large], dim=-1)  # one token's features: a quiet layer beside a loud one
    per_row = decode_tensor(encode_tensor(x, "fp8_e4m3"))[:, :32]
    per_layer = decode_tensor(encode_tensor(x, "fp8_e4m3", scale_group=32))[:, :32]
    error_row = float(((per_row - small).norm(dim=-1) / small.norm(dim=-1)).mean())
    error_layer = float(((per_layer - small).norm(dim=-1) / small.norm(dim=-1)).mean())
    assert error_layer < 0.04 < 0.5 < error_row


def test_header_layout_is_what_the_docs_say():
    x = _random(5, 12)
    data = encode_tensor(x, "fp8_e4m3+zstd", scale_group=4)
    magic, version, codec_id, flags, reserved, rows, cols, group = struct.unpack("<4sBBBBIII", data[:HEADER_BYTES])
    assert (magic, version, codec_id, flags, reserved, rows, cols, group) == (b"SDCT", 1, 3, 1, 0, 5, 12, 4)
    header = read_header(data)
    assert (header.codec, header.zstd, header.rows, header.cols, header.scale_group) == ("fp8_e4m3", True, 5, 12, 4)
    assert header.raw_payload_bytes == payload_bytes("fp8_e4m3", 5, 12, 4) == 5 * 12 + 5 * 3 * 4
    plain = encode_tensor(x, "bf16")
    assert len(plain) == HEADER_BYTES + 5 * 12 * 2
    as_float = (np.frombuffer(plain[HEADER_BYTES:], dtype="<u2").astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(as_float.reshape(5, 12), x.to(torch.bfloat16).float().numpy())


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_empty_matrices_round_trip(spec):
    for shape in ((0, 16), (3, 0)):
        decoded = decode_tensor(encode_tensor(torch.zeros(shape), spec))
        assert decoded.shape == shape


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="unknown feature codec"):
        CodecSpec("int4")
    with pytest.raises(ValueError, match="only option after"):
        CodecSpec.parse("bf16+gzip")
    with pytest.raises(ValueError, match=r"\[rows, cols\] matrix"):
        encode_tensor(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="floating-point"):
        encode_tensor(torch.zeros(2, 3, dtype=torch.int32))
    bad = torch.zeros(4, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="row 2 holds a NaN"):
        encode_tensor(bad, "fp8_e4m3")
    with pytest.raises(ValueError, match="does not divide"):
        encode_tensor(torch.zeros(2, 10), "fp8_e4m3", scale_group=3)


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_damaged_bytes_raise_codec_errors(spec):
    data = encode_tensor(_random(6, 32), spec)
    with pytest.raises(CodecError, match="magic"):
        decode_tensor(b"XXXX" + data[4:])
    with pytest.raises(CodecError):
        decode_tensor(data[:-7])
    with pytest.raises(CodecError, match="shorter than"):
        decode_tensor(data[:10])
    with pytest.raises(CodecError, match="unknown codec"):
        decode_tensor(data[:5] + b"\x09" + data[6:])


def test_extensions_and_names():
    assert CodecSpec.parse("fp8_e4m3+zstd").extension == "fp8_e4m3.zst"
    assert CodecSpec.parse("bf16").extension == "bf16"
    assert str(CodecSpec("fp16", zstd=True)) == "fp16+zstd"


def test_codec_errors_on_tiny_target_features(tiny_features):
    """The measured error of each codec on real activations stays at its format's rounding level."""
    features, last_hidden = tiny_features
    hidden = last_hidden.shape[-1]
    bounds = {"bf16": 3e-3, "fp16": 4e-4, "fp8_e4m3": 0.035}  # mean relative L2 per token
    for spec in ALL_SPECS:
        name = CodecSpec.parse(spec).name
        for x, group in ((features, hidden), (last_hidden, None)):
            stats = measure_codec_error(x, spec, scale_group=group)
            assert stats.rel_l2_mean < bounds[name], (spec, stats)
            assert stats.rel_l2_max < 1.5 * bounds[name], (spec, stats)
            assert stats.max_abs_max < 0.07 * float(x.abs().max()), (spec, stats)
    exact = features.to(torch.bfloat16)
    assert measure_codec_error(exact, "bf16").rel_l2_max == 0.0
    raw = measure_codec_error(features, "bf16").bytes_per_row
    assert measure_codec_error(features, "bf16+zstd").bytes_per_row < raw  # real activations do compress
    fp8 = measure_codec_error(features, "fp8_e4m3", scale_group=hidden).bytes_per_row
    assert fp8 == pytest.approx(features.shape[1] + 4 * len(TINY_LAYERS) + HEADER_BYTES / features.shape[0])


def test_fp8_saturation_bound():
    x = torch.tensor([[FP8_MAX * 3, -1.0, 0.5]])
    decoded = decode_tensor(encode_tensor(x, "fp8_e4m3"))
    assert torch.isfinite(decoded).all() and float(decoded[0, 0]) == pytest.approx(FP8_MAX * 3)
