"""Judge-guided refinement: a test-time use of the training judge that moves an edit's latents along its gradient.

The editor's output latents are updated for a few Adam steps to lower NP-Edit's Yes/No loss (the questions NP-Edit
trains with: the edit or contains check, the identity check, optional keep and change checks), differentiated
through the VAE decoder, plus `anchor` x the mean squared distance to the editor's own latents, which keeps the
result near what the editor drew. No pair is used: only the judge's answers, as in training. The judge's gradient
points well once an edit has started (it is weak at a plain copy), so this corrects an edit rather than making one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from PIL import Image

from .images import DEFAULT_MAX_SIDE, load_image, pil_to_tensor, tensor_to_pil

if TYPE_CHECKING:  # (the judges package pulls in transformers: the CLI reads the defaults above without it)
    from .judges import Judge, Question

DEFAULT_REFINE_STEPS = 20
DEFAULT_REFINE_LR = 0.05  # in the scaled latents' units (unit variance): a step moves each value by at most ~lr
DEFAULT_REFINE_ANCHOR = 1.0
MAX_REFINE_STEPS = 500
# `refine_candidates` refines up to 4 candidates in one batch at a working side of this or less (faster for small
# images) and one at a time above it: each holds the judge's and the decoder's activations for its backward pass
REFINE_TOGETHER_MAX_SIDE = 256


def check_refine_settings(steps: int, lr: float, anchor: float) -> None:
    """Refuse settings the refinement cannot run with, in words (before any model loads)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps <= MAX_REFINE_STEPS:
        raise ValueError(f"refinement steps must be a whole number between 0 and {MAX_REFINE_STEPS}, got {steps!r}")
    if not (lr == lr and 0 < lr <= 10):  # (NaN compares unequal)
        raise ValueError(f"the refinement learning rate must be in (0, 10], got {lr!r}")
    if not (anchor == anchor and 0 <= anchor < float("inf")):
        raise ValueError(f"the refinement anchor must be a finite number >= 0, got {anchor!r}")


def pad_questions(rows: Sequence[Sequence[Question]]) -> tuple[list[list[Question]], torch.Tensor]:
    """Question lists of several samples padded to one length (a judge pass needs equal rows) by repeating each
    row's first question, with the (B, Q) mask that leaves the padding out of the loss."""
    if not rows or any(not r for r in rows):
        raise ValueError("every sample needs at least one question")
    width = max(len(r) for r in rows)
    padded = [list(r) + [r[0]] * (width - len(r)) for r in rows]
    mask = torch.tensor([[k < len(r) for k in range(width)] for r in rows])
    return padded, mask


def judge_losses(judge: Judge, reference: torch.Tensor, edited: torch.Tensor, questions: list[list[Question]],
                 mask: torch.Tensor) -> torch.Tensor:
    """(B,) NP-Edit's Yes/No loss per sample (`losses.vlm_sample_losses`, temperature 1); images in [0, 1]."""
    from .losses.vlm import vlm_sample_losses

    out = judge.answer(reference, edited, questions)
    expected = torch.tensor([[q.expected == "Yes" for q in qs] for qs in questions], device=out.logits.device)
    return vlm_sample_losses(out.logits, out.vocab_logprobs, expected, question_mask=mask.to(out.logits.device))[0]


@dataclass
class RefinedLatents:
    """The refined latents and the judge's loss per sample before each update and after the last ((steps + 1, B))."""

    latents: torch.Tensor
    losses: torch.Tensor = field(repr=False)


