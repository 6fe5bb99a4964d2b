"""Export round trips (specdec → DeepSpec / vLLM / SGLang → specdec), config contracts, validators, refusals."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3Config

from specdec.drafters import DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter
from specdec.export import (
    ExportProvenance,
    ExportValidationError,
    UnsupportedDrafterError,
    check_export_parity,
    export_and_check,
    export_drafter,
    expressible_formats,
    find_problems,
    load_deepspec,
    load_export,
    validate_export,
)
from specdec.targets import TargetHead

VOCAB, HIDDEN, TARGET_LAYERS = 64, 32, 6
PROVENANCE = ExportProvenance(target="org/tiny-target")


pytestmark = pytest.mark.usefixtures("one_thread")


def target_head(width: int = HIDDEN) -> TargetHead:
    generator = torch.Generator().manual_seed(5)
    embed, head = torch.randn(VOCAB, width, generator=generator), torch.randn(VOCAB, width, generator=generator)
    return TargetHead(embed, head, tied=False, embed_key="embed_tokens.weight", lm_head_key="lm_head.weight")


def _perturb(module: torch.nn.Module) -> None:
    """Random norms and weights: a freshly initialised norm (all ones) would hide a swapped or dropped tensor."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))


def dspark(**overrides) -> DSparkDrafter:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        target_layer_ids=[-1, 1, 3],
        target_num_hidden_layers=TARGET_LAYERS,
        block_size=4,
        num_anchors=6,
        markov_rank=8,
        mask_token_id=VOCAB - 1,
        attention_backend="sdpa",
    )
    fields.update(overrides)
    torch.manual_seed(0)
    drafter = DSparkDrafter(DSparkConfig(**fields))
    _perturb(drafter)
    drafter.attach_target_head(target_head(fields.get("target_hidden_size") or HIDDEN))
    return drafter.eval()


def dflash(convention: str, **overrides) -> DSparkDrafter:
    return dspark(markov_rank=0, enable_confidence_head=False, anchor_convention=convention, **overrides)


def eagle3(draft_vocab_size: int | None = None, **overrides) -> Eagle3Drafter:
    fields = dict(
        vocab_size=VOCAB,
        draft_vocab_size=draft_vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=48,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        target_layer_ids=[0, 2, 4],
        target_num_hidden_layers=TARGET_LAYERS,
        ttt_length=3,
        attention_backend="sdpa",
    )
    fields.update(overrides)
    torch.manual_seed(0)
    drafter = Eagle3Drafter(Eagle3Config(**fields))
    _perturb(drafter)
    drafter.attach_target_head(target_head())
    if drafter.config.reduced_vocabulary:
        kept = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(2))[: drafter.config.draft_vocab_size]
        drafter.set_vocabulary_mapping(kept.sort().values)
    return drafter.eval()


DRAFTERS = {
    "dspark": (lambda: dspark(), {"deepspec", "vllm", "sglang"}),
    "dspark-no-confidence": (lambda: dspark(enable_confidence_head=False), {"deepspec", "vllm", "sglang"}),
    "dspark-gated": (lambda: dspark(markov_head_type="gated"), {"deepspec"}),
    "dspark-rnn": (lambda: dspark(markov_head_type="rnn"), {"deepspec"}),
    "dspark-zlab": (lambda: dspark(anchor_convention="zlab", enable_confidence_head=False), {"vllm"}),
    "dflash-deepspec": (lambda: dflash("deepspec"), {"deepspec", "vllm", "sglang"}),
    "dflash-zlab": (lambda: dflash("zlab"), {"vllm", "sglang"}),
    "gemma4-dspark": (
        lambda: dspark(block_style="gemma4", embedding_multiplier=math.sqrt(HIDDEN), final_logit_softcapping=30.0),
        {"deepspec"},
    ),
    "gemma4-dspark-k-eq-v": (
        lambda: dspark(block_style="gemma4", attention_k_eq_v=True, embedding_multiplier=math.sqrt(HIDDEN)),
        {"deepspec"},
    ),
    "eagle3-full": (lambda: eagle3(), {"deepspec", "vllm"}),
    "eagle3-reduced": (lambda: eagle3(draft_vocab_size=24), {"vllm"}),
    "eagle3-llama-full": (lambda: eagle3(qk_norm=False), {"vllm", "sglang"}),
    "eagle3-llama-reduced": (lambda: eagle3(draft_vocab_size=24, qk_norm=False), {"vllm", "sglang"}),
    "eagle3-two-layers": (lambda: eagle3(num_hidden_layers=2, qk_norm=False), {"vllm"}),
    "eagle3-five-aux": (lambda: eagle3(target_layer_ids=[0, 1, 2, 3, 4]), {"deepspec"}),
}
ROUND_TRIPS = [(name, fmt) for name, (_, formats) in DRAFTERS.items() for fmt in sorted(formats)]


