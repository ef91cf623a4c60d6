"""Look inside one edit, step by step, and the plain, best-of-N and judge-refined edits the app sets beside it.

The tracing itself (`trace_edit`, its records and `save_trace`, the export the CLI's `edit --trace` writes too) is
`npedit.trace`; it is re-exported here for the app.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from PIL import Image

from npedit.images import load_image
from npedit.trace import (STEP_COLUMNS, EditTrace, StepTrace, cfg_scale_for, dmd_map, refine_trace, save_trace,
                          trace_edit)

__all__ = ["STEP_COLUMNS", "EditTrace", "StepTrace", "cfg_scale_for", "dmd_map", "edit_best_of", "edit_once",
           "edit_refined", "edit_refined_best_of", "refine_trace", "save_trace", "trace_edit"]


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


def edit_refined(pipe, judge, image, instruction: str, refine_steps: int, steps: int = 4, seed: int = 0, *,
                 lr: float, anchor: float, max_side: int = 1024,
                 callback: Callable[[int, torch.Tensor], None] | None = None, **questions):
    """`npedit.refine.refine_edit` seeded as `edit_once` (so its `start` is that plain edit); returns the refinement
    and the time taken. `questions`: edit_type, object_name, keep, ... (see `npedit.verdicts.edit_questions`)."""
    from npedit.refine import refine_edit

    start = time.perf_counter()
    refined = refine_edit(pipe, judge, load_image(image), instruction, steps=steps, refine_steps=refine_steps, lr=lr,
                          anchor=anchor, generator=torch.Generator().manual_seed(int(seed)), max_side=max_side,
                          callback=callback, **questions)
    return refined, time.perf_counter() - start


def edit_refined_best_of(pipe, judge, image, instruction: str, candidates: int, refine_steps: int, steps: int = 4,
                         seed: int = 0, *, lr: float, anchor: float, max_side: int = 1024,
                         callback: Callable[[int, int, torch.Tensor], None] | None = None, **questions):
    """`npedit.refine.refine_candidates`: candidate k seeded `seed + k` (its `edit_refined` with that seed), each
    refined (4 at a time up to 256 px, else one at a time), the lowest final judge loss kept; returns the candidates
    and the time taken. `callback(first, step, losses)` after each measurement of the candidates refined together
    from `first`."""
    from npedit.refine import refine_candidates

    start = time.perf_counter()
    picked = refine_candidates(pipe, judge, load_image(image), instruction, candidates=candidates, seed=int(seed),
                               steps=steps, refine_steps=refine_steps, lr=lr, anchor=anchor, max_side=max_side,
                               callback=callback, **questions)
    return picked, time.perf_counter() - start
