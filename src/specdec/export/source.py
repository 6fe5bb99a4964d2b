"""Where an export starts: a specdec drafter, from an HF drafter directory or a Lightning checkpoint.

An HF drafter directory (``drafter.save_pretrained``) holds the trainable weights only; the frozen target
embedding and LM head are read again from the target. A Lightning ``.ckpt`` holds the LightningModule's
``state_dict`` (keys prefixed ``drafter.``) and its hyper-parameters, from which the drafter config is rebuilt.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModel

from specdec.drafters import DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter
from specdec.targets import TargetHead, read_target_head, resolve_target

Drafter = DSparkDrafter | Eagle3Drafter

# Prefixes added by LightningModules, torch.compile and FSDP wrappers around the drafter's own names.
TRAINER_PREFIXES = ("drafter.", "_orig_mod.", "_fsdp_wrapped_module.", "module.", "draft_model.")


def strip_trainer_prefixes(state_dict: dict[str, torch.Tensor], owner: str = "drafter.") -> dict[str, torch.Tensor]:
    """The drafter's tensors of a training state dict, under the drafter's own names."""
    stripped: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if not key.startswith(owner):
            continue
        name = key
        changed = True
        while changed:
            changed = False
            for prefix in TRAINER_PREFIXES:
                if name.startswith(prefix):
                    name = name[len(prefix) :]
                    changed = True
            name = name.replace("._orig_mod.", ".").replace("._fsdp_wrapped_module.", ".")
        stripped[name] = tensor
    return stripped


def target_head_of(drafter: Drafter) -> TargetHead:
    """The frozen target embedding and LM head attached to a drafter (refused when none is attached)."""
    if isinstance(drafter, DSparkDrafter):
        if not drafter.target_head.attached:
            raise RuntimeError("the drafter has no target embedding / LM head: call attach_target_head() first")
        embed, lm_head = drafter.target_head.embed_weight, drafter.target_head.lm_head_weight
    else:
        if not drafter.target_attached:
            raise RuntimeError("the drafter has no target embedding / LM head: call attach_target_head() first")
        embed, lm_head = drafter.embed_weight, drafter.target_lm_head_weight
    return TargetHead(
        embed_tokens=embed, lm_head=lm_head, tied=False, embed_key="embed_tokens.weight", lm_head_key="lm_head.weight"
    )


def has_target_head(drafter: Drafter) -> bool:
    return drafter.target_head.attached if isinstance(drafter, DSparkDrafter) else drafter.target_attached


def load_drafter(source: str | Path, target: str | None = None, revision: str | None = None) -> Drafter:
    """A drafter from an HF drafter directory or a Lightning ``.ckpt`` (a file, or DeepSpeed's sharded checkpoint
    directory), in fp32, with the target head attached.

    ``target`` (``specdec-tiny``, a local HF directory or a hub id) supplies the frozen embedding and LM head;
    without it the drafter is returned bare (enough for formats that omit them, e.g. vLLM DFlash).
    """
    path = Path(source)
    if path.is_dir() and not (path / "config.json").exists() and is_deepspeed_checkpoint(path):
        drafter, recorded_target = _from_deepspeed_checkpoint(path, target)
        target = target or recorded_target
    elif path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path} has no config.json: expected an HF drafter directory (save_pretrained)")
        drafter = AutoModel.from_pretrained(path)
        if not isinstance(drafter, DSparkDrafter | Eagle3Drafter):
            raise TypeError(f"{path}/config.json describes a {type(drafter).__name__}, not a specdec drafter")
    elif path.suffix == ".ckpt" and path.is_file():
        drafter, recorded_target = _from_lightning_checkpoint(path, target)
        target = target or recorded_target
    else:
        raise FileNotFoundError(f"{path} is neither an HF drafter directory nor a Lightning .ckpt file")
    drafter = drafter.float().eval()
    if target is not None:
        drafter.attach_target_head(read_target_head(target, revision=revision))
    return drafter


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A Lightning checkpoint written by ``DeepSpeedStrategy``: a directory with DeepSpeed's ``latest`` tag file."""
    path = Path(path)
    return path.is_dir() and (path / "latest").is_file()