@pytest.mark.parametrize(("name", "format_name"), ROUND_TRIPS)
def test_round_trip_reproduces_logits_exactly_in_fp32(name, format_name, tmp_path):
    drafter = DRAFTERS[name][0]()
    report = export_and_check(drafter, format_name, output_dir=tmp_path, dtype="float32", provenance=PROVENANCE)
    assert report.passed and report.worst == 0.0, report.summary()
    assert report.max_abs_diff, "nothing was compared"


@pytest.mark.parametrize("name", sorted(DRAFTERS))
def test_formats_that_cannot_express_a_drafter_refuse_it_with_the_reason(name, tmp_path):
    factory, expected = DRAFTERS[name]
    drafter = factory()
    assert set(expressible_formats(drafter.config)) == expected
    for format_name in {"deepspec", "vllm", "sglang"} - expected:
        with pytest.raises(UnsupportedDrafterError, match=f"cannot export to {format_name}: .+"):
            export_drafter(drafter, format_name, tmp_path / format_name, provenance=PROVENANCE)
        assert not (tmp_path / format_name).exists()


@pytest.mark.parametrize(
    ("factory", "format_name", "reason"),
    [
        (lambda: eagle3(target_layer_ids=[0, 1, 2, 3, 4], qk_norm=False), "sglang", "5 aux layers"),
        (lambda: eagle3(target_layer_ids=[0, 1, 2, 3, 4]), "vllm", "exactly 3"),
        (lambda: eagle3(), "sglang", "silently skips q_norm/k_norm"),
        (lambda: eagle3(draft_vocab_size=24), "deepspec", "no d2t/t2d"),
        (lambda: dflash("zlab"), "deepspec", "anchor-first"),
        (lambda: dspark(block_style="gemma4", embedding_multiplier=math.sqrt(HIDDEN)), "vllm", "Gemma4DSparkModel"),
        (lambda: dspark(markov_head_type="gated"), "sglang", "only the 'vanilla'"),
        (lambda: dspark(hidden_size=16, target_hidden_size=HIDDEN, head_dim=4), "vllm", "width bridges"),
    ],
)
def test_refusal_messages_say_why(factory, format_name, reason, tmp_path):
    with pytest.raises(UnsupportedDrafterError, match=reason):
        export_drafter(factory(), format_name, tmp_path, provenance=PROVENANCE)


@pytest.mark.parametrize("format_name", ["deepspec", "vllm", "sglang"])
def test_bf16_exports_match_the_original_rounded_to_bf16(format_name, tmp_path):
    drafter = dspark() if format_name != "sglang" else dflash("zlab")
    path = export_drafter(drafter, format_name, tmp_path, provenance=PROVENANCE)  # bf16 by default
    assert all(t.dtype == torch.bfloat16 for t in load_file(path / "model.safetensors").values())
    assert check_export_parity(drafter, path).worst == 0.0


# ---- configs carry the fields of each engine contract ------------------------------------------------------
TARGET_CONFIG = Qwen3Config(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=48,
    num_hidden_layers=TARGET_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=8192,
    architectures=["Qwen3ForCausalLM"],
)
ROPE = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0}


def _export(drafter, format_name, tmp_path, **options):
    path = export_drafter(drafter, format_name, tmp_path, target_config=TARGET_CONFIG, provenance=PROVENANCE, **options)
    return json.loads((path / "config.json").read_text()), load_file(path / "model.safetensors"), path


