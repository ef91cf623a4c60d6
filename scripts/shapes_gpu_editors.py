"""The Shapes editor stage alone, from the bundled teacher and judge, sized by wall-clock (for a GPU).

    python scripts/shapes_gpu_editors.py --out runs/editors --sft-student runs/shapes/sft-long/pipeline --minutes 5
    python scripts/shapes_gpu_editors.py --out runs/editors-smoke --sft-student PIPELINE --smoke   # a few steps each

What `scripts/shapes_chain.py` does for the editors, without retraining the VAE, teacher and judge (the bundled
ones are better than what a short chain makes). Side by side, every run `python -m npedit train ...`:
  from the given paired-SFT student, by default: NP-Edit (the recipe), NP-Edit at lr 1e-4, NP-Edit with change checks
  (`judge.change_questions=2`), and paired SFT continued for the same wall-clock (`--runs` picks others from RUNS,
  e.g. the `-b512` ones: 4x the batch and a pool of 2M distinct cases, so that no sample repeats);
  pair-free: an identity warm-up from the teacher, then NP-Edit from it for the rest of the time
  (`--pairfree-judge` gives it another judge; `--no-pairfree` skips it).
Then paired SFT from each start for as many steps as its NP-Edit run reached (the equal-step baseline, at that run's
batch and pool; `--equal-steps` names the runs), and the exact benchmark (300 cases, seed 0) of every model, the
starting SFT student included.
`--pack DIR` writes DIR/reports.tar.gz (logs, metrics, benchmark reports, editors.json) and DIR/<run>.safetensors,
the transformers of the best runs by exact score (at most --keep), to rebuild their pipelines elsewhere.
If any run fails in its first minute, everything stops at once (exit code 2), so that a fixed rerun still fits a lease.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from npedit.files import write_atomic  # noqa: E402

_spec = importlib.util.spec_from_file_location("shapes_chain", ROOT / "scripts" / "shapes_chain.py")
shapes_chain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(shapes_chain)

BIG = ["data.batch_size=512", "data.pool=2000000"]  # 4x the batch, and a pool that no run exhausts
UNROLL = ["loss.lambda_target=1", "loss.lambda_dmd=0", "loss.lambda_vlm=0", "data.do_nothing_prob=0"]
SHAPE_MIX = ["data.forms=[shape]", "data.filter_share=0.5"]  # half of the cases named by shape alone
FINAL = ["optim.final_share=0.15", "optim.final_lr_scale=0.25"]  # the last 15% of the minutes at a quarter of the lr
RUNS = {  # runs from the SFT student: name -> (config, extra overrides)
    "sft-npedit": ("npedit", []),
    "sft-npedit-lr1e-4": ("npedit", ["optim.lr=1e-4"]),
    "sft-npedit-change": ("npedit", ["judge.change_questions=2"]),
    "sft-more": ("sft", []),
    "sft-npedit-change-b512": ("npedit", ["judge.change_questions=2", *BIG]),
    "sft-more-b512": ("sft", [*BIG, "optim.lr=1e-4"]),
    "sft-npedit-change-keep-b512": ("npedit", ["judge.change_questions=2", "judge.keep_questions=2", *BIG]),
    "sft-npedit-change-keep-b512-lr2e-5": ("npedit", ["judge.change_questions=2", "judge.keep_questions=2", *BIG,
                                                      "optim.lr=2e-5"]),
    # the lower rate without keep checks: tells the two changes of the run above apart
    "sft-npedit-change-b512-lr2e-5": ("npedit", ["judge.change_questions=2", *BIG, "optim.lr=2e-5"]),
    # the fifth call's winner again with another training seed: how far two runs of one recipe differ
    "sft-npedit-change-keep-b512-lr2e-5-seed1": ("npedit", ["judge.change_questions=2", "judge.keep_questions=2", *BIG,
                                                            "optim.lr=2e-5", "seed=1"]),
    # for a student with a reference encoder (`python -m npedit shapes ref-encoder`): the encoder learns 20x faster
    "sft-npedit-change-keep-b512-lr2e-5-enc20": ("npedit", ["judge.change_questions=2", "judge.keep_questions=2", *BIG,
                                                            "optim.lr=2e-5", "optim.reference_encoder_lr_scale=20"]),
    "sft-more-b512-enc20": ("sft", [*BIG, "optim.lr=1e-4", "optim.reference_encoder_lr_scale=20"]),
    # unroll regression (the 4-step output trained toward the true result), without and with more edits that name
    # their object by shape alone; on the CPU the mixture lifted `the {shape}` under this objective and not under
    # paired SFT (docs/shapes_experiments.md, "Why: the editor cannot find an object by its shape")
    "unroll-b512-lr2e-5": ("npedit", [*UNROLL, *BIG, "optim.lr=2e-5"]),
    "unroll-b512-lr2e-5-shapemix": ("npedit", [*UNROLL, *BIG, "optim.lr=2e-5", *SHAPE_MIX]),
    # with the step-down at the end that took out the checkpoint-to-checkpoint swing on the CPU (+0.017 to +0.025)
    "unroll-b512-lr2e-5-final": ("npedit", [*UNROLL, *BIG, "optim.lr=2e-5", *FINAL]),
}
FROM_SFT = ("sft-npedit", "sft-npedit-lr1e-4", "sft-npedit-change", "sft-more")  # the default selection
EQUAL_STEPS = ("sft-npedit",)  # NP-Edit runs that get an equal-step paired-SFT baseline by default
WARMUP_MINUTES = 0.8
LOAD_MINUTES = 0.4  # loading and exporting around a run's max_minutes, so runs end together


class Editors(shapes_chain.Chain):
    def __init__(self, out: Path, *, smoke: bool, minutes: float, batch: int, workers: int, threads: int,
                 teacher: str, judge: str, sft_student: str | None, runs: tuple[str, ...] = FROM_SFT,
                 equal_steps: tuple[str, ...] = EQUAL_STEPS, pairfree_judge: str | None = None,
                 pairfree: bool = True, grace: float = 3.0):
        # whatever still runs `grace` minutes after the training phase is stopped, so that --pack always happens
        super().__init__(out, smoke=smoke, scale=1.0, threads=threads,
                         deadline=float("inf") if smoke else time.monotonic() + 60 * (minutes + grace))
        self.base, self.judge_path, self.sft_student = teacher, judge, sft_student
        self.total, self.batch, self.workers = minutes, batch, workers
        unknown = sorted(set(runs) - set(RUNS))
        if unknown:
            raise ValueError(f"unknown runs {unknown}; choose from {sorted(RUNS)}")
        not_npedit = sorted(set(equal_steps) - {r for r in runs if RUNS[r][0] == "npedit"})
        if not_npedit:
            raise ValueError(f"equal-step baselines {not_npedit} must name NP-Edit runs among {list(runs)}")
        self.runs, self.equal_steps, self.pairfree = tuple(runs), tuple(equal_steps), pairfree
        self.pairfree_judge = pairfree_judge or judge
        self.record.update(teacher=teacher, judge=judge, sft_student=sft_student, minutes=minutes, batch=batch,
                           runs=list(runs), pairfree_judge=self.pairfree_judge if pairfree else None)

    def left(self) -> float:
        """Training minutes a run started now may take so that it ends with the others."""
        return 0.0 if self.smoke else max(0.5, self.total - (time.monotonic() - self.t0) / 60 - LOAD_MINUTES)

    def data(self) -> list[str]:
        return [] if self.smoke else [f"data.batch_size={self.batch}", f"data.num_workers={self.workers}"]

    def run_args(self, config: str, name: str, student: str, minutes: float, extra: list[str],
                 max_steps: int = 1_000_000, judge_path: str | None = None) -> list[str]:
        judge = [f"judge.path={judge_path or self.judge_path}"] if config == "npedit" else []
        return self.train(config, name, minutes, [f"model.student={student}", *judge, *self.data(), *extra],
                          max_steps=max_steps)

    def stop_if_failed_early(self, jobs: list, seconds: float = 60) -> bool:
        """Watch the first `seconds`; if a run exits with an error, stop all of them. True when all are alive."""
        end = time.monotonic() + (5 if self.smoke else seconds)
        while time.monotonic() < end:
            failed = [name for name, proc, *_ in jobs if proc.poll() not in (None, 0)]
            if failed:
                for name, proc, *_ in jobs:
                    if proc.poll() is None:
                        proc.kill()
                        self.record["stages"][name]["killed"] = True
                self.wait(*jobs)
                self.record["stopped_early"] = failed
                self.save()
                return False
            time.sleep(1)
        return True

    def go(self) -> bool:
        jobs = []
        if self.sft_student:
            jobs += [self.start(name, self.run_args(RUNS[name][0], name, self.sft_student, self.left(), RUNS[name][1]),
                                self.left()) for name in self.runs]
        if self.pairfree:
            warmup_minutes = 0.0 if self.smoke else WARMUP_MINUTES
            warmup = self.start("warmup", self.train("warmup", "warmup", warmup_minutes, self.data()), warmup_minutes)
            if not self.stop_if_failed_early([*jobs, warmup]):
                return False
            if self.wait(warmup)["warmup"]:
                pairfree = self.start("npedit", self.run_args("npedit", "npedit", self.p("warmup", "pipeline"),
                                                              self.left(), [], judge_path=self.pairfree_judge),
                                      self.left())
                if not self.stop_if_failed_early([*jobs, pairfree], seconds=30):
                    return False
                jobs.append(pairfree)
        elif not self.stop_if_failed_early(jobs):
            return False
        trained = self.wait(*jobs)

        # equal-step paired SFT baselines (same batch and pool), beside the benchmark of what is already trained
        baselines = []
        starts = {run: (self.equal_name(run), self.sft_student, [o for o in RUNS[run][1] if o.startswith("data.")])
                  for run in self.equal_steps if self.sft_student}
        starts["npedit"] = ("warmup-sft-equal", self.p("warmup", "pipeline"), [])
        for run, (name, student, extra) in starts.items():
            if trained.get(run) and student:
                steps = self.steps_reached(run)
                self.record[f"{run}_steps"] = steps
                baselines.append(self.start(name, self.run_args("sft", name, student, 0.0 if self.smoke else 1.5,
                                                                extra, max_steps=max(steps, 1)), 1.5))
        evals = [self.start(f"eval-{name}", self.evaluate(name, self.p(name, "pipeline")), 1.5)
                 for name, ok in trained.items() if ok and name != "warmup"]
        if self.sft_student:
            evals.append(self.start("eval-sft-student", self.evaluate("sft-student", self.sft_student), 1.5))
        done = self.wait(*baselines, *evals)
        last = [self.start(f"eval-{name}", self.evaluate(name, self.p(name, "pipeline")), 1.5)
                for name, *_ in baselines if done.get(name)]
        if last:
            self.wait(*last)
        self.collect()
        return all(stage.get("rc") == 0 for stage in self.record["stages"].values())

    @staticmethod
    def equal_name(run: str) -> str:
        """The equal-step paired-SFT baseline of an NP-Edit run ("sft-equal" for the recipe, as before)."""
        return "sft-equal" if run == "sft-npedit" else f"{run}-sft-equal"

    def ranked(self) -> list[str]:
        """Runs trained here (with a pipeline), best (exact, followed, preserved) first."""
        return self.rank(n for n in self.record["eval"] if (self.out / n / "pipeline").is_dir())


def pack(run: Editors, dest: Path, keep: int) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    kept = run.ranked()[:keep]
    run.record["packed"] = kept
    run.save()
    write_atomic(run.out / "editors.json", json.dumps(run.record, indent=2))
    for name in kept:
        shutil.copy(run.out / name / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors",
                    dest / f"{name}.safetensors")
    skip = {"checkpoints", "pipeline", "critic", "tensorboard", "samples"}
    with tarfile.open(dest / "reports.tar.gz", "w:gz") as tar:
        for path in sorted(run.out.rglob("*")):
            rel = path.relative_to(run.out)
            if path.is_file() and not skip.intersection(rel.parts) and path.stat().st_size < 2_000_000:
                tar.add(path, arcname=str(Path("reports") / rel))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/editors", help="run folder")
    ap.add_argument("--sft-student", help="a paired-SFT NPEditPipeline folder to continue from (optional)")
    ap.add_argument("--teacher", default=str(ROOT / "assets" / "shapes" / "teacher"), help="teacher base folder")
    ap.add_argument("--judge", default=str(ROOT / "assets" / "shapes" / "judge"), help="judge folder")
    ap.add_argument("--minutes", type=float, default=5.0, help="wall-clock of the side-by-side training phase")
    ap.add_argument("--batch", type=int, default=128, help="training batch of every run")
    ap.add_argument("--workers", type=int, default=2, help="scene-rendering workers per run")
    ap.add_argument("--threads", type=int, default=2, help="OMP threads per run")
    ap.add_argument("--runs", nargs="+", default=list(FROM_SFT), choices=sorted(RUNS),
                    help="runs from the SFT student, side by side (default: %(default)s)")
    ap.add_argument("--equal-steps", nargs="*", default=list(EQUAL_STEPS),
                    help="NP-Edit runs that get a paired-SFT baseline at their step count (default: %(default)s)")
    ap.add_argument("--pairfree-judge", help="judge of the pair-free NP-Edit run (default: --judge)")
    ap.add_argument("--no-pairfree", action="store_true", help="skip the pair-free warm-up and NP-Edit run")
    ap.add_argument("--grace", type=float, default=3.0,
                    help="minutes after the training phase at which whatever still runs is stopped and packing begins")
    ap.add_argument("--smoke", action="store_true", help="a few steps of every run (checks the commands)")
    ap.add_argument("--pack", help="write reports.tar.gz and the best runs' transformers here")
    ap.add_argument("--keep", type=int, default=6, help="how many transformers --pack writes")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists() and args.smoke:
        shutil.rmtree(out)
    run = Editors(out, smoke=args.smoke, minutes=args.minutes, batch=args.batch, workers=args.workers,
                  threads=args.threads, teacher=args.teacher, judge=args.judge, sft_student=args.sft_student,
                  runs=tuple(args.runs), equal_steps=tuple(args.equal_steps), pairfree_judge=args.pairfree_judge,
                  pairfree=not args.no_pairfree, grace=args.grace)

    def pack_it():
        if not run.record["eval"]:  # go() stopped before collecting the reports
            run.collect()
        pack(run, Path(args.pack), args.keep)

    ok = shapes_chain.go_then_pack(run, "editors", pack_it if args.pack else None)
    return 0 if ok else (2 if run.record.get("stopped_early") else 1)


if __name__ == "__main__":
    sys.exit(main())
