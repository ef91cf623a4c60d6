"""The judge's verdict on one edit, as plain numbers: shared by the CLI, evaluation and the app."""

from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .data import object_names
from .files import write_atomic
from .images import fit_image, load_image
from .judges import (Judge, Question, change_questions, edit_type_name, free_question, keep_questions,
                     training_questions)
from .pipeline import MAX_INSTRUCTION_CHARS

# tables show P(Yes) and margins to 1e-6, so they read as `python -m npedit judge` prints them (to 1e-5); files keep
# every digit
SHOWN_DECIMALS = 6
MAX_QUESTIONS = 32  # per edit: one judge pass holds a row per question (and the gradient maps one image copy each)


@dataclass
class Verdict:
    """P(Yes) and Yes-minus-No margin for each question, and the two headline numbers."""

    p_edit: float  # P(edit done); for removals 1 - P(object still present)
    p_identity: float | None  # P(Yes) of the identity check
    # {"kind", "text", "images", "expected", "p_yes", "margin", "p_yes_or_no"}: p_yes is over the two answers (as the
    # loss reads them, method.md 5.4), p_yes_or_no how much of the judge's full next-token distribution they hold
    questions: list[dict]
    p_keep: float | None = None  # the lowest P(Yes) of the keep checks (the object most likely lost); None: none asked
    # the lowest P(expected answer) of the change checks (Yes for a `new` object, No for a `gone` one); None: none asked
    p_change: float | None = None

    @property
    def score(self) -> float:
        """Sum over the questions of log P(the expected answer), from the margins (how best-of-N ranks edits)."""
        return sum(_log_sigmoid(q["margin"] if q["expected"] == "Yes" else -q["margin"]) for q in self.questions)

    def to_dict(self) -> dict:
        return asdict(self)

    def report(self, instruction: str) -> dict:
        """What `python -m npedit judge` prints and the app's Judge inspector saves: the instruction, the headline
        numbers and every question row."""
        return {"instruction": instruction, "p_edit": self.p_edit, "p_identity": self.p_identity,
                "p_keep": self.p_keep, "p_change": self.p_change, "questions": self.questions}


def _log_sigmoid(x: float) -> float:
    """log(1 / (1 + e^-x)), stable for large |x|: log P(Yes) for a Yes-minus-No margin x."""
    return -(max(-x, 0.0) + math.log1p(math.exp(-abs(x))))


def _pixels01(image) -> torch.Tensor:
    """Any image input -> (1, 3, H, W) in [0, 1], on the 8-bit grid."""
    # divided in place from the 8-bit array: through pil_to_tensor's [-1, 1] and back, a 12-MP photo held ~460 MB of
    # temporaries for its 144 MB of pixels (every judge rounds to the 8-bit grid first, so the values it sees match)
    arr = np.array(load_image(image), dtype=np.uint8)  # (H, W, 3), a writable copy torch can share
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float().div_(255)


def edit_questions(instruction: str, *, edit_type: str = "edit", object_name: str | None = None,
                   extra: Sequence[str] = (), keep: Sequence[str] = (), new: Sequence[str] = (),
                   gone: Sequence[str] = ()) -> list[Question]:
    """The questions asked about one edit: the edit and identity checks (a contains check for a removal), a keep
    check per object named in `keep`, a change check per object named in `new` (expected there) or `gone`
    (expected not there), and the free-form `extra` questions (expected Yes). An empty instruction is refused: the
    edit check would ask about nothing; a text longer than the editor's instruction limit, or more than
    `MAX_QUESTIONS` questions, is refused (a judge pass over them would take memory without bound). Object names
    may come as one string separated by ';' and `extra` as one string, a question per line (as in the CLI and the
    app); a plain string is never read letter by letter."""
    if instruction is not None and not isinstance(instruction, str):
        raise ValueError(f"the instruction must be text, got {type(instruction).__name__}")
    if not (instruction or "").strip():
        raise ValueError("the instruction is empty: give the one the edit followed, e.g. 'make the circle blue'")
    keep, new, gone = object_names(keep), object_names(new), object_names(gone)
    extra = extra.splitlines() if isinstance(extra, str) else list(extra)
    edit_type = edit_type_name(edit_type)
    for what, texts in (("the instruction", [instruction]), ("the removed object", [object_name or ""]),
                        ("an object to keep", keep), ("a new object", new), ("a gone object", gone),
                        ("an extra question", extra)):
        longest = max((len(t.strip()) for t in texts), default=0)  # (counted as the editor counts: stripped)
        if longest > MAX_INSTRUCTION_CHARS:
            raise ValueError(f"{what} has {longest} characters; at most {MAX_INSTRUCTION_CHARS} are accepted")
    questions: list[Question] = training_questions(instruction, edit_type, object_name, identity=True, kept=keep)
    removed = object_name if edit_type == "remove" else None
    for checks, used in (keep_questions(keep, len(keep), removed=removed),
                         change_questions(new, gone, len(new) + len(gone), removed=removed)):
        questions += [q for q, u in zip(checks, used) if u]
    questions += [free_question(text) for text in extra if text.strip()]
    if len(questions) > MAX_QUESTIONS:
        raise ValueError(f"{len(questions)} questions for one edit; at most {MAX_QUESTIONS} are asked at once: name "
                         "fewer objects or extra questions")
    return questions