def _common_decoder_fields(config, layers):
    assert config["num_hidden_layers"] == layers
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        assert config[field] > 0
    assert config["rms_norm_eps"] == 1e-6 and config["vocab_size"] == VOCAB
    assert config["max_position_embeddings"] == 8192  # raised to the target's (drafter said 4096)
    assert config["rope_theta"] == 1_000_000.0 and config["rope_scaling"]["type"] == "linear"
    assert config["rope_scaling"]["factor"] == 2.0 and config["rope_parameters"] == ROPE
    assert config["tie_word_embeddings"] is False


def test_sglang_eagle3_config_and_weights(tmp_path):
    drafter = eagle3(draft_vocab_size=24, qk_norm=False, rope_parameters=ROPE)
    config, tensors, _ = _export(drafter, "sglang", tmp_path)
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["model_type"] == "llama"
    _common_decoder_fields(config, layers=1)
    assert config["draft_vocab_size"] == 24 and config["target_hidden_size"] == HIDDEN
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 4]  # output-of-layer
    assert tensors["fc.weight"].shape == (HIDDEN, 3 * HIDDEN)
    assert tensors["midlayer.self_attn.q_proj.weight"].shape[1] == 2 * HIDDEN
    assert {"midlayer.hidden_norm.weight", "midlayer.input_layernorm.weight", "norm.weight"} <= set(tensors)
    assert tensors["lm_head.weight"].shape == (24, HIDDEN) and "embed_tokens.weight" not in tensors
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    hot = tensors["d2t"] + torch.arange(24)
    assert torch.equal(hot, drafter.draft_token_ids()) and int(tensors["t2d"].sum()) == 24


def test_vllm_eagle3_speculators_config(tmp_path):
    config, tensors, _ = _export(eagle3(draft_vocab_size=24, rope_parameters=ROPE), "vllm", tmp_path)
    assert config["architectures"] == ["Eagle3Speculator"] and config["speculators_model_type"] == "eagle3"
    assert config["speculators_version"]
    layer_config = config["transformer_layer_config"]
    assert layer_config["model_type"] == "qwen3"  # per-head q/k norms → vLLM's Qwen3 EAGLE3 layer
    _common_decoder_fields(layer_config, layers=1)
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 3, 5]  # capture index = layer + 1
    assert config["draft_vocab_size"] == 24 and config["target_hidden_size"] == HIDDEN
    assert config["norm_before_residual"] is False
    for field in ("norm_before_fc", "fc_norm", "norm_output"):
        assert config[field] is False
    spec = config["speculators_config"]
    assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
    assert spec["proposal_methods"][0] == {**spec["proposal_methods"][0], "proposal_type": "greedy"}
    assert spec["proposal_methods"][0]["speculative_tokens"] == 3
    assert spec["verifier"] == {"name_or_path": "org/tiny-target", "architectures": ["Qwen3ForCausalLM"]}
    assert {"layers.0.hidden_norm.weight", "layers.0.self_attn.q_norm.weight", "d2t", "t2d"} <= set(tensors)


