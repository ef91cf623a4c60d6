"""Look inside one edit, step by step: x0 of each sampling step, the judge's verdict on it, and its DMD map.

`trace_edit` runs the pipeline itself (so the one sampler of npedit.sampler) and records each
step through `callback_on_step_end`; the judge, teacher and critic then look at what it recorded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from PIL import Image

from npedit import flow
from npedit.config import LossConfig
from npedit.guidance import teacher_critic_x0
from npedit.images import load_image, tensor_to_pil
from npedit.verdicts import judge_candidates

from .judging import SHOWN_DECIMALS

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
    steps: list[StepTrace] = field(default_factory=list)
    judge_note: str | None = None  # why there are no P(Yes) values
    dmd_note: str | None = None  # why there are no DMD maps
    timings: dict = field(default_factory=dict)

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


def cfg_scale_for(loss: LossConfig, edit_type: str) -> float:
    """The teacher's CFG scale in training for this edit type (strong for the types the config lists)."""
    return loss.cfg_scale_strong if edit_type in loss.strong_cfg_edit_types else loss.cfg_scale


@torch.no_grad()
def dmd_map(x0_real: torch.Tensor, x0_fake: torch.Tensor) -> np.ndarray:
    """Per-position disagreement |x0_fake - x0_real| averaged over channels: (B, C, h, w) -> (h, w) of sample 0."""
    return (x0_fake - x0_real).abs().float().mean(1)[0].cpu().numpy()


@torch.no_grad()
def edit_once(pipe, image, instruction: str, steps: int = 4, seed: int = 0,
              max_side: int = 1024) -> tuple[Image.Image, float]:
    """A plain edit (no per-step records) with the same seeding as `trace_edit`; returns the image and its time."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(int(seed))
    out = pipe(image=load_image(image), prompt=instruction, num_inference_steps=steps, generator=generator,
               max_side=max_side).images[0]
    return out, time.perf_counter() - start


def edit_best_of(pipe, judge, image, instruction: str, candidates: int, steps: int = 4, seed: int = 0,
                 max_side: int = 1024, **questions):
    """`npedit.best_of` with candidate k seeded `seed + k` (each is `edit_once` with its own seed); returns the
    candidates and the time taken. `questions`: edit_type, object_name, keep, ... (see
    `npedit.verdicts.edit_questions`)."""
    from npedit.best_of import best_of

    start = time.perf_counter()
    picked = best_of(pipe, judge, load_image(image), instruction, candidates=candidates, steps=steps,
                     seed=int(seed), max_side=max_side, **questions)
    return picked, time.perf_counter() - start


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
    if judge is None:
        judge_note = judge_note or "no judge loaded"
    trace = EditTrace(reference, edited, instruction, caption, caption_from, int(seed), scale,
                      dmd_t=None if teacher is None or critic is None else dmd_t,
                      judge_note=judge_note if judge is None else None,
                      dmd_note=dmd_note if teacher is None or critic is None else None)
    x0_imgs = [tensor_to_pil(bb.decode_latents(r["x0"]).clamp(-1, 1)[0]) for r in records]
    verdicts, judge_s = [None] * len(records), 0.0
    if judge is not None:  # every step's x0 in one judge pass (chunks of 8): a real VLM answers a batch at once
        report(0.5, f"asking the judge about the {len(records)} steps")
        t0 = time.perf_counter()
        verdicts = judge_candidates(judge, reference, x0_imgs, instruction, edit_type=edit_type,
                                    object_name=object_name)
        judge_s = (time.perf_counter() - t0) / len(records)  # each step's share of the pass
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