def _from_deepspeed_checkpoint(path: Path, target: str | None) -> tuple[Drafter, str | None]:
    """Consolidate a sharded DeepSpeed checkpoint into one Lightning checkpoint file, then read that."""
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as error:  # pragma: no cover - depends on the installed lightning
        raise ImportError(f"{path}: reading a DeepSpeed checkpoint needs lightning's deepspeed utilities") from error
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        single = Path(scratch) / "consolidated.ckpt"
        try:
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(single))
        except ModuleNotFoundError as error:
            raise ImportError(
                f"{path} is a DeepSpeed checkpoint; reading it needs DeepSpeed (pip install 'specdec[deepspeed]'), "
                "or use the .drafter directory written beside it"
            ) from error
        return _from_lightning_checkpoint(single, target)


def drafter_from_lightning_checkpoint(path: str | Path, target: str | None = None) -> Drafter:
    """Rebuild the drafter of a LightningModule checkpoint from its ``state_dict`` and hyper-parameters."""
    return _from_lightning_checkpoint(path, target)[0]


def _from_lightning_checkpoint(path: str | Path, target: str | None) -> tuple[Drafter, str | None]:
    """The drafter and the target recorded in the checkpoint (specdec modules store both at the top level)."""
    # The checkpoint is the user's own training output; it pickles hyper-parameters, so weights_only is off.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dict" not in checkpoint:
        raise KeyError(f"{path} has no 'state_dict': not a Lightning checkpoint")
    weights = strip_trainer_prefixes(checkpoint["state_dict"])
    if not weights:
        raise KeyError(
            f"{path}: no 'drafter.*' tensors in state_dict (keys start {sorted(checkpoint['state_dict'])[:3]})"
        )
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if "drafter_config" in checkpoint:
        hparams["drafter_config"] = checkpoint["drafter_config"]
    recorded_target = checkpoint.get("target") or hparams.get("target")
    config = _config_from_hparams(hparams, weights, target or recorded_target, path)
    drafter = (DSparkDrafter if isinstance(config, DSparkConfig) else Eagle3Drafter)(config)
    missing, unexpected = drafter.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise KeyError(f"{path}: drafter weights do not match the config (missing {missing}, unexpected {unexpected})")
    return drafter, recorded_target


def _is_eagle3(weights: dict[str, Any]) -> bool:
    return "layers.0.hidden_norm.weight" in weights


def _config_from_hparams(hparams: dict[str, Any], weights: dict[str, Any], target: str | None, path: Path):
    eagle3 = _is_eagle3(weights)
    given = hparams.get("drafter_config")
    if isinstance(given, dict):
        fields = {key: value for key, value in given.items() if key not in ("model_type", "transformers_version")}
        return (Eagle3Config if eagle3 else DSparkConfig)(**fields)
    layer_ids = hparams.get("layer_ids")
    if target is None or layer_ids is None:
        raise KeyError(
            f"{path}: hyper_parameters lack 'target' and 'layer_ids' (or a full 'drafter_config'); "
            "export the HF drafter directory saved next to the checkpoint instead"
        )
    target_config = AutoConfig.from_pretrained(resolve_target(target).path)
    overrides = dict(hparams.get("drafter") or {})
    if eagle3:
        return Eagle3Config.from_target(target_config, layer_ids, **overrides)
    mask = hparams.get("mask_token_id")
    if mask is None:
        from transformers import AutoTokenizer

        mask = AutoTokenizer.from_pretrained(resolve_target(target).path).mask_token_id
        if mask is None:
            raise KeyError(f"{path}: mask_token_id is not in hyper_parameters and the target tokenizer has none")
    return DSparkConfig.from_target(
        target_config,
        layer_ids,
        num_hidden_layers=int(hparams.get("num_hidden_layers", 5)),
        mask_token_id=mask,
        **overrides,
    )


def recorded_target(source: str | Path) -> str | None:
    """The target a training run recorded with its drafter: the HF directory's provenance or the ``.ckpt``'s."""
    path = Path(source)
    if path.is_dir():
        record = path / "specdec_provenance.json"
        return json.loads(record.read_text()).get("target") if record.exists() else None
    if path.suffix == ".ckpt" and path.is_file():
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return checkpoint.get("target") or (checkpoint.get("hyper_parameters") or {}).get("target")
    return None
