"""The judge's verdict on one edit, as plain numbers: shared by the CLI, evaluation and the app."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from .images import load_image, pil_to_tensor
from .judges import Judge, Question, change_questions, free_question, keep_questions, training_questions


@dataclass
class Verdict:
    """P(Yes) and Yes-minus-No margin for each question, and the two headline numbers."""

    p_edit: float  # P(edit done); for removals 1 - P(object still present)
    p_identity: float | None  # P(Yes) of the identity check
    questions: list[dict]  # {"kind", "text", "images", "expected", "p_yes", "margin"}
    p_keep: float | None = None  # the lowest P(Yes) of the keep checks (the object most likely lost); None: none asked
    # the lowest P(expected answer) of the change checks (Yes for a `new` object, No for a `gone` one); None: none asked
    p_change: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _pixels01(image) -> torch.Tensor:
    """Any image input -> (1, 3, H, W) in [0, 1]."""
    return (pil_to_tensor(load_image(image)).unsqueeze(0) + 1) / 2


@torch.no_grad()
def judge_edit(judge: Judge, reference, edited, instruction: str, *, edit_type: str = "edit",
               object_name: str | None = None, extra: list[str] = (), keep: Sequence[str] = (),
               new: Sequence[str] = (), gone: Sequence[str] = ()) -> Verdict:
    """Ask the edit and identity checks (plus a keep check per object named in `keep`, a change check per object
    named in `new` (expected there) or `gone` (expected not there), and free-form `extra` questions) about one
    (reference, edited) pair."""
    questions: list[Question] = training_questions(instruction, edit_type, object_name, identity=True, kept=keep)
    removed = object_name if edit_type == "remove" else None
    for checks, used in (keep_questions(keep, len(keep), removed=removed),
                         change_questions(new, gone, len(new) + len(gone), removed=removed)):
        questions += [q for q, u in zip(checks, used) if u]
    questions += [free_question(text) for text in extra if text.strip()]
    device = next(judge.parameters()).device
    out = judge.answer(_pixels01(reference).to(device), _pixels01(edited).to(device), [questions])
    p_yes, margin = out.p_yes[0].tolist(), out.margin[0].tolist()
    rows = [{"kind": q.kind, "text": q.text, "images": list(q.images), "expected": q.expected,
             "p_yes": p, "margin": m} for q, p, m in zip(questions, p_yes, margin)]
    edit_row = next(r for r in rows if r["kind"] in ("edit", "contains"))
    p_edit = 1.0 - edit_row["p_yes"] if edit_row["kind"] == "contains" else edit_row["p_yes"]
    identity = [r["p_yes"] for r in rows if r["kind"] == "identity"]
    keep_p = [r["p_yes"] for r in rows if r["kind"] == "keep"]
    change_p = [r["p_yes"] if r["expected"] == "Yes" else 1 - r["p_yes"] for r in rows if r["kind"] == "change"]
    return Verdict(p_edit=p_edit, p_identity=identity[0] if identity else None, questions=rows,
                   p_keep=min(keep_p) if keep_p else None, p_change=min(change_p) if change_p else None)
