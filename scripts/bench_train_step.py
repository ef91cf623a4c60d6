"""Per-component time of one NP-Edit training iteration on tiny models (prints measured figures).

    python scripts/bench_train_step.py [--family zimage|sd3] [--batch 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from npedit.backbones.tiny import build_tiny_sd3, build_tiny_zimage
from npedit.config import load_config
from npedit.data import apply_do_nothing
from npedit.judges.tiny import build_tiny_llava_onevision
from npedit.training.trainer import Trainer


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `fn()` over `repeats` runs (after one warm-up run)."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--family", choices=["zimage", "sd3"], default="zimage")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    base = (build_tiny_zimage if args.family == "zimage" else build_tiny_sd3)(root / "base")
    judge = build_tiny_llava_onevision(root / "judge")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(root / f"images/{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "instruction": "make the red circle green",
                                 "caption_reference": "a red circle", "caption_target": "a green circle",
                                 "edit_type": "recolor"}))
    (root / "cases.jsonl").write_text("\n".join(lines), encoding="utf-8")
    cfg = load_config(None, [f"model.base={base}", f"judge.path={judge}", f"data.train={root}/cases.jsonl",
                             f"output_dir={root}/run", f"data.batch_size={args.batch}", "optim.skip_grad_norm=1e9"])
    tr = Trainer(cfg)
    batch = apply_do_nothing(next(tr.batches), 0.0, tr.gen)
    ref_pixels, ref = tr._reference(batch)
    cond = tr.backbone.encode_prompt(batch["instruction"], with_reference=True)
    two_steps = [tr.schedule[0], tr.schedule[1]]
    rows = {}
    rows["text encoding (instruction)"], _ = timed(lambda: tr.backbone.encode_prompt(batch["instruction"], with_reference=True), args.repeats)
    rows["VAE encode (reference)"], _ = timed(lambda: tr._reference(batch), args.repeats)
    rows["student unroll, 2 steps, with grad"], x = timed(lambda: tr.generate(ref, cond, times=two_steps), args.repeats)
    rows["DMD: teacher x2 (CFG) + critic, no grad"], _ = timed(lambda: tr._dmd_predictions(x, batch), args.repeats)
    rows["VAE decode + judge (2 questions), with grad"], _ = timed(lambda: tr._judge_loss(ref_pixels, x, batch), args.repeats)

    def backward():
        y = tr.generate(ref, cond, times=two_steps)
        loss = tr._judge_loss(ref_pixels, y, batch)[0] + y.square().mean()
        start = time.perf_counter()
        loss.backward()
        tr.student.zero_grad()
        return time.perf_counter() - start

    rows["backward through judge, VAE and unroll"] = statistics.median(backward() for _ in range(args.repeats))
    tr.batches = itertools.repeat(batch)  # every update below sees this batch
    rows["critic update (unroll + critic fit)"], _ = timed(lambda: tr._optimise("critic", tr.critic_loss), args.repeats)
    rows["student update (all of the above + step)"], _ = timed(lambda: tr._optimise("student", tr.student_loss),
                                                                 args.repeats)
    tr.cfg = load_config(None, [f"model.base={base}", f"data.train={root}/cases.jsonl", "stage=warmup",
                                f"data.batch_size={args.batch}"])
    rows["warmup update (identity flow matching)"], _ = timed(lambda: tr._optimise("student", tr.warmup_loss),
                                                              args.repeats)
    n_aux = cfg.critic_steps
    rows[f"one NP-Edit iteration ({n_aux} critic + 1 student)"] = (
        n_aux * rows["critic update (unroll + critic fit)"] + rows["student update (all of the above + step)"])
    print(f"family={args.family} batch={args.batch} torch_threads={torch.get_num_threads()} "
          f"student_params={sum(p.numel() for p in tr.student.parameters()):,}")
    for name, sec in rows.items():
        print(f"{name:50s} {sec * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
