"""The speedup and cost planner: latency tables, the plan's arithmetic, reading evaluations, the command."""

from __future__ import annotations

import csv
import json

import pytest

from specdec.cli import main
from specdec.planning import AcceptanceCurve, LatencyProfile, plan, read_acceptance
from specdec.planning.plan import predicted_speedup
from specdec.planning.profile import interpolate

FLAT = {"target_forward_ms": {1: 10.0, 2: 10.5, 4: 12.0, 8: 20.0}, "draft_ms": 2.0}


def test_interpolation_is_linear_between_points_and_proportional_beyond():
    table = {2: 10.0, 4: 20.0}
    assert interpolate(table, 1) == 10.0 and interpolate(table, 3) == 15.0 and interpolate(table, 8) == 40.0


def test_profiles_by_total_tokens_and_by_concurrency():
    flat = LatencyProfile(**FLAT)
    assert flat.forward_ms(2, 2) == 12.0  # 4 tokens in all
    assert flat.round_ms(1, 2) == 2.0 + 11.25 and flat.plain_step_ms(4) == 12.0
    padded = LatencyProfile({1: {1: 5.0, 3: 7.0}, 4: {1: 9.0, 3: 15.0}}, {1: 1.0, 4: 3.0}, round_overhead_ms=0.5)
    assert padded.forward_ms(4, 2) == 12.0
    assert padded.forward_ms(2, 1) == pytest.approx(5.0 + (9.0 - 5.0) / 3)  # between concurrency levels
    assert padded.round_ms(4, 2) == 3.0 + 15.0 + 0.5


def test_plan_picks_the_draft_length_of_highest_expected_speedup():
    curve = AcceptanceCurve("gsm8k", [0.8, 0.6, 0.3])
    profile = LatencyProfile(**FLAT)
    expected = {1: 1.8 * 10 / 12.5, 2: 2.4 * 10 / 13.25, 3: 2.7 * 10 / 14.0}
    (row,) = plan([curve], profile, [1], gpu_hour_price=3.6)
    assert row.speedup_by_length == pytest.approx(expected)
    assert row.draft_length == 3 and row.speedup == pytest.approx(27 / 14)
    assert row.tokens_per_second == pytest.approx(1000 * 2.7 / 14) and row.plain_tokens_per_second == 100.0
    assert row.cost_per_million == pytest.approx(3.6 / 3600 / row.tokens_per_second * 1e6)
    # at 8 concurrent requests the verification forward is compute-bound: shorter drafts win
    (busy,) = plan([curve], profile, [8])
    assert busy.draft_length < 3 and busy.speedup < row.speedup
    assert predicted_speedup(curve, profile, 1, 0) == 1.0
    with pytest.raises(ValueError, match="no acceptance"):
        plan([AcceptanceCurve("empty", [])], profile, [1])


def test_acceptance_is_read_from_the_test_json_and_from_csv_logs(tmp_path):
    record = {
        "modes": {
            "chain": {
                "all": {"rounds": 10, "tau": 2.0, "accept_rate@0": 0.7, "accept_rate@1": 0.4},
                "dataset/gsm8k": {"rounds": 6, "tau": 2.1, "accept_rate@0": 0.75, "accept_rate@1": 0.45},
                "dataset/unused": {"rounds": 0, "accept_rate@0": 0.0},
            },
            "tree@2x2": {"all": {"rounds": 4, "accept_rate@0": 0.9}},
        }
    }
    (tmp_path / "speculative_test.json").write_text(json.dumps(record))
    curves = read_acceptance(tmp_path / "speculative_test.json")
    assert [(c.name, c.survival) for c in curves] == [("gsm8k", [0.75, 0.45]), ("all", [0.7, 0.4])]
    assert curves[0].measured["tau"] == 2.1
    assert read_acceptance(tmp_path / "speculative_test.json", mode="tree@2x2")[0].survival == [0.9]
    with pytest.raises(ValueError, match="no mode 'static'"):
        read_acceptance(tmp_path / "speculative_test.json", mode="static")

    with open(tmp_path / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["step", "speedup/T0/accept_rate@0", "speedup/T0/accept_rate@1", "speedup/T0/speedup"]
        header += ["speedup/accept_rate@0", "speedup/T1/accept_rate@0", "train_loss", "val/accept_rate@0"]
        writer.writerow(header)
        writer.writerow([5, "", "", "", "", "", 2.5, 0.9])
        writer.writerow([10, 0.5, 0.2, 0.7, 0.5, 0.3, "", 0.95])
    curves = {c.name: c for c in read_acceptance(tmp_path / "metrics.csv")}
    assert set(curves) == {"T=0", "T=1"}  # the teacher-forced val/ acceptance is not what decoding achieves
    assert curves["T=0"].survival == [0.5, 0.2] and curves["T=0"].measured["speedup"] == 0.7
    (tmp_path / "fit.csv").write_text("step,train/accept_rate@0,sim/accept_rate@0\n10,0.9,0.8\n")
    with pytest.raises(ValueError, match="only training-time acceptance"):
        read_acceptance(tmp_path / "fit.csv")
    with pytest.raises(FileNotFoundError, match="no evaluation results"):
        read_acceptance(tmp_path / "missing.json")


def test_specdec_plan_speedup_writes_table_json_csv_and_plots(tmp_path, capsys):
    (tmp_path / "speculative_test.json").write_text(
        json.dumps({"modes": {"chain": {"dataset/mbpp": {"rounds": 3, "accept_rate@0": 0.8, "accept_rate@1": 0.5}}}})
    )
    LatencyProfile(**FLAT).save(tmp_path / "profile.yaml")
    main([
        "plan", "speedup", "--results", str(tmp_path / "speculative_test.json"), "--profile",
        str(tmp_path / "profile.yaml"), "--concurrency", "[1, 2, 8]", "--gpu_hour_price", "2.5",
        "--output_dir", str(tmp_path / "plan"),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    assert "speedup" in printed and "$/M" in printed and "mbpp" in printed
    rows = json.loads((tmp_path / "plan" / "plan.json").read_text())["rows"]
    assert [row["concurrency"] for row in rows] == [1, 2, 8]
    assert all(row["cost_per_million"] > 0 for row in rows)
    assert (tmp_path / "plan" / "plan_mbpp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((tmp_path / "plan" / "plan.csv").read_text().splitlines()) == 4


def test_a_bad_profile_is_refused_naming_the_file_and_field(tmp_path, capsys):
    (tmp_path / "profile.yaml").write_text("target_forward_ms: {1: 3.0}\ndraft: 1.0\n")
    (tmp_path / "r.json").write_text(json.dumps({"modes": {"chain": {"all": {"rounds": 1, "accept_rate@0": 0.5}}}}))
    with pytest.raises(SystemExit) as exit_info:
        main(["plan", "speedup", "--results", str(tmp_path / "r.json"), "--profile", str(tmp_path / "profile.yaml")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "profile.yaml" in error and "'draft'" in error
