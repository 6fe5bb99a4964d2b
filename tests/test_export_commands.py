"""``specdec export`` command functions on a drafter for the tiny target, and the ExportParityCheck callback."""

import json

import lightning as L
import pytest
import torch
from jsonargparse import auto_cli
from transformers import AutoConfig, AutoModel

from specdec.callbacks import ExportParityCheck
from specdec.drafters import DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter
from specdec.export import ExportValidationError, ParityError, find_problems, load_export
from specdec.export.commands import EXPORT_COMMANDS, export_command, import_command, parity_command, validate_command
from specdec.export.parity import fixed_inputs
from specdec.targets import TINY_TARGET, read_target_head, resolve_target

LAYER_IDS = [0, 2, 4]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_config():
    return AutoConfig.from_pretrained(resolve_target(TINY_TARGET).path)


def tiny_dspark(tiny_config, **overrides) -> DSparkDrafter:
    config = DSparkConfig.from_target(
        tiny_config, LAYER_IDS, num_hidden_layers=1, mask_token_id=3, num_anchors=8, **overrides
    )
    torch.manual_seed(0)
    return DSparkDrafter(config)


@pytest.fixture(scope="module")
def drafter_dir(tmp_path_factory, tiny_config):
    """An HF drafter directory as training leaves it: weights, config and a provenance naming the target."""
    directory = tmp_path_factory.mktemp("run") / "step=10.drafter"
    tiny_dspark(tiny_config).save_pretrained(directory)
    record = {"target": TINY_TARGET, "layer_ids": LAYER_IDS, "cache_manifest_id": "abc123", "hyper_parameters": {}}
    (directory / "specdec_provenance.json").write_text(json.dumps(record))
    return directory


@pytest.mark.parametrize("format_name", ["deepspec", "vllm", "sglang"])
def test_tiny_target_dspark_directory_exports_to_every_format(format_name, drafter_dir, tmp_path, capsys):
    out = tmp_path / format_name
    export_command(drafter_dir, out, format=format_name)  # target read from the directory's provenance
    printed = capsys.readouterr().out
    assert "validated" in printed and "reproduces the original drafter (max |Δ| 0 " in printed
    assert find_problems(out) == []
    provenance = json.loads((out / "specdec_provenance.json").read_text())
    assert provenance["target"] == TINY_TARGET and provenance["cache_manifest_id"] == "abc123"
    assert provenance["layer_ids"] == LAYER_IDS and len(provenance["tokenizer_hash"]) == 64


def test_lightning_checkpoint_exports(tiny_config, tmp_path, capsys):
    drafter = tiny_dspark(tiny_config)
    checkpoint = {
        "state_dict": {f"drafter.{name}": tensor for name, tensor in drafter.state_dict().items()},
        "drafter_config": drafter.config.to_dict(),
        "target": TINY_TARGET,
        "hyper_parameters": {"lr": 6e-4},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    export_command(tmp_path / "last.ckpt", tmp_path / "out", format="vllm", dtype="float32")
    assert "reproduces the original drafter" in capsys.readouterr().out
    rebuilt = load_export(tmp_path / "out", target=TINY_TARGET)
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name


def test_lightning_checkpoint_from_hyper_parameters(tiny_config, tmp_path):
    drafter = tiny_dspark(tiny_config)
    hparams = {"target": TINY_TARGET, "layer_ids": LAYER_IDS, "num_hidden_layers": 1, "drafter": {"num_anchors": 8}}
    state = {f"drafter._orig_mod.{name}": tensor for name, tensor in drafter.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, tmp_path / "run.ckpt")
    export_command(tmp_path / "run.ckpt", tmp_path / "out", format="sglang")
    assert find_problems(tmp_path / "out") == []


def test_import_command_writes_a_loadable_drafter(drafter_dir, tmp_path):
    export_command(drafter_dir, tmp_path / "deepspec", format="deepspec", dtype="float32", check_parity=False)
    import_command(tmp_path / "deepspec", tmp_path / "imported")
    imported = AutoModel.from_pretrained(tmp_path / "imported")
    original = AutoModel.from_pretrained(drafter_dir)
    assert isinstance(imported, DSparkDrafter)
    for name, tensor in original.state_dict().items():
        assert torch.equal(imported.state_dict()[name].float(), tensor.float()), name
    parity_command(drafter_dir, tmp_path / "deepspec", target=TINY_TARGET)


def test_validate_command_reports_problems(drafter_dir, tmp_path):
    export_command(drafter_dir, tmp_path / "vllm", format="vllm", check_parity=False)
    validate_command(tmp_path / "vllm")
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    config["aux_hidden_state_layer_ids"] = LAYER_IDS  # specdec ids written where vLLM expects capture indices
    (tmp_path / "vllm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportValidationError, match="wrong layer-id convention"):
        validate_command(tmp_path / "vllm")


def test_commands_parse_as_a_cli(drafter_dir, tmp_path, capsys):
    out = tmp_path / "sglang"
    args = ["export", "drafter", "--source", str(drafter_dir), "--format", "sglang", "--output_dir", str(out)]
    auto_cli({"export": EXPORT_COMMANDS}, args=args, as_positional=False)
    assert "Qwen3DSparkModel" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        auto_cli({"export": EXPORT_COMMANDS}, args=[*args[:4], "--format", "tensorrt"], as_positional=False)


# ---- the callback ------------------------------------------------------------------------------------------------
class DrafterModule(L.LightningModule):
    """The smallest module with the contract the callback relies on: ``drafter`` (head attached), ``target_name``."""

    def __init__(self, drafter) -> None:
        super().__init__()
        self.drafter = drafter
        self.target_name = TINY_TARGET

    def training_step(self, batch, batch_index):
        inputs = fixed_inputs(self.drafter.config, batch=1, length=12)
        output = self.drafter(**inputs)
        logits = output.draft_logits if isinstance(self.drafter, DSparkDrafter) else output.draft_logits[0]
        return logits.float().square().mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.drafter.parameters(), lr=1e-2)


def test_callback_checks_every_checkpoint_in_a_real_fit(tiny_config, tmp_path):
    drafter = tiny_dspark(tiny_config, markov_rank=16)
    drafter.attach_target_head(read_target_head(TINY_TARGET))
    gate = ExportParityCheck(export_root=tmp_path / "exports")
    trainer = L.Trainer(
        max_steps=2,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[gate],
    )
    trainer.fit(DrafterModule(drafter))
    assert gate.saves >= 1
    assert set(gate.last_results) == {"deepspec", "vllm", "sglang"}
    assert all(report.worst == 0.0 for report in gate.last_results.values())
    saved = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=False)
    assert set(saved["export_parity"]) == {"deepspec", "vllm", "sglang"}
    assert find_problems(tmp_path / "exports" / "sglang") == []


