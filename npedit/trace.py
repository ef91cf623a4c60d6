"""Look inside one edit, step by step, and write what was seen: x0 of each sampling step, the judge's verdict on it,
and its DMD map.

`trace_edit` runs the pipeline itself (so the one sampler of npedit.sampler) and records each step through
`callback_on_step_end`; the judge, teacher and critic then look at what it recorded. `refine_trace` refines the
traced edit with the judge (`npedit.refine`) from its own last latents, so the refined result and the steps shown
belong to one sampling. `save_trace` writes a trace as a folder or a .zip (the CLI's `edit --trace` and the app's
download: one builder, the same files and numbers).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from PIL import Image

from . import flow
from .config import LossConfig, cfg_scale_for
from .files import png_bytes, write_atomic
from .guidance import teacher_critic_x0
from .images import load_image, tensor_to_pil
from .verdicts import SHOWN_DECIMALS, judge_candidates

if TYPE_CHECKING:
    from .refine import Refinement

Progress = Callable[[float, str], None]


@dataclass
class StepTrace:
    """What one sampling step produced and what the judge and the DMD pair think of it."""

    step: int
    t: float
    x0: Image.Image  # the step's predicted clean image, decoded
    sample_s: float  # time of the sampler step (student forward)
    p_edit: float | None = None
    p_identity: float | None = None
    dmd_map: np.ndarray | None = None  # (h, w) channel mean of |x0_critic - x0_teacher| on x0 noised to dmd_t
    dmd_mean: float | None = None
    judge_s: float = 0.0
    dmd_s: float = 0.0


@dataclass
class EditTrace:
    """A whole traced edit: the result, the per-step records, and why any part is missing."""

    reference: Image.Image
    image: Image.Image  # the edited image as the pipeline returns it (input size)
    instruction: str
    caption_target: str  # c^x used for the DMD maps
    caption_from: str  # "given" or "instruction" (the library's fallback when none is given)
    seed: int
    cfg_scale: float
    dmd_t: float | None = None  # the noise level at which each step's x0 is handed to the teacher and critic
    edit_type: str = "edit"  # the judge's questions
    object_name: str | None = None
    steps: list[StepTrace] = field(default_factory=list)
    judge_note: str | None = None  # why there are no P(Yes) values
    dmd_note: str | None = None  # why there are no DMD maps
    timings: dict = field(default_factory=dict)
    # the edit's output latents (the last step's x0), on the CPU (a trace outlives the GPU call that made it), and the
    # max_side it was sampled at: what `refine_trace` starts from
    latents: torch.Tensor | None = field(default=None, repr=False)
    max_side: int = 1024
    refinement: Refinement | None = None  # `refine_trace`'s: the edit refined by the judge from `latents`
    refine_settings: dict | None = None  # its steps, lr, anchor and the objects its keep and change checks name

    def table(self) -> list[dict]:
        """One row per step: t, P(edit done) (a removal: P(No) of its contains check), P(Yes) of the identity
        check, mean DMD disagreement, timings."""
        return [dict(zip(STEP_COLUMNS, (s.step + 1, round(s.t, 4), _round(s.p_edit, SHOWN_DECIMALS),
                                        _round(s.p_identity, SHOWN_DECIMALS),
                                        _round(s.dmd_mean), round(s.sample_s, 3), round(s.judge_s, 3),
                                        round(s.dmd_s, 3))))
                for s in self.steps]


STEP_COLUMNS = ("step", "t", "P(edit done)", "P(Yes) identity", "DMD mean |x0_critic - x0_teacher|", "sampler s",
                "judge s", "DMD s")  # EditTrace.table's columns


def _round(x: float | None, n: int = 4) -> float | None:
    return None if x is None else round(float(x), n)


@torch.no_grad()
def dmd_map(x0_real: torch.Tensor, x0_fake: torch.Tensor) -> np.ndarray:
    """Per-position disagreement |x0_fake - x0_real| averaged over channels: (B, C, h, w) -> (h, w) of sample 0."""
    return (x0_fake - x0_real).abs().float().mean(1)[0].cpu().numpy()


@torch.no_grad()
def trace_edit(pipe, judge, teacher, critic, image, instruction: str, caption_target: str | None = None,
               steps: int = 4, seed: int = 0, *, edit_type: str = "edit", object_name: str | None = None,
               max_side: int = 1024, loss: LossConfig | None = None, judge_note: str | None = None,
               dmd_note: str | None = None, progress: Progress | None = None, dmd_t: float | None = None) -> EditTrace:
    """Edit `image` with `pipe` and record, for every sampling step, x0, the judge's verdict and the DMD map.

    `judge`, `teacher` and `critic` may be None (then `judge_note` / `dmd_note` say why). The DMD map
    of a step is where DMD would act on that step's x0, as training applies it to the unroll's output:
    x0 noised to `dmd_t` (default: the middle of the loss's t range) with noise drawn from `seed`, the
    same for every step, then the teacher's CFG x0-prediction against the critic's, both on the target
    caption c^x (default: the instruction, as npedit.data does).
    """
    loss = loss or LossConfig()
    report = progress or (lambda frac, desc: None)
    reference = load_image(image)
    caption = (caption_target or "").strip()
    caption_from = "given" if caption else "instruction"
    caption = caption or instruction.strip()
    records: list[dict] = []
    clock = [time.perf_counter()]

    def on_step(_pipe, step, t, tensors):
        now = time.perf_counter()
        records.append({"step": step, "t": float(t), "x0": tensors["x0"].detach().clone(), "sample_s": now - clock[0]})
        clock[0] = now
        report((step + 1) / (2 * steps), f"sampling step {step + 1}/{steps}")

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(int(seed))
    edited = pipe(image=reference, prompt=instruction, num_inference_steps=steps, generator=generator,
                  callback_on_step_end=on_step, max_side=max_side).images[0]
    sample_s = time.perf_counter() - start

    bb = pipe.backbone
    scale = cfg_scale_for(loss, edit_type)
    if teacher is None or critic is None:
        dmd_note = dmd_note or "no teacher/critic loaded"
    else:
        cond_x = bb.encode_prompt([caption], with_reference=False)
        cond_neg = bb.encode_prompt([loss.negative_prompt], with_reference=False)
        # not the sampler's x_t: step 1's is pure noise (the same whatever the image) and each later one holds the
        # previous step's x0; one noise for all steps, so the maps differ only by x0
        dmd_t = float((loss.dmd_t_min + loss.dmd_t_max) / 2 if dmd_t is None else dmd_t)
        x0 = records[0]["x0"]
        eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(int(seed))).to(x0.device, x0.dtype)
    unreadable = judge and next(filter(None, map(judge.control_token_in, (instruction, object_name or ""))), None)
    if unreadable:  # the edit and its DMD maps still show; the judge would refuse these questions
        judge, judge_note = None, (f"the judge reads {unreadable!r} as one of its control tokens, not as text: no "
                                   "P(Yes) for this instruction")
    if judge is None:
        judge_note = judge_note or "no judge loaded"
    trace = EditTrace(reference, edited, instruction, caption, caption_from, int(seed), scale,
                      dmd_t=None if teacher is None or critic is None else dmd_t, edit_type=edit_type,
                      object_name=object_name, latents=records[-1]["x0"].cpu(), max_side=max_side,
                      judge_note=judge_note if judge is None else None,
                      dmd_note=dmd_note if teacher is None or critic is None else None)
    x0_imgs = [tensor_to_pil(bb.decode_latents(r["x0"]).clamp(-1, 1)[0]) for r in records]
    verdicts, judge_s = [None] * len(records), 0.0
    if judge is not None:  # every step's x0 in one judge pass (chunks of 8): a real VLM answers a batch at once
        report(0.5, f"asking the judge about the {len(records)} steps")
        t0 = time.perf_counter()
        try:
            verdicts = judge_candidates(judge, reference, x0_imgs, instruction, edit_type=edit_type,
                                        object_name=object_name)
            judge_s = (time.perf_counter() - t0) / len(records)  # each step's share of the pass
        except ValueError as exc:  # a question the judge refuses (longer than it reads): the edit and maps still show
            trace.judge_note = f"the judge cannot answer: {exc}"
    for r, x0_img, verdict in zip(records, x0_imgs, verdicts):
        st = StepTrace(step=r["step"], t=r["t"], x0=x0_img, sample_s=r["sample_s"])
        if verdict is not None:
            st.p_edit, st.p_identity, st.judge_s = verdict.p_edit, verdict.p_identity, judge_s
        if teacher is not None and critic is not None:
            t0 = time.perf_counter()
            x_t = flow.add_noise(r["x0"], eps, dmd_t)
            t_vec = torch.full((x_t.shape[0],), dmd_t, device=x_t.device)  # float32: bf16 would round the time
            x0_real, x0_fake = teacher_critic_x0(bb, teacher, critic, x_t, t_vec, cond_x, cond_neg, scale)
            st.dmd_map = dmd_map(x0_real, x0_fake)
            st.dmd_mean, st.dmd_s = float(st.dmd_map.mean()), time.perf_counter() - t0
        trace.steps.append(st)
        report(0.5 + (r["step"] + 1) / (2 * steps), f"judging and DMD for step {r['step'] + 1}/{steps}")
    trace.timings = {"sample_s": sample_s, "judge_s": sum(s.judge_s for s in trace.steps),
                     "dmd_s": sum(s.dmd_s for s in trace.steps), "total_s": time.perf_counter() - start}
    return trace


def refine_trace(trace: EditTrace, pipe, judge, *, refine_steps: int, lr: float, anchor: float,
                 callback: Callable[[int, torch.Tensor], None] | None = None, keep=(), new=(),
                 gone=()) -> Refinement:
    """Refine `trace`'s edit with the judge (`npedit.refine.refine_from_latents` on `trace.latents`, the very
    sampling its steps show, at the max_side it was sampled at), asked the trace's edit type and object plus the
    `keep`, `new` and `gone` objects. Stores the refinement, its settings and its time in the trace (which then
    saves refined.png and a "refinement" record) and returns it; `trace.image` stays the editor's own edit."""
    from .data import object_names
    from .refine import refine_from_latents

    if trace.latents is None:
        raise ValueError("this trace holds no latents to refine (it was not made by trace_edit)")
    start = time.perf_counter()
    asked = {"keep": object_names(keep), "new": object_names(new), "gone": object_names(gone)}
    [refined] = refine_from_latents(pipe, judge, trace.reference, trace.latents.to(pipe.device), trace.instruction,
                                    refine_steps=refine_steps, lr=lr, anchor=anchor, max_side=trace.max_side,
                                    callback=callback, edit_type=trace.edit_type, object_name=trace.object_name,
                                    **asked)
    trace.refinement = refined
    trace.refine_settings = {"steps": int(refine_steps), "lr": float(lr), "anchor": float(anchor), **asked}
    trace.timings["refine_s"] = time.perf_counter() - start
    trace.timings["total_s"] = trace.timings.get("total_s", 0.0) + trace.timings["refine_s"]
    return refined


