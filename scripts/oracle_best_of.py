"""How far could picking among an editor's samples go? Exact Shapes scores of every candidate of best-of-N.

For each held-out case the editor samples N edits (the same noise as `eval shapes --candidates N`); the spec's
parser scores every one. Per category it prints the exact rate of a single sample (the mean over candidates),
of the judge's pick (what `--candidates N` reports) and of an oracle that keeps any exact candidate (the ceiling
of every selector: what the samples hold). A gap between the judge and the oracle is the judge's to close; an
oracle below a target says the editor itself must change.

    python scripts/oracle_best_of.py --model assets/shapes/editor-unroll-npedit --n 300 --seed 0 --candidates 16 \
        --out runs/oracle/seed0.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npedit.best_of import best_of  # noqa: E402
from npedit.files import write_atomic  # noqa: E402
from npedit.shapes.edits import held_out_cases  # noqa: E402
from npedit.shapes.scoring import score_edit  # noqa: E402
from npedit.shapes.world import render  # noqa: E402


def case_scores(pipe, judge, case, *, candidates: int, seed: int) -> dict:
    """Every candidate's exact score for one case, and which one the judge picks (as `eval shapes` samples them)."""
    gen = torch.Generator().manual_seed(seed)  # one generator for all candidates, as `best_of_editor` draws them
    picked = best_of(pipe, judge, render(case.reference), case.instruction, candidates=candidates,
                     generator=gen, edit_type=case.edit_type, object_name=case.object_name or None, keep=case.keep)
    exact = [bool(score_edit(np.asarray(im), case)["exact"]) for im in picked.images]
    return {"edit_type": case.edit_type, "exact": exact, "judge_pick": picked.best}


def summarize(rows: list[dict]) -> dict:
    """Per category and overall: single-sample mean, first candidate, judge's pick, oracle (any exact)."""
    groups = defaultdict(list)
    for r in rows:
        groups[r["edit_type"]].append(r)
        groups["overall"].append(r)
    table = {}
    for name, rs in groups.items():
        table[name] = {
            "n": len(rs),
            "sample_mean": float(np.mean([np.mean(r["exact"]) for r in rs])),
            "first": float(np.mean([r["exact"][0] for r in rs])),
            "judge_pick": float(np.mean([r["exact"][r["judge_pick"]] for r in rs])),
            "oracle": float(np.mean([any(r["exact"]) for r in rs])),
        }
    return table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/shapes/editor-unroll-npedit")
    ap.add_argument("--judge", default="assets/shapes/judge")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--out", type=Path, help="JSON with every case's candidate scores and the table")
    args = ap.parse_args(argv)
    if args.candidates < 1 or args.n < 1:
        ap.error("--candidates and --n must be >= 1")
    if args.out:  # made now: a missing folder found after the sampling would lose it
        args.out.parent.mkdir(parents=True, exist_ok=True)

    from npedit.judges import load_judge
    from npedit.pipeline import NPEditPipeline

    pipe = NPEditPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(args.judge)
    cases = held_out_cases(args.n, seed=args.seed)
    rows = [case_scores(pipe, judge, c, candidates=args.candidates, seed=args.seed)
            for c in tqdm(cases, desc=f"best of {args.candidates}")]
    table = summarize(rows)
    print(f"{'category':<12} {'n':>4} {'one sample':>10} {'first':>6} {'judge pick':>10} {'oracle':>7}")
    for name in sorted(table, key=lambda k: (k == "overall", k)):
        t = table[name]
        print(f"{name:<12} {t['n']:>4} {t['sample_mean']:>10.3f} {t['first']:>6.3f} {t['judge_pick']:>10.3f} "
              f"{t['oracle']:>7.3f}")
    if args.out:
        report = {"model": args.model, "judge": args.judge, "n": args.n, "seed": args.seed,
                  "candidates": args.candidates, "table": table, "cases": rows}
        write_atomic(args.out, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