def refine_latents(backbone, judge: Judge, reference: torch.Tensor, latents: torch.Tensor,
                   questions: Sequence[Sequence[Question]], *, steps: int = DEFAULT_REFINE_STEPS,
                   lr: float = DEFAULT_REFINE_LR, anchor: float = DEFAULT_REFINE_ANCHOR,
                   callback: Callable[[int, torch.Tensor], None] | None = None) -> RefinedLatents:
    """Refine an editor's output `latents` (B, C, h, w) for `steps` Adam steps on the judge's loss of
    `questions[b]` about (reference[b], decode(latents[b])) plus `anchor` x mean((latents - start)^2).

    `reference`: (B or 1, 3, H, W) in [0, 1] at the decoded images' size; `backbone` decodes (its VAE, with
    `decode_latents`). Samples are independent (the loss is a sum of per-sample losses and Adam's steps are per
    value: a batch refines each sample as it would alone, up to float rounding). Neither the judge nor the VAE is
    changed. `callback(step, per-sample losses)` runs after each measurement."""
    check_refine_settings(steps, lr, anchor)
    rows, mask = pad_questions(questions)
    if len(rows) != len(latents):
        raise ValueError(f"{len(latents)} latents but {len(rows)} question lists")
    start = latents.detach().float()
    z = start.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    losses = []
    for step in range(steps + 1):
        last = step == steps  # the last pass only measures the result: no graph
        with torch.set_grad_enabled(not last):
            edited = (backbone.decode_latents(z).float() + 1) / 2
            per_sample = judge_losses(judge, reference, edited, rows, mask)
        losses.append(per_sample.detach().cpu())
        if callback is not None:
            callback(step, losses[-1])
        if last:
            break
        with torch.enable_grad():
            # summed over samples, each with its own anchor term: sample b's gradient is what it would be alone (a
            # batch mean scaled every gradient by 1/B, which Adam's epsilon then damped unevenly)
            loss = per_sample.sum() + anchor * (z - start).pow(2).flatten(1).mean(1).sum()
            (grad,) = torch.autograd.grad(loss, z)  # only the latents: no gradient collects in the judge or the VAE
        z.grad = grad
        opt.step()
    return RefinedLatents(z.detach().to(latents.dtype), torch.stack(losses))


@dataclass
class Refinement:
    """One refined edit: the editor's own result, the refined one, and the judge's loss at every step."""

    image: Image.Image  # refined, at the input's size
    start: Image.Image  # the editor's own edit (what the same call without refinement returns)
    losses: list[float]  # the judge's loss before each update and after the last

    @property
    def improved(self) -> float:
        """How much the judge's loss fell (start minus end; negative: it rose)."""
        return self.losses[0] - self.losses[-1]


def refine_edit(pipe, judge: Judge, image, instruction: str, *, steps: int = 4,
                refine_steps: int = DEFAULT_REFINE_STEPS, lr: float = DEFAULT_REFINE_LR,
                anchor: float = DEFAULT_REFINE_ANCHOR, generator: torch.Generator | None = None,
                max_side: int = DEFAULT_MAX_SIDE, callback: Callable[[int, torch.Tensor], None] | None = None,
                **questions) -> Refinement:
    """Edit `image` with `pipe` (`steps` sampling steps), then refine the result with the judge asked
    `verdicts.edit_questions(instruction, **questions)` (edit_type, object_name, keep, new, gone, extra)."""
    from .verdicts import edit_questions

    check_refine_settings(refine_steps, lr, anchor)
    edit_questions(instruction, **questions)  # refused in words before the edit runs
    picture = load_image(image)
    z = pipe(image=picture, prompt=instruction, num_inference_steps=steps, generator=generator, output_type="latent",
             max_side=max_side).images
    return refine_from_latents(pipe, judge, picture, z, instruction, refine_steps=refine_steps, lr=lr, anchor=anchor,
                               max_side=max_side, callback=callback, **questions)[0]


