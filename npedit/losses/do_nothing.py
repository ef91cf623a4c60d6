"""The "do nothing" regulariser: the output must equal the reference (method.md section 5.5)."""

from __future__ import annotations

import torch


def do_nothing_loss(x: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """mse(x, reference) over the samples where `mask` (B,) is true; zero when none is."""
    per_sample = (x.float() - reference.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    m = mask.to(per_sample.dtype)
    loss = (per_sample * m).sum() / x.shape[0]
    return loss, {"do_nothing_loss": loss.detach(), "do_nothing_frac": m.mean()}
