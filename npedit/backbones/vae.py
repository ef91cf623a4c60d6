"""Pixels <-> scaled latents through a diffusers VAE, using the scale/shift in its config."""

from __future__ import annotations

import torch
from torch import nn


class LatentCodec(nn.Module):
    """Wraps a diffusers `AutoencoderKL`: z = (mode(E(x)) - shift) * scale and back."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.scale = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        self.channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f)."""
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        return (dist.mode() - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, h*f, w*f) in about [-1, 1]; keeps the graph for VLM gradients."""
        z = latents / self.scale + self.shift
        return self.vae.decode(z.to(self.vae.dtype)).sample
