"""The YAML configs: every one prints through LightningCLI, and every paper config builds on the meta device."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import torch
import yaml
from transformers import Gemma4TextConfig

from specdec.callbacks import GlobalBatchSize
from specdec.cli import main
from specdec.lightning import DrafterModule
from specdec.lightning.cli import SpecdecCLI

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
        values = yaml.safe_load(config.read_text())
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
    return directory


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda path: path.stem)
def test_paper_config_builds_on_the_meta_device(config, gemma4_config_dir):
    args = ["--config", str(config), "--trainer.logger", "false", "--trainer.accelerator", "cpu"]
    if "gemma4" in config.stem:
        args += ["--model.init_args.target", str(gemma4_config_dir)]
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
