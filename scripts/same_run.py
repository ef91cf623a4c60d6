"""Whether two training runs are the same run: `python scripts/same_run.py RUN_A RUN_B`.

Compares what each run logged in metrics.jsonl (every value but the wall-clock ones) step by step, and the tensors of
the newest checkpoint both hold, bit for bit (weights, LoRA adapters, optimiser moments, RNG states). Prints
`same` with what was compared, or the first differences; exits 1 when the runs differ. Use it on a run trained twice
with one seed, or on a run killed and resumed against the one trained straight (README: Reproducibility).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

CLOCK = ("time", "elapsed_s", "minutes")  # wall-clock values: never the same twice


def logged(run: Path) -> dict[int, dict]:
    """metrics.jsonl of `run` as {step: its values but the wall-clock ones}, rows of one step merged."""
    rows: dict[int, dict] = {}
    path = run / "metrics.jsonl"
    if not path.is_file():
        why = ("not a run folder, or a run that has logged nothing yet" if run.is_dir() else
               "it is a file, not a run folder" if run.exists() else "no such folder")
        raise SystemExit(f"error: {run} holds no metrics.jsonl: {why}")
    for n, line in enumerate(path.read_bytes().splitlines(), 1):
        try:
            row = json.loads(line.decode("utf-8"))  # (bytes that are not UTF-8: a ValueError too)
            step = row["step"]
        except (ValueError, KeyError, TypeError):  # (a line cut short by a full disk, or another program's file)
            raise SystemExit(f"error: {path}:{n}: not a metrics line (a JSON object with a step)") from None
        rows.setdefault(step, {}).update({k: v for k, v in row.items() if k not in CLOCK})
    return rows


def checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint holds (weights, optimiser moments, RNG states), keyed by file and name."""
    return {f"{f.relative_to(checkpoint)}:{k}": v for f in sorted(checkpoint.rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def same_value(x, y) -> bool:
    """Logged values equal, a NaN equal to a NaN (a run that logged one repeats it: NaN != NaN would say otherwise)."""
    return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))


def tensor_difference(x: torch.Tensor, y: torch.Tensor) -> str | None:
    """How two tensors differ, or None when they hold the same bits (a NaN where the other has the same NaN)."""
    if x.shape != y.shape or x.dtype != y.dtype:
        return f"shape {tuple(x.shape)} vs {tuple(y.shape)}" if x.shape != y.shape else f"dtype {x.dtype} vs {y.dtype}"
    if torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
        return None
    return f"max difference {(x.float() - y.float()).abs().max().item():.3g}"


def differences(a: Path, b: Path, limit: int = 5) -> tuple[list[str], str]:
    """(at most `limit` lines naming where runs `a` and `b` differ, a line saying what was compared)."""
    out: list[str] = []
    rows_a, rows_b = logged(a), logged(b)
    if rows_a.keys() != rows_b.keys():
        out.append(f"logged steps differ: {sorted(rows_a.keys() ^ rows_b.keys())[:10]} in one run only")
    for step in sorted(rows_a.keys() & rows_b.keys()):
        for key in sorted(rows_a[step].keys() | rows_b[step].keys()):
            if not same_value(rows_a[step].get(key), rows_b[step].get(key)):
                out.append(f"step {step} {key}: {rows_a[step].get(key)} vs {rows_b[step].get(key)}")
    names = sorted({d.name for d in (a / "checkpoints").glob("step_*")}
                   & {d.name for d in (b / "checkpoints").glob("step_*")})
    compared = f"{len(rows_a.keys() & rows_b.keys())} logged steps"
    if names:
        ta, tb = checkpoint_tensors(a / "checkpoints" / names[-1]), checkpoint_tensors(b / "checkpoints" / names[-1])
        if ta.keys() != tb.keys():
            out.append(f"{names[-1]}: tensors {sorted(ta.keys() ^ tb.keys())[:3]} in one run only")
        out += [f"{names[-1]} {k}: {why}" for k in sorted(ta.keys() & tb.keys())
                if (why := tensor_difference(ta[k], tb[k])) is not None]
        compared += f", {len(ta)} tensors of {names[-1]}"
    else:
        out.append("no checkpoint step that both runs hold: weights not compared")
    return out[:limit] + ([f"... and {len(out) - limit} more"] if len(out) > limit else []), compared


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    diff, compared = differences(args.run_a, args.run_b)
    print("\n".join(diff) if diff else f"same: {compared}, bit for bit")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
