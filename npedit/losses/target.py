"""Target regression: the student's unrolled output toward a given result (an extension, off by default)."""

from __future__ import annotations

import torch


def masked_mse(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mse(x, y) (B,) summed over the samples where `mask` (B,) is true, divided by B."""
    per_sample = (x.float() - y.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    return (per_sample * mask.to(per_sample.dtype)).sum() / x.shape[0]


def target_loss(x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """mse(x, target) in latent space over the samples where `mask` (B,) is true, e.g. the judge's accepted
    edits (`edit --verdicts --min-score`); unlike flow matching on pairs, it trains the few-step unroll itself."""
    loss = masked_mse(x, target, mask)
    return loss, {"target_loss": loss.detach()}
