"""Flow-matching regression: critic updates, identity warm-up and paired SFT all use it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import flow


def flow_matching_loss(v_pred: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """|| v_pred - (eps - x0) ||^2 averaged; v_pred was predicted at x_t = (1 - t) x0 + t eps."""
    loss = F.mse_loss(v_pred.float(), flow.velocity_target(x0, eps).float())
    return loss, {"fm_loss": loss.detach()}