# ---- the editor's own teacher and critic -----------------------------------------------------------------------

def own_companions(editor: str | os.PathLike | None) -> tuple[str | None, str | None, LossConfig]:
    """The teacher, critic and loss settings an editor folder names for itself: its training config's model.base and
    loss, and the critic/ inside it (the bundled editors) or beside a run's pipeline/; None where it names none."""
    from .folders import looks_local

    teacher, critic, loss = None, None, LossConfig()
    local = Path(editor) if editor else None
    if local is not None and (local / "training_config.json").is_file():
        cfg = json.loads((local / "training_config.json").read_text(encoding="utf-8"))
        teacher = cfg.get("model", {}).get("base") or None
        run_config = local.parent.parent / "config.yaml"
        if local.parent.name == "exports" and run_config.is_file() and (not teacher or teacher.startswith("local:")):
            # an export names its base only (`sharing.portable`); beside its run, the run's config says where it is
            teacher = _run_base(run_config) or teacher
        if teacher and not (Path(teacher).is_dir() or not looks_local(teacher)):
            teacher = None  # e.g. a relative runs/ path of the machine that trained a bundled editor
        elif teacher and Path(teacher).is_dir():
            teacher = str(Path(teacher).resolve())  # named as the editor and critic are (trace.json's models)
        # a run's pipeline/ has its critic beside it
        critic = str(local.parent / "critic") if (local.parent / "critic" / "config.json").is_file() else None
        if local.parent.name == "exports" and "averaged_steps" not in cfg and cfg.get("exported_from"):
            # an export of one checkpoint, beside its run: that checkpoint's critic, fitted to this very student
            # (the run's critic/ is its last step's: another editor's for an earlier one)
            name = PurePosixPath(str(cfg["exported_from"]).removeprefix("local:").replace("\\", "/")).name
            own = local.parent.parent / "checkpoints" / name / "critic"
            critic = str(own) if (own / "config.json").is_file() else None
        try:
            loss = LossConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.get("loss", {}).items()})
        except (TypeError, ValueError):  # a foreign or older config: the default loss settings
            loss = LossConfig()
    if local is not None and (local / "critic" / "config.json").is_file():
        critic = str(local / "critic")  # carried inside the editor folder (the bundled editors): its own first
    return teacher, critic, loss


