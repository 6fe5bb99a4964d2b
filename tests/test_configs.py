"""The YAML configs: every one prints through LightningCLI, and every paper config builds on the meta device."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
import yaml
from transformers import Gemma4TextConfig

from specdec.callbacks import GlobalBatchSize
from specdec.cli import main
from specdec.decoding import DecodingOptions
from specdec.drafters import DFlashOptions, DSparkOptions, Eagle3Options
from specdec.lightning import DrafterModule
from specdec.lightning.cli import SpecdecCLI
from specdec.targets.loading import TINY_TARGET_PATH

CONFIGS = Path(__file__).parents[1] / "configs"
PAPER_CONFIGS = sorted(path for path in CONFIGS.glob("*.yaml") if path.stem != "quickstart")

# Trainable parameters of DeepSpec's drafters (deepspec.md §3.5): DSpark-Qwen3-4B 615 M (Markov 77.8 M), DFlash
# the same without the Markov head; the 8B and 14B drafters are sized like their targets.
EXPECTED_MILLIONS = {
    "dspark_qwen3_4b": 615.2,
    "dflash_qwen3_4b": 615.2 - 77.8,
    "dspark_qwen3_8b": 1130,
    "dspark_qwen3_14b": 1860,
}


def test_there_are_twelve_paper_configs():
    names = {path.stem for path in PAPER_CONFIGS}
    assert names == {
        f"{a}_{t}" for a in ("dspark", "dflash", "eagle3") for t in ("qwen3_4b", "qwen3_8b", "qwen3_14b", "gemma4_12b")
    }


@pytest.mark.parametrize("config", [*PAPER_CONFIGS, CONFIGS / "quickstart.yaml"], ids=lambda path: path.stem)
def test_config_prints(config):
    output = io.StringIO()
    with contextlib.redirect_stdout(output), pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(output.getvalue())
    assert printed["model"]["class_path"].startswith("specdec.lightning.")
    assert printed["data"]["class_path"] == "specdec.data.TargetCacheDataModule"


def test_paper_hyper_parameters_match_deepspec():
    for config in PAPER_CONFIGS:
        values = resolved_config(["--config", str(config)])
        model = values["model"]["init_args"]
        trainer = values["trainer"]
        assert (model["lr"], model["warmup_ratio"], model["weight_decay"]) == (6e-4, 0.04, 0.0), config.name
        assert (trainer["max_epochs"], trainer["precision"], trainer["gradient_clip_val"]) == (10, "bf16-mixed", 1.0)
        batch = [c for c in trainer["callbacks"] if c["class_path"].endswith("GlobalBatchSize")]
        assert batch[0]["init_args"]["global_batch_size"] == 512 and values["data"]["init_args"]["batch_size"] == 1
        expected_layers = {"qwen3_4b": [1, 9, 17, 25, 33], "qwen3_8b": [1, 9, 17, 25, 33]}
        expected_layers.update(qwen3_14b=[1, 10, 19, 28, 37], gemma4_12b=[5, 17, 29, 41, 46])
        target_key = config.stem.split("_", 1)[1]
        assert model["layer_ids"] == expected_layers[target_key], config.name


@pytest.fixture(scope="module")
def gemma4_config_dir(tmp_path_factory):
    """A Gemma 4 text geometry with enough layers for the 12B layer ids (the hub config is not reachable here)."""
    directory = tmp_path_factory.mktemp("gemma4-geometry")
    layer_types = (["sliding_attention"] * 5 + ["full_attention"]) * 8
    config = Gemma4TextConfig(num_hidden_layers=48, layer_types=layer_types, per_layer_config={})
    config.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a tokenizer with a mask token (any id will do)
        shutil.copy(TINY_TARGET_PATH / name, directory / name)
    return directory


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda path: path.stem)
def test_paper_config_builds_on_the_meta_device(config, gemma4_config_dir):
    args = ["--config", str(config), "--trainer.logger", "false", "--trainer.accelerator", "cpu"]
    if "gemma4" in config.stem:
        args += ["--data.init_args.target", str(gemma4_config_dir)]
    with torch.device("meta"):
        cli = SpecdecCLI(args=args, run=False)
    module = cli.model
    assert isinstance(module, DrafterModule)
    parameters = [p for p in module.parameters() if p.requires_grad]
    assert all(p.is_meta for p in parameters)
    millions = sum(p.numel() for p in parameters) / 1e6
    if config.stem in EXPECTED_MILLIONS:
        assert millions == pytest.approx(EXPECTED_MILLIONS[config.stem], rel=0.01)
    assert any(isinstance(c, GlobalBatchSize) for c in cli.trainer.callbacks)
    assert cli.datamodule.batch_size == 1
    if "eagle3" in config.stem:
        assert module.config.ttt_length == 7 and module.config.num_hidden_layers == 1
    else:
        assert module.config.block_size == 7 and module.config.num_anchors == 512
        assert module.config.num_hidden_layers == 5


class _ParseOnly(SpecdecCLI):
    """The CLI up to the parsed, linked and interpolated config: nothing is instantiated."""

    def _set_seed(self) -> None:
        pass

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str | None) -> None:
        pass


def resolved_config(args: list[str]) -> dict:
    config = _ParseOnly(args=["fit", *args]).config["fit"].clone().as_dict()
    config.pop("config", None)
    return config


def flat(value, prefix: str = "") -> dict:
    """``{"a": {"b": [1]}}`` → ``{"a.b.__len__": 1, "a.b.0": 1}`` (list lengths count, so a dropped item shows)."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list | tuple):
        items = {k: v for index, item in enumerate(value) for k, v in flat(item, f"{prefix}{index}.").items()}
        return {f"{prefix}__len__": len(value), **items}
    return {prefix[:-1]: value}


