"""Rebuild a specdec drafter from exported files, reading them the way each engine documents it.

This is the import path (DeepSpec checkpoints → specdec, for evaluation and fine-tuning) and the second
half of the parity gate. It is written against the engine contracts, not against specdec's exporters: it
re-derives layer ids from each engine's convention (vLLM capture index − 1), maps engine tensor names back
(SGLang ``midlayer.``, DeepSpec ``gate_proj``/``joint_proj``), decodes ``d2t`` offsets, and takes the
embedding / LM head from the files when the format ships them and from the target otherwise — exactly what
the engine would run. A drafter that differs from the original after this round trip is an export bug.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from specdec.drafters import DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter
from specdec.export.directory import read_config, read_tensors
from specdec.targets import TargetHead, read_target_head

Drafter = DSparkDrafter | Eagle3Drafter
HEAD_KEYS = ("embed_tokens.weight", "lm_head.weight")


class ExportReadError(ValueError):
    """An exported directory that cannot be read back into a specdec drafter; the message says why."""


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE from ``rope_parameters`` (flat or per layer type) or from ``rope_theta`` + ``rope_scaling``."""
    parameters = config.get("rope_parameters")
    if isinstance(parameters, dict) and parameters:
        if "full_attention" in parameters:
            parameters = parameters["full_attention"]
        return {key: value for key, value in parameters.items() if key != "type"}
    rope = {"rope_type": "default", "rope_theta": float(config.get("rope_theta", 10000.0))}
    scaling = config.get("rope_scaling")
    if isinstance(scaling, dict):
        rope.update({key: value for key, value in scaling.items() if key != "type"})
        rope["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    return rope


def _decoder(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "vocab_size": config["vocab_size"],
        "hidden_size": config["hidden_size"],
        "intermediate_size": config["intermediate_size"],
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": config["num_attention_heads"],
        "num_key_value_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "head_dim": config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"],
        "rms_norm_eps": config.get("rms_norm_eps", 1e-6),
        "rope_parameters": _rope(config),
        "max_position_embeddings": config["max_position_embeddings"],
        "hidden_act": config.get("hidden_act") or config.get("hidden_activation") or "silu",
        "attention_bias": bool(config.get("attention_bias", False)),
    }


def _head(
    tensors: dict[str, torch.Tensor],
    target_head: TargetHead | None,
    target: str | None,
    where: Path,
    shipped_head: tuple[str, ...] = HEAD_KEYS,
) -> TargetHead:
    """Embedding / LM head: the file's tensors named in ``shipped_head`` when present (what the engine loads),
    the target's for the rest."""
    shipped = {key: tensors[key] for key in shipped_head if key in tensors}
    if len(shipped) < len(HEAD_KEYS) and target_head is None:
        if target is None:
            missing = sorted(set(HEAD_KEYS) - set(shipped))
            raise ExportReadError(f"{where}: the format shares {missing} with the target; pass the target")
        target_head = read_target_head(target)
    embed = shipped.get("embed_tokens.weight", target_head.embed_tokens if target_head is not None else None)
    lm_head = shipped.get("lm_head.weight", target_head.lm_head if target_head is not None else None)
    return TargetHead(
        embed_tokens=embed, lm_head=lm_head, tied=False, embed_key="embed_tokens.weight", lm_head_key="lm_head.weight"
    )


def _build(drafter: Drafter, weights: dict[str, torch.Tensor], head: TargetHead, where: Path) -> Drafter:
    missing, unexpected = drafter.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ExportReadError(f"{where}: tensors do not match the config (missing {missing}, unexpected {unexpected})")
    drafter.attach_target_head(head)
    return drafter.eval()


def _fc_width(tensors: dict[str, torch.Tensor], ids: list[int], hidden: int) -> int:
    fc = tensors.get("fc.weight")
    return fc.shape[1] // len(ids) if fc is not None and ids else hidden


# ---- DeepSpec (and SGLang's DSpark path) --------------------------------------------------------------
DEEPSPEC_MARKOV_NAMES = {"markov_head.gate_proj.": "markov_head.gate.", "markov_head.joint_proj.": "markov_head.cell."}


