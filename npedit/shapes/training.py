"""Shapes-world training data for the NP-Edit trainer (`data.train=shapes`) and the text corpus."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..config import DataConfig
from .edits import CATEGORIES, TEMPLATES, EditCase, case_from_edit, edit_between, held_out_keys, sample_case
from .scoring import FORM_GROUPS, form_group, reference_form
from .world import MAX_OBJECTS, caption, random_scene, render

POOL = 50_000  # distinct training cases at data.fraction = 1 (data.pool replaces it)
PARAPHRASE_PROB = 0.3
_STREAM = 7919  # keeps training draws apart from held_out_cases' streams


def render_tensor(scene) -> torch.Tensor:
    """Render a scene as (3, 64, 64) in [-1, 1]."""
    return torch.from_numpy(render(scene)).permute(2, 0, 1).float() / 127.5 - 1.0


class ShapesEditData(Dataset):
    """Deterministic random edit cases: sample i is always the same case; the target is rendered for SFT."""

    def __init__(self, size: int = POOL, *, seed: int = 0, paraphrase_prob: float = PARAPHRASE_PROB,
                 min_objects: int = 0, categories: tuple[str, ...] = (), forms: tuple[str, ...] = (),
                 filter_share: float = 1.0, exclude_held_out: tuple[int, ...] = ()):
        if min_objects > MAX_OBJECTS:
            raise ValueError(f"data.min_objects={min_objects}: a Shapes scene holds at most {MAX_OBJECTS} objects")
        bad = [c for c in categories if c not in CATEGORIES]
        if bad:
            raise ValueError(f"data.categories: unknown {bad}; the Shapes categories are {', '.join(CATEGORIES)}")
        bad = [f for f in forms if f not in FORM_GROUPS]
        if bad:
            raise ValueError(f"data.forms: unknown {bad}; the ways an instruction names its object are "
                             f"{', '.join(FORM_GROUPS)}")
        named = [c for c in (categories or CATEGORIES) if c not in ("add", "background")]
        if forms and not named:
            raise ValueError(f"data.forms={list(forms)} keeps only edits that name an object, and data.categories="
                             f"{list(categories)} has none (add and background name no object)")
        if forms and min_objects > 1 and set(forms) == {"lone"}:
            raise ValueError("data.forms=[lone] (one object in the scene) and data.min_objects > 1 exclude each other")
        self.size, self.seed, self.paraphrase_prob, self.min_objects = size, seed, paraphrase_prob, min_objects
        self.categories, self.forms = tuple(categories) or CATEGORIES, set(forms)
        self.filter_share = filter_share  # the share of cases the category and form filters apply to
        # (reference, expected) of the benchmark cases of these seeds, redrawn when drawn (empty: none, no extra draw)
        self.excluded = held_out_keys(tuple(exclude_held_out)) if exclude_held_out else frozenset()

    def __len__(self) -> int:
        return self.size

    def case(self, i: int):
        rng = np.random.default_rng([_STREAM, self.seed, i])
        filtered = self.categories != CATEGORIES or bool(self.forms)
        if filtered and self.filter_share < 1:  # (no extra draw otherwise: unfiltered data stays as it was)
            filtered = bool(rng.random() < self.filter_share)
        categories = self.categories if filtered else CATEGORIES
        while True:  # the same draws for the same i; cases outside the filters are drawn again
            category = categories[int(rng.integers(len(categories)))] if categories != CATEGORIES else None
            case = sample_case(rng, category, paraphrase_prob=self.paraphrase_prob, id=f"train-{i:06d}")
            if len(case.reference.objects) < self.min_objects:
                continue
            if self.forms and filtered:
                form = reference_form(case)
                if not form or form_group({"form": form, "objects": len(case.reference.objects)}) not in self.forms:
                    continue
            if self.excluded and (case.reference, case.expected) in self.excluded:
                continue
            return case

    def __getitem__(self, i: int) -> dict:
        c = self.case(i)
        return {
            "id": c.id,
            "reference": render_tensor(c.reference),
            "target": render_tensor(c.expected),
            "instruction": c.instruction,
            "caption_reference": c.caption_reference,
            "caption_target": c.caption_target,
            "edit_type": c.edit_type,
            "object_name": c.object_name or "",
            "keep": c.keep,
            "new": c.new,
            "gone": c.gone,
        }


def training_dataset(cfg: DataConfig, *, stage: str, seed: int) -> Dataset:
    """The `data.train=shapes` dataset: `data.pool` distinct cases (default POOL), shrunk by `data.fraction`;
    with `data.min_objects`, only cases whose reference holds at least that many objects; `data.categories` and
    `data.forms` keep only those edit categories and ways of naming the edited object (scoring.FORM_GROUPS), in
    `data.filter_share` of the cases (the rest are drawn from the whole domain); `data.exclude_held_out` redraws
    the held-out benchmark cases of those seeds (edits.held_out_keys).

    Long runs on a GPU see the default pool dozens of times; a larger pool (cases are drawn, not stored) keeps
    every sample new."""
    if cfg.resolution != 64:
        raise ValueError(f"the Shapes world is 64x64; set data.resolution=64 (got {cfg.resolution})")
    return ShapesEditData(max(1, int((cfg.pool or POOL) * cfg.fraction)), seed=seed, min_objects=cfg.min_objects,
                          categories=cfg.categories, forms=cfg.forms, filter_share=cfg.filter_share,
                          exclude_held_out=cfg.exclude_held_out)


def training_cases(n: int, pool: int = POOL, seed: int = 0) -> list[EditCase]:
    """The first n cases (at most `pool`) that a `data.train=shapes` run with `data.pool=pool` and `seed` trains on,
    each instruction in the spec's canonical form as the benchmark words it (training paraphrases 30% of them):
    to compare an editor on cases it was trained on with held-out ones (does it fit, does it generalise?)."""
    if n < 1 or pool < 1:
        raise ValueError(f"training_cases needs n >= 1 and pool >= 1, got n={n}, pool={pool}")
    data = ShapesEditData(pool, seed=seed)
    cases = []
    for i in range(min(n, pool)):
        c = data.case(i)
        cases.append(case_from_edit(c.reference, edit_between(c.reference, c.expected, c.category), 0, id=c.id))
    return cases


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Captions, instructions (every template) and the judge's questions, for training tokenizers."""
    from ..judges.questions import training_questions

    rng = np.random.default_rng([_STREAM, seed, 10**9])
    texts: list[str] = [t for temps in TEMPLATES.values() for t in temps]
    for _ in range(n):
        c = sample_case(rng, paraphrase_prob=0.5)
        texts += [c.caption_reference, c.caption_target, c.instruction]
        texts += [q.text for q in training_questions(c.instruction, c.edit_type, c.object_name or None)]
    texts += [caption(random_scene(rng)) for _ in range(n // 4)]
    texts += ["do nothing", "low quality, artifacts"] + list(CATEGORIES)
    return texts
