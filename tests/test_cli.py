import shutil
import subprocess
import sys

import pytest


def run_specdec(*args: str) -> subprocess.CompletedProcess:
    executable = shutil.which("specdec")
    command = [executable] if executable else [sys.executable, "-m", "specdec.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)


def test_help_lists_subcommands():
    result = run_specdec("--help")
    assert result.returncode == 0, result.stderr
    for subcommand in ("demo", "cache", "target"):
        assert subcommand in result.stdout


def test_demo_answers_and_reports_speed():
    result = run_specdec("demo", "--max_new_tokens", "12", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "assistant:" in result.stdout
    assert "tokens/s" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("target", "info", "--target", "/no/such/dir"), "does not exist"),
        (("target", "info", "--layer_ids", "[0, 5]"), "final layer"),
    ],
)
def test_bad_input_exits_with_a_clear_message(args, message):
    result = run_specdec(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_target_info_reports_geometry():
    result = run_specdec("target", "info", "--layer_ids", "[0, 2, 4]")
    assert result.returncode == 0, result.stderr
    assert '"num_hidden_layers": 6' in result.stdout and '"layer_ids": [' in result.stdout


def test_cache_estimate_reports_deepspec_reference_and_codecs():
    result = run_specdec(
        "cache",
        "estimate",
        "--hidden_size",
        "2560",
        "--layer_ids",
        "[1, 9, 17, 25, 33]",
        "--num_samples",
        "1000",
        "--avg_tokens",
        "1000",
    )
    assert result.returncode == 0, result.stderr
    assert "30,726" in result.stdout and "fp8_e4m3" in result.stdout
    missing = run_specdec("cache", "estimate", "--num_layers", "3")
    assert missing.returncode == 2 and "--hidden_size" in missing.stderr