def _dspark_config_from_deepspec(config: dict[str, Any], tensors, gemma: bool) -> DSparkConfig:
    decoder = _decoder(config)
    ids = list(config["target_layer_ids"])
    rank = int(config.get("markov_rank", 0))
    fields = dict(
        **decoder,
        target_hidden_size=_fc_width(tensors, ids, decoder["hidden_size"]),
        target_layer_ids=ids,
        target_num_hidden_layers=config.get("num_target_layers"),
        target_model_type="gemma4_text" if gemma else "qwen3",
        block_size=config["block_size"],
        mask_token_id=config["mask_token_id"],
        num_anchors=config.get("num_anchors", 512),
        anchor_convention="deepspec",  # DeepSpec's DSpark/DFlash read predictions from every slot
        markov_rank=rank,
        markov_head_type=config.get("markov_head_type") or "vanilla",
        enable_confidence_head=bool(config.get("enable_confidence_head", False)),
        confidence_head_with_markov=bool(config.get("confidence_head_with_markov", False)),
    )
    if gemma:
        fields.update(
            block_style="gemma4",
            head_dim=config.get("global_head_dim") or decoder["head_dim"],
            embedding_multiplier=math.sqrt(decoder["hidden_size"]),  # Gemma's scaled word embedding
            final_logit_softcapping=config.get("final_logit_softcapping"),
            attention_k_eq_v=bool(config.get("attention_k_eq_v", False)),
        )
    return DSparkConfig(**fields)


def load_deepspec(directory: str | Path, overrides: dict[str, Any] | None = None) -> Drafter:
    """A DeepSpec checkpoint (``Qwen3DSparkModel``, ``Gemma4DSparkModel``, ``Qwen3Eagle3Model``) as a specdec drafter.

    DeepSpec ships the frozen target embedding and LM head, so no target is needed.
    """
    return load_export(directory, overrides=overrides)


def _from_deepspec_dspark(config, tensors, where, overrides) -> Drafter:
    gemma = config["architectures"][0] == "Gemma4DSparkModel"
    drafter_config = _dspark_config_from_deepspec(config, tensors, gemma)
    for key, value in (overrides or {}).items():
        setattr(drafter_config, key, value)
    head = _head(tensors, None, None, where)
    weights = {}
    for name, tensor in tensors.items():
        if name in HEAD_KEYS:
            continue
        for old, new in DEEPSPEC_MARKOV_NAMES.items():
            name = name.replace(old, new)
        weights[name] = tensor
    return _build(DSparkDrafter(drafter_config), weights, head, where)


def _eagle3_config(
    decoder: dict[str, Any], ids: list[int], draft_vocab: int, qk_norm: bool, depth, extra
) -> Eagle3Config:
    return Eagle3Config(
        **decoder,
        draft_vocab_size=draft_vocab,
        target_layer_ids=ids,
        target_num_hidden_layers=depth,
        qk_norm=qk_norm,
        **extra,
    )


def _eagle3_weights(
    tensors: dict[str, torch.Tensor], renames: dict[str, str], reduced: bool
) -> dict[str, torch.Tensor]:
    weights = {}
    for name, tensor in tensors.items():
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old) :]
        if name == "embed_tokens.weight":
            continue
        if not reduced and name in ("lm_head.weight", "d2t", "t2d"):
            continue  # a full-vocabulary draft predicts through the (target) LM head itself
        weights[name] = tensor
    return weights


def _full_vocab_identity(tensors: dict[str, torch.Tensor], where: Path) -> None:
    d2t = tensors.get("d2t")
    if d2t is not None and bool(d2t.any()):
        raise ExportReadError(f"{where}: draft_vocab_size equals vocab_size but d2t is not the identity mapping")


def _from_eagle3(config, tensors, where, target_head, target, overrides, *, decoder, ids, qk_norm, renames) -> Drafter:
    vocab = decoder["vocab_size"]
    draft_vocab = int(config.get("draft_vocab_size") or vocab)
    reduced = draft_vocab < vocab
    if not reduced:
        _full_vocab_identity(tensors, where)
    extra = {key: config[key] for key in ("ttt_length", "step_loss_decay") if key in config}
    drafter_config = _eagle3_config(decoder, ids, draft_vocab, qk_norm, config.get("num_target_layers"), extra)
    for key, value in (overrides or {}).items():
        setattr(drafter_config, key, value)
    # A reduced draft's lm_head is its own (trained) head; the target's LM head then comes from the target.
    shipped = ("embed_tokens.weight",) if reduced else HEAD_KEYS
    head = _head(tensors, target_head, target, where, shipped)
    if reduced and "lm_head.weight" not in tensors:
        raise ExportReadError(f"{where}: a reduced-vocabulary EAGLE3 draft must ship lm_head.weight")
    return _build(Eagle3Drafter(drafter_config), _eagle3_weights(tensors, renames, reduced), head, where)


