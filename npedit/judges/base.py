"""The judge protocol: a frozen VLM answering Yes/No questions about (reference, edited) pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import nn

ImageRole = Literal["reference", "edited"]
Answer = Literal["Yes", "No"]


@dataclass(frozen=True)
class Question:
    """One Yes/No question: its text, which images it shows (in order) and the answer we train toward."""

    text: str
    images: tuple[ImageRole, ...]
    expected: Answer
    kind: str  # "edit", "identity", "contains", "keep" (an untouched object still there),
    # "change" (the edit's own result: a created object there, a replaced one gone) or "extra" (free-form)

    def __post_init__(self):
        if not self.images or any(r not in ("reference", "edited") for r in self.images):
            raise ValueError(f"images must be a non-empty tuple of 'reference'/'edited', got {self.images!r}")
        if self.expected not in ("Yes", "No"):
            raise ValueError(f"expected must be 'Yes' or 'No', got {self.expected!r}")


@dataclass
class JudgeOutput:
    """Answer-position scores for a (B, Q) grid of questions; index 0 is "No", index 1 is "Yes"."""

    logits: torch.Tensor  # (B, Q, 2) raw logits of the No and Yes tokens
    vocab_logprobs: torch.Tensor  # (B, Q, 2) log-softmax over the full vocabulary, at No and Yes

    @property
    def p_yes(self) -> torch.Tensor:
        """P(Yes) restricted to the two answers, (B, Q)."""
        return torch.softmax(self.logits.float(), dim=-1)[..., 1]

    @property
    def margin(self) -> torch.Tensor:
        """Yes-minus-No logit margin, (B, Q)."""
        return (self.logits[..., 1] - self.logits[..., 0]).float()


class Judge(nn.Module):
    """Base class of judge adapters (one file per VLM family).

    Images are float tensors (B, 3, H, W) in [0, 1]; the adapter resizes and normalises them
    with differentiable torch ops. All B x Q questions run in one forward pass; the reference
    image's vision features are computed without gradient.
    """

    def answer(
        self,
        reference: torch.Tensor,
        edited: torch.Tensor,
        questions: Sequence[Sequence[Question]],
    ) -> JudgeOutput:
        """Score `questions[b][q]` on the pair (reference[b], edited[b]); every row has the same length Q; a
        reference of batch 1 is the reference of every row."""
        raise NotImplementedError

    def control_token_in(self, text: str) -> str | None:
        """The first string in `text` that this judge reads as one of its control tokens rather than as text (an
        image placeholder, a turn's end); None when there is none. A question holding one is refused."""
        return None

    max_positions: int | None = None  # how many token positions a question's prompt may take; None: no limit known

    def text_lengths(self, texts: Sequence[str]) -> list[int]:
        """How many tokens the judge reads in each of `texts` on its own (a judge with `max_positions` says)."""
        raise NotImplementedError

    def prompt_length(self, question: Question, image_shape: tuple[int, int]) -> int:
        """Tokens in the whole prompt of `question` with images of (H, W) `image_shape` (with `max_positions`)."""
        raise NotImplementedError

    @torch.no_grad()
    def score(
        self, reference: torch.Tensor, edited: torch.Tensor, questions: Sequence[Sequence[Question]]
    ) -> list[list[float]]:
        """P(Yes) of each question as plain floats (B x Q), without gradient; for CLIs and the app."""
        return self.answer(reference, edited, questions).p_yes.tolist()
