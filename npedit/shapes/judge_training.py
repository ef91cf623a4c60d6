"""Training the Shapes-world judge: a small LLaVA-OneVision that answers the NP-Edit questions.

The judge is asked exactly the questions the NP-Edit trainer asks (`npedit.judges.training_questions`),
through the same adapter (`LlavaOnevisionJudge.answer`), and its truth comes from the grammar:
- edit check: Yes iff `scoring.followed(candidate, edit)` (so identical images are No);
- contains check (removals, candidate only): Yes iff an object of that colour and shape is present;
- identity check (also the removal one): Yes iff `scoring.preserved(candidate, reference, edit)`.

Architecture choice: 64 x 64 views cut into 21 x 21 patches give a 3 x 3 grid of vision tokens
whose patches hold exactly one grid cell each (every object spans centre +- 9, i.e. pixels
2..20, 23..41, 44..62; the last row and column, always background, fall off the strided conv).
Nine tokens per image keep the language model's sequences short, which is what makes CPU
training fast enough.

Recipe (staged, dense supervision first; every head and probe is temporary and discarded):
1. vision: the vision tower and projector learn, from linear heads on the projected features (the
   tokens the language model reads), per-cell colour / shape / size, the background, which cell
   each token is, and every cell's object from the mean token (see `DenseHead` for why).
2. checks: the Yes/No checks, 2-way cross-entropy on the [No, Yes] logits of `judge.answer`
   (exactly what NP-Edit reads), with dense auxiliaries kept on: the vision head on both images,
   and linear probes on the language model (`Probes`): edited-image cell tokens (reference object,
   changed?), every text position (which cells changed, the candidate's objects) and the last
   positions (target cell, category, named values, the true answer).

Candidates and their labels (balanced 1:1:1:1 over (edit done?, rest preserved?) per category):
true edit (Yes, Yes); identical or wrong value at the right cell (No, Yes); the edit plus an
extra change or a changed unnamed attribute (Yes, No); wrong object, wrong category, moved
object, or a wrong edit plus an extra change (No, No). For removals "edit done" means the
contains check answers No.

Editors' own outputs (`hard_editors=`): optionally, each named editor edits training cases before
stage 2, and a share (`hard_prob`) of the stage-2 pairs are those outputs as they are (blurry,
half-edited), labelled from what `world.parse` reads in them; outputs that do not parse are dropped.

Degradations (the student's decoded outputs are imperfect): the candidate may be blurred
(Gaussian sigma 0.3-1.0 px), colour-jittered (gain 0.92-1.08, offset +-0.04 per channel) and
noised (sigma up to 0.08); such a candidate keeps its label only when `world.parse` still reads
the candidate scene from it, otherwise the clean render is used. So labels always follow the
benchmark's own reading of the image.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from npedit import config as config_lib
from npedit.devices import resolve_device
from npedit.files import write_atomic
from npedit.judges import Question, kept_question, training_questions
from npedit.judges.llava_onevision import LlavaOnevisionJudge
from npedit.judges.tiny import build_tiny_llava_onevision
from npedit.shapes.edits import (
    CATEGORIES,
    MUST_CHANGE,
    OBJ_ATTRS,
    Edit,
    EditCase,
    apply_edit,
    edit_between,
    edit_problem,
    held_out_cases,
    held_out_keys,
    named_attributes,
    sample_case,
    sample_edit,
)
from npedit.shapes.scoring import FORM_GROUPS, followed, form_group, preserved, reference_form
from npedit.shapes.world import BACKGROUNDS, CELLS, COLOURS, SHAPES, SIZES, Scene, parse, pick, render
from npedit.training.checkpoint import disk_writes, publishing
from npedit.training.logging import MetricsLogger

# ---- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchConfig:
    """Sizes of the judge built from scratch (SigLIP tower + Qwen2 language model)."""

    image_size: int = 64
    patch_size: int = 21  # 3 x 3 tokens, one per grid cell
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    vision_width: int = 128
    vision_layers: int = 3
    vision_heads: int = 4
    vocab_size: int = 1024
    corpus_cases: int = 3000  # random cases whose questions train the tokenizer

    def __post_init__(self):
        if self.image_size // self.patch_size < 1:
            raise ValueError(f"arch.patch_size {self.patch_size} is larger than arch.image_size {self.image_size}")
        if self.hidden_size % self.num_heads or self.vision_width % self.vision_heads:
            raise ValueError("arch.hidden_size / vision_width must be divisible by num_heads / vision_heads")


@dataclass(frozen=True)
class JudgeTrainConfig:
    """One judge-training run: the two stages, the data mix and the bookkeeping."""

    preset: str = "default"
    output_dir: str = ""  # "" = runs/shapes/judge-<preset>-<time>
    seed: int = 0
    threads: int = 1  # torch CPU threads (0: leave as is, as the other stages read it)
    device: str = "cpu"  # "auto" = CUDA when available
    arch: ArchConfig = field(default_factory=ArchConfig)
    # start from this judge folder instead of building a new model (skips nothing else)
    init: str = field(default="", metadata=config_lib.BUNDLE_PATH)
    # stage 1: vision tower on the dense per-cell head
    vision_steps: int = 800
    vision_batch: int = 64
    vision_lr: float = 2e-3
    # stage 2: Yes/No checks with the dense auxiliaries
    check_steps: int = 2500
    batch_size: int = 32  # (reference, candidate) pairs per step, two questions each
    lr: float = 1.5e-3
    min_lr_ratio: float = 0.05  # cosine decay to lr * this
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    dense_weight: float = 0.2  # vision head on both images during stage 2
    probe_weight: float = 0.3  # language-model probes during stage 2
    probe_layer: int = -1  # decoder layer whose output the probes read; -1 = num_layers // 2 - 1
    paraphrase_prob: float = 0.5
    degrade_prob: float = 0.4
    # Hard examples from editors' own outputs (blurry, half-edited): each editor folder edits `hard_cases`
    # training cases before stage 2; outputs that parse are labelled from the parse, and each stage-2
    # pair is drawn from that pool with probability `hard_prob`.
    hard_editors: tuple[str, ...] = ()
    hard_cases: int = 2000
    hard_prob: float = 0.25
    # Ramp supervision: each stage-2 step also scores `ramp_batch` pairs whose candidate is the pixel blend
    # reference + a * (true result - reference), a ~ U(0, 1), with soft targets P(Yes) = a for the edit check
    # (1 - a for a removal's contains check) and 1 for the identity check (nothing else differs); loss weight
    # `ramp_weight`. It shapes the judge's logit along the path from a copy to the edit, so that its gradient
    # at a copier's output points toward the edit (see scripts/judge_gradient_alignment.py).
    ramp_batch: int = 0
    ramp_weight: float = 1.0
    # Gradient alignment: each stage-2 step also takes `align_batch` pairs at reference + a * (true result -
    # reference), a ~ U(0, align_max), and penalises 1 - cosine between the descent direction of the NP-Edit
    # training loss (edit check + identity check, expected answers of the true result) with respect to the
    # candidate's pixels and (true result - candidate), weight `align_weight` (double backpropagation). This
    # is what a copier's student receives from the judge; the student still never sees a pair.
    align_batch: int = 0
    align_weight: float = 0.5
    align_max: float = 0.5
    max_minutes: float = 40.0  # stop stage 2 early after this much wall-clock (0 = no limit)
    # bookkeeping
    log_every: int = 25
    eval_every: int = 250
    eval_cases: int = 120  # held-out cases; 4 candidates and 8 questions each
    eval_seed: int = 1000
    # Benchmark seeds whose held-out cases (edits.held_out_keys: reference and expected result, any wording) the
    # training cases are redrawn away from, e.g. [1000, 2000, 2024, 3000]. Empty (the default, and the bundled
    # judge's runs): no exclusion, the draws of earlier runs exactly.
    exclude_held_out: tuple[int, ...] = ()
    save_every: int = 0  # extra checkpoints under checkpoints/ (0 = only the best and the last)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {', '.join(PRESETS)}")
        if self.vision_steps < 0 or self.check_steps < 0 or self.batch_size < 1 or self.vision_batch < 1:
            raise ValueError("vision_steps and check_steps must be >= 0, batch sizes >= 1")
        if not 0 <= self.paraphrase_prob <= 1 or not 0 <= self.degrade_prob <= 1:
            raise ValueError("paraphrase_prob and degrade_prob must be in [0, 1]")
        if not 0 <= self.hard_prob <= 1 or self.hard_cases < 0:
            raise ValueError("hard_prob must be in [0, 1] and hard_cases >= 0")
        if self.ramp_batch < 0 or self.ramp_weight < 0:
            raise ValueError("ramp_batch and ramp_weight must be >= 0")
        if self.align_batch < 0 or self.align_weight < 0 or not 0 <= self.align_max <= 1:
            raise ValueError("align_batch and align_weight must be >= 0, align_max in [0, 1]")
        if any(s < 0 for s in self.exclude_held_out):
            raise ValueError(f"exclude_held_out lists benchmark seeds (>= 0); got {list(self.exclude_held_out)}")
        if self.probe_layer >= self.arch.num_layers:
            raise ValueError(f"probe_layer must be < arch.num_layers ({self.arch.num_layers})")
        if self.threads < 0 or min(self.log_every, self.eval_every, self.eval_cases) < 1:
            raise ValueError(f"threads must be >= 0 (0: leave as is) and log_every, eval_every and eval_cases >= 1, "
                             f"got {self.threads}, {self.log_every}, {self.eval_every} and {self.eval_cases}")
        for key in ("seed", "eval_seed"):  # numpy's range: a negative seed failed inside the run (eval_seed at its end)
            if not 0 <= getattr(self, key) < 2**32:
                raise ValueError(f"{key} must be between 0 and 2**32 - 1, got {getattr(self, key)}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0 (0: the best and the last only), got {self.save_every}")
        if self.device != "auto":
            resolve_device(self.device)  # an unknown device is said now, before the run folder is made


# Named presets: overrides applied on top of the dataclass defaults, before the user's.
PRESETS: dict[str, dict] = {
    "default": {},
    "quick": {
        "arch": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "vision_width": 32, "vision_layers": 1,
                 "vision_heads": 2, "vocab_size": 600, "corpus_cases": 200},
        "vision_steps": 3, "vision_batch": 8, "check_steps": 4, "batch_size": 4, "warmup_steps": 1,
        "log_every": 2, "eval_every": 2, "eval_cases": 6, "save_every": 2,
    },
}


def build_config(overrides: Sequence[str] = ()) -> JudgeTrainConfig:
    """The config of `preset=<name>` (default "default") with the dotted `key=value` overrides applied."""
    preset, rest = config_lib.pick_preset(overrides)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(PRESETS)}")
    data = config_lib.apply_overrides({"preset": preset, **PRESETS[preset]}, rest)
    return config_lib.build_config(JudgeTrainConfig, data)


# ---- truth from the grammar ------------------------------------------------------------------


def true_answers(case: EditCase, candidate: Scene) -> tuple[bool, bool]:
    """Truth of (edit check or, for removals, contains check; identity check) for `candidate`."""
    edit = edit_between(case.reference, case.expected, case.category)
    if case.category == "remove":
        check = any(o.name == case.object_name for o in candidate.objects)
    else:
        check = followed(candidate, edit)
    return check, preserved(candidate, case.reference, edit)


def edit_done(case: EditCase, check: bool) -> bool:
    """Whether the requested change is present, from the first check's truth (removals: not contained)."""
    return not check if case.category == "remove" else check