# ---- vLLM speculators -----------------------------------------------------------------------------------
def _from_speculators(config, tensors, where, target_head, target, overrides) -> Drafter:
    kind = config["speculators_model_type"]
    decoder = _decoder(config["transformer_layer_config"])
    if kind == "eagle3":
        if config.get("norm_before_residual", True):  # vLLM's default when the field is absent
            raise ExportReadError(
                f"{where}: norm_before_residual is true (or absent); specdec's EAGLE3 cannot express it"
            )
        ids = [i - 1 for i in config["eagle_aux_hidden_state_layer_ids"]]  # capture index → output of layer
        qk_norm = config["transformer_layer_config"].get("model_type") == "qwen3"
        return _from_eagle3(
            config,
            tensors,
            where,
            target_head,
            target,
            overrides,
            decoder=decoder,
            ids=ids,
            qk_norm=qk_norm,
            renames={},
        )
    ids = [i - 1 for i in config["aux_hidden_state_layer_ids"]]  # capture index → output of layer
    rank = int(config.get("markov_rank", 0)) if kind == "dspark" else 0
    anchor_first = bool(config.get("sample_from_anchor", True)) if kind == "dspark" else False
    fields = dict(
        **decoder,
        target_hidden_size=config.get("target_hidden_size") or _fc_width(tensors, ids, decoder["hidden_size"]),
        target_layer_ids=ids,
        block_size=config["block_size"],
        mask_token_id=config["mask_token_id"],
        anchor_convention="deepspec" if anchor_first else "zlab",
        markov_rank=rank,
        markov_head_type=config.get("markov_head_type") or "vanilla",
        enable_confidence_head=bool(config.get("enable_confidence_head", False)),
        confidence_head_with_markov=bool(config.get("confidence_head_with_markov", False)),
    )
    return _dspark_from_fields(fields, tensors, where, target_head, target, overrides)


def _dspark_from_fields(fields, tensors, where, target_head, target, overrides) -> Drafter:
    fields.update(overrides or {})
    head = _head(tensors, target_head, target, where)
    weights = {name: tensor for name, tensor in tensors.items() if name not in HEAD_KEYS}
    return _build(DSparkDrafter(DSparkConfig(**fields)), weights, head, where)


# ---- SGLang / z-lab ----------------------------------------------------------------------------------
def _from_zlab_dflash(config, tensors, where, target_head, target, overrides) -> Drafter:
    decoder = _decoder(config)
    dflash = config["dflash_config"]
    ids = list(dflash["target_layer_ids"])  # output-of-layer convention
    fields = dict(
        **decoder,
        target_hidden_size=config.get("target_hidden_size") or _fc_width(tensors, ids, decoder["hidden_size"]),
        target_layer_ids=ids,
        target_num_hidden_layers=config.get("num_target_layers"),
        block_size=config["block_size"],
        mask_token_id=dflash["mask_token_id"],
        anchor_convention="zlab",  # block [anchor, mask...]; slots 1..B-1 predict
        markov_rank=0,
        enable_confidence_head=False,
    )
    return _dspark_from_fields(fields, tensors, where, target_head, target, overrides)


def load_export(
    directory: str | Path,
    *,
    target: str | None = None,
    target_head: TargetHead | None = None,
    overrides: dict[str, Any] | None = None,
) -> Drafter:
    """Rebuild the drafter an engine would serve from ``directory`` (fp32, target head attached).

    ``target`` / ``target_head`` supply the embedding and LM head for formats that share them with the target;
    ``overrides`` sets training-only fields the formats do not carry (``num_anchors``, ``ttt_length``, ...).
    """
    where = Path(directory)
    config = read_config(where)
    tensors = read_tensors(where)
    if "speculators_model_type" in config:
        return _from_speculators(config, tensors, where, target_head, target, overrides)
    architecture = (config.get("architectures") or [None])[0]
    if architecture in ("Qwen3DSparkModel", "Gemma4DSparkModel"):
        return _from_deepspec_dspark(config, tensors, where, overrides)
    if architecture == "DFlashDraftModel":
        return _from_zlab_dflash(config, tensors, where, target_head, target, overrides)
    if architecture == "Qwen3Eagle3Model":
        return _from_eagle3(
            config,
            tensors,
            where,
            target_head,
            target,
            overrides,
            decoder=_decoder(config),
            ids=list(config["target_layer_ids"]),
            qk_norm=True,
            renames={},
        )
    if architecture == "LlamaForCausalLMEagle3":
        ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        if not ids:
            raise ExportReadError(f"{where}: eagle_config.eagle_aux_hidden_state_layer_ids is missing")
        return _from_eagle3(
            config,
            tensors,
            where,
            target_head,
            target,
            overrides,
            decoder=_decoder(config),
            ids=list(ids),
            qk_norm=False,
            renames={"midlayer.": "layers.0."},
        )
    raise ExportReadError(f"{where}/config.json: architectures = {config.get('architectures')!r} is not a known format")
