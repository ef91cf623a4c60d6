"""Distribution matching distillation loss (method.md section 5.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dmd_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """L = 0.5 mse(x, sg(x - g)), g = (x0_fake - x0_real) / mean|x - x0_real| per sample.

    x: (B, C, h, w) student output (with grad); x0_real: teacher's CFG prediction; x0_fake: critic's.
    The gradient of L w.r.t. x is exactly g / x.numel().
    """
    with torch.no_grad():
        dims = tuple(range(1, x.ndim))
        weight = (x - x0_real).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)  # (B, 1, 1, 1)
        g = torch.nan_to_num((x0_fake - x0_real) / weight)
        target = x - g
    loss = 0.5 * F.mse_loss(x.float(), target.float())
    return loss, {"dmd_loss": loss.detach(), "dmd_grad_abs": g.abs().mean()}
