"""One short call that checks every path only a GPU exercises, on tiny random-weight models of the real families.

    python scripts/gpu_smoke.py --out $OUT/gpu_smoke.json        # on a lent GPU (cuda, bfloat16: the defaults)
    python scripts/gpu_smoke.py --device cpu --only pipeline,judge  # the same code on a CPU, so it cannot rot

Checks (each independent: one failure does not stop the rest): an `NPEditPipeline` loaded in --dtype for SD3,
Z-Image and the "frames" Z-Image editor (finite output, the denoiser's time in float32, difference to float32);
diffusers' model offload (`enable_model_cpu_offload`) against the plain result; the workbench's `trace_edit`; each
judge family (verdicts, answer gradients, P(Yes) against float32); a few Trainer iterations in mixed precision
(SD3 with and without LoRA, Z-Image: finite losses, parameters that change, a checkpoint that resumes); and
`python -m npedit bench` on the device. One row per check, then everything as JSON to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

STARTED = time.perf_counter()  # after the imports of torch and numpy: the report's total counts from here

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the lent machine has no internet: never wait on hub retries
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
GROUPS = ("pipeline", "offload", "trace", "judge", "train", "bench")
# Where each family's transformer receives its time, and the native value it should get for our t in [0, 1]
# (SD3: 1000 t; Z-Image: t_scale (1 - t), t = 1 clean): read by a hook to check the time is float32 and unrounded.
TIME_INPUT = {
    "sd3": ("time_text_embed", lambda transformer, t: 1000.0 * t),
    "zimage": ("t_embedder", lambda transformer, t: transformer.t_scale * (1.0 - t)),
}
INSTRUCTION = "make the red circle green"


class CheckFailed(AssertionError):
    """A check ran but its result is wrong (as opposed to an exception inside the code under test)."""


def require(ok: bool, message: str) -> None:
    """Raise `CheckFailed(message)` unless `ok`."""
    if not ok:
        raise CheckFailed(message)


def random_image(size: int = 64, seed: int = 0) -> Image.Image:
    """A random RGB image of size x size (8-bit noise)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))


class Models:
    """The tiny models every check shares, built on first use under one temporary folder."""

    def __init__(self, root: Path):
        self.root = root

    @functools.cached_property
    def sd3_base(self) -> str:
        from npedit.backbones.tiny import build_tiny_sd3

        # SD3's full text stack (two CLIPs and a T5): under model offload the second and third encoders are the
        # ones diffusers hooks outside `model_cpu_offload_seq`
        return build_tiny_sd3(self.root / "sd3-base", num_clips=2, t5_hidden=64)

    @functools.cached_property
    def zimage_base(self) -> str:
        from npedit.backbones.tiny import build_tiny_zimage

        return build_tiny_zimage(self.root / "zimage-base")

    @functools.cached_property
    def judges(self) -> dict[str, str]:
        """Judge folders by family (model_type); InternVL with a 64-pixel view, as the tests build it."""
        from npedit.judges import tiny

        return {
            "llava_onevision": tiny.build_tiny_llava_onevision(self.root / "llava_onevision"),
            "internvl": tiny.build_tiny_internvl(self.root / "internvl", image_size=64, patch_size=4),
            "qwen2_5_vl": tiny.build_tiny_qwen2_5_vl(self.root / "qwen2_5_vl"),
        }

    def editor(self, kind: str) -> str:
        """An `NPEditPipeline` folder saved in float32: kind "sd3", "zimage" or "zimage-frames"."""
        folder = self.root / f"editor-{kind}"
        if (folder / "model_index.json").is_file():
            return str(folder)
        from npedit.backbones import load_backbone
        from npedit.backbones.zimage import NPEditZImageTransformer2DModel
        from npedit.pipeline import NPEditPipeline

        base = self.sd3_base if kind == "sd3" else self.zimage_base
        backbone = load_backbone(base)
        teacher = backbone.load_transformer(base)
        if kind == "zimage-frames":  # the re-implementation's layout, as `import-reimpl` builds it
            config = {k: v for k, v in teacher.config.items() if not k.startswith("_")}
            student = NPEditZImageTransformer2DModel(**config, reference_layout="frames")
            student.load_state_dict(teacher.state_dict())
        else:
            student = backbone.prepare_student(teacher)
        with torch.no_grad():  # a zero-initialised reference path would make the reference invisible
            g = torch.Generator().manual_seed(1)
            for name, p in student.named_parameters():
                if name.startswith("ref_"):
                    p.copy_(0.02 * torch.randn(p.shape, generator=g))
        NPEditPipeline.from_parts(student.eval(), backbone).save_pretrained(folder)
        return str(folder)

    @functools.cached_property
    def tiny_set(self) -> dict[str, str]:
        """Editor, judge, teacher and critic of the workbench's tiny set (Z-Image, LLaVA-OneVision)."""
        from workbench.tiny import build_tiny_set

        return build_tiny_set(self.root / "tiny-set", base=self.zimage_base, judge=self.judges["llava_onevision"])


