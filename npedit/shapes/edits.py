"""Edit cases for the Shapes world: structured edits, their instructions, and the held-out benchmark.

One structured `Edit` gives both the expected scene (`apply_edit`) and the instruction text
(`instruction`), so the two cannot disagree. Choices where the spec is silent:
- replace must change the shape; its colour is drawn from all six (it may stay the same).
- object_name is the removed object for remove, the added object for add, the edited
  (reference) object for replace / recolor / resize, and None for background.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from ..files import write_atomic, write_png
from .world import (
    BACKGROUNDS,
    CELLS,
    COLOURS,
    MAX_OBJECTS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    pick,
    caption,
    parse,
    random_object,
    random_scene,
    referring_expression,
    render,
    scene_from_dict,
    scene_to_dict,
)

CATEGORIES = ("add", "remove", "replace", "recolor", "resize", "background")
OBJ_ATTRS = ("shape", "colour", "size")
# The fields each category's Edit carries; the object attributes among them are the ones it names.
EDIT_FIELDS: dict[str, tuple[str, ...]] = {
    "add": ("cell", "shape", "colour", "size"),
    "remove": ("cell",),
    "replace": ("cell", "shape", "colour"),
    "recolor": ("cell", "colour"),
    "resize": ("cell", "size"),
    "background": ("background",),
}
# The attribute an object edit must change (replace: the shape; its colour is free).
MUST_CHANGE = {"replace": "shape", "recolor": "colour", "resize": "size"}
_ALLOWED = {
    "cell": CELLS, "shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES), "background": tuple(BACKGROUNDS),
}

# Index 0 is the spec's canonical form; the rest are paraphrases for training and demos.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "add a {size} {colour} {shape} at the {cell}",
        "put a {size} {colour} {shape} in the {cell}",
        "draw a {size} {colour} {shape} at the {cell}",
        "place a {size} {colour} {shape} in the {cell}",
    ),
    "remove": ("remove {ref}", "delete {ref}", "get rid of {ref}", "erase {ref}"),
    "replace": (
        "replace {ref} with a {colour} {shape}",
        "turn {ref} into a {colour} {shape}",
        "swap {ref} for a {colour} {shape}",
        "change {ref} into a {colour} {shape}",
    ),
    "recolor": (
        "make {ref} {colour}",
        "paint {ref} {colour}",
        "colour {ref} {colour}",
        "change the colour of {ref} to {colour}",
    ),
    "resize": ("make {ref} {comparative}", "{verb} {ref}", "scale {ref} {direction}", "make {ref} {size}"),
    "background": (
        "change the background to {background}",
        "make the background {background}",
        "set the background to {background}",
        "paint the background {background}",
    ),
}
_RESIZE_WORDS = {
    "large": {"comparative": "larger", "verb": "enlarge", "direction": "up"},
    "small": {"comparative": "smaller", "verb": "shrink", "direction": "down"},
}  # keyed by the new size


def _check_category(category: str) -> None:
    """Raise a ValueError listing the categories when `category` is not one of them."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; allowed: {', '.join(CATEGORIES)}")


def named_attributes(category: str) -> tuple[str, ...]:
    """The object attributes an edit of `category` names (e.g. recolor: ("colour",))."""
    return tuple(f for f in EDIT_FIELDS[category] if f in OBJ_ATTRS)


@dataclass(frozen=True)
class Edit:
    """A structured edit: category, target cell and the new values it names (others stay None)."""

    category: str
    cell: str | None = None
    shape: str | None = None
    colour: str | None = None
    size: str | None = None
    background: str | None = None

    def __post_init__(self):
        _check_category(self.category)
        required = EDIT_FIELDS[self.category]
        for field, allowed in _ALLOWED.items():
            value = getattr(self, field)
            if field in required and value not in allowed:
                raise ValueError(f"{self.category} edit needs {field} in {', '.join(allowed)}; got {value!r}")
            if field not in required and value is not None:
                raise ValueError(f"{self.category} edit takes only {', '.join(required)}; got {field}={value!r}")


