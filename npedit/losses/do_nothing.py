"""The "do nothing" regulariser: the output must equal the reference (method.md section 5.5)."""

from __future__ import annotations

import torch

from .target import masked_mse


def do_nothing_loss(x: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """mse(x, reference) over the samples where `mask` (B,) is true; zero when none is."""
    loss = masked_mse(x, reference, mask)
    return loss, {"do_nothing_loss": loss.detach(), "do_nothing_frac": mask.float().mean()}