def _run_base(config_file: Path) -> str | None:
    """model.base of a run's config.yaml, None when it does not read."""
    from .config import load_config

    try:
        return load_config(config_file).model.base or None
    except (OSError, ValueError):
        return None


def load_companion(role: str, path: str, pipe, torch_dtype=None) -> torch.nn.Module:
    """The frozen teacher or critic transformer at `path`, of the editor's family (it shares the editor's text
    encoder and VAE), on the editor's device; a ValueError naming `role` when it is of another family."""
    from .backbones import detect_family

    family = detect_family(path)
    if family != pipe.family:
        raise ValueError(f"the {role} {path} is a {family} model but the editor is {pipe.family}; pass a "
                         f"{pipe.family} checkpoint")
    net = pipe.backbone.load_transformer(path, torch_dtype=torch_dtype)
    return net.requires_grad_(False).eval().to(pipe.device)


# ---- writing a trace -------------------------------------------------------------------------------------------

TRACE_COLUMNS = ("step", "t", "p_edit", "p_identity", "dmd_mean", "dmd_max", "sample_s", "judge_s", "dmd_s", "x0",
                 "dmd_npy", "dmd_png")  # steps.csv and trace.json's "steps"
STEP_FILE = re.compile(r"step-\d+-(x0\.png|dmd\.npy|dmd\.png)")  # the names `trace_record` gives a step's files
REFINED_FILE = "refined.png"  # a refined trace's result (`refine_trace`)
TRACE_NAMES = ("trace.json", "steps.csv", "reference.png", "edited.png", REFINED_FILE)  # and the STEP_FILE ones