def edit_problem(scene: Scene, edit: Edit) -> str | None:
    """Why `edit` cannot apply to `scene`, or None when it can."""
    if edit.category == "background":
        return "the background is already " + edit.background if edit.background == scene.background else None
    target = scene.at(edit.cell)
    if edit.category == "add":
        if target is not None:
            return f"the {edit.cell} is occupied"
        return "the scene is full" if len(scene.objects) >= MAX_OBJECTS else None
    if target is None:
        return f"no object at the {edit.cell}"
    if edit.category == "remove":
        return "cannot remove the only object" if len(scene.objects) < 2 else None
    attr = MUST_CHANGE[edit.category]
    return f"{attr} unchanged" if getattr(edit, attr) == getattr(target, attr) else None


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The expected scene after `edit`; raises ValueError when the edit does not apply."""
    problem = edit_problem(scene, edit)
    if problem is not None:
        raise ValueError(f"cannot apply {edit}: {problem}")
    if edit.category == "background":
        return replace(scene, background=edit.background)
    others = tuple(o for o in scene.objects if o.cell != edit.cell)
    if edit.category == "remove":
        return Scene(scene.background, others)
    attrs = {a: getattr(edit, a) for a in named_attributes(edit.category)}
    target = scene.at(edit.cell)
    new = Obj(cell=edit.cell, **attrs) if target is None else replace(target, **attrs)
    return Scene(scene.background, others + (new,))


def edit_between(reference: Scene, expected: Scene, category: str) -> Edit:
    """Recover the structured edit of `category` that turns `reference` into `expected`."""
    _check_category(category)
    if category == "background":
        edit = Edit("background", background=expected.background)
    else:
        changed = [c for c in CELLS if reference.at(c) != expected.at(c)]
        if len(changed) != 1:
            raise ValueError(f"a {category} edit changes exactly one cell; these differ: {changed}")
        new = expected.at(changed[0])
        edit = Edit(category, changed[0], **{a: getattr(new, a) for a in named_attributes(category)})
    if apply_edit(reference, edit) != expected:
        raise ValueError(f"{expected} is not a {category} edit of {reference}")
    return edit


def sample_edit(scene: Scene, category: str, rng: np.random.Generator) -> Edit | None:
    """A uniformly drawn feasible edit of `category` on `scene`, or None when there is none."""
    _check_category(category)
    if category == "background":
        return Edit("background", background=pick(rng, [b for b in BACKGROUNDS if b != scene.background]))
    if category == "add":
        if len(scene.objects) >= MAX_OBJECTS:
            return None
        new = random_object(rng, pick(rng, scene.empty_cells))
        return Edit("add", new.cell, new.shape, new.colour, new.size)
    if category == "remove" and len(scene.objects) < 2:
        return None
    target = pick(rng, scene.objects)
    attrs = {a: pick(rng, _choices(target, a, category)) for a in named_attributes(category)}
    return Edit(category, target.cell, **attrs)


def _choices(target: Obj, attr: str, category: str) -> tuple[str, ...]:
    """Values `attr` may take in a `category` edit of `target`: any, or any other for MUST_CHANGE."""
    if attr != MUST_CHANGE.get(category):
        return _ALLOWED[attr]
    return tuple(v for v in _ALLOWED[attr] if v != getattr(target, attr))


def _template_fields(scene: Scene, edit: Edit) -> dict[str, str]:
    """The values instruction templates may use: the edit's fields, {ref} and the resize words."""
    fields = {f: getattr(edit, f) for f in EDIT_FIELDS[edit.category]}
    target = scene.at(edit.cell) if edit.cell is not None else None
    if target is not None:
        fields["ref"] = referring_expression(scene, target)
    if edit.category == "resize":
        fields.update(_RESIZE_WORDS[edit.size])
    return fields


def instruction(scene: Scene, edit: Edit, template: int = 0) -> str:
    """The instruction for `edit` on `scene`; template 0 is the spec's canonical form."""
    return TEMPLATES[edit.category][template].format(**_template_fields(scene, edit))


@dataclass(frozen=True)
class EditCase:
    """One training/benchmark sample: reference, instruction c, expected result and captions c^y, c^x."""

    id: str
    reference: Scene
    instruction: str
    expected: Scene
    category: str
    caption_reference: str  # c^y
    caption_target: str  # c^x
    edit_type: str
    object_name: str | None

    def __post_init__(self):
        _check_category(self.category)

    @property
    def untouched(self) -> tuple[Obj, ...]:
        """The reference's objects the instruction leaves alone (neither changed nor removed), in reading order.
        Which object an instruction is about follows from the instruction and the reference alone."""
        return tuple(o for o in self.reference.objects if o in self.expected.objects)

    @property
    def keep(self) -> list[str]:
        """Names of the untouched objects (a training sample's `keep` list)."""
        return [o.name for o in self.untouched]

    @property
    def new(self) -> list[str]:
        """Names of the objects the edit creates (added, recoloured, replaced or resized), except a name an untouched
        object already carries (its keep check asks it). Known from the instruction alone."""
        kept = set(self.keep)
        return [o.name for o in self.expected.objects if o not in self.reference.objects and o.name not in kept]

    @property
    def gone(self) -> list[str]:
        """Names of the reference's objects the edit changes or removes that no object of the result carries any
        more (the old name of a recoloured or replaced object, the removed object's), from reference + instruction."""
        after = {o.name for o in self.expected.objects}
        return [o.name for o in self.reference.objects if o not in self.expected.objects and o.name not in after]


def _object_name(reference: Scene, expected: Scene, edit: Edit) -> str | None:
    """`{colour} {shape}` of the object the edit is about (the added one for add), None for background."""
    if edit.cell is None:
        return None
    scene = expected if edit.category == "add" else reference
    return scene.at(edit.cell).name


def case_from_edit(scene: Scene, edit: Edit, template: int = 0, id: str = "case") -> EditCase:
    """The EditCase of applying `edit` to `scene`, instruction from TEMPLATES[category][template]."""
    expected = apply_edit(scene, edit)
    return EditCase(
        id=id,
        reference=scene,
        instruction=instruction(scene, edit, template),
        expected=expected,
        category=edit.category,
        caption_reference=caption(scene),
        caption_target=caption(expected),
        edit_type=edit.category,
        object_name=_object_name(scene, expected, edit),
    )


