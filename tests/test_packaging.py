import subprocess
import sys
from pathlib import Path

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


def test_the_checkout_root_on_sys_path_does_not_shadow_the_kernels_distribution():
    """The top-level ``kernels/`` directory is ``specdec.kernels``; from the checkout root, plain ``import kernels``
    must still be the installed package of that name (transformers imports it), or fail as a missing module."""
    root = Path(__file__).resolve().parents[1]
    code = (
        "import importlib.metadata, sys\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "try:\n"
        "    importlib.metadata.version('kernels')\n"
        "except importlib.metadata.PackageNotFoundError:\n"
        "    installed = False\n"
        "else:\n"
        "    installed = True\n"
        "try:\n"
        "    import kernels\n"
        "except ModuleNotFoundError:\n"
        "    assert not installed\n"
        "else:\n"
        "    assert installed and 'site-packages' in kernels.__file__, kernels.__file__\n"
        "import transformers.modeling_utils, specdec.kernels as k\n"
        f"assert k.__file__.startswith({str(root / 'kernels')!r}), k.__file__\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
