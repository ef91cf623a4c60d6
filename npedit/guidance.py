"""Teacher and critic predictions at a noisy state: the inputs of DMD (training) and of DMD maps (app)."""

from __future__ import annotations

import torch

from . import flow


def teacher_critic_x0(backbone, teacher, critic, x_t: torch.Tensor, t: torch.Tensor, cond_x, cond_neg,
                      cfg_scale: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 of the teacher (CFG against the negative prompt) and of the critic (no CFG) at (x_t, t), both on c^x."""
    v_real = flow.guided(backbone.velocity(teacher, x_t, t, cond_x), backbone.velocity(teacher, x_t, t, cond_neg),
                         cfg_scale)
    v_fake = backbone.velocity(critic, x_t, t, cond_x)
    return flow.x0_from_velocity(x_t, t, v_real), flow.x0_from_velocity(x_t, t, v_fake)
