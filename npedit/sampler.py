"""The one few-step sampler: training unroll, evaluation, CLI and app all call `sample`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch

from . import flow

# denoise(x_t (B, C, H, W), t (B,)) -> velocity (B, C, H, W), in the convention of npedit.flow.
Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepState:
    """What the sampler exposes after each step (passed to `callback`)."""

    step: int
    t: float
    x_t: torch.Tensor  # (B, C, H, W) the noisy state the denoiser saw
    x0: torch.Tensor  # (B, C, H, W) its prediction of the clean sample
    velocity: torch.Tensor  # (B, C, H, W)


Generators = torch.Generator | Sequence[torch.Generator] | None


def draw_noise(shape: Sequence[int], generator: Generators, device, dtype) -> torch.Tensor:
    """Standard Gaussian noise of `shape`, drawn where the generator lives (a CPU generator may drive a CUDA run),
    then moved; with a list of generators (one per sample), sample b's noise comes from generator b alone, so it
    does not depend on the rest of the batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}: give one per sample")
        return torch.cat([draw_noise((1, *shape[1:]), g, device, dtype) for g in generator])
    gen_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=gen_device).to(device, dtype)


def sample(
    denoise: Denoise,
    noise: torch.Tensor,
    times: Sequence[float],
    *,
    generator: Generators = None,
    renoise: Literal["fresh", "ode"] = "fresh",
    callback: Callable[[StepState], None] | None = None,
) -> torch.Tensor:
    """Run the few-step sampler from x_{times[0]} = noise and return the last predicted x0.

    Each step predicts x0 = x_t - t v, then moves to the next time by re-noising x0:
    with fresh Gaussian noise (``"fresh"``, DMD-style, method.md section 2) or with the
    noise implied by the prediction (``"ode"``, eps = x_t + (1 - t) v: an Euler step).
    Gradients flow through every step unless the caller disables them.
    """
    if len(times) == 0:
        raise ValueError("times must hold at least one value")
    x_t = noise
    x0 = noise
    batch = noise.shape[0]
    for i, t in enumerate(times):
        # float32 whatever the latents' dtype: bf16 would round the time (0.9474 -> 0.9492, 1000 (1 - t) off by ~2)
        t_vec = torch.full((batch,), float(t), device=noise.device, dtype=torch.float32)
        v = denoise(x_t, t_vec)
        x0 = flow.x0_from_velocity(x_t, t, v)
        if callback is not None:
            callback(StepState(step=i, t=float(t), x_t=x_t, x0=x0, velocity=v))
        if i + 1 < len(times):
            if renoise == "fresh":
                eps = draw_noise(noise.shape, generator, noise.device, noise.dtype)
            elif renoise == "ode":
                eps = flow.eps_from_velocity(x_t, t, v)
            else:
                raise ValueError(f"renoise must be 'fresh' or 'ode', got {renoise!r}")
            x_t = flow.add_noise(x0, eps, times[i + 1])
    return x0


def unroll_times(schedule: Sequence[float], two_step_prob: float, generator: torch.Generator | None = None) -> list[float]:
    """Times of the training unroll: [t0] or, with probability `two_step_prob`, [t0, t*] with t* interior."""
    if len(schedule) < 2 or two_step_prob <= 0:
        return [schedule[0]]
    u = torch.rand((), generator=generator).item()
    if u >= two_step_prob:
        return [schedule[0]]
    k = int(torch.randint(1, len(schedule), (), generator=generator).item())
    return [schedule[0], schedule[k]]