def refine_from_latents(pipe, judge: Judge, image, latents: torch.Tensor, instruction: str, *,
                        refine_steps: int = DEFAULT_REFINE_STEPS, lr: float = DEFAULT_REFINE_LR,
                        anchor: float = DEFAULT_REFINE_ANCHOR, max_side: int = DEFAULT_MAX_SIDE,
                        callback: Callable[[int, torch.Tensor], None] | None = None,
                        **questions) -> list[Refinement]:
    """Refine edits of `image` that `pipe` has already sampled: `latents` (B, C, h, w), its output with
    `output_type="latent"` at `max_side` (e.g. a traced edit's last x0, or several candidates of one image), each
    refined as if alone with the judge asked `verdicts.edit_questions(instruction, **questions)`. One `Refinement`
    per latent, its `start` the decoded latent (what the pipeline returns for it)."""
    from .verdicts import edit_questions

    check_refine_settings(refine_steps, lr, anchor)
    asked = edit_questions(instruction, **questions)
    picture = load_image(image)
    backbone = pipe.backbone
    work = pipe.working_size(picture.size, max_side)
    device = next(judge.parameters()).device
    reference = ((pil_to_tensor(picture.resize(work, resample=3)) + 1) / 2).unsqueeze(0).to(device)
    refined = refine_latents(backbone, judge, reference, latents, [asked] * len(latents), steps=refine_steps, lr=lr,
                             anchor=anchor, callback=callback)

    def to_images(z: torch.Tensor) -> list[Image.Image]:
        with torch.no_grad():
            ims = [tensor_to_pil(x) for x in backbone.decode_latents(z).clamp(-1, 1)]
        return [im.resize(picture.size, resample=3) if im.size != picture.size else im for im in ims]

    return [Refinement(image, start, [float(v) for v in refined.losses[:, b]])
            for b, (image, start) in enumerate(zip(to_images(refined.latents), to_images(latents)))]


@dataclass
class RefinedCandidates:
    """Several edits of one image, each refined by the judge, and which one ends with the lowest judge loss."""

    refinements: list[Refinement]
    seeds: list[int]  # candidate k's seed: its `refine_edit` with a generator seeded so (up to rounding)

    @property
    def best(self) -> int:
        """The candidate whose refinement ends with the lowest judge loss (the first on a tie; a NaN loss never wins
        unless all are NaN)."""
        final = [r.losses[-1] for r in self.refinements]
        scored = [k for k, v in enumerate(final) if not math.isnan(v)]
        return min(scored, key=lambda k: (final[k], k)) if scored else 0

    @property
    def image(self) -> Image.Image:
        return self.refinements[self.best].image


def refine_candidates(pipe, judge: Judge, image, instruction: str, *, candidates: int = 4, seed: int = 0,
                      steps: int = 4, refine_steps: int = DEFAULT_REFINE_STEPS, lr: float = DEFAULT_REFINE_LR,
                      anchor: float = DEFAULT_REFINE_ANCHOR, max_side: int = DEFAULT_MAX_SIDE,
                      chunk: int | None = None,
                      callback: Callable[[int, int, torch.Tensor], None] | None = None,
                      **questions) -> RefinedCandidates:
    """Best of `candidates` refined edits: candidate k is sampled with a generator seeded `seed + k` (as
    `best_of.best_of`), every candidate is refined (`refine_steps` judge-guided steps, `chunk` at a time: samples
    refine independently, so the chunk changes memory, not results; default 4 at a working side up to
    `REFINE_TOGETHER_MAX_SIDE`, else 1) and the lowest final judge loss is kept.
    `callback(first, step, losses)`: after each measurement of the chunk whose first candidate is `first`."""
    from .verdicts import edit_questions

    if candidates < 1 or (chunk is not None and chunk < 1):
        raise ValueError(f"candidates and chunk must be >= 1, got {candidates} and {chunk}")
    check_refine_settings(refine_steps, lr, anchor)
    edit_questions(instruction, **questions)  # refused in words before any edit runs
    picture = load_image(image)
    if chunk is None:
        chunk = 4 if max(pipe.working_size(picture.size, max_side)) <= REFINE_TOGETHER_MAX_SIDE else 1
    seeds = [seed + k for k in range(candidates)]
    done: list[Refinement] = []
    for first in range(0, candidates, chunk):
        part = seeds[first:first + chunk]
        z = pipe(image=[picture] * len(part), prompt=instruction, num_inference_steps=steps,
                 generator=[torch.Generator().manual_seed(s) for s in part], output_type="latent",
                 max_side=max_side).images
        step_done = None if callback is None else (lambda step, losses, first=first: callback(first, step, losses))
        done += refine_from_latents(pipe, judge, picture, z, instruction, refine_steps=refine_steps, lr=lr,
                                    anchor=anchor, max_side=max_side, callback=step_done, **questions)
    return RefinedCandidates(done, seeds)