def test_dflash_configs(tmp_path):
    drafter = dflash("zlab", rope_parameters=ROPE)
    sglang, tensors, _ = _export(drafter, "sglang", tmp_path / "sglang")
    assert sglang["architectures"] == ["DFlashDraftModel"] and sglang["model_type"] == "qwen3"
    _common_decoder_fields(sglang, layers=2)
    assert sglang["block_size"] == 4 and sglang["num_target_layers"] == TARGET_LAYERS
    assert sglang["dflash_config"] == {"mask_token_id": VOCAB - 1, "target_layer_ids": [-1, 1, 3]}
    assert sglang["layer_types"] == ["full_attention"] * 2 and sglang["use_sliding_window"] is False
    assert "sliding_window" in sglang and sglang["hidden_act"] == "silu"
    assert not {"embed_tokens.weight", "lm_head.weight"} & set(tensors)
    assert tensors["fc.weight"].shape == (HIDDEN, 3 * HIDDEN) and "hidden_norm.weight" in tensors

    vllm, tensors, _ = _export(drafter, "vllm", tmp_path / "vllm")
    assert vllm["speculators_model_type"] == "dflash" and vllm["aux_hidden_state_layer_ids"] == [0, 2, 4]
    assert vllm["mask_token_id"] == VOCAB - 1 and vllm["draft_vocab_size"] == VOCAB
    assert (
        vllm["target_hidden_size"] == HIDDEN
        and vllm["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
    )  # block of 4, slots 1..3 predict
    assert vllm["transformer_layer_config"]["layer_types"] == ["full_attention"] * 2
    _common_decoder_fields(vllm["transformer_layer_config"], layers=2)


@pytest.mark.parametrize("format_name", ["deepspec", "sglang"])
def test_dspark_qwen3_dspark_model_config(format_name, tmp_path):
    config, tensors, _ = _export(dspark(rope_parameters=ROPE), format_name, tmp_path)
    assert config["architectures"] == ["Qwen3DSparkModel"] and config["model_type"] == "qwen3"
    _common_decoder_fields(config, layers=2)
    assert config["target_layer_ids"] == [-1, 1, 3] and config["num_target_layers"] == TARGET_LAYERS
    assert config["block_size"] == 4 and config["mask_token_id"] == VOCAB - 1 and config["num_anchors"] == 6
    assert config["head_dim"] == 8 and config["markov_rank"] == 8 and config["markov_head_type"] == "vanilla"
    assert config["enable_confidence_head"] is True and config["confidence_head_with_markov"] is True
    assert tensors["embed_tokens.weight"].shape == tensors["lm_head.weight"].shape == (VOCAB, HIDDEN)
    expected = {"markov_head.markov_w1.weight", "markov_head.markov_w2.weight", "confidence_head.proj.weight"}
    assert expected | {"confidence_head.proj.bias", "fc.weight", "hidden_norm.weight", "norm.weight"} <= set(tensors)


def test_vllm_dspark_carries_markov_fields_and_anchor_convention(tmp_path):
    config, tensors, _ = _export(dspark(), "vllm", tmp_path / "a")
    assert config["speculators_model_type"] == "dspark" and config["sample_from_anchor"] is True
    assert config["markov_rank"] == 8 and config["markov_head_type"] == "vanilla"
    assert config["enable_confidence_head"] is True and config["confidence_head_with_markov"] is True
    assert config["aux_hidden_state_layer_ids"] == [0, 2, 4] and config["block_size"] == 4
    assert not {"embed_tokens.weight", "lm_head.weight"} & set(tensors)
    zlab, _, _ = _export(dspark(anchor_convention="zlab", enable_confidence_head=False), "vllm", tmp_path / "b")
    assert zlab["speculators_model_type"] == "dspark" and zlab["sample_from_anchor"] is False


def test_provenance_is_recorded(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"fingerprint": {"target": "specdec-tiny", "layer_ids": [0, 2, 4]}}))
    from specdec.export import cache_manifest_id

    provenance = ExportProvenance.from_target(
        "specdec-tiny", cache_manifest_id=cache_manifest_id(manifest), train_config={"lr": 6e-4}
    )
    path = export_drafter(eagle3(), "vllm", tmp_path / "out", target_config=TARGET_CONFIG, provenance=provenance)
    record = json.loads((path / "specdec_provenance.json").read_text())
    assert record["target"] == "specdec-tiny" and record["export_format"] == "vllm"
    assert len(record["tokenizer_hash"]) == 64 and len(record["chat_template_hash"]) == 64
    assert record["cache_manifest_id"] == cache_manifest_id(manifest) and record["train_config"] == {"lr": 6e-4}
    assert record["layer_ids"] == [0, 2, 4]
    assert record["engine_layer_ids"] == {"eagle_aux_hidden_state_layer_ids": [1, 3, 5]}
    assert record["num_target_layers"] == TARGET_LAYERS and record["target_max_position_embeddings"] == 8192