def make_case(
    scene: Scene, category: str, rng: np.random.Generator, paraphrase: bool = False, id: str = "case"
) -> EditCase | None:
    """A random feasible case of `category` on `scene` (a random paraphrase if asked), or None."""
    edit = sample_edit(scene, category, rng)
    if edit is None:
        return None
    template = int(rng.integers(1, len(TEMPLATES[category]))) if paraphrase else 0
    return case_from_edit(scene, edit, template, id)


def sample_case(
    rng: np.random.Generator, category: str | None = None, paraphrase_prob: float = 0.0, id: str = "sample"
) -> EditCase:
    """Draw a category (uniform unless given), then random scenes until the category is feasible."""
    category = pick(rng, CATEGORIES) if category is None else category
    _check_category(category)
    paraphrase = bool(rng.random() < paraphrase_prob)
    while True:
        case = make_case(random_scene(rng), category, rng, paraphrase, id)
        if case is not None:
            return case


def held_out_cases(n: int, seed: int = 0) -> list[EditCase]:
    """Deterministic benchmark: n // 6 canonical cases per category, the remainder to the first ones."""
    cases = []
    for i, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, i])  # one stream per category
        count = n // len(CATEGORIES) + (i < n % len(CATEGORIES))
        cases += [sample_case(rng, category, id=f"{category}-{k:04d}") for k in range(count)]
    return cases


HELD_OUT_N = 300  # the benchmark's size (`eval shapes --n`, `judge-eval n=`): held_out_keys covers any n up to it


@lru_cache(maxsize=8)
def held_out_keys(seeds: tuple[int, ...], n: int = HELD_OUT_N) -> frozenset[tuple[Scene, Scene]]:
    """(reference, expected) of every case of `held_out_cases(n, s)` for s in `seeds`, i.e. each benchmark case
    whatever its wording; it also covers held_out_cases(m, s) for m <= n (each category's cases are a prefix).
    Training draws are a disjoint random stream, not an exclusion: in this finite world (5 backgrounds x 1 to 3 of
    36 objects in 9 cells, but a third of the scenes hold a lone object, of which there are only 1,620) a pool of
    50,000 holds by chance about 8% of the 300 held-out cases, one of 2 million about 30%. `data.exclude_held_out`
    (editor) and `exclude_held_out=` (judge) redraw training cases in this set."""
    if any(s < 0 for s in seeds):
        raise ValueError(f"held-out seeds are >= 0, got {list(seeds)}")
    return frozenset((c.reference, c.expected) for s in seeds for c in held_out_cases(n, s))


def case_to_dict(case: EditCase, image: str) -> dict:
    """JSON-ready dict of a case; `image` is the reference render's path relative to the jsonl."""
    return {
        "id": case.id,
        "image": image,
        "instruction": case.instruction,
        "category": case.category,
        "caption_reference": case.caption_reference,
        "caption_target": case.caption_target,
        "edit_type": case.edit_type,
        "object_name": case.object_name,
        "keep": case.keep,
        "new": case.new,
        "gone": case.gone,
        "expected": scene_to_dict(case.expected),
        "reference": scene_to_dict(case.reference),
    }


def case_from_dict(data: dict, directory: str | Path = ".") -> EditCase:
    """Inverse of case_to_dict; without a "reference" entry the reference image is parsed."""
    if "reference" in data:
        reference = scene_from_dict(data["reference"])
    else:
        reference = parse(np.asarray(Image.open(Path(directory) / data["image"]).convert("RGB")))
    return EditCase(
        id=data["id"],
        reference=reference,
        instruction=data["instruction"],
        expected=scene_from_dict(data["expected"]),
        category=data["category"],
        caption_reference=data["caption_reference"],
        caption_target=data["caption_target"],
        edit_type=data["edit_type"],
        object_name=data["object_name"],
    )


def write_cases_jsonl(cases: Iterable[EditCase], directory: str | Path) -> Path:
    """Write directory/images/<id>.png (reference renders) and directory/cases.jsonl; return the jsonl path."""
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    path = directory / "cases.jsonl"
    seen: set[str] = set()
    lines = []
    for case in cases:
        if case.id in seen:
            raise ValueError(f"duplicate case id {case.id!r}")
        seen.add(case.id)
        image = f"images/{case.id}.png"
        # each file replaced whole: the app's Train tab may be copying these cases for a run while another visitor
        # generates the same seed (in place, a reader found a file cut short or empty)
        write_png(directory / image, Image.fromarray(render(case.reference)), sync=False)
        lines.append(json.dumps(case_to_dict(case, image)) + "\n")
    write_atomic(path, "".join(lines), sync=False)
    return path


def read_cases_jsonl(directory: str | Path) -> list[EditCase]:
    """Read the cases written by write_cases_jsonl."""
    directory = Path(directory)
    with open(directory / "cases.jsonl", encoding="utf-8") as f:
        return [case_from_dict(json.loads(line), directory) for line in f if line.strip()]
