"""Seconds per update of the Shapes training stages (configs/shapes/*.yaml) on the bundled models, and where they go.

    OMP_NUM_THREADS=1 python scripts/profile_train_step.py [--stages warmup npedit sft] [--threads 1]
        [--updates 8] [--skip 2] [--cprofile 25] [--json out.json]

Each stage's config runs as written (batch, critic_steps, judge questions), with the bundled teacher
(assets/shapes/teacher) as model.base, the bundled editor (assets/shapes/editor) as the student of npedit and sft
(their configs name runs/ folders a fresh clone lacks), and a temporary output_dir. After `--skip` updates (first
calls allocate and fill caches), `--updates` updates are timed one by one; the median is printed with each part's
share of the timed updates' wall time (exclusive: a part's time leaves out the parts it calls). With `--cprofile N`,
the N functions of most own time over the timed updates follow.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import json
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from npedit.config import load_config  # noqa: E402
from npedit.files import write_atomic  # noqa: E402
from npedit.training.trainer import Trainer  # noqa: E402

BUNDLED = {"model.base": "assets/shapes/teacher", "judge.path": "assets/shapes/judge"}
STUDENT = "assets/shapes/editor"


class PartTimer:
    """Exclusive wall time per named part: a part's clock stops while a part it calls runs."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.stack: list[list] = []  # [name, start, time spent in nested parts]

    def wrap(self, owner, attr: str, name: str) -> None:
        """Time every call of `owner.attr` as part `name` (an instance attribute shadows a method)."""
        fn = getattr(owner, attr)

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                _, start, nested = self.stack.pop()
                spent = time.perf_counter() - start
                self.seconds[name] = self.seconds.get(name, 0.0) + spent - nested
                if self.stack:
                    self.stack[-1][2] += spent

        setattr(owner, attr, timed)


def overrides(stage: str, out: str) -> list[str]:
    """The dotted overrides that point the stage's config at the bundled models and a scratch folder."""
    items = dict(BUNDLED)
    if stage != "warmup":
        items["model.student"] = STUDENT
    if stage == "warmup" or stage == "sft":
        items.pop("judge.path")
    return [f"{k}={v}" for k, v in items.items()] + [f"output_dir={out}"]


def instrument(tr: Trainer, timer: PartTimer) -> None:
    """Wrap the trainer's parts in `timer`; the student's own forward is what `generate` leaves (its sampler)."""
    backbone = tr.backbone
    batches = tr.batches

    def drawn():
        while True:
            timer.stack.append(["data: draw + render a micro-batch", time.perf_counter(), 0.0])
            batch = next(batches)
            name, start, nested = timer.stack.pop()
            timer.seconds[name] = timer.seconds.get(name, 0.0) + time.perf_counter() - start - nested
            yield batch

    tr.batches = drawn()
    timer.wrap(backbone, "encode_image", "VAE encode (reference, SFT target)")
    timer.wrap(backbone, "decode_latents", "VAE decode for the judge")
    timer.wrap(backbone, "encode_prompt", "text encoding")
    timer.wrap(tr, "generate", "student unroll (forward)")
    timer.wrap(tr, "_dmd_predictions", "DMD: teacher (CFG) + critic, no grad")
    timer.wrap(tr.acc, "backward", "backward")
    timer.wrap(torch.nn.utils, "clip_grad_norm_", "grad clip")
    for opt in (tr.opt_student, tr.opt_critic):
        if opt is not None:
            timer.wrap(opt, "step", "optimizer step")
    if tr.judge is not None:
        timer.wrap(tr.judge, "answer", "judge forward (vision + language)")
        timer.wrap(tr.judge, "_layout", "judge prompts (processor, tokenizer)")
        timer.wrap(tr, "_judge_loss", "judge loss: questions, loss (rest)")
    for name, attr in (("warmup", "warmup_loss"), ("sft", "sft_loss"), ("critic", "critic_loss"),
                       ("student", "student_loss")):
        timer.wrap(tr, attr, f"{name} loss: the rest (transformer forward, noise)")


def profile_stage(stage: str, updates: int, skip: int, cprofile: int) -> dict:
    """Median seconds per update of `stage` and each part's share; prints a table (and cProfile's top)."""
    with tempfile.TemporaryDirectory(prefix=f"profile-{stage}-") as out:  # (nothing of the run is kept)
        return _profile(load_config(str(ROOT / "configs" / "shapes" / f"{stage}.yaml"), overrides(stage, out)),
                        updates, skip, cprofile)


def _profile(cfg, updates: int, skip: int, cprofile: int) -> dict:
    """`profile_stage` on a loaded config."""
    stage = cfg.stage
    tr = Trainer(cfg)
    for _ in range(skip):
        tr.iteration()
        tr.step += 1
    timer = PartTimer()
    instrument(tr, timer)
    timer.seconds.clear()
    prof = cProfile.Profile() if cprofile else None
    times = []
    for _ in range(updates):
        start = time.perf_counter()
        if prof:
            prof.enable()
        tr.iteration()
        if prof:
            prof.disable()
        times.append(time.perf_counter() - start)
        tr.step += 1
    total = sum(times)
    parts = dict(sorted(timer.seconds.items(), key=lambda kv: -kv[1]))
    parts["other (optimiser bookkeeping, Python)"] = total - sum(parts.values())
    median = statistics.median(times)
    print(f"\n{stage}: batch {cfg.data.batch_size} x {cfg.gradient_accumulation_steps}, critic_steps "
          f"{cfg.critic_steps if stage == 'npedit' else 0}, torch threads {torch.get_num_threads()}: "
          f"median {median:.3f} s per update (min {min(times):.3f}, max {max(times):.3f}, {updates} timed)")
    for name, sec in parts.items():
        print(f"  {name:52s} {sec / updates * 1000:8.1f} ms  {sec / total:6.1%}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(cprofile)
    return {"stage": stage, "threads": torch.get_num_threads(), "median_s": median, "times_s": times,
            "parts_ms": {k: v / updates * 1000 for k, v in parts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=["warmup", "npedit", "sft"], choices=["warmup", "npedit", "sft"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, OMP_NUM_THREADS)")
    ap.add_argument("--updates", type=int, default=8, help="timed updates per stage")
    ap.add_argument("--skip", type=int, default=2, help="untimed updates first")
    ap.add_argument("--cprofile", type=int, default=0, help="print the N functions of most own time")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    if args.updates < 1 or args.skip < 0 or (args.threads is not None and args.threads < 1):
        ap.error(f"--updates and --threads must be >= 1 and --skip >= 0, got {args.updates}, {args.threads} and "
                 f"{args.skip}")  # (0 updates: a traceback from the median of nothing, after the models loaded)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [profile_stage(s, args.updates, args.skip, args.cprofile) for s in args.stages]
    if args.json:
        write_atomic(args.json, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