# ---- DeepSpec checkpoints in, DeepSpec layout out ------------------------------------------------------------
def _deepspec_checkpoint(directory, rank: int = 8):
    """A checkpoint laid out as DeepSpec releases them: the target's Qwen3 config plus DSpark fields."""
    hidden, inter, heads, kv, head_dim = HIDDEN, 48, 4, 2, 8
    config = TARGET_CONFIG.to_dict() | {
        "architectures": ["Qwen3DSparkModel"],
        "num_hidden_layers": 1,
        "num_target_layers": TARGET_LAYERS,
        "block_size": 4,
        "tie_word_embeddings": False,
        "layer_types": ["full_attention"],
        "mask_token_id": VOCAB - 1,
        "target_layer_ids": [1, 3],
        "num_anchors": 512,
        "enable_confidence_head": True,
        "confidence_head_with_markov": True,
        "markov_rank": rank,
        "markov_head_type": "vanilla",
    }
    shapes = {
        "embed_tokens.weight": (VOCAB, hidden),
        "lm_head.weight": (VOCAB, hidden),
        "fc.weight": (hidden, 2 * hidden),
        "hidden_norm.weight": (hidden,),
        "norm.weight": (hidden,),
        "layers.0.input_layernorm.weight": (hidden,),
        "layers.0.post_attention_layernorm.weight": (hidden,),
        "layers.0.self_attn.q_proj.weight": (heads * head_dim, hidden),
        "layers.0.self_attn.k_proj.weight": (kv * head_dim, hidden),
        "layers.0.self_attn.v_proj.weight": (kv * head_dim, hidden),
        "layers.0.self_attn.o_proj.weight": (hidden, heads * head_dim),
        "layers.0.self_attn.q_norm.weight": (head_dim,),
        "layers.0.self_attn.k_norm.weight": (head_dim,),
        "layers.0.mlp.gate_proj.weight": (inter, hidden),
        "layers.0.mlp.up_proj.weight": (inter, hidden),
        "layers.0.mlp.down_proj.weight": (hidden, inter),
        "markov_head.markov_w1.weight": (VOCAB, rank),
        "markov_head.markov_w2.weight": (VOCAB, rank),
        "confidence_head.proj.weight": (1, hidden + rank),
        "confidence_head.proj.bias": (1,),
    }
    generator = torch.Generator().manual_seed(4)
    tensors = {name: torch.randn(shape, generator=generator).to(torch.bfloat16) for name, shape in shapes.items()}
    # Released checkpoints were written by transformers 4.x: RoPE as rope_theta / rope_scaling only.
    config.pop("rope_parameters", None)
    config.update(rope_theta=1_000_000.0, rope_scaling=None, torch_dtype="bfloat16")
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return config, tensors


def test_deepspec_checkpoint_imports_and_exports_back_to_the_same_layout(tmp_path):
    original_config, original = _deepspec_checkpoint(tmp_path / "released")
    drafter = load_deepspec(tmp_path / "released")
    assert isinstance(drafter, DSparkDrafter) and drafter.config.target_layer_ids == [1, 3]
    assert drafter.config.anchor_convention == "deepspec" and drafter.config.markov_rank == 8
    assert drafter.config.rope_parameters == {"rope_type": "default", "rope_theta": 1_000_000.0}
    path = export_drafter(drafter, "deepspec", tmp_path / "again", provenance=PROVENANCE)
    exported = load_file(path / "model.safetensors")
    assert set(exported) == set(original)
    assert all(torch.equal(exported[name], original[name]) for name in original)
    config = json.loads((path / "config.json").read_text())
    for field in (
        "architectures",
        "block_size",
        "mask_token_id",
        "target_layer_ids",
        "num_target_layers",
        "num_anchors",
        "markov_rank",
        "markov_head_type",
        "enable_confidence_head",
        "confidence_head_with_markov",
        "hidden_size",
        "num_hidden_layers",
        "head_dim",
    ):
        assert config[field] == original_config[field], field
    assert check_export_parity(drafter, path).worst == 0.0


# ---- validators reject hand-broken exports ---------------------------------------------------------------------
def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for parent in parents:
            node = node[parent]
        if value is None:
            node.pop(leaf)
        else:
            node[leaf] = value
    (path / "config.json").write_text(json.dumps(config))


def _edit_tensors(path, drop=(), **replace):
    tensors = load_file(path / "model.safetensors")
    for name in drop:
        tensors.pop(name)
    tensors.update(replace)
    save_file(tensors, str(path / "model.safetensors"))


def _problems(path) -> str:
    problems = find_problems(path)
    assert problems, "the broken export was accepted"
    with pytest.raises(ExportValidationError):
        validate_export(path)
    return "\n".join(problems)


def test_validator_missing_d2t(tmp_path):
    path = export_drafter(eagle3(draft_vocab_size=24, qk_norm=False), "sglang", tmp_path, provenance=PROVENANCE)
    _edit_tensors(path, drop=("d2t",))
    assert "model.safetensors: 'd2t' is missing" in _problems(path)


