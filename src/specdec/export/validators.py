"""Check an exported directory against its engine's contract before anyone serves it; every exporter's last step.

Engines fail quietly: SGLang's EAGLE3 loader skips tensors it does not know, vLLM aligns a pruned vocabulary
to ids 0..N-1 when ``d2t`` is missing, a layer id in the wrong convention reads the neighbouring layer. The
checks here read only the exported files (``config.json``, ``*.safetensors``, ``specdec_provenance.json``)
and report every problem at once, each naming the file and field:

- required config fields and their values (rope in both spellings, ``max_position_embeddings`` ≥ target);
- required and unknown tensor names, tensor shapes (``fc`` width = number of aux layers × target width);
- dtypes (one float dtype; ``d2t`` int64, ``t2d`` bool) and ``d2t``/``t2d`` consistency;
- layer ids: range for the target's depth, no final-layer tap, and the engine's convention (against the
  trained layer ids recorded in the provenance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PretrainedConfig

from specdec.export.conventions import cast_floats, target_max_positions
from specdec.export.directory import (
    CONFIG_FILE,
    PROVENANCE_FILE,
    ExportProvenance,
    provenance_record,
    read_config,
    read_provenance,
    read_tensors,
    write_export,
)
from specdec.export.source import Drafter


class ExportValidationError(ValueError):
    """An exported directory breaks its engine's contract; ``problems`` lists every finding, each naming a file."""

    def __init__(self, directory: str, problems: list[str]) -> None:
        lines = "\n".join(f"  - {problem}" for problem in problems)
        super().__init__(f"export at {directory} is invalid ({len(problems)} problem(s)):\n{lines}")
        self.directory = directory
        self.problems = problems


WEIGHTS = "model.safetensors"
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
DSPARK_ARCHITECTURES = ("Qwen3DSparkModel", "Gemma4DSparkModel")
KNOWN_ARCHITECTURES = (*DSPARK_ARCHITECTURES, "Qwen3Eagle3Model", "LlamaForCausalLMEagle3", "DFlashDraftModel")
SPECULATORS_TYPES = ("eagle3", "dflash", "dspark")

Shape = tuple[int, ...]


@dataclass
class Layout:
    """What an architecture's config implies: tensor names → shapes, plus the layer-id field to check."""

    required: dict[str, Shape] = field(default_factory=dict)
    optional: dict[str, Shape] = field(default_factory=dict)
    layer_field: str = ""
    layer_ids: list[int] = field(default_factory=list)
    capture_index: bool = False  # vLLM: field holds specdec id + 1
    aux_width: int = 0  # target hidden width per aux layer (for the fc check)
    draft_vocab_size: int | None = None
    vocab_size: int = 0
    reduced_vocab_keys: bool = False  # d2t/t2d expected


class Findings(list):
    def add(self, message: str) -> None:
        self.append(message)


def _get(config: dict[str, Any], dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _require_fields(config: dict[str, Any], fields: Sequence[str], findings: Findings, where: str = CONFIG_FILE):
    for name in fields:
        if _get(config, name) is None:
            findings.add(f"{where}: required field '{name}' is missing")


def _decoder_layer(
    prefix: str, d: dict[str, Any], input_width: int, qk_norm: bool, hidden_norm: bool, gemma: bool = False
) -> dict[str, Shape]:
    hidden, heads, kv, head_dim = d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]
    inter = d["intermediate_size"]
    shapes: dict[str, Shape] = {
        f"{prefix}.input_layernorm.weight": (hidden,),
        f"{prefix}.self_attn.q_proj.weight": (heads * head_dim, input_width),
        f"{prefix}.self_attn.k_proj.weight": (kv * head_dim, input_width),
        f"{prefix}.self_attn.o_proj.weight": (hidden, heads * head_dim),
        f"{prefix}.post_attention_layernorm.weight": (hidden,),
        f"{prefix}.mlp.gate_proj.weight": (inter, hidden),
        f"{prefix}.mlp.up_proj.weight": (inter, hidden),
        f"{prefix}.mlp.down_proj.weight": (hidden, inter),
    }
    if not (gemma and d.get("attention_k_eq_v")):
        shapes[f"{prefix}.self_attn.v_proj.weight"] = (kv * head_dim, input_width)
    if d.get("attention_bias"):
        for name, rows in (("q", heads), ("k", kv), ("v", kv)):
            if f"{prefix}.self_attn.{name}_proj.weight" in shapes:
                shapes[f"{prefix}.self_attn.{name}_proj.bias"] = (rows * head_dim,)
        shapes[f"{prefix}.self_attn.o_proj.bias"] = (hidden,)
    if qk_norm:
        shapes[f"{prefix}.self_attn.q_norm.weight"] = (head_dim,)
        shapes[f"{prefix}.self_attn.k_norm.weight"] = (head_dim,)
    if hidden_norm:
        shapes[f"{prefix}.hidden_norm.weight"] = (hidden,)
    if gemma:
        shapes[f"{prefix}.pre_feedforward_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_feedforward_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.layer_scalar"] = (1,)
    return shapes