# What each config resolved to before the configs were split into stacked parts and the shared facts linked.
RESOLVED_BEFORE = json.loads((Path(__file__).parent / "data" / "resolved_configs.json").read_text())
MOVED_CLASSES = {  # the checkpoint and global-batch callbacks moved to specdec.callbacks
    "specdec.lightning.GlobalBatchSize": "specdec.callbacks.GlobalBatchSize",
    "specdec.lightning.DrafterCheckpoint": "specdec.callbacks.DrafterCheckpoint",
}
NEW_DATA_OPTIONS = {  # DataModule options added since, at defaults that keep the old behaviour
    "data.init_args.prefetch_factor": None,
    "data.init_args.pin_memory": None,
}
NEW_DECODING_OPTIONS = flat(asdict(DecodingOptions()), "model.init_args.decoding.")  # fields added since, at defaults
OPTIONS = {"DSparkModule": DSparkOptions, "DFlashModule": DFlashOptions, "Eagle3Module": Eagle3Options}


@pytest.mark.parametrize("name", sorted(RESOLVED_BEFORE), ids=str)
def test_every_config_resolves_to_the_values_it_had_before_it_was_split(name):
    """Every value of the old resolved config is found again; the only new keys are the typed drafter's defaults
    (which applied before too), the run name, the DataModule's layer ids (linked into the model's), and its later
    loader options and decoding options at their defaults."""
    before = flat(RESOLVED_BEFORE[name])
    now = resolved_config(["--config", str(CONFIGS / f"{name}.yaml")])
    after = flat(now)
    data = now["data"]["init_args"]
    for key, value in before.items():
        if (
            key.startswith("data.init_args.")
            and key.split(".")[3:4] in (["target"], ["layer_ids"])
            and ("build" in key.split(".")[2])
        ):
            # a cache build's target and layer ids now default to the DataModule's (stated once)
            field = key.split(".")[3]
            assert after.get(f"data.init_args.{key.split('.')[2]}.{field}") is None
            assert flat({field: data[field]}).get(".".join(key.split(".")[3:])) == value, key
            continue
        expected = MOVED_CLASSES.get(value, value) if key.endswith("class_path") else value
        assert after.get(key, "<missing>") == expected, key
    options = OPTIONS[now["model"]["class_path"].rsplit(".", 1)[1]]
    defaults = {f"model.init_args.drafter.{f.name}": f.default for f in fields(options)}
    for key in sorted(set(after) - set(before)):
        if key.startswith("model.init_args.drafter."):
            assert after[key] == defaults[key], key
        elif key.startswith("data.init_args.layer_ids"):
            assert after[key] == after["model.init_args." + key.removeprefix("data.init_args.")], key
        elif key in NEW_DATA_OPTIONS:
            assert after[key] is NEW_DATA_OPTIONS[key], key
        elif key in NEW_DECODING_OPTIONS:
            assert after[key] == NEW_DECODING_OPTIONS[key], key
        else:
            assert key == "run_name" or (key.startswith("data.init_args.") and "build.layer_ids" in key), key


def test_configs_are_stacked_from_shared_parts():
    lines = sum(len(path.read_text().splitlines()) for path in CONFIGS.rglob("*.yaml"))
    assert lines <= 965 // 2, f"{lines} YAML lines under configs/"
    run = yaml.safe_load((CONFIGS / "dspark_qwen3_4b.yaml").read_text())
    assert "model" not in run and "data" not in run  # algorithm and target come from their parts


def test_a_wrongly_typed_drafter_field_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        resolved_config(["--config", str(CONFIGS / "quickstart.yaml"), "--model.init_args.drafter.block_size", "abc"])
    assert "block_size" in capsys.readouterr().err


def test_the_model_cannot_state_a_target_of_its_own(capsys):
    args = ["--config", str(CONFIGS / "quickstart.yaml"), "--model.init_args.target", "Qwen/Qwen3-4B"]
    with pytest.raises(SystemExit):
        resolved_config(args)
    assert "model.init_args.target" in capsys.readouterr().err


def test_layer_ids_the_target_does_not_have_are_refused_before_any_model_is_built(capsys):
    args = ["--config", str(CONFIGS / "dspark_qwen3_4b.yaml"), "--data.init_args.layer_ids", "[1, 9, 17, 25, 40]"]
    with pytest.raises(SystemExit):
        resolved_config(args)
    assert "do not fit target Qwen/Qwen3-4B" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "stage"), [("deepspeed_zero2", 2), ("deepspeed_zero3_offload", 3)])
def test_deepspeed_strategy_configs_stack_onto_a_paper_run(name, stage):
    config = resolved_config(
        ["--config", str(CONFIGS / "dspark_qwen3_4b.yaml"), "--config", str(CONFIGS / "strategy" / f"{name}.yaml")]
    )
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert strategy["init_args"]["stage"] == stage and strategy["init_args"]["offload_optimizer"] is True
    assert config["trainer"]["precision"] == "bf16-mixed"  # the rest of the run is unchanged