# ---- checks -----------------------------------------------------------------------------------


def edit(pipe, seed: int = 0, **kwargs) -> np.ndarray:
    """One seeded 4-step edit of a fixed random image, as (1, H, W, 3) in [0, 1]."""
    return pipe(image=random_image(), prompt=INSTRUCTION, generator=torch.Generator().manual_seed(seed),
                output_type="np", **kwargs).images


def record_times(pipe) -> list[torch.Tensor]:
    """Hook the module that receives the pipeline transformer's time; returns the list each call appends to."""
    module_name, _ = TIME_INPUT[pipe.family]
    seen: list[torch.Tensor] = []
    pipe.transformer.get_submodule(module_name).register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach()))
    return seen


def check_time(pipe, seen: list[torch.Tensor]) -> None:
    """Every time the denoiser saw is float32, and each of the sampler's times reached it unrounded."""
    _, native = TIME_INPUT[pipe.family]
    require(bool(seen), "the time input was never called")
    dtypes = sorted({str(s.dtype) for s in seen})
    require(dtypes == ["torch.float32"], f"the denoiser's time arrived as {dtypes}, not float32 only")
    values = torch.cat([s.float().flatten().cpu() for s in seen])
    for t in pipe.times(4):
        want = native(pipe.transformer, t)
        require(bool((values - want).abs().min() < 1e-2), f"time {t} should reach the transformer as {want:.4f}; "
                                                          f"it saw {sorted(set(values.tolist()))}")


