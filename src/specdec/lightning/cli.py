"""LightningCLI of ``specdec fit / validate / test / predict`` over any drafter module and DataModule.

The facts a drafter and its data must agree on are stated once, on the DataModule (``data.init_args.target``
and ``data.init_args.layer_ids``), and linked into the model at parse time: a config cannot state them twice, so
it cannot state them differently, and layer ids the target does not have are refused before anything is built.

Configs stack: ``--config`` may be given several times, later files overriding earlier ones (a ``class_path``
stated once, its ``init_args`` refined by later files). A file may name the parts it stacks on with
``config: [part.yaml, ...]`` (paths relative to the file): they are applied first, in order, then the file itself,
exactly as if each had been given with its own ``--config``. Values may refer to others with OmegaConf
interpolation resolved over the merged config (``${..run_name}``), so a run's name and directory are stated once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from specdec.lightning.base import DrafterModule
from specdec.lightning.checkpoint_io import check_checkpoint_readable


def linked_target(target: str | None) -> str:
    """The DataModule's target, which the model trains for; stated once, on the data."""
    if target is None:
        raise ValueError("data.init_args.target is required: the drafter is trained for the target the data came from")
    return target


def linked_layer_ids(target: str | None, layer_ids: list[int] | None) -> list[int]:
    """The DataModule's layer ids, checked against the target's depth when its config is at hand offline."""
    if layer_ids is None:
        raise ValueError("data.init_args.layer_ids is required: the target layers the drafter reads")
    depth = _offline_depth(target) if target is not None else None
    if depth is not None:
        from specdec.targets import validate_layer_ids

        try:
            validate_layer_ids(layer_ids, depth)
        except ValueError as error:
            raise ValueError(
                f"data.init_args.layer_ids {list(layer_ids)} do not fit target {target}: {error}"
            ) from None
    return list(layer_ids)


def known_mask_token_id(target: str | None) -> int | None:
    """The mask token DSpark/DFlash drafts with for a known target; None lets the module read the tokenizer's."""
    from specdec.targets.known import known_mask_token_id as known

    return None if target is None else known(target)


def _offline_depth(target: str) -> int | None:
    """The target's layer count from a local directory, the HF cache or the known-target table; None otherwise."""
    from transformers import AutoConfig

    from specdec.targets import resolve_target
    from specdec.targets.known import known_target_config

    location = resolve_target(target)
    try:
        config = AutoConfig.from_pretrained(location.path, revision=location.revision, local_files_only=True)
    except (OSError, ValueError):
        config = known_target_config(target)
    return None if config is None else config.get_text_config().num_hidden_layers


def expand_config_stacks(args: list[str]) -> list[str]:
    """``--config run.yaml`` whose ``config:`` lists parts → ``--config part`` for each part, then the rest of run.yaml.

    jsonargparse's own ``config: other.yaml`` includes one file, and a subclass group the including file also sets
    (``model: {init_args: ...}``) replaces the included one; giving each part its own ``--config`` merges them.
    """
    expanded: list[str] = []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--config" and index + 1 < len(args):
            expanded += _expand_config_file(args[index + 1])
            index += 2
            continue
        if arg.startswith("--config="):
            expanded += _expand_config_file(arg.removeprefix("--config="))
        else:
            expanded.append(arg)
        index += 1
    return expanded


def _expand_config_file(value: str, seen: tuple[Path, ...] = ()) -> list[str]:
    path = Path(value)
    if not path.is_file():
        return ["--config", value]
    content = yaml.safe_load(path.read_text())
    if not isinstance(content, dict) or not isinstance(content.get("config"), list):
        return ["--config", value]
    if path.resolve() in seen:
        raise ValueError(f"{path}: config stack includes itself ({' → '.join(map(str, seen))})")
    expanded: list[str] = []
    for part in content.pop("config"):
        part_path = path.parent / str(part)
        if not part_path.is_file():
            raise FileNotFoundError(f"{path}: config part {part!r} not found at {part_path}")
        expanded += _expand_config_file(str(part_path), (*seen, path.resolve()))
    if content:
        expanded += ["--config", yaml.safe_dump(content, sort_keys=False)]
    return expanded


LINKED_MODEL_ARGUMENTS = ("target", "layer_ids", "mask_token_id")  # set from the DataModule, never stated


def refuse_linked_model_arguments(args: list[str]) -> None:
    """A model argument linked from the data, stated anyway, would be overwritten silently: refuse it instead."""
    stated: list[str] = []
    for index, arg in enumerate(args):
        name = arg.removeprefix("--").split("=", 1)[0]
        if name in {f"model.init_args.{key}" for key in LINKED_MODEL_ARGUMENTS} | {
            f"model.{key}" for key in LINKED_MODEL_ARGUMENTS
        }:
            stated.append(f"{arg.split('=', 1)[0]} on the command line")
        if arg == "--config" and index + 1 < len(args):
            stated += _linked_in_config(args[index + 1])
    if stated:
        keys = ", ".join(f"data.init_args.{key}" for key in LINKED_MODEL_ARGUMENTS)
        raise ValueError(f"{'; '.join(stated)}: the model's target, layer ids and mask token are linked from {keys}")


def _linked_in_config(value: str) -> list[str]:
    path = Path(value)
    source = str(path) if path.is_file() else "a stacked config"
    content = yaml.safe_load(path.read_text() if path.is_file() else value)
    if not isinstance(content, dict):
        return []
    found = []
    model = content.get("model")
    init_args = model.get("init_args") if isinstance(model, dict) else None
    if isinstance(init_args, dict):
        found += [f"model.init_args.{key} in {source}" for key in LINKED_MODEL_ARGUMENTS if key in init_args]
    include = content.get("config")
    if isinstance(include, str) and path.is_file():
        found += _linked_in_config(str(path.parent / include))
    return found


class SpecdecCLI(LightningCLI):
    """Models and DataModules are chosen by ``class_path`` in YAML (e.g. ``specdec.lightning.DSparkModule``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = kwargs.pop("parser_kwargs", None) or {}
        parser_kwargs.setdefault("parser_mode", "omegaconf+")
        super().__init__(
            model_class=DrafterModule,
            datamodule_class=LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            parser_kwargs=parser_kwargs,
            **kwargs,
        )

    def parse_arguments(self, parser: ArgumentParser, args: Any) -> None:
        if isinstance(args, (dict, Namespace)):
            super().parse_arguments(parser, args)
            return
        expanded = expand_config_stacks(list(sys.argv[1:] if args is None else args))
        try:
            refuse_linked_model_arguments(expanded)
        except ValueError as error:
            parser.error(str(error))
        self.config = parser.parse_args(expanded)
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config.get(f"{subcommand}.ckpt_path") if subcommand else None
        if ckpt_path:
            check_checkpoint_readable(ckpt_path)  # before Lightning reads its hyper-parameters from it

    def add_arguments_to_parser(self, parser: ArgumentParser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None, help="A run's name, for interpolation in stacked configs."
        )
        parser.link_arguments("data.init_args.target", "model.init_args.target", linked_target, apply_on="parse")
        parser.link_arguments(
            "data.init_args.target", "model.init_args.mask_token_id", known_mask_token_id, apply_on="parse"
        )
        parser.link_arguments(
            ("data.init_args.target", "data.init_args.layer_ids"),
            "model.init_args.layer_ids",
            linked_layer_ids,
            apply_on="parse",
        )
