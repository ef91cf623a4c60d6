"""Train, evaluate and package the whole Shapes-world chain in one command, sized by wall-clock.

    python scripts/shapes_chain.py --out runs/chain                # ~10 minutes on one H100
    python scripts/shapes_chain.py --out runs/chain-smoke --smoke  # every stage for a few steps (~2 min)
    python scripts/shapes_chain.py --out runs/chain --check-first  # the smoke pass, then the chain
    python scripts/shapes_chain.py --out runs/chain --pack DIR     # also write DIR/*.tar.gz for assets/

Stages (each one is the project's own command, `python -m npedit ...`, run as a subprocess with
its log under OUT/logs/):
  A. small VAE, then its decoder sharpened with the palette loss | judge fine-tuning (from
     assets/shapes/judge), beside A-C
  B. text encoder + teacher    |
  C. identity warm-up of the student
  D. NP-Edit (two learning rates) and the ablations DMD-only, VLM-only, no identity question,
     full-vocabulary CE, side by side with the same wall-clock each
  E. paired SFT for as many steps as the full NP-Edit run reached; the exact benchmark of every
     variant, the zero-shot teacher (SDEdit) and the judge evaluation
Tiny models leave a GPU mostly idle, so the processes of one phase share it well. `--scale`
multiplies every budget (e.g. 3 for a longer run). With `--check-first` a quick smoke pass of
every stage runs first and the chain stops there if any stage fails.
Sizing: on the lent H100 (a sandboxed machine where every kernel launch is slow) a step of these
tiny models costs about the same at any batch size (4-step edit 50 ms for 1 image, 90 ms for 64), so
the GPU recipe uses large batches and renders scenes in background workers.
OUT/chain.json records each stage's command, return code and time, and every benchmark summary.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from npedit.files import write_atomic  # noqa: E402

BUNDLED_JUDGE = ROOT / "assets" / "shapes" / "judge"

# Wall-clock budgets of the full chain, in minutes (times --scale).
BUDGET = {"vae": 1.0, "vae-decoder": 1.0, "judge": 2.8, "teacher": 1.8, "warmup": 0.5, "npedit": 2.2, "sft": 0.5}
# Seconds a stage may take beyond its budget (imports, loading, evaluation, export) before it is killed.
GRACE_S = 75

NPEDIT_VARIANTS = {
    "npedit": [],
    "npedit-lr2e-4": ["optim.lr=2e-4"],
    "npedit-lr1e-4-b128": ["optim.lr=1e-4", "data.batch_size=128"],
    "ablation-dmd-only": ["loss.lambda_vlm=0"],
    "ablation-vlm-only": ["loss.lambda_dmd=0"],
    "ablation-no-identity": ["judge.identity_question=false"],
    "ablation-full-vocab": ["judge.loss=full_vocab"],
}
FULL_RECIPES = ("npedit", "npedit-lr2e-4", "npedit-lr1e-4-b128")  # the candidates for the bundled editor


class Chain:
    def __init__(self, out: Path, *, smoke: bool, scale: float, threads: int, deadline: float = float("inf")):
        self.out, self.smoke, self.scale, self.threads = out, smoke, scale, threads
        self.deadline = deadline  # time.monotonic() after which running stages are stopped
        self.base = str(out / "teacher" / "base")  # the teacher (model.base) of the student stages
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.record: dict = {"smoke": smoke, "scale": scale, "stages": {}, "eval": {}}
        self.t0 = time.monotonic()

    # ---- processes ------------------------------------------------------------------------
    def start(self, name: str, args: list[str], minutes: float) -> tuple[str, subprocess.Popen, float, float]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.threads),
               "TOKENIZERS_PARALLELISM": "false"}
        log = open(self.out / "logs" / f"{name}.log", "w", encoding="utf-8")
        cmd = [sys.executable, "-m", "npedit", *args]
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.record["stages"][name] = {"cmd": " ".join(args), "minutes_budget": minutes}
        print(f"[{self.clock()}] start {name}", flush=True)
        return name, proc, time.monotonic(), 60 * minutes + GRACE_S

    def wait(self, *running) -> dict[str, bool]:
        ok = {}
        pending = list(running)
        while pending:
            for item in list(pending):
                name, proc, began, limit = item
                rc = proc.poll()
                if rc is None and (time.monotonic() - began > limit or time.monotonic() > self.deadline):
                    proc.kill()
                    rc = proc.wait()
                    self.record["stages"][name]["killed"] = True
                if rc is None:
                    continue
                pending.remove(item)
                secs = time.monotonic() - began
                self.record["stages"][name].update({"rc": rc, "seconds": round(secs, 1)})
                ok[name] = rc == 0
                status = "ok" if rc == 0 else f"FAILED rc={rc}"
                print(f"[{self.clock()}] {name}: {status} in {secs:.0f} s", flush=True)
                if rc != 0:
                    tail = (self.out / "logs" / f"{name}.log").read_text(errors="replace", encoding="utf-8")[-3000:]
                    print(f"---- tail of logs/{name}.log ----\n{tail}\n----", flush=True)
            time.sleep(0.5)
        self.save()
        return ok

    def run(self, name: str, args: list[str], minutes: float) -> bool:
        return self.wait(self.start(name, args, minutes))[name]

    def clock(self) -> str:
        return f"{time.monotonic() - self.t0:6.0f} s"

    def save(self) -> None:
        self.record["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        write_atomic(self.out / "chain.json", json.dumps(self.record, indent=2))

    def minutes(self, key: str) -> float:
        return 0.0 if self.smoke else BUDGET[key] * self.scale

    # ---- stage arguments ------------------------------------------------------------------
    def p(self, *parts: str) -> str:
        return str(self.out.joinpath(*parts))

    def vae(self):
        if self.smoke:
            return ["shapes", "vae", "preset=quick", f"output_dir={self.p('vae')}"]
        return ["shapes", "vae", f"output_dir={self.p('vae')}", "steps=1000000", f"max_minutes={self.minutes('vae')}",
                "batch_size=256", "crop=64", "lr=2e-3", "log_every=100", "workers=3"]

    def vae_decoder(self):
        """Sharpen the decoder with the palette loss, keeping the encoder (the latent space) as trained."""
        args = ["shapes", "vae", f"output_dir={self.p('vae-decoder')}", f"init={self.p('vae', 'vae')}",
                "decoder_only=true", "palette_weight=0.5"]
        if self.smoke:
            return [*args, "preset=quick"]
        return [*args, "steps=1000000", f"max_minutes={self.minutes('vae-decoder')}", "batch_size=256", "lr=5e-4",
                "log_every=100", "workers=3"]

    def judge(self):
        common = [f"init={BUNDLED_JUDGE}", "vision_steps=0", "device=auto", f"threads={self.threads}",
                  f"output_dir={self.p('judge')}", "eval_seed=2000"]  # selection on seed 2000; the report uses 1000
        if self.smoke:
            return ["shapes", "judge", *common, "check_steps=2", "batch_size=4", "eval_every=2", "eval_cases=4",
                    "log_every=1", "warmup_steps=1"]
        return ["shapes", "judge", *common, "check_steps=6000", f"max_minutes={self.minutes('judge')}", "lr=5e-4",
                "batch_size=64", "warmup_steps=50", "eval_every=250", "eval_cases=120", "log_every=50"]

    def teacher(self):
        base = [f"output_dir={self.p('teacher')}", f"vae={self.p('vae-decoder', 'vae')}"]
        if self.smoke:
            return ["shapes", "teacher", "preset=quick", *base]
        return ["shapes", "teacher", *base, "steps=1000000", f"max_minutes={self.minutes('teacher')}",
                "batch_size=512", "lr=1e-3", "sample_every=2500", "log_every=50", "workers=6"]

    def train(self, config: str, name: str, minutes: float, extra: list[str], max_steps: int = 1_000_000):
        args = ["train", "--config", f"configs/shapes/{config}.yaml", f"output_dir={self.p(name)}",
                f"model.base={self.base}"]
        if self.smoke:
            return args + [*extra, "max_steps=2", "data.batch_size=2", "log_every=1", "sample_every=2",
                           "save_every=2", "critic_steps=1"]
        return args + [f"max_steps={max_steps}", f"max_minutes={minutes}", "log_every=25", "sample_every=1000",
                       "save_every=1000", *extra]

    def evaluate(self, name: str, model: str | None = None, baseline: bool = False):
        n = "10" if self.smoke else "300"
        args = ["eval", "shapes", "--n", n, "--seed", "0", "--out", self.p("eval"), "--name", name]
        if baseline:
            return args + ["--baseline", "teacher", "--teacher", self.base]
        return args + ["--model", model]

    # ---- the chain ------------------------------------------------------------------------
    def go(self) -> bool:
        judge_job = self.start("judge", self.judge(), self.minutes("judge"))
        if not self.run("vae", self.vae(), self.minutes("vae")):
            return False
        if not self.run("vae-decoder", self.vae_decoder(), self.minutes("vae-decoder")):
            return False
        if not self.run("teacher", self.teacher(), self.minutes("teacher")):
            return False
        warmup = self.train("warmup", "warmup", self.minutes("warmup"),
                            [] if self.smoke else ["data.batch_size=128", "data.num_workers=3"])
        if not self.run("warmup", warmup, self.minutes("warmup")):
            return False
        judge_ok = self.wait(judge_job)["judge"] and (self.out / "judge" / "judge").is_dir()
        judge = self.p("judge", "judge") if judge_ok else str(BUNDLED_JUDGE)
        self.record["judge_used"] = judge
        student = [f"model.student={self.p('warmup', 'pipeline')}", f"judge.path={judge}"]
        batch = [] if self.smoke else ["data.batch_size=64", "data.num_workers=1"]
        jobs = [self.start(name, self.train("npedit", name, self.minutes("npedit"),
                                            [*student, *batch, *extra]),
                           self.minutes("npedit"))
                for name, extra in NPEDIT_VARIANTS.items()]
        trained = self.wait(*jobs)

        steps = self.steps_reached("npedit")
        self.record["npedit_steps"] = steps
        sft = self.start("sft", self.train("sft", "sft", self.minutes("sft"), [*student[:1], *batch],
                                           max_steps=steps or 1000), self.minutes("sft"))
        evals = [self.start(f"eval-{name}", self.evaluate(name, self.p(name, "pipeline")), 1.0)
                 for name, ok in trained.items() if ok]
        evals.append(self.start("eval-warmup-identity", self.evaluate("warmup-identity", self.p("warmup", "pipeline")), 1.0))
        evals.append(self.start("eval-teacher-sdedit", self.evaluate("teacher-sdedit", baseline=True), 1.0))
        evals.append(self.start("judge-eval", ["shapes", "judge-eval", "--judge", judge, "--n", "5" if self.smoke else "300",
                                               "--out", self.p("eval")], 1.0))
        done = self.wait(sft, *evals)
        if done.get("sft"):
            self.wait(self.start("eval-sft", self.evaluate("sft", self.p("sft", "pipeline")), 1.0))
        self.collect()
        return all(self.record["stages"][s].get("rc") == 0 for s in self.record["stages"])

    def steps_reached(self, run: str) -> int:
        path = self.out / run / "metrics.jsonl"
        if not path.exists():
            return 0
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return max((int(r["step"]) for r in rows), default=0)

    def collect(self) -> None:
        for path in sorted((self.out / "eval").glob("*.json")):
            data = json.loads(path.read_text(encoding="utf-8"))
            if path.name == "judge_eval.json":
                self.record["judge_eval"] = data.get("overall")
            elif "summary" in data:
                self.record["eval"][path.stem] = {"summary": data["summary"].get("overall", data["summary"]),
                                                  "steps": self.steps_reached(path.stem)}
        self.save()
        print(json.dumps({k: v for k, v in self.record.items() if k != "stages"}, indent=1), flush=True)

    def rank(self, names) -> list[str]:
        """The benchmarked ones of `names`, best (exact, followed, preserved) first."""
        def key(name):
            s = self.record["eval"][name].get("summary", {})
            return (s.get("exact", -1), s.get("followed", -1), s.get("preserved", -1))
        return sorted((n for n in names if n in self.record["eval"]), key=key, reverse=True)

    def best_editor(self) -> str | None:
        """The full recipe with the highest (exact, followed, preserved) on the benchmark."""
        ranked = self.rank(FULL_RECIPES)
        return ranked[0] if ranked else None


def pack(chain: Chain, dest: Path) -> None:
    """dest/{editor,critic,teacher,judge,reports}.tar.gz: what assets/ and the README need."""
    dest.mkdir(parents=True, exist_ok=True)
    best = chain.best_editor()
    chain.record["bundled_candidate"] = best
    chain.save()
    trees = {"teacher": chain.out / "teacher" / "base", "judge": chain.out / "judge" / "judge"}
    if best:
        trees.update(editor=chain.out / best / "pipeline", critic=chain.out / best / "critic")
    for name, folder in trees.items():
        if folder.is_dir():
            with tarfile.open(dest / f"{name}.tar.gz", "w:gz") as tar:
                tar.add(folder, arcname=name)
    skip = {"checkpoints", "pipeline", "critic", "base", "judge", "tensorboard", "init", "vae"}
    with tarfile.open(dest / "reports.tar.gz", "w:gz") as tar:
        for path in sorted(chain.out.rglob("*")):
            rel = path.relative_to(chain.out)
            if path.is_file() and not skip.intersection(rel.parts[1:-1] if len(rel.parts) > 1 else ()) \
                    and path.stat().st_size < 2_000_000 and "tfevents" not in path.name:
                tar.add(path, arcname=str(Path("reports") / rel))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/chain", help="run folder of the chain")
    ap.add_argument("--smoke", action="store_true", help="only the quick pass of every stage")
    ap.add_argument("--check-first", action="store_true", help="run the smoke pass first; stop if it fails")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every wall-clock budget")
    ap.add_argument("--threads", type=int, default=2, help="OMP threads per stage process")
    ap.add_argument("--pack", help="write the bundle-ready tarballs here")
    ap.add_argument("--deadline-minutes", type=float, default=0,
                    help="stop whatever still runs after this many minutes and pack what exists (0 = none)")
    args = ap.parse_args()
    for flag, folder in (("--out", args.out), ("--pack", args.pack)):
        if folder and Path(folder).exists() and not Path(folder).is_dir():  # (else a traceback, or one after the chain)
            ap.error(f"{flag} {folder} is a file; give a folder")
    out = Path(args.out)
    deadline = time.monotonic() + 60 * args.deadline_minutes if args.deadline_minutes else float("inf")
    if args.smoke or args.check_first:
        smoke_dir = out / "smoke" if not args.smoke else out
        if smoke_dir.exists():
            shutil.rmtree(smoke_dir)
        ok = Chain(smoke_dir, smoke=True, scale=args.scale, threads=args.threads, deadline=deadline).go()
        print(f"smoke pass: {'ok' if ok else 'FAILED'}", flush=True)
        if not ok or args.smoke:
            return 0 if ok else 1
    chain = Chain(out, smoke=False, scale=args.scale, threads=args.threads, deadline=deadline)
    ok = go_then_pack(chain, "chain", (lambda: pack(chain, Path(args.pack))) if args.pack else None)
    return 0 if ok else 1


def go_then_pack(chain: Chain, label: str, pack_it=None) -> bool:
    """Run the chain; pack whatever finished even if it stopped with an error; print the outcome."""
    try:
        ok = chain.go()
    except Exception as exc:
        print(f"{label} stopped: {exc!r}", flush=True)
        ok = False
    if pack_it:
        pack_it()
    print(f"{label}: {'ok' if ok else 'finished with failures'} in {chain.record['elapsed_s']:.0f} s", flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
