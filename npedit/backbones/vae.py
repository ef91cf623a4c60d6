"""Pixels <-> scaled latents through a diffusers VAE, using the scale/shift in its config."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from .base import onload

# The VAE classes a checkpoint's vae/config.json may name (no other class is ever imported).
VAE_CLASSES = {
    "AutoencoderKL": ("diffusers", "AutoencoderKL"),
    "PatchAutoencoder": ("npedit.backbones.fast_vae", "PatchAutoencoder"),  # our fast distilled VAE
}


def vae_class(config: dict, folder: str | os.PathLike) -> type:
    """The class of `VAE_CLASSES` a VAE's config (of `folder`, for messages) names, AutoencoderKL if none;
    CheckpointError for another class or a transformers model."""
    from npedit.folders import CheckpointError

    name = config.get("_class_name", "AutoencoderKL" if "model_type" not in config else None)
    if name is None:
        raise CheckpointError(f"{folder} is not a VAE (a transformers model of type {config['model_type']!r}); "
                              f"supported VAE classes: {', '.join(VAE_CLASSES)}")
    if name not in VAE_CLASSES:
        raise CheckpointError(f"{folder}: unsupported VAE class {name!r}; supported: {', '.join(VAE_CLASSES)}")
    module, cls = VAE_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


class AnyVAE:
    """`from_pretrained` for whichever class of `VAE_CLASSES` the folder's config names (AutoencoderKL if none), or
    only the class `only` names (a recipe that trains that class)."""

    @staticmethod
    def from_pretrained(path: str | os.PathLike, subfolder: str | None = None, only: str | None = None,
                        **kwargs) -> nn.Module:
        from npedit.folders import CheckpointError, check_size, describe, locate, looks_local

        path = locate(path)  # offline: a hub id's cached snapshot, or one error at once
        kw = {"subfolder": subfolder} if subfolder else {}
        folder = Path(path, subfolder or "")
        if looks_local(path) and not (folder / "config.json").is_file():
            raise CheckpointError(f"{describe(folder)}: a VAE folder holds config.json and its weights")
        model_class = vae_class(AutoencoderKL.load_config(str(path), **kw), folder)
        if only is not None and model_class.__name__ != only:
            raise CheckpointError(f"{folder} holds a {model_class.__name__}, not the {only} this needs")
        check_size(path, model_class, kwargs.get("torch_dtype"), subfolder)
        return model_class.from_pretrained(str(path), **kw, **{"use_safetensors": True, **kwargs})


class LatentCodec(nn.Module):
    """Wraps a diffusers `AutoencoderKL` (or a `PatchAutoencoder`): z = (mode(E(x)) - shift) * scale and back."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        cfg = vae.config
        self.scale = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        self.channels = int(cfg.latent_channels)
        self.downsample = int(getattr(cfg, "downsample", 0) or 2 ** (len(cfg.block_out_channels) - 1))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, C, H/f, W/f)."""
        onload(self.vae)  # an offloaded VAE is on the CPU until then: the pixels must go where it runs
        anchor = next(self.vae.parameters())  # (diffusers' `.device` / `.dtype` walk every module: ~1 ms each)
        out = self.vae.encode(pixels.to(anchor.device, anchor.dtype))
        z = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latents
        return (z - self.shift) * self.scale

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, 3, h*f, w*f) in about [-1, 1]; keeps the graph for VLM gradients."""
        z = latents / self.scale + self.shift
        return self.vae.decode(z.to(next(self.vae.parameters()).dtype)).sample