@dataclass(frozen=True)
class JudgeSample:
    """A case, one candidate result and the true answers to its two questions."""

    case: EditCase
    candidate: Scene
    kind: str  # how the candidate was made (see CANDIDATE_MAKERS; "editor" = an editor's output)
    answers: tuple[bool, bool]  # truth of (edit / contains check, identity check)
    # The candidate's pixels when they are not render(candidate): an editor's output, which parses as `candidate`.
    image: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def questions(self) -> list[Question]:
        """The two questions NP-Edit asks about this case, in training order."""
        return training_questions(self.case.instruction, self.case.edit_type, self.case.object_name)


# ---- candidate results -----------------------------------------------------------------------
# Each maker turns (rng, case, edit) into a candidate scene, or None when it does not apply.


def _random_edit(rng: np.random.Generator, scene: Scene, categories: Sequence[str],
                 accept: Callable[[Edit], bool], tries: int = 40) -> Edit | None:
    """A random feasible edit of one of `categories` on `scene` that `accept` takes, or None."""
    for _ in range(tries):
        edit = sample_edit(scene, pick(rng, categories), rng)
        if edit is not None and accept(edit):
            return edit
    return None


def _apply(scene: Scene, edit: Edit | None) -> Scene | None:
    return None if edit is None else apply_edit(scene, edit)


def _wrong_value(rng, case, edit):
    """Same category at the same cell, other values (e.g. recolor to the wrong colour)."""
    return _apply(case.reference, _random_edit(rng, case.reference, [edit.category],
                                               lambda e: e.cell == edit.cell and e != edit))


def _wrong_object(rng, case, edit):
    """The same kind of change at another cell (with the instruction's values when possible)."""
    if edit.category == "background":
        return None
    scene = case.reference
    if rng.random() < 0.5:
        cells = [c for c in CELLS if c != edit.cell]
        rng.shuffle(cells)
        for cell in cells:
            moved = replace(edit, cell=cell)
            if edit_problem(scene, moved) is None:
                return apply_edit(scene, moved)
    return _apply(scene, _random_edit(rng, scene, [edit.category], lambda e: e.cell != edit.cell))


def _wrong_category(rng, case, edit):
    """An edit of another category, at the target cell when that is possible."""
    scene = case.reference
    at_target = edit.cell is not None and scene.at(edit.cell) is not None
    others = [c for c in CATEGORIES if c != edit.category]
    return _apply(scene, _random_edit(rng, scene, others, lambda e: not at_target or e.cell == edit.cell))


def _plus_extra(rng, scene: Scene | None, edit: Edit) -> Scene | None:
    """`scene` with one more change somewhere the instruction does not name."""
    if scene is None:
        return None
    return _apply(scene, _random_edit(rng, scene, CATEGORIES,
                                      lambda e: e.cell != edit.cell and not (e.cell is None and edit.cell is None)))


def _extra(rng, case, edit):
    """The right edit plus an extra change (another object altered, added or removed, or the background)."""
    return _plus_extra(rng, case.expected, edit)


def _unnamed(rng, case, edit):
    """The right edit, but an attribute the instruction does not name changed too (e.g. recolor also resized)."""
    if edit.category not in MUST_CHANGE:
        return None
    target = case.expected.at(edit.cell)
    attr = pick(rng, [a for a in OBJ_ATTRS if a not in named_attributes(edit.category)])
    allowed = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES)}[attr]
    changed = replace(target, **{attr: pick(rng, [v for v in allowed if v != getattr(target, attr)])})
    return Scene(case.expected.background, tuple(o for o in case.expected.objects if o.cell != edit.cell) + (changed,))


def _moved(rng, case, edit):
    """The (edited) object ends up in another, empty cell."""
    scene = case.expected if edit.category != "remove" else case.reference
    obj = scene.at(edit.cell) if edit.cell is not None else None
    if obj is None or not scene.empty_cells:
        return None
    cell = pick(rng, [c for c in scene.empty_cells if c != edit.cell])
    return Scene(scene.background, tuple(o for o in scene.objects if o.cell != edit.cell) + (replace(obj, cell=cell),))


def _compound(rng, case, edit):
    """A wrong edit (value or object) plus an extra change."""
    wrong = _wrong_value(rng, case, edit) if rng.random() < 0.5 else _wrong_object(rng, case, edit)
    return _plus_extra(rng, wrong, edit)


