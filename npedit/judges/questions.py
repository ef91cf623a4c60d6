"""The Yes/No questions the judge is asked about each edit (method.md section 5.4), in our own words."""

from __future__ import annotations

from typing import Sequence

import torch

from npedit.edit_types import edit_type_name
from npedit.judges.base import Answer, ImageRole, Question

PAIR = ("reference", "edited")
ANSWER_FORMAT = "Answer with Yes or No."
# Every two-image question opens by saying which image is which.
PAIR_INTRO = (
    "You are reviewing an image edit. The first image is the original and the second image is the edited version."
)


def edit_question(instruction: str) -> Question:
    """Was `instruction` carried out in the edited image? Identical images must be answered No."""
    text = (
        f'{PAIR_INTRO} The instruction was: "{instruction}". '
        "Has this instruction been carried out in the second image? "
        f"If the two images are identical, the answer is No. {ANSWER_FORMAT}"
    )
    return Question(text, PAIR, "Yes", "edit")


def identity_question(instruction: str) -> Question:
    """Apart from what `instruction` asks to change, is the edited image the same as the reference?"""
    text = (
        f'{PAIR_INTRO} The instruction was: "{instruction}". '
        "Leaving aside only what the instruction asks to change, is the second image the same as the first: "
        f"every other object, colour, size, position and the background? {ANSWER_FORMAT}"
    )
    return Question(text, PAIR, "Yes", "identity")


def removal_identity_question(object_name: str) -> Question:
    """Ignoring the removed object, does everything else, layout included, match exactly?"""
    text = (
        f"{PAIR_INTRO} The edit removed this object: {object_name}. "
        "Ignoring that object, does everything else in the second image match the first exactly, "
        f"including the layout and the positions of all remaining objects? {ANSWER_FORMAT}"
    )
    return Question(text, PAIR, "Yes", "identity")


def contains_question(object_name: str) -> Question:
    """One-image question on the edited image: does it contain `object_name`? (a removal expects No)."""
    text = f"Does this image contain the following object: {object_name}? {ANSWER_FORMAT}"
    return Question(text, ("edited",), "No", "contains")


def kept_question(object_name: str) -> Question:
    """The contains question about an object the edit must leave alone: expected Yes (kind "keep")."""
    return Question(contains_question(object_name).text, ("edited",), "Yes", "keep")


def _slots(questions: list[Question], slots: int, generator: torch.Generator | None,
           filler: Question) -> tuple[list[Question], list[bool]]:
    """Exactly `slots` questions and their mask: with more questions than slots, the first `slots` (or, given a
    `generator`, a random choice kept in order); unused slots repeat the first question (or `filler`), masked out."""
    if slots < 0:
        raise ValueError(f"slots must be >= 0, got {slots}")
    if generator is not None and 0 < slots < len(questions):  # (no draw when nothing is asked: same RNG stream)
        chosen = sorted(torch.randperm(len(questions), generator=generator)[:slots].tolist())
        questions = [questions[i] for i in chosen]
    questions = questions[:slots]
    used = [True] * len(questions)
    pad = questions[0] if questions else filler
    while len(questions) < slots:
        questions.append(pad)
        used.append(False)
    return questions, used


def _distinct(names: Sequence[str], skip: str | None = None) -> list[str]:
    out: list[str] = []
    for name in names:
        name = name.strip()
        if name and name != skip and name not in out:
            out.append(name)
    return out


def keep_questions(names: Sequence[str], slots: int, removed: str | None = None,
                   generator: torch.Generator | None = None) -> tuple[list[Question], list[bool]]:
    """Up to `slots` one-image checks that objects the edit must leave alone are still there.

    One `contains_question(name)` (expected Yes) per distinct name in `names`, in order; a name equal to
    the removed object's is skipped (the removal check asks the opposite). With more names than slots, the
    first `slots` are asked, or, given a `generator`, a random choice of them. Returns exactly `slots`
    questions and a mask: unused slots repeat the first question (or a placeholder) with mask False, so a
    batch stays a rectangular (B, Q) grid and the loss ignores them.
    """
    questions = [kept_question(name) for name in _distinct(names, skip=removed)]
    return _slots(questions, slots, generator, kept_question("anything"))


def change_question(object_name: str, present: bool) -> Question:
    """The contains question about an object the edit itself creates (expected Yes) or must make disappear
    (expected No), kind "change"."""
    return Question(contains_question(object_name).text, ("edited",), "Yes" if present else "No", "change")


def change_questions(new: Sequence[str], gone: Sequence[str], slots: int, removed: str | None = None,
                     generator: torch.Generator | None = None) -> tuple[list[Question], list[bool]]:
    """Up to `slots` one-image checks of the edit's own result: "does the edited image contain <name>?",
    expected Yes for each distinct object name the edit creates (`new`: the recoloured, replaced, resized or
    added object) and No for each one it must make disappear (`gone`: the old name of a recoloured or replaced
    object, when no other object keeps it). A `gone` name equal to the removed object's is skipped (the
    removal check already asks it), as is a name listed on both sides. Slots, random choice and mask as in
    `keep_questions`.
    """
    yes = _distinct(new)
    no = [n for n in _distinct(gone, skip=removed) if n not in yes]
    questions = [change_question(n, True) for n in yes] + [change_question(n, False) for n in no]
    return _slots(questions, slots, generator, change_question("anything", True))


def questions_quoting(text: str, instruction: bool) -> list[Question]:
    """The questions whose text quotes `text`: an instruction's edit and identity checks, or an object name's
    contains check and removal identity check (the longest prompts that text is asked in)."""
    if instruction:
        return [edit_question(text), identity_question(text)]
    return [contains_question(text), removal_identity_question(text)]


def free_question(text: str, images: Sequence[ImageRole] = PAIR, expected: Answer = "Yes") -> Question:
    """A free-form Yes/No question (e.g. typed in the app), asked verbatim."""
    return Question(text, tuple(images), expected, "extra")


def training_questions(
    instruction: str, edit_type: str, object_name: str | None = None, *, identity: bool = True,
    kept: Sequence[str] = (),
) -> list[Question]:
    """The questions of one training sample: edit check (contains-check for removals), then identity.

    A removal is checked with "does the edited image contain <object_name>?" (expected No), unless `kept`
    (names of objects the edit leaves in place) holds the same name: then another object answers that
    question Yes whatever the edit does, so the instruction's edit check and identity question are asked
    instead. The count depends only on `identity` (2 or 1), so a batch forms a rectangular (B, Q) grid.
    """
    edit_type = edit_type_name(edit_type)
    # text as typed (" red circle", the CLI's --object) asks what the app's or a CSV list's stripped text asks
    instruction, object_name = instruction.strip(), (object_name or "").strip() or None
    if edit_type == "remove":
        if not object_name:
            raise ValueError(
                f"edit_type 'remove' needs object_name (the removed object's name), got {object_name!r} "
                f"for instruction {instruction!r}"
            )
    if edit_type == "remove" and object_name not in _distinct(kept):
        check, keep = contains_question(object_name), removal_identity_question(object_name)
    else:
        check, keep = edit_question(instruction), identity_question(instruction)
    return [check, keep] if identity else [check]
