"""Scoring edited Shapes images against their cases (spec/shapes-world.md, "Scoring an edit").

With the edited cell c and the edit's named attributes (edits.EDIT_FIELDS):
- followed: background: the new background; remove: c is empty; add / replace / recolor /
  resize: an object sits at c and has every named attribute's new value.
- preserved: every cell other than c is as in the reference (same object or still empty), the
  background is unchanged (except for the background edit, where all cells are compared),
  and for replace / recolor / resize the object at c keeps its unnamed attributes
  (replace: size; recolor: shape and size; resize: shape and colour).
So exact == followed and preserved. An output that does not parse to a valid scene (wrong size,
no background colour on the border, 0 or more than 3 objects) scores 0 on all three.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .edits import CATEGORIES, MUST_CHANGE, OBJ_ATTRS, Edit, EditCase, edit_between, named_attributes
from .world import CANVAS, CELLS, Scene, clean_fraction, parse, referring_form

METRICS = ("exact", "followed", "preserved", "clean")
# How an object edit's instruction names its object, for `by_form`: alone in its scene (any name will do), or among
# others by its shape, by colour and shape, or by shape and cell (world.REFERENCE_FORMS).
FORM_GROUPS = {"lone": "lone object", "shape": "the {shape}", "colour shape": "the {colour} {shape}",
               "shape cell": "the {shape} at the {cell}"}


def followed(parsed: Scene, edit: Edit) -> bool:
    """Whether the change `edit` asks for is present in the parsed output."""
    if edit.category == "background":
        return parsed.background == edit.background
    got = parsed.at(edit.cell)
    if edit.category == "remove":
        return got is None
    return got is not None and all(getattr(got, a) == getattr(edit, a) for a in named_attributes(edit.category))


def preserved(parsed: Scene, reference: Scene, edit: Edit) -> bool:
    """Whether everything `edit` does not name is as in `reference`."""
    if edit.category != "background" and parsed.background != reference.background:
        return False
    if any(parsed.at(c) != reference.at(c) for c in CELLS if c != edit.cell):
        return False
    if edit.category not in MUST_CHANGE:
        return True
    got, old = parsed.at(edit.cell), reference.at(edit.cell)
    unnamed = [a for a in OBJ_ATTRS if a not in named_attributes(edit.category)]
    return got is not None and all(getattr(got, a) == getattr(old, a) for a in unnamed)


def _parse_or_none(image: np.ndarray) -> Scene | None:
    """parse(image), or None when the image is not 64 x 64 x 3."""
    return parse(image) if image.shape == (CANVAS, CANVAS, 3) else None


def error_kinds(parsed: Scene | None, case: EditCase, edit: Edit | None = None) -> list[str]:
    """What differs between a parsed output and the expected scene, one entry per mistake (empty if exact).

    Kinds: "unparseable"; "background"; then, for the edited cell or any other cell, "missing object",
    "extra object", "shape <expected>-><got>", "size <expected>-><got>" and "colour", which becomes
    "other cell: colour of the edit" when an untouched object took the colour the edit asks for (the edit
    bleeding onto it) and "edited cell: colour unchanged" when the edited object kept its old colour.
    `edit` is the case's structured edit, derived from the case when not given.
    """
    if parsed is None:
        return ["unparseable"]
    edit = edit or edit_between(case.reference, case.expected, case.category)
    kinds = ["background"] if parsed.background != case.expected.background else []
    for cell in CELLS:
        want, got = case.expected.at(cell), parsed.at(cell)
        if want == got:
            continue
        where = "edited cell" if cell == edit.cell else "other cell"
        if want is None or got is None:
            kinds.append(f"{where}: {'extra' if want is None else 'missing'} object")
            continue
        for attr in ("shape", "size"):
            if getattr(want, attr) != getattr(got, attr):
                kinds.append(f"{where}: {attr} {getattr(want, attr)}->{getattr(got, attr)}")
        if want.colour != got.colour:
            old = case.reference.at(cell)
            if cell != edit.cell and got.colour == edit.colour:
                kinds.append("other cell: colour of the edit")
            elif cell == edit.cell and old is not None and got.colour == old.colour:
                kinds.append("edited cell: colour unchanged")
            else:
                kinds.append(f"{where}: colour")
    return kinds


def reference_form(case: EditCase, edit: Edit | None = None) -> str:
    """The referring form (world.REFERENCE_FORMS) by which the case's instruction names the object it edits;
    "" when it names none (add, background)."""
    edit = edit or edit_between(case.reference, case.expected, case.category)
    if edit.category in ("add", "background"):
        return ""
    return referring_form(case.reference, case.reference.at(edit.cell))


def score_edit(output_image, case: EditCase) -> dict:
    """Score one edited uint8 image: exact, followed, preserved (0 or 1), clean (pixel share) and its mistakes."""
    image = np.asarray(output_image)
    parsed = _parse_or_none(image)
    edit = edit_between(case.reference, case.expected, case.category)
    ok = parsed is not None
    return {
        "id": case.id,
        "category": case.category,
        "objects": len(case.reference.objects),  # objects in the reference scene: how hard the reference is to ground
        "form": reference_form(case, edit),  # how the instruction names the edited object ("": it names none)
        "exact": float(ok and parsed == case.expected),
        "followed": float(ok and followed(parsed, edit)),
        "preserved": float(ok and preserved(parsed, case.reference, edit)),
        "clean": clean_fraction(image) if image.ndim == 3 and image.shape[-1] == 3 else 0.0,
        "errors": error_kinds(parsed, case, edit),
    }


def error_counts(rows: Iterable[dict]) -> list[tuple[str, int]]:
    """How often each kind of mistake occurs over scored rows, most frequent first."""
    counts: dict[str, int] = {}
    for row in rows:
        for kind in row.get("errors", []):
            counts[kind] = counts.get(kind, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _means(rows: list[dict]) -> dict:
    """Mean of each metric over `rows` (NaN when empty) and their count."""
    means = {m: float(np.mean([r[m] for r in rows])) if rows else float("nan") for m in METRICS}
    return {**means, "count": len(rows)}


def by_objects(rows: Iterable[dict]) -> dict[str, dict[int, dict]]:
    """The metrics per category (and overall) split by the number of objects in the reference scene.

    Rows without an "objects" entry (reports written before it existed) are left out."""
    rows = [r for r in rows if "objects" in r]
    if not rows:
        return {}
    groups: dict[str, dict[int, list[dict]]] = {}
    for r in rows:
        for key in (r["category"], "overall"):
            groups.setdefault(key, {}).setdefault(r["objects"], []).append(r)
    return {c: {k: _means(groups[c][k]) for k in sorted(groups[c])} for c in (*_categories(rows), "overall")}


def form_group(row: dict) -> str | None:
    """A scored row's `FORM_GROUPS` key: "lone" for an object edit in a one-object scene, else its form; None when
    the instruction names no object (or the row predates the "form" field)."""
    if not row.get("form"):
        return None
    return "lone" if row["objects"] == 1 else row["form"]


def by_form(rows: Iterable[dict]) -> dict[str, dict[str, dict]]:
    """The metrics of object edits (remove, replace, recolor, resize) per category and overall, split by how the
    instruction names the object (`FORM_GROUPS`: alone in its scene, or among others by shape, colour and shape,
    or shape and cell)."""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        group = form_group(r)
        if group is not None:
            for key in (r["category"], "overall"):
                groups.setdefault(key, {}).setdefault(group, []).append(r)
    if not groups:
        return {}
    cats = [c for c in _categories([r for r in rows if form_group(r)]) if c in groups] + ["overall"]
    return {c: {FORM_GROUPS[g]: _means(groups[c][g]) for g in FORM_GROUPS if g in groups[c]} for c in cats}


def _categories(rows: list[dict]) -> list[str]:
    """The categories present in `rows`, in the spec's order (unknown ones after, by name)."""
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted({r["category"] for r in rows}, key=lambda c: (order.get(c, len(order)), c))


def summarize(rows: Iterable[dict]) -> dict:
    """Per-category and overall (over all rows) means of the four metrics, with counts."""
    rows = list(rows)
    summary = {c: _means([r for r in rows if r["category"] == c]) for c in _categories(rows)}
    summary["overall"] = _means(rows)
    return summary