def pipeline_check(models: Models, kind: str, device: str, dtype: torch.dtype) -> dict:
    """An editor folder loaded with torch_dtype=dtype edits on the device: finite, float32 time, close to float32."""
    from npedit.pipeline import NPEditPipeline

    folder = models.editor(kind)
    pipe = NPEditPipeline.from_pretrained(folder, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    dtypes = {name: next(getattr(pipe, name).parameters()).dtype for name in ("transformer", "vae", "text_encoder")}
    require(set(dtypes.values()) == {dtype}, f"components loaded as {dtypes}, not {dtype}")
    seen = record_times(pipe)
    out = edit(pipe)
    require(bool(np.isfinite(out).all()), "the edit is not finite")
    check_time(pipe, seen)
    full = NPEditPipeline.from_pretrained(folder, dtype=torch.float32).to(device)
    full.set_progress_bar_config(disable=True)
    reference = edit(full)
    diff = float(np.abs(out - reference).max())
    require(diff < 0.25, f"the {dtype} edit differs from float32's by {diff:.3f} (of 1)")
    return {"max_abs_diff_vs_float32": round(diff, 4), "mean_abs_diff_vs_float32":
            round(float(np.abs(out - reference).mean()), 5), "time_dtype": "float32", "calls": len(seen)}


def offload_check(models: Models, kind: str, device: str, dtype: torch.dtype) -> dict:
    """`enable_model_cpu_offload` on the device: the same edit as the pipeline held there, models back on the CPU."""
    from npedit.pipeline import NPEditPipeline

    folder = models.editor(kind)
    plain = NPEditPipeline.from_pretrained(folder, dtype=dtype).to(device)
    plain.set_progress_bar_config(disable=True)
    expected = edit(plain)
    del plain
    pipe = NPEditPipeline.from_pretrained(folder, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_model_cpu_offload(device=device)
    seen = record_times(pipe)
    out = edit(pipe)
    require(bool(np.isfinite(out).all()), "the offloaded edit is not finite")
    check_time(pipe, seen)
    diff = float(np.abs(out - expected).max())
    require(diff < 1e-2, f"the offloaded edit differs from the plain one by {diff:.4f}")
    after = {name: str(next(getattr(pipe, name).parameters()).device) for name in ("transformer", "vae",
                                                                                    "text_encoder")}
    require(all(d == "cpu" for d in after.values()), f"after the call the models are on {after}, not offloaded")
    return {"max_abs_diff_vs_plain": round(diff, 5), "execution_device": str(pipe._execution_device)}


def trace_check(models: Models, device: str, dtype: torch.dtype) -> dict:
    """The workbench's per-step trace (judge P(Yes), DMD maps) with its model set in `dtype` on the device."""
    from workbench import models as wb
    from workbench.inspect import trace_edit

    paths = models.tiny_set
    name = {v: k for k, v in DTYPES.items()}[dtype]
    ms = wb.ModelSet(wb.resolve_paths(**{k: paths[k] for k in ("model", "judge", "teacher", "critic")}, env={}),
                     device=device, dtype=name)
    pipe = ms.editor()
    judge, teacher, critic, loss, judge_note, dmd_note = ms.inspectors(None, pipe)
    require(judge_note is None and dmd_note is None, f"inspectors missing: {judge_note or dmd_note}")
    trace = trace_edit(pipe, judge, teacher, critic, random_image(), INSTRUCTION, "a green circle", steps=4, seed=0,
                       edit_type="recolor", loss=loss)
    require(len(trace.steps) == 4, f"{len(trace.steps)} steps traced, not 4")
    for s in trace.steps:
        require(0 < s.p_edit < 1 and 0 < s.p_identity < 1, f"step {s.step}: P(Yes) {s.p_edit}, {s.p_identity}")
        require(s.dmd_map is not None and bool(np.isfinite(s.dmd_map).all()) and s.dmd_mean > 0,
                f"step {s.step}: DMD map not finite or all zero")
    return {"p_edit": [round(s.p_edit, 4) for s in trace.steps], "dmd_mean": [round(s.dmd_mean, 4)
                                                                              for s in trace.steps],
            "total_s": round(trace.timings["total_s"], 3)}


def judge_check(models: Models, family: str, device: str, dtype: torch.dtype) -> dict:
    """A judge family in `dtype` on the device: verdicts, answer gradients on the pixels, P(Yes) against float32."""
    from npedit.judges import load_judge
    from npedit.verdicts import answer_gradients, judge_edit

    folder = models.judges[family]
    judge = load_judge(folder, torch_dtype=dtype, device=device)
    require(next(judge.parameters()).dtype == dtype, f"judge loaded as {next(judge.parameters()).dtype}")
    ref, edited = random_image(seed=1), random_image(seed=2)
    asked = dict(edit_type="remove", object_name="red circle", keep=["blue square"])
    verdict = judge_edit(judge, ref, edited, "remove the red circle", **asked)
    p = [q["p_yes"] for q in verdict.questions]
    require(all(0 < x < 1 and math.isfinite(x) for x in p), f"P(Yes) out of (0, 1): {p}")
    grads = answer_gradients(judge, ref, edited, "remove the red circle", **asked)
    require(bool(np.isfinite(grads.grads).all()), "answer gradients are not finite")
    per_question = np.abs(grads.grads).reshape(len(grads.grads), -1).sum(1)
    require(bool((per_question > 0).all()), f"a question's gradient is zero on the pixels: {per_question.tolist()}")
    full = load_judge(folder, torch_dtype=torch.float32, device=device)
    p32 = [q["p_yes"] for q in judge_edit(full, ref, edited, "remove the red circle", **asked).questions]
    diff = max(abs(a - b) for a, b in zip(p, p32))
    require(diff < 0.05, f"P(Yes) differs from float32's by {diff:.4f}")
    return {"p_yes": [round(x, 4) for x in p], "max_abs_diff_p_yes_vs_float32": round(diff, 5),
            "grad_abs_sum": [float(f"{x:.3g}") for x in per_question]}


def trainable(net) -> dict[str, torch.Tensor]:
    """CPU float32 copies of a network's trainable parameters."""
    return {n: p.detach().float().cpu().clone() for n, p in net.named_parameters() if p.requires_grad}


def train_check(models: Models, family: str, lora_rank: int, device: str, dtype: torch.dtype) -> dict:
    """A few NP-Edit iterations (judge + DMD) through the Trainer in mixed precision on the device; finite losses,
    moving parameters, and a checkpoint that resumes to the same weights and trains on."""
    from npedit.config import load_config
    from npedit.training.trainer import Trainer

    name = {v: k for k, v in DTYPES.items()}[dtype]
    base = models.sd3_base if family == "sd3" else models.zimage_base
    run = models.root / f"train-{family}-lora{lora_rank}"
    overrides = [f"model.base={base}", "data.train=shapes", "data.batch_size=2", "critic_steps=1", f"output_dir={run}",
                 f"mixed_precision={MIXED_PRECISION[name]}", f"model.dtype={name}", f"judge.dtype={name}",
                 f"judge.path={models.judges['llava_onevision']}", "optim.skip_grad_norm=1e9", "log_every=1",
                 "sample_every=0", "save_every=0", "sampler.two_step_prob=1.0"]
    if lora_rank:
        overrides.append(f"model.lora_rank={lora_rank}")
    shutil.rmtree(run, ignore_errors=True)  # this check's own run from an earlier call (--workdir): a new one each time
    trainer = Trainer(load_config(None, ["stage=npedit", "max_steps=2", *overrides]))
    require(trainer.acc.device.type == torch.device(device).type,
            f"the trainer runs on {trainer.acc.device}, not {device}")
    require(trainer.judge is not None and trainer.critic is not None, "the run has no judge or no critic")
    metrics: list[dict] = []
    iterate = trainer.iteration
    trainer.iteration = lambda: metrics.append(iterate()) or metrics[-1]
    before = trainable(trainer.student)
    trainer.train()
    after = trainable(trainer.student)
    moved = max(float((after[k] - before[k]).abs().max()) for k in before)
    require(moved > 0, "no student parameter changed")
    losses = {k: float(v) for m in metrics for k, v in m.items() if k.endswith("loss")}
    require(all(math.isfinite(v) for v in losses.values()) and "student_loss" in losses, f"losses: {losses}")
    skipped = trainer.skipped
    require(skipped == {"student": 0, "critic": 0}, f"skipped updates: {skipped}")

    again = Trainer(load_config(None, ["stage=npedit", "max_steps=3", *overrides]))
    require(again.resume() and again.step == 2, f"did not resume at step 2 (step {again.step})")
    restored = trainable(again.student)
    off = max(float((restored[k] - after[k]).abs().max()) for k in after)
    require(off == 0, f"resumed weights differ from the saved ones by {off:.3g}")
    out = again.train()
    require(again.step == 3 and (out / "model_index.json").is_file(), f"resumed run ended at {again.step}")
    return {"student_loss": [round(float(m["student_loss"]), 4) for m in metrics],
            "max_param_change": float(f"{moved:.3g}"), "trainable": sum(v.numel() for v in before.values()),
            "device": str(trainer.acc.device)}


def bench_check(models: Models, device: str, dtype: torch.dtype) -> dict:
    """`python -m npedit bench --device DEVICE --dtype DTYPE` with quick settings (the tiny Z-Image editor and
    teacher)."""
    from npedit.cli import main

    paths = models.tiny_set
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["bench", "--model", paths["model"], "--teacher", paths["teacher"], "--device", device,
                     "--dtype", str(dtype).removeprefix("torch."), "--repeats", "2", "--batch", "2",
                     "--teacher-steps", "2", "--json"])
    require(code == 0, f"bench exited with {code}")
    result = json.loads(printed.getvalue().strip().splitlines()[-1])
    require(result["device"].split(":")[0] == torch.device(device).type, f"bench ran on {result['device']}")
    require(result["dtype"] == str(dtype).removeprefix("torch."), f"bench ran in {result['dtype']}")
    keys = ("edit_latency_ms", "bare_transformer_ms", "teacher_sdedit_latency_ms", "batch_throughput_img_per_s")
    require(all(result[k] > 0 for k in keys), f"bench figures: {result}")
    return {k: round(result[k], 2) for k in keys}


def checks(models: Models, device: str, dtype: torch.dtype) -> list[tuple[str, str, object]]:
    """(name, group, thunk) of every check, in the order they run."""
    out = [(f"pipeline/{kind}", "pipeline", functools.partial(pipeline_check, models, kind, device, dtype))
           for kind in ("sd3", "zimage", "zimage-frames")]
    out += [(f"offload/{kind}", "offload", functools.partial(offload_check, models, kind, device, dtype))
            for kind in ("sd3", "zimage-frames")]
    out.append(("trace/zimage", "trace", functools.partial(trace_check, models, device, dtype)))
    out += [(f"judge/{family}", "judge", functools.partial(judge_check, models, family, device, dtype))
            for family in ("llava_onevision", "internvl", "qwen2_5_vl")]
    out += [(f"train/{family}{'-lora' if rank else ''}", "train",
             functools.partial(train_check, models, family, rank, device, dtype))
            for family, rank in (("sd3", 4), ("sd3", 0), ("zimage", 0))]
    out.append(("bench/zimage", "bench", functools.partial(bench_check, models, device, dtype)))
    return out


def row_line(row: dict) -> str:
    """A check's row as one printed line: name, ok/FAIL, seconds, figures or the error."""
    shown = row.get("error") or json.dumps(row["figures"])
    return f"{row['name']:24s} {'ok' if row['ok'] else 'FAIL':4s} {row['seconds']:6.1f}s  {shown[:300]}"


def run_check(name: str, thunk) -> dict:
    """Run one check; its row: name, ok, seconds, figures (or the error and the last lines of its traceback)."""
    start = time.perf_counter()
    try:
        figures, ok, error = thunk(), True, None
    except (Exception, SystemExit) as exc:  # one failure is a row, not the end of the run (the CLI exits on errors)
        figures, ok = {}, False
        error = f"{type(exc).__name__}: {exc}"[:2000]
        figures["traceback"] = traceback.format_exc().splitlines()[-12:]
    row = {"name": name, "ok": ok, "seconds": round(time.perf_counter() - start, 2), "figures": figures}
    if error:
        row["error"] = error
    return row


def environment(device: str) -> dict:
    """What the run runs on: device name, torch/diffusers/transformers versions (read before any check)."""
    import diffusers
    import transformers

    dev = torch.device(device)
    return {"device": device, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cpu_threads": torch.get_num_threads()}


def peak_gpu_memory_mib(device: str) -> float | str | None:
    """The peak GPU memory of the run in MiB (None on a CPU; the error after a CUDA failure broke the context)."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    try:
        return round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    except RuntimeError as exc:
        return f"unreadable: {exc}"[:200]


def write_report(out: str | None, report: dict) -> None:
    """Write the JSON report (after every check: a run cut short still leaves its rows)."""
    if out:
        from npedit.files import write_atomic

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, json.dumps(report, indent=2))  # whole: Ctrl-C mid-write keeps the rows written before


def main(argv: list[str] | None = None) -> int:
    """Run the selected checks, print one row each, write the JSON report; exit 1 if any failed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    ap.add_argument("--only", default="", help=f"comma-separated groups or check names (groups: {', '.join(GROUPS)})")
    ap.add_argument("--out", default=None, help="the JSON report (default: $OUT/gpu_smoke.json when $OUT is set)")
    ap.add_argument("--workdir", default=None, help="where the tiny models are built (default: a temporary folder)")
    args = ap.parse_args(argv)
    out = args.out or (str(Path(os.environ["OUT"]) / "gpu_smoke.json") if os.environ.get("OUT") else None)
    device, dtype = args.device, DTYPES[args.dtype]
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {device} but no CUDA device is visible (use --device cpu)")
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    names = {n for n, _, _ in checks(None, device, dtype)}
    unknown = wanted - set(GROUPS) - names
    if unknown:
        raise SystemExit(f"error: --only names no group or check {sorted(unknown)}; groups: {', '.join(GROUPS)}; "
                         f"checks: {', '.join(sorted(names))}")
    if torch.device(device).type == "cpu":  # accelerate (the Trainer) would otherwise take a visible GPU
        os.environ["ACCELERATE_USE_CPU"] = "true"
    for library in ("transformers", "diffusers"):  # their loading bars would bury the rows
        __import__(library).utils.logging.disable_progress_bar()
    report = {"environment": environment(device), "dtype": args.dtype, "complete": False, "rows": []}
    try:  # now, not after the first check (minutes on a lent GPU)
        write_report(out, report)
    except OSError as exc:
        raise SystemExit(f"error: cannot write --out {out}: {exc.strerror or exc}") from None
    rows = report["rows"]
    with tempfile.TemporaryDirectory(prefix="gpu_smoke_") as tmp:
        models = Models(Path(args.workdir or tmp))
        selected = [c for c in checks(models, device, dtype) if not wanted or c[0] in wanted or c[1] in wanted]
        with tqdm(selected, desc="gpu smoke", unit="check") as bar:
            for name, _, thunk in bar:
                bar.set_postfix_str(name)
                rows.append(run_check(name, thunk))
                tqdm.write(row_line(rows[-1]))
                write_report(out, report)
    report.update(complete=True, ok=all(r["ok"] for r in rows), total_s=round(time.perf_counter() - STARTED, 1))
    report["environment"]["peak_gpu_memory_mib"] = peak_gpu_memory_mib(device)
    write_report(out, report)
    failed = [r["name"] for r in rows if not r["ok"]]
    print("\n".join(["", *map(row_line, rows)]))  # all rows again, together at the end of the output
    print(f"{len(rows) - len(failed)}/{len(rows)} checks ok in {report['total_s']} s" +
          (f"; failed: {', '.join(failed)}" if failed else "") + f" ({device}, {args.dtype})")
    if out:
        print(f"report: {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