DECODER_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "vocab_size",
    "max_position_embeddings",
)


def _check_decoder(d: dict[str, Any], findings: Findings, where: str) -> bool:
    """Sizes present and positive, RoPE in both spellings; False when the layout cannot be derived."""
    missing = [name for name in DECODER_FIELDS if d.get(name) is None]
    for name in missing:
        findings.add(f"{where}: required field '{name}' is missing")
    if missing:
        return False
    for name in ("hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads", "num_hidden_layers"):
        if not isinstance(d[name], int) or d[name] <= 0:
            findings.add(f"{where}: '{name}' = {d[name]!r} must be a positive integer")
            return False
    if d.get("rope_parameters") is None:
        findings.add(f"{where}: 'rope_parameters' is missing (transformers v5 engines read RoPE from it)")
    if d.get("rope_theta") is None and "full_attention" not in (d.get("rope_parameters") or {}):
        findings.add(f"{where}: 'rope_theta' is missing (older engines read RoPE from rope_theta/rope_scaling)")
    if d.get("tie_word_embeddings"):
        findings.add(f"{where}: 'tie_word_embeddings' is true; a drafter's LM head is never its embedding")
    return True


def _dspark_heads(config: dict[str, Any], hidden: int, vocab: int, findings: Findings) -> dict[str, Shape]:
    shapes: dict[str, Shape] = {}
    rank = config.get("markov_rank") or 0
    head_type = config.get("markov_head_type", "vanilla")
    if rank > 0:
        shapes["markov_head.markov_w1.weight"] = (vocab, rank)
        shapes["markov_head.markov_w2.weight"] = (vocab, rank)
        if head_type == "gated":
            shapes.update(
                {"markov_head.gate_proj.weight": (rank, hidden + rank), "markov_head.gate_proj.bias": (rank,)}
            )
        elif head_type == "rnn":
            shapes.update(
                {
                    "markov_head.joint_proj.weight": (3 * rank, 2 * rank + hidden),
                    "markov_head.joint_proj.bias": (3 * rank,),
                }
            )
        elif head_type != "vanilla":
            findings.add(f"{CONFIG_FILE}: markov_head_type '{head_type}' is not one of vanilla, gated, rnn")
    if config.get("enable_confidence_head"):
        with_markov = bool(config.get("confidence_head_with_markov")) and rank > 0
        if config.get("confidence_head_with_markov") and rank == 0:
            findings.add(f"{CONFIG_FILE}: confidence_head_with_markov is true but markov_rank is 0")
        shapes["confidence_head.proj.weight"] = (1, hidden + (rank if with_markov else 0))
        shapes["confidence_head.proj.bias"] = (1,)
    return shapes


