"""Self-training data for a Shapes editor, no pairs: its best-of-N edits of new cases that the judge accepts.

    python scripts/shapes_selftrain_data.py --model assets/shapes/editor-sft-npedit --n 2400 --candidates 12 \
        --seed 11 --min-score -0.5 --out runs/selftrain/data

Writes OUT/images/<id>.png (references), OUT/picked/<id>.png (the judge's pick of N edits), OUT/rows.jsonl
(every case with the pick as `target` and its judge score; a training manifest), OUT/accepted<S>.jsonl (the
rows scoring >= S) and, as a paired control on the same cases, OUT/true<S>.jsonl (same rows, the grammar's true
results as targets). `exact_for_analysis` (the exact scorer on the pick) is written for reporting only; nothing
here filters on it. Train on a manifest with `python -m npedit train ... data.train=OUT/accepted<S>.jsonl`
(stage sft, or stage npedit with loss.lambda_target > 0).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from npedit.assets import default_path  # noqa: E402
from npedit.best_of import best_of  # noqa: E402
from npedit.files import write_atomic  # noqa: E402
from npedit.judges import load_judge  # noqa: E402
from npedit.pipeline import NPEditPipeline  # noqa: E402
from npedit.shapes.scoring import score_edit  # noqa: E402
from npedit.shapes.training import PARAPHRASE_PROB  # noqa: E402
from npedit.shapes.world import render  # noqa: E402
from workbench.datasets import shapes_cases  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="editor pipeline (default: the bundled pair-free editor)")
    ap.add_argument("--judge", help="judge folder (default: the bundled one)")
    ap.add_argument("--n", type=int, default=2400, help="new cases (the six categories in turn)")
    ap.add_argument("--candidates", type=int, default=12)
    ap.add_argument("--seed", type=int, default=11, help="case seed (the benchmark's held-out cases are apart)")
    ap.add_argument("--min-score", type=float, default=-0.5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    for sub in ("images", "picked", "true"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    pipe = NPEditPipeline.from_pretrained(default_path("model", args.model))
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(default_path("judge", args.judge), device=torch.device("cpu"))
    rows = []
    for i, case in enumerate(tqdm(shapes_cases(args.n, seed=args.seed, paraphrase_prob=PARAPHRASE_PROB), desc="cases")):
        ref = render(case.reference)
        Image.fromarray(ref).save(out / "images" / f"{case.id}.png")
        Image.fromarray(render(case.expected)).save(out / "true" / f"{case.id}.png")
        picked = best_of(pipe, judge, ref, case.instruction, candidates=args.candidates,
                         generator=torch.Generator().manual_seed(i), edit_type=case.edit_type,
                         object_name=case.object_name or None, keep=case.keep)
        picked.image.save(out / "picked" / f"{case.id}.png")
        rows.append({"id": case.id, "image": f"images/{case.id}.png", "target": f"picked/{case.id}.png",
                     "instruction": case.instruction, "caption_reference": case.caption_reference,
                     "caption_target": case.caption_target, "edit_type": case.edit_type,
                     "object_name": case.object_name or "", "keep": case.keep, "new": case.new, "gone": case.gone,
                     "category": case.category, "score": picked.verdicts[picked.best].score,
                     "exact_for_analysis": score_edit(np.asarray(picked.image), case)["exact"]})
    accepted = [r for r in rows if r["score"] >= args.min_score]
    write = lambda name, items: write_atomic(out / name, "".join(json.dumps(r) + "\n" for r in items))  # noqa: E731
    write("rows.jsonl", rows)
    write(f"accepted{args.min_score}.jsonl", accepted)
    write(f"true{args.min_score}.jsonl", [{**r, "target": f"true/{r['id']}.png"} for r in accepted])
    share = np.mean([r["exact_for_analysis"] for r in accepted]) if accepted else float("nan")
    print(f"{len(accepted)} of {len(rows)} picks accepted (score >= {args.min_score}); exact among them {share:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
