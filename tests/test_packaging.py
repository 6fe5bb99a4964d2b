import subprocess
import sys

from specdec.targets import TINY_TARGET_PATH


def test_import_works_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import specdec, specdec.targets, specdec.cli, specdec.kernels as k\n"
        "assert not k.TRITON_AVAILABLE and not k.kernels_usable_on('cuda')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_kernels_are_installed_with_the_package():
    import specdec.kernels

    assert specdec.kernels.kernels_usable_on("cpu") == (
        specdec.kernels.TRITON_AVAILABLE and specdec.kernels.TRITON_INTERPRET
    )


def test_tiny_target_ships_with_the_package():
    assert (TINY_TARGET_PATH / "model.safetensors").stat().st_size > 1_000_000
