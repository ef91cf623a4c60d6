"""`python -m npedit ...` (or any `python ...`) in a subprocess, as a user runs it (offline, the repo on the path)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_python(*args, cwd, ok=True) -> subprocess.CompletedProcess:
    """Run `python ARGS` in `cwd`; assert it succeeded (or, with ok=False, that it failed) and return the result."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert (out.returncode == 0) == ok, out.stderr[-3000:]
    return out


def run_npedit(*args, cwd, ok=True) -> subprocess.CompletedProcess:
    """Run the CLI in `cwd`, as run_python does."""
    return run_python("-m", "npedit", *args, cwd=cwd, ok=ok)
