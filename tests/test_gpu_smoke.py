"""scripts/gpu_smoke.py, the one-call check for a lent GPU, run here on the CPU in bfloat16 so that it cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


def test_every_check_passes_on_the_cpu_in_bfloat16(tmp_path):
    """The whole script (all 13 checks, ~10 s here) as the device tool runs it, with --device cpu: every row ok."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_smoke.py"), "--device", "cpu",
                           "--dtype", "bfloat16"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    report = json.loads((tmp_path / "gpu_smoke.json").read_text())  # --out defaults to $OUT/gpu_smoke.json
    failed = {r["name"]: r.get("error") for r in report["rows"] if not r["ok"]}
    assert done.returncode == 0 and not failed, (failed, done.stdout[-3000:], done.stderr[-3000:])
    names = [r["name"] for r in report["rows"]]
    assert {n.split("/")[0] for n in names} == {"pipeline", "offload", "trace", "judge", "train", "bench"}
    assert len(names) == 13 and report["dtype"] == "bfloat16" and report["environment"]["device"] == "cpu"
    assert report["complete"] and report["ok"]
    assert "13/13 checks ok" in done.stdout and "(cpu, bfloat16)" in done.stdout


def test_a_rounded_or_bfloat16_time_and_a_raising_check_are_failures():
    """`check_time` refuses a time the transformer got in bfloat16 or rounded; an exception is one FAIL row."""
    smoke = load_script("gpu_smoke")
    pipe = SimpleNamespace(family="sd3", times=lambda n: [1.0, 0.9474], transformer=None)
    smoke.check_time(pipe, [torch.tensor([1000.0, 947.4])])
    with pytest.raises(smoke.CheckFailed, match="float32"):
        smoke.check_time(pipe, [torch.tensor([1000.0, 947.4]).bfloat16()])
    with pytest.raises(smoke.CheckFailed, match="947.4"):  # bf16's 948, carried in float32
        smoke.check_time(pipe, [torch.tensor([1000.0, 948.0])])
    row = smoke.run_check("broken", lambda: 1 / 0)
    assert not row["ok"] and row["error"].startswith("ZeroDivisionError") and row["figures"]["traceback"]
    assert not smoke.run_check("exits", lambda: sys.exit("error: no such model"))["ok"]  # as the CLI stops
    with pytest.raises(SystemExit, match="no group or check"):
        smoke.main(["--device", "cpu", "--only", "pipelines"])