def _verdict(questions: list[Question], p_yes: list[float], margin: list[float], p_yes_or_no: list[float]) -> Verdict:
    return verdict_from_rows([{"kind": q.kind, "text": q.text, "images": list(q.images), "expected": q.expected,
                               "p_yes": p, "margin": m, "p_yes_or_no": s}
                              for q, p, m, s in zip(questions, p_yes, margin, p_yes_or_no)])


def _yes_or_no(out) -> torch.Tensor:
    """(B, Q) full-vocabulary probability that the answer's first token is Yes or No."""
    return out.vocab_logprobs.float().exp().sum(-1)


def verdict_from_rows(rows: list[dict]) -> Verdict:
    """The headline numbers of a verdict from its question rows (kind, expected, p_yes, margin, ...)."""
    edit_row = next(r for r in rows if r["kind"] in ("edit", "contains"))
    p_edit = 1.0 - edit_row["p_yes"] if edit_row["kind"] == "contains" else edit_row["p_yes"]
    identity = [r["p_yes"] for r in rows if r["kind"] == "identity"]
    keep_p = [r["p_yes"] for r in rows if r["kind"] == "keep"]
    change_p = [r["p_yes"] if r["expected"] == "Yes" else 1 - r["p_yes"] for r in rows if r["kind"] == "change"]
    return Verdict(p_edit=p_edit, p_identity=identity[0] if identity else None, questions=rows,
                   p_keep=min(keep_p) if keep_p else None, p_change=min(change_p) if change_p else None)


@torch.no_grad()
def judge_edit(judge: Judge, reference, edited, instruction: str, *, edit_type: str = "edit",
               object_name: str | None = None, extra: list[str] = (), keep: Sequence[str] = (),
               new: Sequence[str] = (), gone: Sequence[str] = ()) -> Verdict:
    """Ask `edit_questions` about one (reference, edited) pair."""
    return judge_candidates(judge, reference, [edited], instruction, edit_type=edit_type, object_name=object_name,
                            extra=extra, keep=keep, new=new, gone=gone)[0]


@torch.no_grad()
def judge_candidates(judge: Judge, reference, candidates: Sequence, instruction: str, *, chunk: int = 8,
                     **questions) -> list[Verdict]:
    """Ask `edit_questions(instruction, **questions)` about each of several edits of one reference, `chunk`
    candidates per judge pass; the candidates must share one size."""
    asked = edit_questions(instruction, **questions)
    device = next(judge.parameters()).device
    edited = [_pixels01(c) for c in candidates]
    if not edited or len({tuple(e.shape) for e in edited}) != 1:
        raise ValueError(f"give one or more candidates of one size, got sizes {[tuple(e.shape[-2:]) for e in edited]}")
    ref = _pixels01(reference).to(device)
    verdicts = []
    for i in range(0, len(edited), chunk):
        part = torch.cat(edited[i:i + chunk]).to(device)
        out = judge.answer(ref, part, [asked] * len(part))  # one reference: its features once
        verdicts += [_verdict(asked, p, m, s)
                     for p, m, s in zip(out.p_yes.tolist(), out.margin.tolist(), _yes_or_no(out).tolist())]
    return verdicts


