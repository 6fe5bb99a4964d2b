"""`specdec test` through its component in a module of its own: eval prompts decoded against the tiny target."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from specdec.data.datamodules import TargetCacheDataModule
from specdec.data.prompts.eval_sets import EvalSetsSpec, EvalTask, write_eval_set
from specdec.decoding import DecodingOptions, DynamicTopK, PrefixScheduler
from specdec.drafters import DSparkConfig, DSparkDrafter
from specdec.lightning import DecodableModule, SpeculativeTest
from specdec.targets import TINY_TARGET, load_target, read_target_head

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyDrafterModule(L.LightningModule):
    """A module of one's own: the DecodableModule attributes around an untrained DSpark drafter of the tiny target,
    its test hooks handed to a SpeculativeTest."""

    def __init__(self, decoding: DecodingOptions) -> None:
        super().__init__()
        self.target_name = TINY_TARGET
        self.decoding_options = decoding
        target = load_target(TINY_TARGET, device="cpu")
        self._target = target
        torch.manual_seed(0)
        config = DSparkConfig.from_target(
            target.model.config,
            [1, 3],
            num_hidden_layers=1,
            mask_token_id=target.tokenizer.mask_token_id,
            block_size=4,
            markov_rank=16,
        )
        self.drafter = DSparkDrafter(config)
        self.drafter.attach_target_head(read_target_head(TINY_TARGET))

        self.speculative_test = SpeculativeTest()

    def load_target(self):
        return self._target

    def on_test_epoch_start(self) -> None:
        self.speculative_test.start(self)

    def test_step(self, batch, batch_idx: int = 0) -> None:
        self.speculative_test.step(self, batch)

    def on_test_epoch_end(self) -> None:
        self.speculative_test_results = self.speculative_test.end(self)


def test_specdec_test_decodes_eval_sets_and_logs_per_dataset(tmp_path, capsys):
    write_eval_set(tmp_path / "sums.jsonl", [{"turns": [f"Write a function that adds {i} numbers."]} for i in range(3)])
    write_eval_set(tmp_path / "chat.jsonl", [{"turns": ["What does os.path do?", "And shutil?"]}])
    spec = EvalSetsSpec(
        str(tmp_path), tasks=[EvalTask("sums", 2, "code"), EvalTask("chat", None, "chat")], all_turns=["chat"]
    )
    module = TinyDrafterModule(DecodingOptions(temperature=1.0, max_new_tokens=12, seed=1, warmup_prompts=0))
    assert isinstance(module, DecodableModule)
    trainer = L.Trainer(
        accelerator="cpu", logger=CSVLogger(tmp_path / "logs"), enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(module, datamodule=TargetCacheDataModule(str(tmp_path / "unused"), eval_sets=spec))
    printed = capsys.readouterr().out
    for column in ("dataset", "#propose", "accept_len", "verify_rate", "accept_rate@0", "cond_accept@3", "speedup"):
        assert column in printed
    results = module.speculative_test_results
    assert results["dataset/sums"]["rounds"] > 0 and results["dataset/chat"]["rounds"] > 0
    assert results["domain/code"]["tau"] == results["dataset/sums"]["tau"]
    assert 1.0 <= results["all"]["tau"] <= 5.0 and results["all"]["propose"] <= 4.0
    assert results["all"]["tokens_per_second"] > 0 and results["all"]["ar_tokens_per_second"] > 0
    # 2 prompts of `sums` plus 2 turns of `chat`, 12 tokens at most each
    assert results["all"]["rounds"] <= 4 * 11
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        header = next(csv.reader(handle))
    assert {"test/tau", "test/dataset/sums/tau", "test/domain/chat/accept_rate@0", "test/speedup"} <= set(header)


COMPARED = ["static@0.3", "dynamic@0.3", "prefix", "topk", "tree@2x2"]


def test_specdec_test_reports_every_proposal_mode_side_by_side(tmp_path, capsys):
    """Truncation policies, the prefix scheduler and tree drafting in ``specdec test``, batched, on the same prompts:
    one row per mode and group; greedy, every mode commits exactly the target's own greedy tokens."""
    write_eval_set(tmp_path / "sums.jsonl", [{"turns": [f"Add {i} and {i + 1}, then explain."]} for i in range(4)])
    spec = EvalSetsSpec(str(tmp_path), tasks=[EvalTask("sums", None, "code")], batch_size=2)
    options = DecodingOptions(
        temperature=0.0, max_new_tokens=10, seed=1, warmup_prompts=1, batch_size=2, engine="static", compare=COMPARED
    )
    module = TinyDrafterModule(options)
    trainer = L.Trainer(
        accelerator="cpu", logger=CSVLogger(tmp_path / "logs"), enable_progress_bar=False, enable_model_summary=False
    )
    trainer.test(module, datamodule=TargetCacheDataModule(str(tmp_path / "unused"), eval_sets=spec))
    printed = capsys.readouterr().out
    by_mode = module.speculative_test.results_by_mode
    assert list(by_mode) == ["chain", *COMPARED]
    table = [line.split(" | ") for line in printed.splitlines() if line.startswith("dataset/sums ")]
    assert [row[1].strip() for row in table] == ["chain", *COMPARED]  # side by side under the dataset
    for mode, results in by_mode.items():
        assert results["dataset/sums"]["rounds"] > 0, mode
        assert results["all"]["tokens_per_second"] > 0 and results["all"]["ar_tokens_per_second"] > 0, mode
    assert by_mode["tree@2x2"]["all"]["propose"] == pytest.approx(6.0, abs=2.0)  # 2 + 4 nodes, fewer at the end
    assert module.speculative_test_results == by_mode["chain"]
    evaluators = module.speculative_test.evaluators
    assert isinstance(evaluators["prefix"].decoder.policy, PrefixScheduler)
    assert len(evaluators["prefix"].steps_per_second.token_counts) == evaluators["prefix"].max_drafts + 1
    assert isinstance(evaluators["topk"].decoder.policy, DynamicTopK)
    assert evaluators["prefix"].decoder.session is evaluators["chain"].decoder.session  # compiled once, shared
    assert all(f"{mode}: engine static" in printed for mode in ["chain", *COMPARED[:4]])
    assert "tree@2x2: engine eager" in printed
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        header = next(csv.reader(handle))
    assert {"test/tau", "test/tree@2x2/tau", "test/prefix/dataset/sums/speedup"} <= set(header)

    prompts = [[*range(3, 3 + n)] for n in (5, 9)]
    for mode, evaluator in evaluators.items():
        with torch.inference_mode():  # the sessions' buffers were made inside the test loop's inference mode
            decoded = evaluator.decode(prompts, seed=0, measure_speedup=True)
        speculative = [result.token_ids for result in decoded.speculative.results]
        assert speculative == [result.token_ids for result in decoded.autoregressive.results], mode
