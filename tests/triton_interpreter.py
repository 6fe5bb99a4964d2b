"""Triton kernel checks on CPU: the interpreter must be switched on before Triton is first imported, which this
test process has already done, so a module's ``run_checks`` runs once in a subprocess and reports per case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_checks_interpreted(module: str, names: list[str]) -> dict[str, str | None]:
    """``module.run_checks('cpu', names)`` under ``TRITON_INTERPRET=1`` on one thread: each case's failure or None."""
    code = f"import json\nfrom {module} import run_checks\nprint(json.dumps(run_checks('cpu', {names!r})))\n"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])
