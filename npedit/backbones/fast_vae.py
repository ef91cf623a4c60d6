"""A fast autoencoder that works at latent resolution only, distilled into an existing VAE's latent space.

`PatchAutoencoder` folds each f x f pixel patch into channels (pixel unshuffle), runs a few 3x3
convolutions on the latent grid and unfolds back (pixel shuffle): apart from one thin layer at half
resolution, no layer runs above latent resolution, so encoding and decoding cost a fraction of an
`AutoencoderKL`'s. The decoder ends in a per-position head (1x1 convolutions, `head` wide) and, with
`refine` > 0, unfolds in two steps with a thin 3x3 convolution in between, which smooths the seams
between neighbouring patches (edges of shapes crossing a patch border). It is trained
(`python -m npedit shapes fast-vae`) to reproduce a given VAE's *scaled* latents and to decode
them to the true images, so a pipeline can swap its VAE for it without retraining anything else
(`python -m npedit swap-vae`). Its config therefore carries scaling_factor 1 and shift_factor 0.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import nn


class _Residual(nn.Module):
    """x + relu(conv3x3(x)): one cheap layer that keeps gradients flowing through a deep stack."""

    def __init__(self, width: int):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.conv(x))


class PatchAutoencoder(ModelMixin, ConfigMixin):
    """Pixels (B, 3, H, W) in [-1, 1] <-> latents (B, C, H/f, W/f), every layer at latent resolution."""

    @register_to_config
    def __init__(self, in_channels: int = 3, out_channels: int = 3, latent_channels: int = 4, downsample: int = 4,
                 width: int = 64, depth: int = 3, head: int = 0, refine: int = 0, scaling_factor: float = 1.0,
                 shift_factor: float = 0.0, sample_size: int = 64):
        super().__init__()
        if downsample < 1 or width < 1 or depth < 0 or head < 0 or refine < 0:
            raise ValueError(f"downsample and width must be >= 1, depth, head and refine >= 0; got {downsample}, "
                             f"{width}, {depth}, {head}, {refine}")
        if refine and downsample % 2:
            raise ValueError(f"refine needs an even downsample, got {downsample}")
        patch = downsample * downsample
        self.encoder = nn.Sequential(
            nn.PixelUnshuffle(downsample), nn.Conv2d(in_channels * patch, width, 1), nn.ReLU(),
            *[_Residual(width) for _ in range(depth)], nn.Conv2d(width, latent_channels, 3, padding=1))
        layers = [nn.Conv2d(latent_channels, width, 3, padding=1), nn.ReLU(), *[_Residual(width) for _ in range(depth)]]
        if head:
            layers += [nn.Conv2d(width, head, 1), nn.ReLU()]
        feat = head or width
        if refine:  # unfold to half resolution, one thin 3x3 layer across patch seams, then the rest
            rest = downsample // 2
            layers += [nn.Conv2d(feat, refine * 4, 1), nn.PixelShuffle(2), nn.ReLU(),
                       nn.Conv2d(refine, refine, 3, padding=1), nn.ReLU(),
                       nn.Conv2d(refine, out_channels * rest * rest, 1), nn.PixelShuffle(rest)]
        else:
            layers += [nn.Conv2d(feat, out_channels * patch, 1), nn.PixelShuffle(downsample)]
        self.decoder = nn.Sequential(*layers)

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (B, {channels}, H, W), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """(B, 3, H, W) in [-1, 1] -> latents (B, C, H/f, W/f); H and W must be multiples of f."""
        self._check(x, self.config.in_channels, "pixels")
        f = self.config.downsample
        if x.shape[-1] % f or x.shape[-2] % f:
            raise ValueError(f"image sides must be multiples of {f}, got {tuple(x.shape[-2:])}")
        z = self.encoder(x)
        return AutoencoderTinyOutput(latents=z) if return_dict else (z,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        """Latents (B, C, h, w) -> (B, 3, h*f, w*f), about [-1, 1]; differentiable (NP-Edit's judge reads it)."""
        self._check(z, self.config.latent_channels, "latents")
        x = self.decoder(z)
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: torch.Tensor, return_dict: bool = True):
        rec = self.decode(self.encode(x).latents).sample
        return DecoderOutput(sample=rec) if return_dict else (rec,)
