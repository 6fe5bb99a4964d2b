"""Confidence calibration: DeepSpec's ECE / AUROC / Brier by hand, Sequential Temperature Scaling, the callback.

Checked here: the metric against numbers worked out by hand (binning, ties, stop-token rounds, position
weighting); STS lowering the held-out ECE of a deliberately over-confident head, both on synthetic logits with a
known temperature and on real decoding rounds of a drafter whose confidence head was scaled up; the temperatures
applied by the drafter at inference and surviving ``save_pretrained`` / ``from_pretrained``; and the callback in a
short real fit.
"""

from __future__ import annotations

import csv
import json
import math

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from specdec.callbacks import DrafterCheckpoint
from specdec.callbacks.confidence_calibration import ConfidenceCalibration
from specdec.data.cache.builder import TokenizeOptions, build_target_cache
from specdec.data.datamodules import TargetCacheDataModule
from specdec.data.prompts.sources import iter_training_conversations
from specdec.decoding import DecodingOptions, GenerationResult, SpeculativeDecoder
from specdec.decoding.temperature_scaling import (
    CalibrationRounds,
    calibrate,
    fit_sequential_temperatures,
    set_confidence_temperatures,
)
from specdec.drafters import DSparkDrafter
from specdec.lightning import DSparkModule
from specdec.metrics.confidence import ConfidenceCalibrationMetrics, histogram_auroc, plot_reliability
from specdec.targets import TINY_TARGET, load_target
from tests.test_datamodules import write_conversations
from tests.test_decoding import make_drafter, small_target

pytestmark = pytest.mark.usefixtures("one_thread")


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def hand_result() -> GenerationResult:
    """Rounds whose survival values sit away from bin edges: a = cumprod(c)."""
    result = GenerationResult(prompt_ids=[0])
    rounds = [
        ([0.82, 0.5], 2, 1, 2),  # a = [0.82, 0.41], labels [1, 0]
        ([0.83, 0.75], 2, 2, 3),  # a = [0.83, 0.6225], labels [1, 1]
        ([0.84, 0.5], 2, 0, 1),  # a = [0.84, 0.42], labels [0, 0]
        ([0.23, 0.9, 0.9], 3, 1, 1),  # an accepted stop token at draft 0: only a = [0.23], label [1] counts
        (None, 2, 1, 2),  # no confidence head: skipped
        ([], 0, 0, 1),  # no drafts: skipped
    ]
    for confidences, proposed, accepted, committed in rounds:
        logits = None if confidences is None else torch.tensor([logit(c) for c in confidences])
        result.confidence_logits.append(logits)
        result.proposed.append(proposed)
        result.accepted.append(accepted)
        result.committed.append(committed)
    return result


def test_metrics_match_a_hand_computation():
    metric = ConfidenceCalibrationMetrics(max_drafts=3)
    metric.update_from([hand_result()])
    values = metric.compute()
    # Position 0: a = [0.82, 0.83, 0.84, 0.23], labels [1, 1, 0, 1]; 0.82..0.84 share ECE bin 16.
    assert float(values["count@0"]) == 4
    assert float(values["ece@0"]) == pytest.approx(0.75 * abs(0.83 - 2 / 3) + 0.25 * 0.77, abs=1e-6)
    assert float(values["brier@0"]) == pytest.approx((0.18**2 + 0.17**2 + 0.84**2 + 0.77**2) / 4, abs=1e-6)
    assert float(values["auroc@0"]) == pytest.approx(0.0)  # the only rejection scored highest
    assert float(values["pred_mean@0"]) == pytest.approx(0.68, abs=1e-6)
    assert float(values["target_mean@0"]) == pytest.approx(0.75, abs=1e-6)
    # Position 1: a = [0.41, 0.6225, 0.42], labels [0, 1, 0]; 0.41 and 0.42 share bin 8.
    assert float(values["ece@1"]) == pytest.approx((2 / 3) * 0.415 + (1 / 3) * 0.3775, abs=1e-6)
    assert float(values["brier@1"]) == pytest.approx((0.41**2 + 0.3775**2 + 0.42**2) / 3, abs=1e-6)
    assert float(values["auroc@1"]) == pytest.approx(1.0)
    # Position 2 never counted: NaN there, and the summaries weight positions by their counts (4 and 3).
    assert float(values["count@2"]) == 0 and math.isnan(float(values["ece@2"]))
    assert float(values["ece"]) == pytest.approx((4 * float(values["ece@0"]) + 3 * float(values["ece@1"])) / 7)
    assert float(values["auroc"]) == pytest.approx(3 / 7, abs=1e-6)
    assert float(values["samples"]) == 7


def test_auroc_counts_ties_as_half_and_needs_both_classes():
    assert float(histogram_auroc(torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))) == 0.5
    # bin 1's positive beats bin 0's negative and ties bin 1's (½); bin 2's beats both: 3.5 of 4 pairs
    assert float(histogram_auroc(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]))) == 0.875
    assert math.isnan(float(histogram_auroc(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]))))


