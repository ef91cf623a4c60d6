"""Best-of-N editing: sample several edits with different noise and keep the one the judge rates highest.

A test-time use of the training judge: each candidate gets the questions NP-Edit trains with (edit or
contains check, identity check, optional keep and change checks and free-form questions) and is ranked
by `Verdict.score`, the summed log-probability of the expected answers.
"""

from __future__ import annotations

import math
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
    seeds: list[int] | None = None  # candidate k's seed, when each had its own (its single edit with that seed)

    @property
    def best(self) -> int:
        """The highest score's candidate (the first on a tie; a NaN score never wins unless all are NaN)."""
        scores = [v.score for v in self.verdicts]
        scored = [k for k, s in enumerate(scores) if not math.isnan(s)]
        return max(scored, key=lambda k: (scores[k], -k)) if scored else 0

    @property
    def image(self) -> Image.Image:
        return self.images[self.best]


def best_of(pipe, judge, image, instruction: str, *, candidates: int = 4, steps: int = 4, seed: int | None = None,
            generator: torch.Generator | None = None, max_side: int = 1024, chunk: int = 8,
            **questions) -> Candidates:
    """Edit `image` `candidates` times (pipeline and judge batches of at most `chunk`) and judge every result with
    `edit_questions(instruction, **questions)` (edit_type, object_name, keep, new, gone, extra).

    With `seed`, candidate k has its own noise, seeded `seed + k`: it is the single edit with that seed (up to
    rounding), whatever `candidates` and `chunk` are. Without, one `generator` serves every candidate in turn."""
    if candidates < 1 or chunk < 1:
        raise ValueError(f"candidates and chunk must be >= 1, got {candidates} and {chunk}")
    if seed is not None and generator is not None:
        raise ValueError("give seed (a generator per candidate) or generator (one for all), not both")
    picture = load_image(image)
    seeds = [seed + k for k in range(candidates)] if seed is not None else None
    images = []
    while len(images) < candidates:
        n = min(chunk, candidates - len(images))
        gen = generator if seeds is None else [torch.Generator().manual_seed(s) for s in seeds[len(images):][:n]]
        images += pipe(image=[picture] * n, prompt=instruction, num_inference_steps=steps, generator=gen,
                       max_side=max_side).images
    return Candidates(images, judge_candidates(judge, picture, images, instruction, chunk=chunk, **questions), seeds)