def test_validator_wrong_layer_id_convention(tmp_path):
    path = export_drafter(eagle3(), "vllm", tmp_path, provenance=PROVENANCE)
    _edit_config(path, eagle_aux_hidden_state_layer_ids=[0, 2, 4])  # specdec ids written verbatim for vLLM
    message = _problems(path)
    assert "'eagle_aux_hidden_state_layer_ids' = [0, 2, 4]" in message and "wrong layer-id convention" in message
    assert "[1, 3, 5]" in message


def test_validator_final_layer_tap(tmp_path):
    path = export_drafter(dspark(), "sglang", tmp_path, provenance=PROVENANCE)
    _edit_config(path, target_layer_ids=[-1, 1, TARGET_LAYERS - 1])
    assert "taps the final layer of the 6-layer target" in _problems(path)
    vllm = export_drafter(dflash("zlab"), "vllm", tmp_path / "vllm", provenance=PROVENANCE)
    _edit_config(vllm, aux_hidden_state_layer_ids=[0, 2, TARGET_LAYERS])  # capture index of the final layer
    assert "'aux_hidden_state_layer_ids' id 6 taps the final layer" in _problems(vllm)


def test_validator_wrong_fc_width(tmp_path):
    path = export_drafter(eagle3(qk_norm=False), "sglang", tmp_path, provenance=PROVENANCE)
    _edit_tensors(path, **{"fc.weight": torch.zeros(HIDDEN, 5 * HIDDEN, dtype=torch.bfloat16)})
    message = _problems(path)
    assert f"'fc.weight' has shape [{HIDDEN}, {5 * HIDDEN}], expected [{HIDDEN}, {3 * HIDDEN}]" in message
    assert "3 aux layer(s)" in message


def test_validator_unknown_and_missing_tensors(tmp_path):
    path = export_drafter(eagle3(qk_norm=False), "sglang", tmp_path, provenance=PROVENANCE)
    _edit_tensors(
        path, drop=("norm.weight",), **{"midlayer.self_attn.q_norm.weight": torch.ones(8, dtype=torch.bfloat16)}
    )
    message = _problems(path)
    assert "required tensor 'norm.weight' is missing" in message
    assert "unknown tensor(s) ['midlayer.self_attn.q_norm.weight']" in message and "SGLang" in message


def test_validator_vocabulary_map_sanity(tmp_path):
    path = export_drafter(eagle3(draft_vocab_size=24), "vllm", tmp_path, provenance=PROVENANCE)
    t2d = load_file(path / "model.safetensors")["t2d"].clone()
    first_marked = int(t2d.nonzero()[0])
    t2d[first_marked] = False
    t2d[(~t2d).nonzero()[-1]] = True
    _edit_tensors(path, t2d=t2d, d2t=load_file(path / "model.safetensors")["d2t"].to(torch.int64))
    assert "'t2d' and 'd2t' disagree" in _problems(path)
    _edit_tensors(path, d2t=load_file(path / "model.safetensors")["d2t"].to(torch.int32))
    assert "'d2t' has dtype torch.int32" in _problems(path)


def test_validator_config_fields(tmp_path):
    path = export_drafter(eagle3(), "vllm", tmp_path, target_config=TARGET_CONFIG, provenance=PROVENANCE)
    _edit_config(path, norm_before_residual=None, transformer_layer_config__max_position_embeddings=2048)
    message = _problems(path)
    assert "required field 'norm_before_residual' is missing" in message
    assert "max_position_embeddings = 2048 is below the target's 8192" in message
    _edit_config(path, speculators_config__verifier__name_or_path="")
    assert "verifier.name_or_path is empty" in _problems(path)


def test_exported_dirs_are_valid_and_load_without_the_original(tmp_path):
    drafter = eagle3(draft_vocab_size=24, qk_norm=False)
    path = export_drafter(drafter, "sglang", tmp_path, provenance=PROVENANCE)
    assert find_problems(path) == []
    rebuilt = load_export(path, target_head=target_head())
    assert isinstance(rebuilt, Eagle3Drafter) and rebuilt.config.qk_norm is False
    assert torch.equal(rebuilt.d2t, drafter.d2t) and torch.equal(rebuilt.t2d, drafter.t2d)