CANDIDATE_MAKERS: dict[str, Callable] = {
    "true": lambda rng, case, edit: case.expected,
    "identical": lambda rng, case, edit: case.reference,
    "wrong_value": _wrong_value,
    "wrong_object": _wrong_object,
    "wrong_category": _wrong_category,
    "extra": _extra,
    "unnamed": _unnamed,
    "moved": _moved,
    "compound": _compound,
}
# (edit done?, rest preserved?) -> makers likely to produce it, with weights.
COMBOS: dict[tuple[bool, bool], dict[str, float]] = {
    (True, True): {"true": 1.0},
    (False, True): {"identical": 0.5, "wrong_value": 0.5},
    (True, False): {"extra": 0.6, "unnamed": 0.4},
    (False, False): {"wrong_object": 0.3, "wrong_category": 0.3, "moved": 0.2, "compound": 0.2},
}


def make_candidate(rng: np.random.Generator, case: EditCase, combo: tuple[bool, bool], tries: int = 50) -> JudgeSample:
    """A candidate for `case` whose true (edit done, preserved) is `combo` (any candidate if none is found)."""
    edit = edit_between(case.reference, case.expected, case.category)
    makers = COMBOS[combo]
    names, weights = list(makers), np.array(list(makers.values()))
    sample = None
    for _ in range(tries):
        kind = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        candidate = CANDIDATE_MAKERS[kind](rng, case, edit)
        if candidate is None:
            continue
        answers = true_answers(case, candidate)
        sample = JudgeSample(case, candidate, kind, answers)
        if (edit_done(case, answers[0]), answers[1]) == combo:
            return sample
    if sample is None:  # nothing applied: fall back to the true edit
        return JudgeSample(case, case.expected, "true", true_answers(case, case.expected))
    return sample


def training_case(rng: np.random.Generator, paraphrase_prob: float = 0.5,
                  excluded: frozenset = frozenset()) -> EditCase:
    """A random training case, drawn again while its (reference, expected) is in `excluded` (no extra draw if empty)."""
    while True:
        case = sample_case(rng, paraphrase_prob=paraphrase_prob)
        if not excluded or (case.reference, case.expected) not in excluded:
            return case


def sample_training(rng: np.random.Generator, paraphrase_prob: float = 0.5,
                    excluded: frozenset = frozenset()) -> JudgeSample:
    """One training sample: uniform category, uniform (edit done, preserved) combination; its case is not in
    `excluded` (`held_out_keys`)."""
    case = training_case(rng, paraphrase_prob, excluded)
    combos = list(COMBOS)
    return make_candidate(rng, case, combos[int(rng.integers(len(combos)))])


def evaluation_samples(n: int, seed: int = 1000) -> list[JudgeSample]:
    """Held-out benchmark for the judge: `n` canonical cases (`held_out_cases`), one candidate per combination."""
    samples = []
    for i, case in enumerate(held_out_cases(n, seed)):
        rng = np.random.default_rng([seed, 7, i])
        samples += [make_candidate(rng, case, combo) for combo in COMBOS]
    return samples


