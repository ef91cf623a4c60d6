"""The judge loss on Yes/No answers (method.md section 5.4)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def vlm_sample_losses(
    logits: torch.Tensor,
    vocab_logprobs: torch.Tensor,
    expected_yes: torch.Tensor,
    *,
    question_mask: torch.Tensor | None = None,
    mode: Literal["yes_no", "full_vocab"] = "yes_no",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's loss (B,), the mean over its own questions (see `vlm_loss`), and the (B, Q) margins of the
    expected answer's logit over the other's."""
    sign = expected_yes.to(logits.dtype) * 2 - 1  # +1 expects Yes, -1 expects No
    margin = (logits[..., 1] - logits[..., 0]).float() * sign  # (B, Q)
    if mode == "yes_no":
        per_q = -F.logsigmoid(temperature * margin)
    elif mode == "full_vocab":
        per_q = -torch.where(expected_yes, vocab_logprobs[..., 1], vocab_logprobs[..., 0]).float()
    else:
        raise ValueError(f"mode must be 'yes_no' or 'full_vocab', got {mode!r}")
    if question_mask is None:
        return per_q.mean(dim=1), margin
    used = question_mask.to(per_q.dtype)
    return (per_q * used).sum(dim=1) / used.sum(dim=1).clamp_min(1.0), margin


def vlm_loss(
    logits: torch.Tensor,
    vocab_logprobs: torch.Tensor,
    expected_yes: torch.Tensor,
    *,
    weight: torch.Tensor | None = None,
    question_mask: torch.Tensor | None = None,
    mode: Literal["yes_no", "full_vocab"] = "yes_no",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, dict]:
    """Mean over questions of -log sigmoid(T (l_expected - l_other)) ("yes_no", binary CE on the
    Yes-minus-No logit difference) or of -log p_vocab(expected) ("full_vocab", the ablation).

    logits, vocab_logprobs: (B, Q, 2) with index 0 = No, 1 = Yes; expected_yes: (B, Q) bool;
    weight: optional (B,) per-sample weight (0 drops a sample, e.g. "do nothing" samples);
    question_mask: optional (B, Q) bool, False for padding slots (a sample's mean runs over its own questions).
    """
    per_sample, margin = vlm_sample_losses(logits, vocab_logprobs, expected_yes, question_mask=question_mask,
                                           mode=mode, temperature=temperature)
    if weight is None:
        loss = per_sample.mean()
    else:
        loss = (per_sample * weight).sum() / weight.sum().clamp_min(1.0)
    p_expected = torch.sigmoid(margin.detach())
    if question_mask is not None:
        p_expected = p_expected[question_mask.bool()]
    metrics = {"vlm_loss": loss.detach(), "vlm_p_expected": p_expected.mean()}
    return loss, metrics
