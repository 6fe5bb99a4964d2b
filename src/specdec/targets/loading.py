"""Find and load an HF decoder-only target, on whatever hardware is present."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from specdec.targets.geometry import TargetGeometry

TINY_TARGET = "specdec-tiny"
TINY_TARGET_PATH = Path(__file__).parent / "tiny" / "checkpoint"


@dataclass(frozen=True)
class TargetLocation:
    """Where a target's files live: a local directory, or a hub repo fetched file by file."""

    name: str
    path: Path | str  # a local directory, or the hub repo id
    is_local: bool
    revision: str | None = None

    def fetch(self, file_name: str, required: bool = False) -> str | None:
        """Local path of one of the target's files (downloading only that file from the hub), or None."""
        if self.is_local:
            candidate = Path(self.path) / file_name
            if candidate.exists():
                return str(candidate)
            if required:
                raise FileNotFoundError(f"{candidate} does not exist")
            return None
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            return hf_hub_download(str(self.path), file_name, revision=self.revision)
        except EntryNotFoundError:
            if required:
                raise
            return None


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_target(name_or_path: str | Path, revision: str | None = None) -> TargetLocation:
    """Resolve ``specdec-tiny``, a local directory, or a hub repo id ("org/name").

    A name that can only be a path (absolute, relative with ./, ~, or several slashes) must exist and hold
    a config.json; anything else is treated as a hub id.
    """
    name = str(name_or_path)
    if name == TINY_TARGET:
        return TargetLocation(name=name, path=TINY_TARGET_PATH, is_local=True)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"target {name!r} is a file; expected an HF model directory")
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"target directory {path} has no config.json: not an HF model directory")
        return TargetLocation(name=name, path=path, is_local=True)
    if isinstance(name_or_path, Path) or _looks_like_path(name):
        raise FileNotFoundError(f"target directory {path} does not exist")
    return TargetLocation(name=name, path=name, is_local=False, revision=revision)


@dataclass(frozen=True)
class Runtime:
    """Device, dtype and attention implementation for running a target."""

    device: torch.device
    dtype: torch.dtype
    attn_implementation: str


def _flash_attention_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_runtime(device: str = "auto", dtype: str = "auto", attn_implementation: str = "auto") -> Runtime:
    """Fill in ``"auto"`` fields from the hardware: CUDA bf16 (fp16 before Ampere) and fp32 on CPU."""
    resolved_device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    )
    if dtype == "auto":
        if resolved_device.type == "cuda":
            resolved_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            resolved_dtype = torch.float32
    else:
        resolved_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if not isinstance(resolved_dtype, torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype name")
    if attn_implementation == "auto":
        half = resolved_dtype in (torch.bfloat16, torch.float16)
        use_flash = resolved_device.type == "cuda" and half and _flash_attention_available()
        attn_implementation = "flash_attention_2" if use_flash else "sdpa"
    return Runtime(device=resolved_device, dtype=resolved_dtype, attn_implementation=attn_implementation)


@dataclass
class Target:
    """A loaded target: model (eval mode, frozen), tokenizer, geometry and where it came from."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    geometry: TargetGeometry
    location: TargetLocation
    runtime: Runtime


def load_target(
    name_or_path: str | Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str = "auto",
    revision: str | None = None,
    model_factory: Callable[..., PreTrainedModel] = AutoModelForCausalLM.from_pretrained,
) -> Target:
    """Load a decoder-only causal LM and its tokenizer, frozen and in eval mode."""
    location = resolve_target(name_or_path, revision=revision)
    runtime = choose_runtime(device, dtype, attn_implementation)
    config = AutoConfig.from_pretrained(location.path, revision=revision)
    if getattr(config.get_text_config(), "is_encoder_decoder", False):
        raise ValueError(f"target {location.name!r} is an encoder-decoder model; specdec needs a decoder-only LM")
    model = model_factory(
        location.path, revision=revision, dtype=runtime.dtype, attn_implementation=runtime.attn_implementation
    )
    model.to(runtime.device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(location.path, revision=revision)
    return Target(
        model=model,
        tokenizer=tokenizer,
        geometry=TargetGeometry.from_config(config),
        location=location,
        runtime=runtime,
    )