def is_trace_file(name: str) -> bool:
    """Whether a file of this name is one a trace writes into its folder (`trace_files`)."""
    return name in TRACE_NAMES or STEP_FILE.fullmatch(name) is not None


def trace_record(trace: EditTrace, models: dict[str, str | None] | None = None) -> dict:
    """Everything a trace measured, every digit kept, as JSON-ready values: the edit's settings (seed, steps,
    instruction, c^x, edit type, CFG scale, DMD t, the models by name) and one row per step (TRACE_COLUMNS)."""
    maps = [s.dmd_map for s in trace.steps if s.dmd_map is not None]
    steps = []
    for s in trace.steps:
        name = f"step-{s.step + 1}"
        has_map = s.dmd_map is not None
        steps.append(dict(zip(TRACE_COLUMNS, (
            s.step + 1, s.t, s.p_edit, s.p_identity, s.dmd_mean, float(s.dmd_map.max()) if has_map else None,
            s.sample_s, s.judge_s, s.dmd_s, f"{name}-x0.png", f"{name}-dmd.npy" if has_map else None,
            f"{name}-dmd.png" if has_map else None))))
    return {"instruction": trace.instruction, "caption_target": trace.caption_target,
            "caption_from": trace.caption_from, "edit_type": trace.edit_type, "object_name": trace.object_name,
            "seed": trace.seed, "steps": len(trace.steps), "image_size": list(trace.reference.size),
            "cfg_scale": trace.cfg_scale, "dmd_t": trace.dmd_t,
            # the PNG maps are |x0_critic - x0_teacher| / this, one scale for every step (the .npy files are exact)
            "dmd_png_scale": max(float(m.max()) for m in maps) if maps else None,
            "models": dict(models or {}), "judge_note": trace.judge_note, "dmd_note": trace.dmd_note,
            "timings": trace.timings, "reference": "reference.png", "edited": "edited.png",
            # the judge-guided refinement of the edited image (`refine_trace`), its loss before each step and after
            # the last; None: not refined
            "refinement": None if trace.refinement is None else {
                **trace.refine_settings, "losses": trace.refinement.losses, "refined": REFINED_FILE},
            "steps_table": steps}


