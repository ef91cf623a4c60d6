"""Best-of-N editing: sample several edits with different noise and keep the one the judge rates highest.

A test-time use of the training judge: each candidate gets the questions NP-Edit trains with (edit or
contains check, identity check, optional keep and change checks and free-form questions) and is ranked
by `Verdict.score`, the summed log-probability of the expected answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .images import load_image
from .verdicts import Verdict, judge_candidates


@dataclass
class Candidates:
    """The sampled edits, the judge's verdict on each, and which one it ranks first."""

    images: list[Image.Image]
    verdicts: list[Verdict]

    @property
    def best(self) -> int:
        scores = [v.score for v in self.verdicts]
        return scores.index(max(scores))

    @property
    def image(self) -> Image.Image:
        return self.images[self.best]


def best_of(pipe, judge, image, instruction: str, *, candidates: int = 4, steps: int = 4,
            generator: torch.Generator | None = None, max_side: int = 1024, chunk: int = 8,
            **questions) -> Candidates:
    """Edit `image` `candidates` times (pipeline and judge batches of at most `chunk`, noise drawn from
    `generator`) and judge every result with `edit_questions(instruction, **questions)` (edit_type,
    object_name, keep, new, gone, extra)."""
    if candidates < 1 or chunk < 1:
        raise ValueError(f"candidates and chunk must be >= 1, got {candidates} and {chunk}")
    picture = load_image(image)
    images = []
    while len(images) < candidates:
        n = min(chunk, candidates - len(images))
        images += pipe(image=[picture] * n, prompt=instruction, num_inference_steps=steps, generator=generator,
                       max_side=max_side).images
    return Candidates(images, judge_candidates(judge, picture, images, instruction, chunk=chunk, **questions))