def test_metric_sums_like_one_pass_when_split():
    """Σ states: two metrics merged (what DDP does) equal one metric over all rounds."""
    result = hand_result()
    whole = ConfidenceCalibrationMetrics(3)
    whole.update_from([result])
    parts = [ConfidenceCalibrationMetrics(3), ConfidenceCalibrationMetrics(3)]
    for index in range(len(result.proposed)):
        single = GenerationResult(prompt_ids=[0])
        single.confidence_logits.append(result.confidence_logits[index])
        single.proposed.append(result.proposed[index])
        single.accepted.append(result.accepted[index])
        single.committed.append(result.committed[index])
        parts[index % 2].update_from([single])
    parts[0].merge_state(parts[1])
    merged, expected = parts[0].compute(), whole.compute()
    for name, value in expected.items():
        assert torch.allclose(merged[name], value, equal_nan=True), name


def synthetic_rounds(count: int, seed: int, overconfidence: float) -> CalibrationRounds:
    """Rounds whose drafts are accepted with probability σ(z_k) while the head reports ``overconfidence · z_k``."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(count, 4, generator=generator, dtype=torch.float64) + 1.0
    passed = torch.rand(count, 4, generator=generator, dtype=torch.float64) < torch.sigmoid(true_logits)
    accepted = passed.long().cumprod(-1).sum(-1)
    labels = (torch.arange(4)[None] < accepted[:, None]).double()
    return CalibrationRounds(overconfidence * true_logits, labels, torch.full((count,), 4))


def test_sts_recovers_a_known_temperature_and_lowers_heldout_ece():
    report = calibrate(synthetic_rounds(4000, 0, 3.0), synthetic_rounds(4000, 1, 3.0))
    assert report.temperatures[0] == pytest.approx(3.0, rel=0.25)  # position 1 sees the pure per-step bias
    assert all(t > 1.2 for t in report.temperatures[:3])  # over-confident logits get flattened
    assert report.heldout_before["ece"] > 0.05
    assert report.heldout_after["ece"] < 0.4 * report.heldout_before["ece"]
    for k in range(4):
        assert report.heldout_after[f"ece@{k}"] < report.heldout_before[f"ece@{k}"]


def test_sts_leaves_a_calibrated_head_alone():
    temperatures = fit_sequential_temperatures(synthetic_rounds(4000, 2, 1.0))
    assert temperatures[0] == pytest.approx(1.0, rel=0.15)


def test_sts_does_not_fit_positions_with_too_few_acceptances():
    rounds = synthetic_rounds(4000, 4, 3.0)
    rounds.labels[8:, 3] = 0.0  # at most 8 acceptances at the last position
    temperatures = fit_sequential_temperatures(rounds, min_class_count=10)
    assert temperatures[3] == 1.0 and temperatures[0] > 1.5
    assert fit_sequential_temperatures(rounds, min_class_count=1)[3] != 1.0


@pytest.fixture(scope="module")
def decoding_setup():
    target = small_target()
    drafter = make_drafter(target, "dspark")
    with torch.no_grad():
        drafter.confidence_head.proj.weight.mul_(5.0)  # every logit × 5: deliberately over-confident
        drafter.confidence_head.proj.bias.mul_(5.0)
    decoder = SpeculativeDecoder(target, drafter, temperature=1.0, max_new_tokens=16)
    return drafter, decoder


def test_sts_lowers_heldout_ece_of_an_overconfident_head_on_real_rounds(decoding_setup):
    drafter, decoder = decoding_setup
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    fit = decoder.generate([prompt] * 150, torch.Generator().manual_seed(0)).results
    heldout = decoder.generate([prompt] * 150, torch.Generator().manual_seed(1)).results
    max_drafts = decoder.max_draft_tokens
    report = calibrate(
        CalibrationRounds.from_results(fit, max_drafts), CalibrationRounds.from_results(heldout, max_drafts)
    )
    assert report.heldout_before["ece"] > 0.1
    assert report.heldout_after["ece"] < 0.5 * report.heldout_before["ece"]
    assert report.heldout_after["brier"] < report.heldout_before["brier"]

    # Applied at inference: the proposals' logits are the raw ones divided by T_k, and undoing that recovers them.
    set_confidence_temperatures(drafter, report.temperatures)
    try:
        calibrated = decoder.generate([prompt] * 150, torch.Generator().manual_seed(1)).results
    finally:
        set_confidence_temperatures(drafter, None)
    scale = torch.tensor(report.temperatures, dtype=torch.float32)
    raw_round, cal_round = heldout[0].confidence_logits[0], calibrated[0].confidence_logits[0]
    assert torch.allclose(cal_round, raw_round / scale[: len(raw_round)], atol=1e-5)
    undone = CalibrationRounds.from_results(calibrated, max_drafts, report.temperatures)
    assert torch.allclose(undone.logits, CalibrationRounds.from_results(heldout, max_drafts).logits, atol=1e-4)
    metric = ConfidenceCalibrationMetrics(max_drafts)
    metric.update_from(calibrated)
    assert float(metric.compute()["ece"]) == pytest.approx(report.heldout_after["ece"], abs=1e-5)


def test_temperatures_round_trip_through_save_and_load(decoding_setup, tmp_path):
    drafter, _ = decoding_setup
    set_confidence_temperatures(drafter, [2.5, 1.5, 0.75])
    try:
        drafter.save_pretrained(tmp_path)
    finally:
        set_confidence_temperatures(drafter, None)
    assert json.loads((tmp_path / "config.json").read_text())["confidence_temperatures"] == [2.5, 1.5, 0.75]
    loaded = DSparkDrafter.from_pretrained(tmp_path)
    assert loaded.config.confidence_temperatures == [2.5, 1.5, 0.75]
    logits = torch.tensor([[5.0, 3.0, -1.5]])
    assert loaded.calibrated_confidence(logits).tolist() == [[2.0, 2.0, -2.0]]
    assert drafter.calibrated_confidence(logits) is logits  # uncalibrated: untouched
    with pytest.raises(ValueError, match="confidence_temperatures"):
        type(drafter.config)(**{**drafter.config.to_dict(), "confidence_temperatures": [1.0, 0.0]})


def test_reliability_png(tmp_path):
    rounds = synthetic_rounds(500, 3, 3.0)
    path = plot_reliability(
        {"before": rounds.metrics(), "after": rounds.metrics([3.0, 3.0, 3.0, 3.0])}, tmp_path / "r.png"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_callback_fits_sts_at_the_end_of_a_real_fit(tmp_path):
    target = load_target(TINY_TARGET)
    data = write_conversations(tmp_path / "train.jsonl", 8, seed=3, words=30)
    build_target_cache(
        target, list(iter_training_conversations(data)), tmp_path / "cache", [1, 3], TokenizeOptions(max_length=96),
        progress=False,
    )  # fmt: skip
    torch.manual_seed(0)
    module = DSparkModule(
        TINY_TARGET,
        [1, 3],
        num_hidden_layers=1,
        drafter={"block_size": 4, "num_anchors": 8, "markov_rank": 16},
        lr=3e-3,
        decoding=DecodingOptions(max_new_tokens=24, warmup_prompts=0),
    )
    calibration = ConfidenceCalibration(num_prompts=4, plot_dir=str(tmp_path / "plots"))
    trainer = L.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=CSVLogger(tmp_path / "logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[DrafterCheckpoint(dirpath=tmp_path / "ckpt", save_last=True), calibration],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=TargetCacheDataModule(str(tmp_path / "cache"), batch_size=4, seed=1))

    temperatures = module.drafter.config.confidence_temperatures
    assert temperatures is not None and len(temperatures) == 4 and all(t > 0 for t in temperatures)
    report = calibration.reports["fit"]
    assert report.temperatures == temperatures and report.heldout_before is not None
    assert report.fit_after["ece@0"] <= report.fit_before["ece@0"] + 1e-6  # T = 1 is on the grid
    saved = json.loads((tmp_path / "ckpt" / "last.drafter" / "config.json").read_text())
    assert saved["confidence_temperatures"] == temperatures
    assert (tmp_path / "plots" / "reliability_fit.png").is_file()
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        logged = {name for row in csv.DictReader(handle) for name, value in row.items() if value}
    assert {"calibration/fit/ece_before", "calibration/fit/ece_after", "calibration/fit/temperature@0"} <= logged


def test_callback_fits_sts_before_specdec_test(tmp_path):
    from specdec.data.prompts.eval_sets import EvalSetsSpec, EvalTask, write_eval_set
    from tests.test_decoding_eval import TinyDrafterModule

    write_eval_set(tmp_path / "sums.jsonl", [{"turns": ["Write a function that adds two numbers."]}])
    spec = EvalSetsSpec(str(tmp_path), tasks=[EvalTask("sums", None, "code")])
    module = TinyDrafterModule(DecodingOptions(max_new_tokens=8, warmup_prompts=0, measure_speedup=False))
    calibration = ConfidenceCalibration(num_prompts=4, max_new_tokens=24, on_fit_end=False)
    trainer = L.Trainer(
        accelerator="cpu",
        logger=CSVLogger(tmp_path / "logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[calibration],
    )
    trainer.test(module, datamodule=TargetCacheDataModule(str(tmp_path / "unused"), eval_sets=spec))
    report = calibration.reports["test"]
    assert module.drafter.config.confidence_temperatures == report.temperatures
    assert report.heldout_before is not None and report.heldout_before["samples"] > 0
    assert module.speculative_test_results["all"]["rounds"] > 0  # the eval sets were decoded after the fit
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        header = next(csv.reader(handle))
    assert {"calibration/test/ece_before", "calibration/test/ece_after"} <= set(header)