def _eagle3_drafter() -> Eagle3Drafter:
    config = Eagle3Config(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        target_layer_ids=[0, 1, 2],
        target_num_hidden_layers=4,
        ttt_length=2,
    )
    torch.manual_seed(0)
    drafter = Eagle3Drafter(config)
    generator = torch.Generator().manual_seed(0)
    from specdec.targets import TargetHead

    drafter.attach_target_head(
        TargetHead(torch.randn(40, 16, generator=generator), torch.randn(40, 16, generator=generator), False, "e", "l")
    )
    return drafter


class _Trainer:
    is_global_zero, global_step, loggers = True, 5, []


def test_callback_records_refusals_and_catches_a_broken_exporter(monkeypatch):
    drafter = _eagle3_drafter()
    module = DrafterModule(drafter)
    checkpoint = {"state_dict": {f"drafter.{k}": v for k, v in drafter.state_dict().items()}}
    ExportParityCheck().on_save_checkpoint(_Trainer(), module, checkpoint)
    assert "refused" in checkpoint["export_parity"]["sglang"]  # qk-norm Eagle3 is not LlamaForCausalLMEagle3
    assert checkpoint["export_parity"]["vllm"]

    import specdec.export.deepspec as deepspec

    original = deepspec.eagle3_tensors

    def swapped(drafter):  # a shape-preserving mapping bug: gate and up projections exchanged
        tensors = original(drafter)
        gate, up = "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight"
        tensors[gate], tensors[up] = tensors[up], tensors[gate]
        return tensors

    monkeypatch.setattr(deepspec, "eagle3_tensors", swapped)
    with pytest.raises(ParityError, match="DIFFERS FROM the original drafter"):
        ExportParityCheck(formats=["deepspec"]).on_save_checkpoint(_Trainer(), module, dict(checkpoint))
    relaxed = ExportParityCheck(formats=["deepspec"], strict=False)
    with pytest.warns(UserWarning, match="export parity failed"):
        relaxed.on_save_checkpoint(_Trainer(), module, dict(checkpoint))
    assert relaxed.last_results["deepspec"].worst > 0


def test_callback_checks_a_saved_directory(drafter_dir):
    results = ExportParityCheck(formats=["vllm", "sglang"]).check_directory(drafter_dir, TINY_TARGET)
    assert {name: report.passed for name, report in results.items()} == {"vllm": True, "sglang": True}


def test_callback_reads_the_target_head_when_the_module_has_not_attached_it(tiny_config):
    module = DrafterModule(tiny_dspark(tiny_config))  # configure_model has not run: no head attached yet
    checkpoint = {"state_dict": {f"drafter.{k}": v for k, v in module.drafter.state_dict().items()}}
    ExportParityCheck(formats=["sglang"]).on_save_checkpoint(_Trainer(), module, checkpoint)
    assert checkpoint["export_parity"]["sglang"]["draft_logits"] == 0.0