def trace_files(trace: EditTrace, models: dict[str, str | None] | None = None) -> dict[str, bytes]:
    """The files of a trace by name: trace.json (`trace_record`), steps.csv (its steps), reference.png, edited.png,
    refined.png when it was refined (`refine_trace`), and per step step-N-x0.png, step-N-dmd.npy ((h, w) float32) and
    step-N-dmd.png (8-bit, at x0's size)."""
    record = trace_record(trace, models)
    table = io.StringIO()
    writer = csv.DictWriter(table, TRACE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(record["steps_table"])
    files = {"trace.json": (json.dumps(record, indent=1) + "\n").encode(), "steps.csv": table.getvalue().encode(),
             "reference.png": png_bytes(trace.reference), "edited.png": png_bytes(trace.image)}
    if trace.refinement is not None:
        files[REFINED_FILE] = png_bytes(trace.refinement.image)
    for s, row in zip(trace.steps, record["steps_table"]):
        files[row["x0"]] = png_bytes(s.x0)
        if s.dmd_map is not None:
            buf = io.BytesIO()
            np.save(buf, s.dmd_map.astype(np.float32))
            files[row["dmd_npy"]] = buf.getvalue()
            grey = np.clip(s.dmd_map / max(record["dmd_png_scale"], 1e-8) * 255, 0, 255).round().astype(np.uint8)
            # nearest: one latent position stays one visible block over the pixels it covers
            files[row["dmd_png"]] = png_bytes(Image.fromarray(grey).resize(s.x0.size, Image.NEAREST))
    return files


def save_trace(trace: EditTrace, dest: str | os.PathLike, models: dict[str, str | None] | None = None) -> Path:
    """Write `trace_files` into the folder `dest`, or into one zip when `dest` ends in .zip; returns `dest`. Each file
    is written whole (`write_atomic`): a Ctrl-C or a full disk midway keeps an earlier zip, or an earlier trace's
    files, rather than a cut one; an earlier trace's step files that this one lacks (it had more steps) and its
    refined.png (this one is not refined) are removed, so that the folder holds one trace."""
    dest = Path(dest)
    files = trace_files(trace, models)
    if dest.suffix.lower() == ".zip":
        dest.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()  # (the files are in memory already: the zip is built there, then written in one go)
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in files.items():
                # PNGs are deflated already: compressing them again took 0.3 s of a 1024-px trace to save ~1%
                z.writestr(name, data, zipfile.ZIP_STORED if name.endswith(".png") else zipfile.ZIP_DEFLATED)
        write_atomic(dest, buf.getvalue())
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        write_atomic(dest / name, data)
    if (dest / "trace.json").is_file():  # (just written: the folder is a trace's, whose step files are ours to clear)
        for old in [*dest.glob("step-*"), dest / REFINED_FILE]:
            if old.name not in files and (STEP_FILE.fullmatch(old.name) or old.name == REFINED_FILE):
                old.unlink(missing_ok=True)
    return dest