def _layout_dspark_family(config: dict[str, Any], architecture: str, findings: Findings, serving: str | None):
    """Qwen3DSparkModel / Gemma4DSparkModel (DeepSpec, SGLang) and DFlashDraftModel (z-lab, SGLang)."""
    if not _check_decoder(config, findings, CONFIG_FILE):
        return None
    hidden, vocab, layers = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    gemma = architecture == "Gemma4DSparkModel"
    if architecture == "DFlashDraftModel":
        _require_fields(
            config,
            ("block_size", "dflash_config.mask_token_id", "dflash_config.target_layer_ids", "num_target_layers"),
            findings,
        )
        if config.get("hidden_act") != "silu":
            findings.add(
                f"{CONFIG_FILE}: hidden_act = {config.get('hidden_act')!r}; SGLang's DFlashDraftModel needs silu"
            )
        ids = _get(config, "dflash_config.target_layer_ids") or []
        layer_field = "dflash_config.target_layer_ids"
    else:
        _require_fields(
            config,
            (
                "block_size",
                "mask_token_id",
                "target_layer_ids",
                "num_target_layers",
                "num_anchors",
                "markov_rank",
                "enable_confidence_head",
            ),
            findings,
        )
        if (config.get("markov_rank") or 0) > 0:
            _require_fields(config, ("markov_head_type",), findings)
        if config.get("enable_confidence_head"):
            _require_fields(config, ("confidence_head_with_markov",), findings)
        if serving == "sglang":
            _sglang_dspark_rules(config, findings)
        ids = config.get("target_layer_ids") or []
        layer_field = "target_layer_ids"
    types = config.get("layer_types")
    if types is not None and len(types) != layers:
        findings.add(f"{CONFIG_FILE}: layer_types has {len(types)} entries for num_hidden_layers = {layers}")
    target_width = config.get("target_hidden_size") or hidden
    layout = Layout(layer_field=layer_field, layer_ids=list(ids), aux_width=target_width, vocab_size=vocab)
    layout.required.update(
        {"fc.weight": (hidden, len(ids) * target_width), "hidden_norm.weight": (hidden,), "norm.weight": (hidden,)}
    )
    for index in range(layers):
        layout.required.update(
            _decoder_layer(f"layers.{index}", config, hidden, qk_norm=True, hidden_norm=False, gemma=gemma)
        )
    if architecture != "DFlashDraftModel":
        layout.required.update({"embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden)})
        layout.required.update(_dspark_heads(config, hidden, vocab, findings))
    return layout


def _sglang_dspark_rules(config: dict[str, Any], findings: Findings) -> None:
    rank = config.get("markov_rank") or 0
    if rank > 0 and config.get("markov_head_type") != "vanilla":
        findings.add(
            f"{CONFIG_FILE}: markov_head_type = {config.get('markov_head_type')!r}; SGLang serves only vanilla"
        )
    if config.get("enable_confidence_head") and not config.get("confidence_head_with_markov"):
        findings.add(
            f"{CONFIG_FILE}: SGLang's DSpark loader needs confidence_head_with_markov=true with a confidence head"
        )


def _layout_eagle3(
    config: dict[str, Any],
    architecture: str,
    findings: Findings,
    decoder: dict[str, Any],
    where: str,
    layer_prefix: str,
    qk_norm: bool,
) -> Layout | None:
    if not _check_decoder(decoder, findings, where):
        return None
    hidden, vocab, layers = decoder["hidden_size"], decoder["vocab_size"], decoder["num_hidden_layers"]
    draft_vocab = config.get("draft_vocab_size") or vocab
    target_width = config.get("target_hidden_size") or hidden
    layout = Layout(aux_width=target_width, draft_vocab_size=draft_vocab, vocab_size=vocab)
    layout.required.update(
        {"fc.weight": (hidden, 0), "norm.weight": (hidden,), "lm_head.weight": (draft_vocab, hidden)}
    )
    layout.required.update(_decoder_layer(layer_prefix, decoder, 2 * hidden, qk_norm=qk_norm, hidden_norm=True))
    for index in range(1, layers):
        layout.required.update(_decoder_layer(f"layers.{index}", decoder, hidden, qk_norm=qk_norm, hidden_norm=False))
    if architecture == "Qwen3Eagle3Model":
        layout.required["embed_tokens.weight"] = (vocab, hidden)
        if draft_vocab != vocab:
            findings.add(
                f"{CONFIG_FILE}: Qwen3Eagle3Model predicts the full vocabulary; draft_vocab_size = {draft_vocab}"
            )
    else:
        layout.optional["embed_tokens.weight"] = (vocab, hidden)
    reduced = draft_vocab < vocab
    if reduced or architecture == "LlamaForCausalLMEagle3":
        layout.required.update({"d2t": (draft_vocab,), "t2d": (vocab,)})
        layout.reduced_vocab_keys = True
    return layout


def _layout_speculators(config: dict[str, Any], findings: Findings) -> Layout | None:
    _require_fields(
        config,
        (
            "speculators_model_type",
            "speculators_version",
            "transformer_layer_config",
            "speculators_config.proposal_methods",
            "speculators_config.verifier",
        ),
        findings,
    )
    kind = config.get("speculators_model_type")
    if kind not in SPECULATORS_TYPES:
        findings.add(f"{CONFIG_FILE}: speculators_model_type = {kind!r}; expected one of {SPECULATORS_TYPES}")
        return None
    methods = _get(config, "speculators_config.proposal_methods") or [{}]
    first = methods[0] if isinstance(methods, list) and methods else {}
    if not isinstance(first, dict) or "proposal_type" not in first or "speculative_tokens" not in first:
        findings.add(
            f"{CONFIG_FILE}: speculators_config.proposal_methods[0] needs proposal_type and speculative_tokens"
        )
    if not _get(config, "speculators_config.verifier.name_or_path"):
        findings.add(f"{CONFIG_FILE}: speculators_config.verifier.name_or_path is empty; `vllm serve <dir>` loads it")
    decoder = config.get("transformer_layer_config")
    if not isinstance(decoder, dict):
        return None
    where = f"{CONFIG_FILE} transformer_layer_config"
    if kind == "eagle3":
        _require_fields(
            config, ("draft_vocab_size", "eagle_aux_hidden_state_layer_ids", "norm_before_residual"), findings
        )
        if config.get("norm_before_residual"):
            findings.add(
                f"{CONFIG_FILE}: norm_before_residual is true; specdec's EAGLE3 residual is the un-normed input"
            )
        qk_norm = decoder.get("model_type") == "qwen3"
        layout = _layout_eagle3(config, "Eagle3Speculator", findings, decoder, where, "layers.0", qk_norm)
        if layout is not None:
            layout.layer_field = "eagle_aux_hidden_state_layer_ids"
            layout.layer_ids = list(config.get("eagle_aux_hidden_state_layer_ids") or [])
            layout.capture_index = True
            layout.required["fc.weight"] = (decoder["hidden_size"], len(layout.layer_ids) * layout.aux_width)
        return layout
    _require_fields(config, ("aux_hidden_state_layer_ids", "mask_token_id", "block_size"), findings)
    if kind == "dspark":
        _require_fields(config, ("markov_rank", "sample_from_anchor"), findings)
        if (config.get("markov_rank") or 0) > 0 and config.get("markov_head_type", "vanilla") != "vanilla":
            findings.add(
                f"{CONFIG_FILE}: markov_head_type = {config.get('markov_head_type')!r}; vLLM serves only vanilla"
            )
    if not _check_decoder(decoder, findings, where):
        return None
    hidden, vocab = decoder["hidden_size"], decoder["vocab_size"]
    ids = list(config.get("aux_hidden_state_layer_ids") or [])
    target_width = config.get("target_hidden_size") or hidden
    layout = Layout(
        layer_field="aux_hidden_state_layer_ids",
        layer_ids=ids,
        capture_index=True,
        aux_width=target_width,
        vocab_size=vocab,
    )
    layout.required.update(
        {"fc.weight": (hidden, len(ids) * target_width), "hidden_norm.weight": (hidden,), "norm.weight": (hidden,)}
    )
    for index in range(decoder["num_hidden_layers"]):
        layout.required.update(_decoder_layer(f"layers.{index}", decoder, hidden, qk_norm=True, hidden_norm=False))
    if kind == "dspark":
        layout.required.update(_dspark_heads(config, hidden, vocab, findings))
    return layout


def _layout(config: dict[str, Any], findings: Findings, serving: str | None) -> Layout | None:
    if "speculators_model_type" in config:
        return _layout_speculators(config, findings)
    architectures = config.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in KNOWN_ARCHITECTURES:
        findings.add(
            f"{CONFIG_FILE}: architectures = {architectures!r}; expected one of {KNOWN_ARCHITECTURES} "
            "or a speculators config (speculators_model_type)"
        )
        return None
    architecture = architectures[0]
    if architecture in (*DSPARK_ARCHITECTURES, "DFlashDraftModel"):
        return _layout_dspark_family(config, architecture, findings, serving)
    if architecture == "LlamaForCausalLMEagle3":
        _require_fields(config, ("draft_vocab_size", "eagle_config.eagle_aux_hidden_state_layer_ids"), findings)
        if config.get("model_type") != "llama":
            findings.add(
                f"{CONFIG_FILE}: model_type = {config.get('model_type')!r}; LlamaForCausalLMEagle3 needs llama"
            )
        layout = _layout_eagle3(config, architecture, findings, config, CONFIG_FILE, "midlayer", qk_norm=False)
        if layout is not None:
            layout.layer_field = "eagle_config.eagle_aux_hidden_state_layer_ids"
            layout.layer_ids = list(_get(config, layout.layer_field) or [])
            if config.get("num_hidden_layers", 1) != 1:
                findings.add(f"{CONFIG_FILE}: num_hidden_layers = {config['num_hidden_layers']}; export one midlayer")
            layout.required = {k: v for k, v in layout.required.items() if not k.startswith("layers.")}
            layout.required["fc.weight"] = (config["hidden_size"], len(layout.layer_ids) * layout.aux_width)
        return layout
    _require_fields(config, ("target_layer_ids", "num_target_layers", "ttt_length"), findings)
    layout = _layout_eagle3(config, architecture, findings, config, CONFIG_FILE, "layers.0", qk_norm=True)
    if layout is not None:
        layout.layer_field = "target_layer_ids"
        layout.layer_ids = list(config.get("target_layer_ids") or [])
        layout.required["fc.weight"] = (config["hidden_size"], len(layout.layer_ids) * layout.aux_width)
    return layout


def _check_tensors(tensors: dict[str, torch.Tensor], layout: Layout, findings: Findings, engine: str) -> None:
    expected = {**layout.optional, **layout.required}
    for name in sorted(set(layout.required) - set(tensors)):
        if name == "d2t":
            findings.add(
                f"{WEIGHTS}: 'd2t' is missing; with draft_vocab_size {layout.draft_vocab_size} < vocab_size "
                f"{layout.vocab_size} the engine would read draft ids as target ids 0..{layout.draft_vocab_size - 1}"
            )
        else:
            findings.add(f"{WEIGHTS}: required tensor '{name}' is missing")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        findings.add(
            f"{WEIGHTS}: unknown tensor(s) {unknown[:8]}{' ...' if len(unknown) > 8 else ''}: {engine} "
            "would skip or reject them, so the served drafter would differ from the trained one"
        )
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            hint = ""
            if name == "fc.weight":
                hint = (
                    f" ({len(layout.layer_ids)} aux layer(s) × target width {layout.aux_width} from "
                    f"{layout.layer_field})"
                )
            findings.add(f"{WEIGHTS}: '{name}' has shape {list(tensors[name].shape)}, expected {list(shape)}{hint}")
    float_dtypes = {tensor.dtype for name, tensor in tensors.items() if name not in ("d2t", "t2d")}
    bad = sorted(str(dtype) for dtype in float_dtypes if dtype not in FLOAT_DTYPES)
    if bad:
        findings.add(f"{WEIGHTS}: weight dtype(s) {bad} are not bfloat16/float16/float32")
    if len(float_dtypes) > 1:
        findings.add(f"{WEIGHTS}: weights mix dtypes {sorted(str(d) for d in float_dtypes)}; engines expect one")
    _check_vocab_mapping(tensors, layout, findings)


def _check_vocab_mapping(tensors: dict[str, torch.Tensor], layout: Layout, findings: Findings) -> None:
    d2t, t2d = tensors.get("d2t"), tensors.get("t2d")
    if d2t is not None and d2t.dtype != torch.int64:
        findings.add(f"{WEIGHTS}: 'd2t' has dtype {d2t.dtype}; engines add it to arange() as int64 offsets")
        return
    if t2d is not None and t2d.dtype != torch.bool:
        findings.add(f"{WEIGHTS}: 't2d' has dtype {t2d.dtype}; expected bool")
        return
    if d2t is None or t2d is None or d2t.dim() != 1 or t2d.dim() != 1:
        return
    vocab = t2d.numel()
    targets = d2t + torch.arange(d2t.numel())
    if bool((targets < 0).any()) or bool((targets >= vocab).any()):
        findings.add(f"{WEIGHTS}: 'd2t' maps draft ids outside the target vocabulary [0, {vocab})")
        return
    if d2t.numel() > 1 and not bool((targets[1:] > targets[:-1]).all()):
        findings.add(f"{WEIGHTS}: 'd2t' does not map draft ids to distinct ascending target ids")
    if int(t2d.sum()) != d2t.numel():
        findings.add(f"{WEIGHTS}: 't2d' marks {int(t2d.sum())} target ids; d2t has {d2t.numel()} draft ids")
    elif not bool(t2d[targets].all()):
        findings.add(f"{WEIGHTS}: 't2d' and 'd2t' disagree: some d2t targets are not marked in t2d")


def _check_layer_ids(
    layout: Layout, config: dict[str, Any], provenance: dict[str, Any] | None, findings: Findings
) -> None:
    ids, field_name = layout.layer_ids, layout.layer_field
    if not ids:
        findings.add(f"{CONFIG_FILE}: '{field_name}' is empty")
        return
    if any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        findings.add(f"{CONFIG_FILE}: '{field_name}' = {ids} must hold integers")
        return
    shift = 1 if layout.capture_index else 0
    convention = "capture index = layer + 1" if shift else "output-of-layer convention"
    specdec_ids = [i - shift for i in ids]
    if len(set(ids)) != len(ids) or sorted(ids) != ids:
        findings.add(f"{CONFIG_FILE}: '{field_name}' = {ids} must be distinct and ascending")
    depth = config.get("num_target_layers") or (provenance or {}).get("num_target_layers")
    lowest = -1 + shift
    if any(i < lowest for i in ids):
        findings.add(f"{CONFIG_FILE}: '{field_name}' = {ids} has ids below {lowest} ({convention})")
    if depth:
        for engine_id, layer in zip(ids, specdec_ids, strict=True):
            if layer == depth - 1 or layer == depth:
                findings.add(
                    f"{CONFIG_FILE}: '{field_name}' id {engine_id} taps the final layer of the {depth}-layer target "
                    f"({convention}); its output exists only after the final norm and engines cannot capture it"
                )
            elif layer > depth:
                findings.add(f"{CONFIG_FILE}: '{field_name}' id {engine_id} is beyond the {depth}-layer target")
    trained = (provenance or {}).get("layer_ids")
    if trained is not None:
        expected = [int(i) + shift for i in trained]
        if ids != expected:
            findings.add(
                f"{CONFIG_FILE}: '{field_name}' = {ids}, but the drafter was trained on layers {list(trained)} "
                f"which this field spells {expected} ({convention}): wrong layer-id convention "
                f"(see {PROVENANCE_FILE})"
            )
    if "fc.weight" in layout.required and layout.required["fc.weight"][1] == 0:
        layout.required["fc.weight"] = (layout.required["fc.weight"][0], len(ids) * layout.aux_width)


def _check_positions(config: dict[str, Any], provenance: dict[str, Any] | None, findings: Findings) -> None:
    target = (provenance or {}).get("target_max_position_embeddings")
    decoder = config.get("transformer_layer_config") if "speculators_model_type" in config else config
    own = (decoder or {}).get("max_position_embeddings")
    if target is not None and own is not None and own < target:
        findings.add(
            f"{CONFIG_FILE}: max_position_embeddings = {own} is below the target's {target}; the engine "
            "would cap positions and acceptance collapses on long prompts"
        )


def find_problems(directory: str | Path, format_name: str | None = None) -> list[str]:
    """Every contract violation of the export at ``directory`` (empty when it is valid)."""
    directory = Path(directory)
    findings = Findings()
    try:
        config = read_config(directory)
        tensors = read_tensors(directory)
    except (FileNotFoundError, ValueError) as error:
        return [str(error)]
    provenance = read_provenance(directory)
    serving = format_name or (provenance or {}).get("export_format")
    layout = _layout(config, findings, serving)
    if layout is None:
        return list(findings)
    _check_layer_ids(layout, config, provenance, findings)
    engine = {"sglang": "SGLang", "vllm": "vLLM", "deepspec": "DeepSpec"}.get(serving or "", "the engine")
    _check_tensors(tensors, layout, findings, engine)
    _check_positions(config, provenance, findings)
    return list(findings)


def validate_export(directory: str | Path, format_name: str | None = None) -> None:
    """Raise :class:`ExportValidationError` listing every problem of the export at ``directory``."""
    problems = find_problems(directory, format_name)
    if problems:
        raise ExportValidationError(str(directory), problems)


def write_validated_export(
    output_dir: str | Path,
    drafter: Drafter,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    *,
    format_name: str,
    engine_layer_ids: dict[str, Any],
    num_target_layers: int | None,
    target_config: PretrainedConfig | None,
    provenance: ExportProvenance | None,
    dtype: torch.dtype,
) -> Path:
    """Write ``config`` and ``tensors`` (cast to ``dtype``) with their provenance, and validate the directory."""
    record = provenance_record(
        provenance,
        format_name=format_name,
        architecture=config["architectures"][0],
        layer_ids=list(drafter.config.target_layer_ids),
        engine_layer_ids=engine_layer_ids,
        num_target_layers=num_target_layers,
        drafter_config=drafter.config.to_dict(),
        target_max_position_embeddings=target_max_positions(target_config),
    )
    write_export(output_dir, config, cast_floats(tensors, dtype), record)
    validate_export(output_dir)
    return Path(output_dir)
