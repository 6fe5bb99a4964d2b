"""Feature codecs: exact where they promise it, bounded error where they do not, loud on bad bytes."""

import inspect
import json
import struct

import numpy as np
import pytest
import torch

from specdec.data.cache import codecs
from specdec.data.cache.codecs import (
    CODECS,
    DECODE_ROWS,
    FP4_BLOCK,
    FP4_MAX,
    FP8_MAX,
    HEADER_BYTES,
    CodecError,
    CodecSpec,
    decode_tensor,
    decode_tensor_into,
    decode_tensor_reference,
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
    bounds = {"bf16": 3e-3, "fp16": 4e-4, "fp8_e4m3": 0.035, "fp4_e2m1": 0.12}  # mean relative L2 per token
    # largest error relative to the tensor's peak: fp4's top binade steps from 4 to 6, half a step is 1/6 of a block
    peak_bounds = {"fp4_e2m1": 1 / 6}
    for spec in ALL_SPECS:
        name = CodecSpec.parse(spec).name
        for x, group in ((features, hidden), (last_hidden, None)):
            stats = measure_codec_error(x, spec, scale_group=group)
            assert stats.rel_l2_mean < bounds[name], (spec, stats)
            assert stats.rel_l2_max < 1.5 * bounds[name], (spec, stats)
            assert stats.max_abs_max < peak_bounds.get(name, 0.07) * float(x.abs().max()), (spec, stats)
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


@pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_fast_decode_into_equals_the_plain_reference(spec, compiled, monkeypatch):
    """Both fast decoders — the numba kernels and the chunked PyTorch lookup — agree bit for bit with the plain
    reading of the documented layout, for every output dtype and for destinations whose rows are not contiguous."""
    monkeypatch.setattr(codecs, "USE_COMPILED_KERNELS", compiled)
    assert (codecs.compiled_kernels() is not None) == compiled  # numba is a dependency: its path must be the one run
    x = _random(DECODE_ROWS * 2 + 5, 96, seed=3)  # several decode chunks and a ragged last one
    x[1] = 0.0
    x[2, :32] *= 1e-7  # a quiet block next to loud ones
    data = encode_tensor(x, spec, scale_group=None if spec.startswith("bf16") else 48)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        reference = decode_tensor_reference(data, dtype)
        out = torch.full(tuple(x.shape), float("nan"), dtype=dtype)
        decode_tensor_into(bytearray(data), out)  # a writable buffer, as the cache reader passes
        bits = torch.int16 if dtype.itemsize == 2 else torch.int32
        assert torch.equal(out.view(bits), reference.view(bits)), dtype
        assert torch.equal(decode_tensor(data, dtype), out)
        wide = torch.full((x.shape[0], 2 * x.shape[1]), float("nan"), dtype=dtype)
        decode_tensor_into(data, wide[:, 1 : 1 + x.shape[1]])  # a destination whose rows are not contiguous
        assert torch.equal(wide[:, 1 : 1 + x.shape[1]], out) and wide[:, 0].isnan().all()
    with pytest.raises(CodecError, match="destination"):
        decode_tensor_into(data, torch.empty(3, 96))


def test_fp4_layout_is_what_the_docs_say():
    x = _random(3, 8, seed=4)
    data = encode_tensor(x, "fp4_e2m1", scale_group=4)
    magic, version, codec_id, flags, block, rows, cols, group = struct.unpack("<4sBBBBIII", data[:HEADER_BYTES])
    assert (magic, version, codec_id, flags, block, rows, cols, group) == (b"SDCT", 1, 4, 0, 4, 3, 8, 4)
    payload = data[HEADER_BYTES:]
    assert len(payload) == payload_bytes("fp4_e2m1", 3, 8, 4) == 3 * 2 * 4 + 3 * 2 + 3 * 4
    group_scales = np.frombuffer(payload[:24], dtype="<f4").reshape(3, 2)
    block_scales = torch.frombuffer(bytearray(payload[24:30]), dtype=torch.float8_e4m3fn).float().numpy()
    packed = np.frombuffer(payload[30:], dtype=np.uint8).reshape(3, 4)
    nibbles = np.stack([packed & 15, packed >> 4], axis=-1).reshape(3, 8)
    magnitude = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=np.float32)[nibbles & 7]
    values = np.where(nibbles & 8, -magnitude, magnitude)
    scale = (block_scales.reshape(3, 2) * group_scales).astype(np.float32)
    by_hand = values * np.repeat(scale, 4, axis=1)
    assert np.array_equal(by_hand, decode_tensor(data).numpy())
    assert read_header(data).block == 4


def test_fp4_error_is_within_half_a_step_of_each_block():
    small, large = _random(40, 64, seed=5) * 1e-3, _random(40, 64, seed=6) * 1e3
    x = torch.cat([small, large], dim=-1)
    x[7] = 0.0
    decoded = decode_tensor(encode_tensor(x, "fp4_e2m1", scale_group=64))
    blocks = x.reshape(40, -1, FP4_BLOCK)
    error = (decoded.reshape(40, -1, FP4_BLOCK) - blocks).abs().amax(dim=-1)
    # the widest E2M1 step is 4 → 6 (a third of the block maximum), plus e4m3's rounding of the block scale
    assert bool((error <= blocks.abs().amax(dim=-1) / FP4_MAX * (1 + 2**-3)).all())
    assert torch.equal(decoded[7], torch.zeros(128))
    quiet = float(((decoded[:, :64] - small).norm(dim=-1) / small.norm(dim=-1)).mean())
    assert quiet < 0.15  # the quiet layer keeps its own scales next to a loud one (one scale would zero it)
    with pytest.raises(ValueError, match="not even"):
        encode_tensor(torch.zeros(2, 5), "fp4_e2m1")


def test_fp4_bytes_per_token_at_qwen3_4b_geometry():
    """Features and last hidden state at 4 bits come to 0.53 bytes per value: a quarter of DeepSpec's bf16."""
    hidden, layers = 2560, 5
    features = payload_bytes("fp4_e2m1", 1, layers * hidden, hidden)
    last = payload_bytes("fp4_e2m1", 1, hidden, hidden)
    assert features == layers * hidden // 2 + layers * hidden // FP4_BLOCK + layers * 4 == 6820
    assert last == 1364