# ---- images ----------------------------------------------------------------------------------


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(64, 64, 3) uint8 -> (3, 64, 64) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(3, H, W) blurred with a separable Gaussian (reflect padding)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, -1)
    y = F.pad(x[:, None], (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y.flatten(0, 1)[:, None], k.view(1, 1, 1, -1)).view(3, 1, x.shape[1], x.shape[2])
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(y, k.view(1, 1, -1, 1)).view_as(x)


def degrade(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Blur, colour jitter and/or Gaussian noise on a (3, H, W) image in [0, 1] (each drawn independently)."""
    x = image
    if rng.random() < 0.5:
        x = _gaussian_blur(x, float(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.5:
        gain = torch.from_numpy(rng.uniform(0.92, 1.08, 3)).float().view(3, 1, 1)
        offset = torch.from_numpy(rng.uniform(-0.04, 0.04, 3)).float().view(3, 1, 1)
        x = x * gain + offset
    if rng.random() < 0.6 or x is image:
        x = x + float(rng.uniform(0.01, 0.08)) * torch.from_numpy(rng.standard_normal(x.shape)).float()
    return x.clamp(0, 1)


def candidate_image(scene: Scene, rng: np.random.Generator, degrade_prob: float) -> tuple[torch.Tensor, bool]:
    """The candidate's render, degraded with probability `degrade_prob` when the parse still reads `scene`."""
    clean = to_tensor(render(scene))
    if rng.random() >= degrade_prob:
        return clean, False
    noisy = degrade(clean, rng)
    if parse((noisy * 255).round().byte().permute(1, 2, 0).numpy()) == scene:
        return noisy, True
    return clean, False


def sample_image(sample: JudgeSample, rng: np.random.Generator, degrade_prob: float) -> torch.Tensor:
    """The candidate pixels of `sample`: its stored editor output, else its (maybe degraded) render."""
    if sample.image is not None:
        return to_tensor(sample.image)
    return candidate_image(sample.candidate, rng, degrade_prob)[0]


@torch.no_grad()
def editor_samples(editor_dir: str, n: int, seed: int, paraphrase_prob: float = 0.5, device: str = "cpu",
                   batch_size: int = 64, steps: int = 4,
                   excluded: frozenset = frozenset()) -> tuple[list[JudgeSample], dict]:
    """`n` training cases edited by the NPEditPipeline in `editor_dir`; the outputs that parse, labelled from the parse.

    Returns the samples and counts {"cases", "parsed", "edit_yes", "identity_yes"}."""
    from npedit.pipeline import NPEditPipeline
    from PIL import Image

    pipe = NPEditPipeline.from_pretrained(editor_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng([seed, 11])
    cases = [training_case(rng, paraphrase_prob, excluded) for _ in range(n)]
    samples = []
    for start in tqdm(range(0, n, batch_size), desc=f"editor pool {Path(editor_dir).name}", mininterval=10):
        chunk = cases[start : start + batch_size]
        gen = torch.Generator().manual_seed(seed * 100003 + start)
        outs = pipe(image=[Image.fromarray(render(c.reference)) for c in chunk], prompt=[c.instruction for c in chunk],
                    num_inference_steps=steps, generator=gen, output_type="pil").images
        for case, out in zip(chunk, outs):
            image = np.array(out.convert("RGB"))
            scene = parse(image) if image.shape == (64, 64, 3) else None
            if scene is not None:
                samples.append(JudgeSample(case, scene, "editor", true_answers(case, scene), image=image))
    counts = {"cases": n, "parsed": len(samples), "edit_yes": sum(s.answers[0] for s in samples),
              "identity_yes": sum(s.answers[1] for s in samples)}
    return samples, counts


def path_pairs(rng: np.random.Generator, n: int, paraphrase_prob: float = 0.5, high: float = 1.0,
               excluded: frozenset = frozenset()):
    """`n` training cases with candidates on the straight pixel path from the reference to the true result.

    Returns (questions: n rows of the trainer's two, references (n, 3, 64, 64), candidates, true results,
    a (n,)): each candidate is reference + a * (true result - reference) with a ~ U(0, `high`)."""
    cases = [training_case(rng, paraphrase_prob, excluded) for _ in range(n)]
    questions = [training_questions(c.instruction, c.edit_type, c.object_name, kept=c.keep) for c in cases]
    ref = torch.stack([to_tensor(render(c.reference)) for c in cases])
    true = torch.stack([to_tensor(render(c.expected)) for c in cases])
    a = torch.from_numpy(rng.uniform(0.0, high, n)).float()
    return questions, ref, ref + a.view(-1, 1, 1, 1) * (true - ref), true, a


def ramp_targets(questions, a: torch.Tensor) -> torch.Tensor:
    """(n, 2, 2) soft targets over [No, Yes] for candidates a of the way to the true result: a question whose
    answer on the true result is Yes (the edit check) gets P(Yes) = a, one expecting No (a removal's "does it
    contain <object>?") 1 - a, and the identity check P(Yes) = 1 (nothing else differs)."""
    check = torch.stack([w if row[0].expected == "Yes" else 1 - w for row, w in zip(questions, a)])
    yes = torch.stack([check, torch.ones(len(questions))], 1)  # (n, 2)
    return torch.stack([1 - yes, yes], -1)


# ---- dense targets and heads -----------------------------------------------------------------

N_COLOUR, N_SHAPE, N_SIZE, N_BG = len(COLOURS) + 1, len(SHAPES) + 1, len(SIZES) + 1, len(BACKGROUNDS)


def cell_targets(scene: Scene) -> torch.Tensor:
    """(9, 3) per-cell (colour, shape, size) class ids in reading order; 0 = empty cell."""
    rows = []
    for cell in CELLS:
        o = scene.at(cell)
        rows.append([0, 0, 0] if o is None else [
            1 + list(COLOURS).index(o.colour), 1 + SHAPES.index(o.shape), 1 + list(SIZES).index(o.size)])
    return torch.tensor(rows)


def _cell_ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean CE of (..., 7 + 4 + 3) per-cell logits against (..., 3) colour/shape/size targets."""
    parts = logits.split([N_COLOUR, N_SHAPE, N_SIZE], dim=-1)
    return sum(F.cross_entropy(p.reshape(-1, p.shape[-1]), targets[..., i].reshape(-1)) for i, p in enumerate(parts)) / 3


def _unit_rms(x: torch.Tensor) -> torch.Tensor:
    """x scaled to unit root-mean-square over the last axis."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-8)


class DenseHead(nn.Module):
    """Temporary head on the 3 x 3 projected vision tokens: per-cell colour/shape/size, the background, and
    which cell each token is, and every cell's object from the MEAN token. The last one makes the
    features conjunctive (each cell writes its object into its own directions), so a uniform
    attention over an image's tokens hands the language model the whole scene, bound to cells;
    with separate cell and attribute directions, sums lose which object sits where (measured:
    the answer position's per-cell readout then stayed at chance)."""

    def __init__(self, dim: int):
        super().__init__()
        self.cells = nn.Linear(dim, N_COLOUR + N_SHAPE + N_SIZE)
        self.background = nn.Linear(dim, N_BG)
        self.where = nn.Linear(dim, len(CELLS))  # which cell the token is: the language model needs it to localise
        self.pooled = nn.Linear(dim, len(CELLS) * (N_COLOUR + N_SHAPE + N_SIZE))  # the whole scene from the mean token

    def loss(self, feats: torch.Tensor, scenes: Sequence[Scene]) -> tuple[torch.Tensor, dict]:
        """CE on (N, 9, D) features; metrics: scene-exact accuracy of the head's reading."""
        feats = _unit_rms(feats)  # the head reads directions, so it does not inflate the features' scale
        targets = torch.stack([cell_targets(s) for s in scenes]).to(feats.device)  # (N, 9, 3)
        bg = torch.tensor([list(BACKGROUNDS).index(s.background) for s in scenes], device=feats.device)
        cell_logits = self.cells(feats)  # (N, 9, 14)
        bg_logits = self.background(feats.mean(1))  # (N, 5)
        where_logits = self.where(feats)  # (N, 9, 9)
        where = torch.arange(len(CELLS), device=feats.device).expand(len(scenes), -1)
        loss = _cell_ce(cell_logits, targets) + F.cross_entropy(bg_logits, bg)
        loss = loss + F.cross_entropy(where_logits.reshape(-1, len(CELLS)), where.reshape(-1))
        pooled_logits = self.pooled(feats.mean(1)).view(len(scenes), len(CELLS), -1)  # (N, 9, 14)
        loss = loss + _cell_ce(pooled_logits, targets)
        with torch.no_grad():
            pred = torch.stack([p.argmax(-1) for p in cell_logits.split([N_COLOUR, N_SHAPE, N_SIZE], -1)], -1)
            exact = (pred == targets).all(-1).all(-1) & (bg_logits.argmax(-1) == bg)
            where_acc = (where_logits.argmax(-1) == where).float().mean()
            pooled = torch.stack([p.argmax(-1) for p in pooled_logits.split([N_COLOUR, N_SHAPE, N_SIZE], -1)], -1)
            pooled_exact = (pooled == targets).all(-1).all(-1).float().mean()
        return loss, {"scene_exact": exact.float().mean(), "where_acc": where_acc, "pooled_exact": pooled_exact}


def _one_hot_name(value: str | None, names: Sequence[str]) -> int:
    """1 + index of `value` in `names`, or 0 when it is None."""
    return 0 if value is None else 1 + list(names).index(value)


def answer_targets(sample: "JudgeSample") -> tuple[torch.Tensor, torch.Tensor]:
    """Class ids the answer position is probed for, the facts its Yes/No rests on: (two-image row, contains row).

    Two-image questions: per cell whether it changed, whether the background changed, the
    instruction's category and target cell (9 = background), the candidate's object at the target
    cell, and the values the edit names (0 = not named). The one-image contains question: per
    cell whether it holds the named object; the rest are -100 (ignored).
    """
    case, cand = sample.case, sample.candidate
    edit = edit_between(case.reference, case.expected, case.category)
    changed = [int(cand.at(c) != case.reference.at(c)) for c in CELLS]
    target = cand.at(edit.cell) if edit.cell is not None else None
    got = [0, 0, 0] if target is None else [
        _one_hot_name(target.colour, tuple(COLOURS)), _one_hot_name(target.shape, SHAPES),
        _one_hot_name(target.size, tuple(SIZES))]
    named = [_one_hot_name(edit.colour, tuple(COLOURS)), _one_hot_name(edit.shape, SHAPES),
             _one_hot_name(edit.size, tuple(SIZES)), _one_hot_name(edit.background, tuple(BACKGROUNDS))]
    pair = changed + [int(cand.background != case.reference.background), CATEGORIES.index(case.category),
                      len(CELLS) if edit.cell is None else CELLS.index(edit.cell)] + got + named
    holds = [int(cand.at(c) is not None and cand.at(c).name == case.object_name) for c in CELLS]
    return torch.tensor(pair), torch.tensor(holds + [-100] * (len(pair) - len(CELLS)))


# Class counts of the answer-position targets, in answer_targets' order.
ANSWER_CLASSES = [2] * len(CELLS) + [2, len(CATEGORIES), len(CELLS) + 1, N_COLOUR, N_SHAPE, N_SIZE,
                                      N_COLOUR, N_SHAPE, N_SIZE, N_BG + 1]
SUFFIX = 16  # the answer probes read this many last positions (all after the instruction / object name)
ANSWER_TARGETS = len(ANSWER_CLASSES)


# Per-cell changed flags, background changed, then the candidate's colour, shape and size per cell.
SCENE_CLASSES = [2] * len(CELLS) + [2] + [N_COLOUR] * len(CELLS) + [N_SHAPE] * len(CELLS) + [N_SIZE] * len(CELLS)


def scene_targets(sample: "JudgeSample", two_images: bool) -> torch.Tensor:
    """(1, len(SCENE_CLASSES)) image-only facts every text position is probed for; change flags -100 on one image."""
    ref, cand = sample.case.reference, sample.candidate
    changed = [int(cand.at(c) != ref.at(c)) for c in CELLS] + [int(cand.background != ref.background)]
    if not two_images:
        changed = [-100] * len(changed)
    attrs = cell_targets(cand)  # (9, 3)
    return torch.tensor(changed + attrs[:, 0].tolist() + attrs[:, 1].tolist() + attrs[:, 2].tolist())[None]


class Probes(nn.Module):
    """Temporary linear probes on the language model (dense supervision of the comparison); discarded after.

    - middle layer, each edited-image cell token of a two-image question: the reference's object
      in that cell (colour, shape, size) and whether the cell changed;
    - middle and last layer, every text position (after the images): image-only facts (which cells
      changed, the candidate's object per cell); near positions learn to read the images first, and
      the same heads then reach the far answer position;
    - last layer, the answer position and the SUFFIX - 1 positions before it (deep supervision: every
      one of them must gather the same facts, which multiplies the signal that teaches attention to
      read the images): the facts of `answer_targets` and the true answer itself.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.cells = nn.Linear(dim, N_COLOUR + N_SHAPE + N_SIZE + 2)
        self.answer = nn.Linear(dim, sum(ANSWER_CLASSES) + 2)  # + the true answer
        self.scene = nn.ModuleList([nn.Linear(dim, sum(SCENE_CLASSES)) for _ in range(2)])  # middle, final

    def loss(self, middle, final, ids, last, image_token_id, samples: Sequence[JudgeSample], num_q: int):
        """Probe CE on captured (N, L, D) hidden states of the row-major (B * Q) conversations."""
        device = middle.device
        cell_rows, cell_targets_, answer_rows, answer_rows_targets = [], [], [], []
        text_index, text_targets = [], []
        for i in range(ids.shape[0]):
            s = samples[i // num_q]
            pair_targets, contains_targets = answer_targets(s)
            slots = (ids[i] == image_token_id).nonzero().squeeze(-1)
            positions = torch.arange(int(slots[-1]) + 1, int(last[i]) + 1)
            text_index.append(i * ids.shape[1] + positions)
            text_targets.append(scene_targets(s, two_images=len(slots) == 20).expand(len(positions), -1))
            answer_rows.append(final[i, last[i] - SUFFIX + 1 : last[i] + 1])  # (SUFFIX, D)
            truth = torch.tensor([int(s.answers[i % num_q])])
            if len(slots) != 20:  # one-image (contains) question
                answer_rows_targets.append(torch.cat([contains_targets, truth]))
                continue
            answer_rows_targets.append(torch.cat([pair_targets, truth]))
            ref = cell_targets(s.case.reference)  # (9, 3)
            changed = torch.tensor([s.candidate.at(c) != s.case.reference.at(c) for c in CELLS]).long()
            cell_rows.append(middle[i, slots[10:19]])
            cell_targets_.append(torch.cat([ref, changed[:, None]], -1))
        cells = self.cells(torch.stack(cell_rows))  # (R, 9, 16)
        targets = torch.stack(cell_targets_).to(device)  # (R, 9, 4)
        cell_loss = _cell_ce(cells[..., :-2], targets[..., :3])
        cell_loss = cell_loss + F.cross_entropy(cells[..., -2:].reshape(-1, 2), targets[..., 3].reshape(-1))
        suffix_logits = self.answer(torch.stack(answer_rows)).split(ANSWER_CLASSES + [2], -1)  # each (N, S, classes)
        answer_t = torch.stack(answer_rows_targets).to(device)  # (N, ANSWER_TARGETS + 1)
        losses = [F.cross_entropy(lg.flatten(0, 1), answer_t[:, k].repeat_interleave(SUFFIX), ignore_index=-100)
                  for k, lg in enumerate(suffix_logits) if (answer_t[:, k] != -100).any()]
        logits = [lg[:, -1] for lg in suffix_logits]  # at the answer position
        answer_loss = torch.stack(losses).sum() / 4
        text_index = torch.cat(text_index).to(device)
        text_t = torch.cat(text_targets).to(device)  # (P, SCENE_TARGETS)
        scene_loss = 0
        for layer, hidden in enumerate((middle, final)):
            scene_logits = self.scene[layer](hidden.flatten(0, 1)[text_index]).split(SCENE_CLASSES, -1)
            scene_loss = scene_loss + sum(F.cross_entropy(lg, text_t[:, k], ignore_index=-100)
                                          for k, lg in enumerate(scene_logits)) / 8
        with torch.no_grad():
            change_acc = (cells[..., -2:].argmax(-1) == targets[..., 3]).float().mean()
            flags = torch.stack([lg.argmax(-1) for lg in logits[: len(CELLS)]], -1)  # (N, 9)
            flag_acc = (flags == answer_t[:, : len(CELLS)]).all(-1).float().mean()
            k = len(CELLS) + 2
            keep = answer_t[:, k] != -100
            target_acc = (logits[k].argmax(-1) == answer_t[:, k])[keep].float().mean()
            truth_acc = (logits[-1].argmax(-1) == answer_t[:, -1]).float().mean()
            scene_flags = torch.stack([lg.argmax(-1) for lg in scene_logits[: len(CELLS)]], -1)
            two = text_t[:, 0] != -100
            text_flags_acc = (scene_flags == text_t[:, : len(CELLS)]).all(-1)[two].float().mean()
        metrics = {"probe_change_acc": change_acc, "probe_flags_exact": flag_acc, "probe_target_acc": target_acc,
                   "probe_answer_acc": truth_acc, "probe_text_flags_exact": text_flags_acc}
        return cell_loss + answer_loss + scene_loss, metrics


# ---- the judge under training ----------------------------------------------------------------


class TrainableJudge(LlavaOnevisionJudge):
    """The LLaVA-OneVision adapter with every weight trainable and gradients through both images.

    Reuses the adapter's prompt layout, preprocessing and one-pass scoring unchanged; only the
    freezing and the no-grad reference features are lifted, because here the judge itself learns.
    """

    reference_grad = True

    def __init__(self, model, processor):
        super().__init__(model, processor)
        self.model.requires_grad_(True)


def tokenizer_corpus(n_cases: int, seed: int = 0) -> list[str]:
    """Texts the judge's tokenizer is trained on: questions of random cases (all templates), captions, chat words."""
    rng = np.random.default_rng([seed, 99])
    texts = ["user", "assistant", "system", "Yes", "No"]
    for _ in range(n_cases):
        case = sample_case(rng, paraphrase_prob=0.5)
        texts += [case.instruction, case.caption_reference]
        texts += [q.text for q in training_questions(case.instruction, case.edit_type, case.object_name)]
    return texts


def build_judge_model(directory: Path, arch: ArchConfig, seed: int) -> Path:
    """A fresh random judge (model + processor) of `arch` saved to `directory`."""
    build_tiny_llava_onevision(
        directory, corpus=tokenizer_corpus(arch.corpus_cases, seed), image_size=arch.image_size,
        patch_size=arch.patch_size, hidden_size=arch.hidden_size, num_layers=arch.num_layers,
        num_heads=arch.num_heads, vision_width=arch.vision_width, vision_layers=arch.vision_layers,
        vision_heads=arch.vision_heads, vocab_size=arch.vocab_size, seed=seed,
    )
    return directory


def save_judge(judge: LlavaOnevisionJudge, directory: Path, files: dict[str, str] | None = None) -> Path:
    """Write the judge's model (safetensors), processor files and `files` ({name: text}, e.g. its eval.json) to
    `directory`, replacing what was there only once all are written: a run killed or out of disk midway kept neither
    the best judge so far nor a whole new one."""
    directory = Path(directory)
    with publishing(directory) as folder:
        folder.mkdir(parents=True)
        judge.model.save_pretrained(folder, safe_serialization=True)
        judge.processor.save_pretrained(folder)
        for name, text in (files or {}).items():
            (folder / name).write_text(text, encoding="utf-8")
    return directory


# ---- evaluation ------------------------------------------------------------------------------


def _batches(items: Sequence, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


@torch.no_grad()
def judge_probabilities(judge, samples: Sequence[JudgeSample], degrade_prob: float = 0.0, seed: int = 0,
                        batch_size: int = 64) -> np.ndarray:
    """P(Yes) of each sample's two questions, (N, 2)."""
    rng = np.random.default_rng(seed)
    device = next(judge.parameters()).device
    out = []
    for chunk in _batches(list(samples), batch_size):
        ref = torch.stack([to_tensor(render(s.case.reference)) for s in chunk]).to(device)
        cand = torch.stack([candidate_image(s.candidate, rng, degrade_prob)[0] for s in chunk]).to(device)
        out.append(judge.answer(ref, cand, [s.questions for s in chunk]).p_yes.float().cpu().numpy())
    return np.concatenate(out)


def _accuracy_table(samples: Sequence[JudgeSample], p_yes: np.ndarray) -> dict:
    """Accuracy (P(Yes) >= 0.5 against the truth) overall and per kind, category, candidate, category/kind and, for
    object edits, referring form/kind."""
    rows = []  # (category, question kind, candidate kind, correct, form group)
    for s, p in zip(samples, p_yes):
        form = form_group({"form": reference_form(s.case), "objects": len(s.case.reference.objects)})
        for q, prob, truth in zip(s.questions, p, s.answers):
            rows.append((s.case.category, q.kind, s.kind, bool((prob >= 0.5) == truth), form))

    def acc(keep) -> dict:
        hits = [r[3] for r in rows if keep(r)]
        return {"accuracy": float(np.mean(hits)) if hits else float("nan"), "count": len(hits)}

    kinds = sorted({r[1] for r in rows})
    return {
        "overall": acc(lambda r: True),
        "by_kind": {k: acc(lambda r, k=k: r[1] == k) for k in kinds},
        "by_category": {c: acc(lambda r, c=c: r[0] == c) for c in CATEGORIES},
        "by_candidate": {k: acc(lambda r, k=k: r[2] == k) for k in CANDIDATE_MAKERS if any(r[2] == k for r in rows)},
        "by_category_kind": {f"{c}/{k}": acc(lambda r, c=c, k=k: r[0] == c and r[1] == k)
                             for c in CATEGORIES for k in kinds if any(r[0] == c and r[1] == k for r in rows)},
        # object edits by how the instruction names the object (as the editor's benchmark splits them)
        "by_form_kind": {f"{name}/{k}": acc(lambda r, g=g, k=k: r[4] == g and r[1] == k)
                         for g, name in FORM_GROUPS.items() for k in kinds if any(r[4] == g and r[1] == k for r in rows)},
    }


def evaluate_judge(judge, n: int = 300, seed: int = 1000, degrade_prob: float = 0.0, batch_size: int = 64) -> dict:
    """Accuracy of `judge` on held-out true vs wrong edits of `n` canonical cases (4 candidates, 8 questions each).

    Threshold P(Yes) = 0.5; truth from the grammar (scoring.followed / preserved, contains by name).
    Returns {"overall", "by_kind", "by_category", "by_candidate", "by_category_kind", "by_form_kind"} of
    {"accuracy", "count"}, plus the settings.
    """
    samples = evaluation_samples(n, seed)
    p_yes = judge_probabilities(judge, samples, degrade_prob, seed, batch_size)
    return {**_accuracy_table(samples, p_yes), "n_cases": n, "seed": seed, "degrade_prob": degrade_prob}


KEEP_CANDIDATES = ("kept", "recoloured", "reshaped", "removed")


def keep_samples(n: int, seed: int = 1000) -> list[tuple[EditCase, Scene, str, str]]:
    """Held-out keep checks: per canonical case with an untouched object, that object's name and candidates in which
    it is kept (truth Yes), or recoloured, reshaped or removed (No), as (case, candidate, object name, candidate kind).
    A changed candidate is skipped when another object already carries the name (the answer would still be Yes)."""
    out = []
    for i, case in enumerate(held_out_cases(n, seed)):
        if not case.untouched:
            continue
        rng = np.random.default_rng([seed, 11, i])
        obj = pick(rng, case.untouched)
        others = tuple(o for o in case.expected.objects if o != obj)
        variants = {"kept": obj, "recoloured": replace(obj, colour=pick(rng, [c for c in COLOURS if c != obj.colour])),
                    "reshaped": replace(obj, shape=pick(rng, [s for s in SHAPES if s != obj.shape])), "removed": None}
        for kind, new in variants.items():
            objects = others + ((new,) if new is not None else ())
            if not objects or (kind != "kept" and any(o.name == obj.name for o in objects)):
                continue
            out.append((case, Scene(case.expected.background, objects), obj.name, kind))
    return out


def _rates(groups: dict[str, list[bool]]) -> dict:
    return {k: {"accuracy": float(np.mean(v)), "count": len(v)} for k, v in groups.items() if v}


@torch.no_grad()
def _contains_hits(judge, items: Sequence[tuple[EditCase, Scene, str, bool]], seed: int, degrade_prob: float,
                   batch_size: int) -> list[bool]:
    """Whether `judge` answers "does the edited image contain <name>?" right for each (case, candidate, name,
    truth): one question per pair, the candidate rendered (and degraded with `degrade_prob`) in order."""
    rng = np.random.default_rng(seed)
    device = next(judge.parameters()).device
    hits = []
    for chunk in _batches(items, batch_size):
        ref = torch.stack([to_tensor(render(case.reference)) for case, *_ in chunk]).to(device)
        cand = torch.stack([candidate_image(scene, rng, degrade_prob)[0] for _, scene, *_ in chunk]).to(device)
        p = judge.answer(ref, cand, [[kept_question(name)] for _, _, name, _ in chunk]).p_yes[:, 0].cpu().numpy()
        hits += [bool((prob >= 0.5) == truth) for (*_, truth), prob in zip(chunk, p)]
    return hits


def evaluate_keep(judge, n: int = 300, seed: int = 1000, degrade_prob: float = 0.0, batch_size: int = 64) -> dict:
    """Accuracy of `judge` on the keep check ("does the edited image contain <untouched object>?", asked by
    `judge.keep_questions`) over `keep_samples`: overall and per candidate kind."""
    items = keep_samples(n, seed)
    hits = _contains_hits(judge, [(c, s, name, kind == "kept") for c, s, name, kind in items], seed, degrade_prob,
                          batch_size)
    by_kind: dict[str, list[bool]] = {k: [] for k in KEEP_CANDIDATES}
    for (*_, kind), hit in zip(items, hits):
        by_kind[kind].append(hit)
    return {"overall": _rates({"all": hits})["all"], "by_candidate": _rates(by_kind)}


CHANGE_CANDIDATES = ("edited", "unchanged", "wrong value", "wrong object")


def change_samples(n: int, seed: int = 1000) -> list[tuple[EditCase, Scene, str, bool, str]]:
    """Held-out change checks (`judge.change_questions`): per canonical case and each name of its `new` and `gone`
    lists, the contains question asked of the true result, of the unchanged reference, of the same edit with other
    values and of the same edit on another object, as (case, candidate, name, truth, candidate kind); the truth is
    whether the candidate contains an object of that name."""
    out = []
    for i, case in enumerate(held_out_cases(n, seed)):
        names = case.new + case.gone
        if not names:
            continue
        rng = np.random.default_rng([seed, 13, i])
        edit = edit_between(case.reference, case.expected, case.category)
        candidates = {"edited": case.expected, "unchanged": case.reference,
                      "wrong value": _wrong_value(rng, case, edit), "wrong object": _wrong_object(rng, case, edit)}
        for kind, scene in candidates.items():
            if scene is None or not scene.objects:
                continue
            for name in names:
                out.append((case, scene, name, any(o.name == name for o in scene.objects), kind))
    return out


def evaluate_change(judge, n: int = 300, seed: int = 1000, degrade_prob: float = 0.0, batch_size: int = 64) -> dict:
    """Accuracy of `judge` on the change checks over `change_samples`: overall, per candidate kind and per side
    (a `new` name, whose training answer is Yes; a `gone` name, No)."""
    items = change_samples(n, seed)
    hits = _contains_hits(judge, [item[:4] for item in items], seed, degrade_prob, batch_size)
    by_kind: dict[str, list[bool]] = {k: [] for k in CHANGE_CANDIDATES}
    sides: dict[str, list[bool]] = {"new": [], "gone": []}
    for (case, _, name, _, kind), hit in zip(items, hits):
        by_kind[kind].append(hit)
        sides["new" if name in case.new else "gone"].append(hit)
    return {"overall": _rates({"all": hits})["all"], "by_candidate": _rates(by_kind), "by_side": _rates(sides)}


def format_table(result: dict) -> str:
    """A Markdown table of an `evaluate_judge` result."""
    lines = ["| group | accuracy | count |", "|---|---|---|"]
    lines.append(f"| **overall** | {result['overall']['accuracy']:.3f} | {result['overall']['count']} |")
    for section in ("by_kind", "by_category", "by_candidate", "by_category_kind", "by_form_kind"):
        for name, row in result.get(section, {}).items():  # (reports from before by_form_kind lack it)
            lines.append(f"| {section[3:]}: {name} | {row['accuracy']:.3f} | {row['count']} |")
    # the one-image checks of judge.keep_questions (an untouched object) and judge.change_questions (created and
    # vanished objects)
    for key, sections in (("keep", ("by_candidate",)), ("change", ("by_side", "by_candidate"))):
        if key in result:
            block = result[key]
            lines.append(f"| {key} check: overall | {block['overall']['accuracy']:.3f} | {block['overall']['count']} |")
            for section in sections:
                for name, row in block[section].items():
                    lines.append(f"| {key} check: {name} | {row['accuracy']:.3f} | {row['count']} |")
    return "\n".join(lines)


def _default_eval_folder(judge: Path) -> Path:
    """Where judge-eval writes when not told: beside a trained judge (its run), but never into the bundle (the
    repository's tracked assets/, or an install's read-only copy): runs/judge-eval there."""
    from npedit.assets import ASSETS_DIR

    judge = judge.resolve()
    return Path("runs", "judge-eval") if ASSETS_DIR.resolve() in judge.parents else judge.parent


def eval_main(argv: Sequence[str] | None = None, prog: str = "python -m npedit shapes judge-eval") -> int:
    """`python -m npedit shapes judge-eval`: accuracy table of a judge; writes JSON and Markdown."""
    from npedit.assets import default_path
    from npedit.judges import load_judge

    parser = argparse.ArgumentParser(prog=prog, description=eval_main.__doc__)
    parser.add_argument("--judge", help="judge folder (default: the bundled Shapes-world judge)")
    parser.add_argument("--n", type=int, default=300, help="held-out cases (4 candidates, 8 questions each)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--degrade", type=float, default=0.0, help="probability of a degraded candidate")
    parser.add_argument("--out", help="folder for judge_eval.json / judge_eval.md (default: the judge folder's parent; "
                                      "for a bundled judge, runs/judge-eval)")
    argv = config_lib.overrides_as_flags(sys.argv[1:] if argv is None else argv)  # `key=value` words as `--key value`
    args = parser.parse_args(argv)
    if args.n < 1 or not 0 <= args.degrade <= 1:  # (n 0 was numpy's "need at least one array" after the judge loaded)
        parser.error(f"--n must be >= 1 and --degrade (a probability) in [0, 1], got {args.n} and {args.degrade}")
    if not 0 <= args.seed < 2**32:  # numpy's range (else "expected non-negative integer" once the judge loaded)
        parser.error(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():  # before the evaluation, not after
        parser.error(f"--out {args.out} is a file; give a folder")
    path = default_path("judge", args.judge)
    torch.set_num_threads(1)
    device = resolve_device()
    judge = load_judge(path, device=device)
    result = {"judge": str(path), **evaluate_judge(judge, n=args.n, seed=args.seed, degrade_prob=args.degrade),
              "keep": evaluate_keep(judge, n=args.n, seed=args.seed, degrade_prob=args.degrade),
              "change": evaluate_change(judge, n=args.n, seed=args.seed, degrade_prob=args.degrade)}
    table = format_table(result)
    print(table)
    out = Path(args.out) if args.out else _default_eval_folder(Path(path))
    out.mkdir(parents=True, exist_ok=True)
    # whole or not at all (`write_atomic`): a Ctrl-C or a full disk midway keeps an earlier report, not half of one
    write_atomic(out / "judge_eval.json", json.dumps(result, indent=2) + "\n")
    header = f"# Judge evaluation\n\njudge: `{path}`, {args.n} cases, seed {args.seed}, degrade {args.degrade}\n\n"
    write_atomic(out / "judge_eval.md", header + table + "\n")
    print(f"wrote {out / 'judge_eval.json'} and {out / 'judge_eval.md'}")
    return 0


# ---- training --------------------------------------------------------------------------------


def _lr_factor(step: int, cfg: JudgeTrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio over stage 2."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.check_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def vision_step(judge, head: DenseHead, rng, cfg: JudgeTrainConfig) -> tuple[torch.Tensor, dict]:
    """Stage 1 loss: random scenes and edited scenes, some degraded, read by the dense head."""
    scenes, images = [], []
    for _ in range(cfg.vision_batch):
        case = sample_case(rng)
        scene = case.reference if rng.random() < 0.5 else case.expected
        scenes.append(scene)
        images.append(candidate_image(scene, rng, cfg.degrade_prob)[0])
    feats = judge._patch_features(torch.stack(images).to(judge.model.device))  # (N, 9, D)
    return head.loss(feats, scenes)


class _Capture:
    """Forward hooks keeping the projector's outputs (per image batch) and a middle and the last decoder layer's."""

    def __init__(self, judge, layer: int):
        self.projected: list[torch.Tensor] = []
        self.hidden: dict[str, torch.Tensor] = {}
        layers = judge.model.model.language_model.layers
        self.handles = [
            judge.model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: self.projected.append(o)),
            layers[layer].register_forward_hook(self._keeper("middle")),
            layers[len(layers) - 1].register_forward_hook(self._keeper("final")),
        ]

    def _keeper(self, name: str):
        def keep(module, inputs, output):
            self.hidden[name] = output[0] if isinstance(output, tuple) else output
        return keep

    def clear(self):
        self.projected, self.hidden = [], {}

    def remove(self):
        for h in self.handles:
            h.remove()


def _excluded(cfg: JudgeTrainConfig) -> frozenset:
    """The held-out cases the judge's training cases stay clear of (`exclude_held_out`; cached by held_out_keys)."""
    return held_out_keys(tuple(cfg.exclude_held_out)) if cfg.exclude_held_out else frozenset()


def check_step(judge, head: DenseHead, probes: Probes, capture: _Capture, rng, cfg: JudgeTrainConfig,
               pool: Sequence[JudgeSample] = ()):
    """Stage 2 loss: Yes/No CE of both questions (+ dense head on both images + language-model probes).

    With a `pool` of editor outputs, each pair is drawn from it with probability `cfg.hard_prob`."""
    samples = [pool[int(rng.integers(len(pool)))] if pool and rng.random() < cfg.hard_prob
               else sample_training(rng, cfg.paraphrase_prob, _excluded(cfg)) for _ in range(cfg.batch_size)]
    device = judge.model.device
    ref = torch.stack([to_tensor(render(s.case.reference)) for s in samples]).to(device)
    cand = torch.stack([sample_image(s, rng, cfg.degrade_prob) for s in samples]).to(device)
    questions = [s.questions for s in samples]
    capture.clear()
    out = judge.answer(ref, cand, questions)
    labels = torch.tensor([s.answers for s in samples], device=device).long()  # (B, 2), 1 = Yes
    answer_loss = F.cross_entropy(out.logits.reshape(-1, 2), labels.reshape(-1))
    loss, metrics = answer_loss, {"answer_loss": answer_loss.detach()}
    with torch.no_grad():
        right = (out.logits.argmax(-1) == labels).float()
        metrics |= {"train_acc_check": right[:, 0].mean(), "train_acc_identity": right[:, 1].mean()}
    if cfg.dense_weight > 0 and len(capture.projected) == 2:  # reference batch, then candidate batch
        dense, m = head.loss(torch.cat(capture.projected), [s.case.reference for s in samples] + [s.candidate for s in samples])
        loss = loss + cfg.dense_weight * dense
        metrics |= {"dense_loss": dense.detach(), "feature_rms": capture.projected[0].detach().pow(2).mean().sqrt(), **m}
    if cfg.probe_weight > 0:
        rows = [q for row in questions for q in row]
        ids, _, last = judge.prompt_ids(rows)
        probe, m = probes.loss(capture.hidden["middle"], capture.hidden["final"], ids.to(device), last.to(device), judge.image_token_id, samples, len(questions[0]))
        loss = loss + cfg.probe_weight * probe
        metrics |= {"probe_loss": probe.detach(), **m}
    if cfg.ramp_batch > 0 and cfg.ramp_weight > 0:  # after the probes: this forward overwrites the captures
        r_questions, r_ref, r_cand, _, a = path_pairs(rng, cfg.ramp_batch, cfg.paraphrase_prob,
                                                      excluded=_excluded(cfg))
        r_out = judge.answer(r_ref.to(device), r_cand.to(device), r_questions)
        soft = ramp_targets(r_questions, a).to(device)
        ramp = F.cross_entropy(r_out.logits.reshape(-1, 2), soft.reshape(-1, 2))
        loss = loss + cfg.ramp_weight * ramp
        with torch.no_grad():
            p_yes = r_out.logits.softmax(-1)[..., 1]
            metrics |= {"ramp_loss": ramp.detach(), "ramp_mae_check": (p_yes[:, 0] - soft[:, 0, 1]).abs().mean()}
    if cfg.align_batch > 0 and cfg.align_weight > 0:
        pairs = path_pairs(rng, cfg.align_batch, cfg.paraphrase_prob, cfg.align_max, _excluded(cfg))[:4]  # without a
        cos = gradient_alignment(judge, *pairs, create_graph=True)
        align = (1 - cos).mean()
        loss = loss + cfg.align_weight * align
        metrics |= {"align_loss": align.detach(), "align_cos": cos.detach().mean()}
    return loss, metrics


def gradient_alignment(judge, questions, ref: torch.Tensor, cand: torch.Tensor, true: torch.Tensor,
                       create_graph: bool = False) -> torch.Tensor:
    """Per pair, the cosine between the descent direction of the NP-Edit judge loss (-log P(expected answer on
    the true result), summed over the pair's questions) with respect to `cand`'s pixels and (true - cand)."""
    device = judge.model.device
    cand = cand.to(device).detach().requires_grad_(True)
    # The fused attention kernels have no double backward; the math path does (and gives the same values).
    with sdpa_kernel(SDPBackend.MATH):
        out = judge.answer(ref.to(device), cand, questions)
    expected = torch.tensor([[q.expected == "Yes" for q in row] for row in questions], device=device).long()
    nll = F.cross_entropy(out.logits.reshape(-1, 2), expected.reshape(-1), reduction="sum")
    (grad,) = torch.autograd.grad(nll, cand, create_graph=create_graph)
    return F.cosine_similarity(-grad.flatten(1), (true.to(device) - cand.detach()).flatten(1), dim=1)


def _run_dir(cfg: JudgeTrainConfig) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    return Path("runs/shapes") / f"judge-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _optimizer(params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))


def run(overrides: Sequence[str] = ()) -> Path:
    """Train a Shapes-world judge per the config (preset + dotted overrides); return the saved judge folder.

    The run folder holds config.yaml, metrics.jsonl (+ TensorBoard), checkpoints/ and judge/
    (the checkpoint with the best held-out accuracy, with its eval.json).
    """
    cfg = build_config(overrides)
    if cfg.device == "auto":
        cfg = replace(cfg, device=str(resolve_device()))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    run_dir = _run_dir(cfg)
    from .recipes import refuse_to_replace

    refuse_to_replace(run_dir, "judge", "a judge")  # (its first evaluation would replace it, whatever its accuracy)
    from ..folders import looks_local

    if cfg.init and looks_local(cfg.init) and not Path(cfg.init).exists():  # (the hub client said "Repo id must ...")
        raise ValueError(f"init={cfg.init}: no such folder (a judge folder, e.g. assets/shapes/judge)")
    run_dir.mkdir(parents=True, exist_ok=True)
    with disk_writes(run_dir / "config.yaml", "nothing was trained yet: free space and train again"):
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(config_lib.to_dict(cfg), sort_keys=False))
    init = Path(cfg.init) if cfg.init else build_judge_model(run_dir / "init", cfg.arch, cfg.seed)
    judge = TrainableJudge.from_pretrained(init, device=cfg.device)
    dim = judge.model.config.text_config.hidden_size
    head, probes = DenseHead(dim).to(cfg.device), Probes(dim).to(cfg.device)
    logger = MetricsLogger(run_dir)
    start = time.time()

    # Stage 1: the vision tower learns to read every cell and the background.
    params = [*judge.model.model.vision_tower.parameters(), *judge.model.model.multi_modal_projector.parameters(),
              *head.parameters()]
    opt = _optimizer(params, cfg.vision_lr, 0.0)
    for step in tqdm(range(cfg.vision_steps), desc="judge vision", mininterval=10):
        for group in opt.param_groups:
            group["lr"] = cfg.vision_lr * min(1.0, (step + 1) / 50)
        loss, metrics = vision_step(judge, head, rng, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if step % cfg.log_every == 0 or step == cfg.vision_steps - 1:
            logger.log(step, {"stage": 1, "vision_loss": loss.detach(), **metrics, "minutes": (time.time() - start) / 60})

    # Hard examples: the editors' own outputs on training cases.
    pool: list[JudgeSample] = []
    for k, editor in enumerate(cfg.hard_editors):
        found, counts = editor_samples(editor, cfg.hard_cases, seed=cfg.seed + k, paraphrase_prob=cfg.paraphrase_prob,
                                       excluded=_excluded(cfg),
                                       device=cfg.device)
        pool += found
        logger.log(cfg.vision_steps, {"stage": 2, **{f"pool{k}_{key}": v for key, v in counts.items()}})
    if cfg.hard_editors and not pool:
        raise ValueError(f"none of the outputs of {list(cfg.hard_editors)} parses as a scene: no hard examples")

    # Stage 2: the Yes/No checks, with the dense head and the probes as auxiliaries.
    layer = cfg.probe_layer if cfg.probe_layer >= 0 else max(0, cfg.arch.num_layers // 2 - 1)
    capture = _Capture(judge, layer)
    params = [*judge.model.parameters(), *head.parameters(), *probes.parameters()]
    opt = _optimizer(params, cfg.lr, cfg.weight_decay)
    best, best_step, offset = -1.0, -1, cfg.vision_steps
    stage_start = time.time()

    def kept() -> str:
        """What a full disk leaves of this run, and what to do."""
        held = (f"{run_dir / 'judge'} holds the best judge so far (step {offset + best_step}) whole"
                if best_step >= 0 else "no judge was saved yet")
        return f"{held}: free space and train again into another output_dir (init=<a judge folder> continues one)"

    def evaluate_and_keep(step: int):
        nonlocal best, best_step
        result = evaluate_judge(judge, n=cfg.eval_cases, seed=cfg.eval_seed)
        acc = result["overall"]["accuracy"]
        logger.log(offset + step, {"stage": 2, "eval_acc": acc, "minutes": (time.time() - start) / 60,
                                   **{f"eval_{k}": v["accuracy"] for k, v in result["by_kind"].items()},
                                   **{f"eval_{c}": v["accuracy"] for c, v in result["by_category"].items()}})
        if acc > best:
            with disk_writes(run_dir / "judge", kept()):
                save_judge(judge, run_dir / "judge", {"eval.json": json.dumps({"step": offset + step, **result},
                                                                              indent=2)})
            best, best_step = acc, step
        return acc

    bar = tqdm(range(cfg.check_steps), desc="judge checks", mininterval=10)
    last_step = -1
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        loss, metrics = check_step(judge, head, probes, capture, rng, cfg, pool)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        last_step = step
        if step % cfg.log_every == 0:
            logger.log(offset + step, {"stage": 2, "loss": loss.detach(), "grad_norm": grad_norm, **metrics,
                                       "lr": opt.param_groups[0]["lr"], "minutes": (time.time() - start) / 60})
        if cfg.save_every and step and step % cfg.save_every == 0:
            with disk_writes(run_dir / "checkpoints" / f"step-{offset + step:06d}", kept()):
                save_judge(judge, run_dir / "checkpoints" / f"step-{offset + step:06d}")
        if (step + 1) % cfg.eval_every == 0:
            bar.set_postfix(eval_acc=f"{evaluate_and_keep(step):.3f}")
        if cfg.max_minutes and (time.time() - stage_start) / 60 > cfg.max_minutes:
            break
    if last_step < 0 or (last_step + 1) % cfg.eval_every != 0 or best < 0:
        evaluate_and_keep(last_step)
    capture.remove()
    with disk_writes(run_dir / "checkpoints" / "last", kept()):
        save_judge(judge, run_dir / "checkpoints" / "last")
    logger.log(offset + last_step + 1, {"best_eval_acc": best, "best_step": offset + best_step,
                                        "minutes": (time.time() - start) / 60})
    logger.close()
    return run_dir / "judge"
