"""Rectified-flow conventions, owned here and nowhere else (method.md section 2).

Time ``t`` lies in [0, 1] and ``t = 1`` is pure noise:
    x_t = (1 - t) x0 + t eps,    v = eps - x0,    x0 = x_t - t v,    eps = x_t + (1 - t) v.
Backbones with other native conventions convert inside their adapter.
"""

from __future__ import annotations

import torch

# More sampling steps than any schedule asks (a few-step editor: 4; a teacher baseline: tens): a typo like 100000000
# would build that many times and run for days instead of saying so.
MAX_SAMPLING_STEPS = 1000

# The default few-step grid: the uniform grid (1, .75, .5, .25) under time shift 6.
DEFAULT_SHIFT = 6.0
DEFAULT_STEPS = 4


def _bcast(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Reshape a scalar or (B,) time to broadcast against x of shape (B, ...)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        return t
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def shift_time(t: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """Static time shift t' = s t / (1 + (s - 1) t); s > 1 moves steps toward noise."""
    return shift * t / (1 + (shift - 1) * t)


def few_step_times(num_steps: int = DEFAULT_STEPS, shift: float = DEFAULT_SHIFT) -> list[float]:
    """The sampling times (without the final 0): uniform grid 1, 1 - 1/n, ... under `shift`."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return [float(shift_time(1.0 - i / num_steps, shift)) for i in range(num_steps)]


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps."""
    t = _bcast(t, x0)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The flow-matching regression target v = eps - x0."""
    return eps - x0


def x0_from_velocity(x_t: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """x0 = x_t - t v."""
    return x_t - _bcast(t, x_t) * v


def eps_from_velocity(x_t: torch.Tensor, t: torch.Tensor | float, v: torch.Tensor) -> torch.Tensor:
    """eps = x_t + (1 - t) v."""
    return x_t + (1 - _bcast(t, x_t)) * v


def velocity_from_x0(x_t: torch.Tensor, t: torch.Tensor | float, x0: torch.Tensor) -> torch.Tensor:
    """v = (x_t - x0) / t, the inverse of x0_from_velocity (t > 0)."""
    return (x_t - x0) / _bcast(t, x_t)


def sample_times(batch: int, low: float, high: float, *, generator=None, device=None) -> torch.Tensor:
    """t ~ U[low, high], shape (batch,)."""
    u = torch.rand(batch, generator=generator, device=device)
    return low + (high - low) * u


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Classifier-free guidance: uncond + s (cond - uncond); `scale` scalar or per sample (B,)."""
    return uncond + _bcast(scale, cond) * (cond - uncond)