GRADIENT_MAX_SIDE = 1024  # gradient maps of a larger edited image are taken on a resized copy
# Question kinds NP-Edit trains on (the free-form extra questions of the inspector are not among them).
TRAINED_KINDS = ("edit", "contains", "identity", "keep", "change")


@dataclass
class AnswerGradients:
    """Where the judge's answers come from: how each answer's log-probability moves with the edited image's pixels.

    `grads[q]` is d log P(expected answer of question q) / d pixel of the edited image ((3, H, W), pixels in
    [0, 1]): adding a little of it makes the judge more sure of the expected answer. `training` is the mean of
    those over the questions NP-Edit trains on, i.e. the descent direction of its Yes/No loss (temperature 1)
    with respect to the edited image: the way the judge pushes an editor's output in training."""

    questions: list[dict]  # the Verdict rows of the same pair: kind, text, images, expected, p_yes, margin
    grads: np.ndarray  # (Q, 3, H, W) float32
    training: np.ndarray  # (3, H, W) float32; zeros when no trained question was asked
    image: Image.Image  # the edited image as differentiated (resized when it was larger than max_side)

    @property
    def verdict(self) -> Verdict:
        """The judge's verdict on the same pair, from the same pass."""
        return verdict_from_rows(self.questions)

    @staticmethod
    def magnitude(grad: np.ndarray) -> np.ndarray:
        """(H, W): the length over colour channels of a (3, H, W) gradient."""
        return np.sqrt((grad.astype(np.float64) ** 2).sum(axis=0)).astype(np.float32)

    def save(self, path) -> None:
        """Write an .npz of plain arrays (no pickle): `grads`, `training`, `image` ((H, W, 3) uint8) and
        `questions` (the rows as a JSON string)."""
        rgb = np.asarray(self.image.convert("RGB"), dtype=np.uint8)
        buf = io.BytesIO()  # then written whole (`write_atomic`): a Ctrl-C or a full disk keeps an earlier file
        np.savez_compressed(buf, grads=self.grads, training=self.training, image=rgb,
                            questions=np.array(json.dumps(self.questions)))
        write_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path) -> "AnswerGradients":
        """Read what `save` wrote (pickled objects refused)."""
        with np.load(path, allow_pickle=False) as f:
            missing = {"grads", "training", "image", "questions"} - set(f.files)
            if missing:
                raise ValueError(f"{path} is not a gradient-map file (missing {', '.join(sorted(missing))})")
            return cls(json.loads(str(f["questions"])), f["grads"], f["training"], Image.fromarray(f["image"]))


def answer_gradients(judge: Judge, reference, edited, instruction: str, *, max_side: int = GRADIENT_MAX_SIDE,
                     **questions) -> AnswerGradients:
    """Gradients of each answer of `edit_questions(instruction, **questions)` about (reference, edited) with
    respect to the edited image, taken at most `max_side` pixels on its longer side (a larger image is resized
    first; every judge sees less than that). Each question gets its own row of one judge pass (rows are
    independent, so one backward pass gives every question's gradient in its own copy of the image)."""
    asked = edit_questions(instruction, **questions)
    device = next(judge.parameters()).device
    ref = _pixels01(reference).to(device)
    picture = load_image(edited)
    if max(picture.size) > max_side:
        scale = max_side / max(picture.size)
        picture = fit_image(picture, (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))))
    image = _pixels01(picture).to(device).expand(len(asked), -1, -1, -1).clone().requires_grad_(True)
    with torch.enable_grad():
        out = judge.answer(ref, image, [[q] for q in asked])
        margin = out.margin[:, 0]
        sign = torch.tensor([1.0 if q.expected == "Yes" else -1.0 for q in asked], device=margin.device)
        torch.nn.functional.logsigmoid(sign * margin).sum().backward()
    grads = image.grad.detach().float().cpu().numpy()
    verdict = _verdict(asked, out.p_yes[:, 0].tolist(), margin.tolist(), _yes_or_no(out)[:, 0].tolist())
    trained = [i for i, q in enumerate(asked) if q.kind in TRAINED_KINDS]
    training = grads[trained].mean(axis=0) if trained else np.zeros_like(grads[0])
    return AnswerGradients(verdict.questions, grads, training, picture)
