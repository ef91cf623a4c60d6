"""Z-Image family: `ZImageTransformer2DModel` (omni mode for the student), Qwen3 text encoder, AutoencoderKL.

Native convention: the transformer's time is 1 at the clean end (t_native = 1 - t) and it
predicts the negated velocity. The student sees the reference latent as a clean frame through
the transformer's omni mode (per-image noise mask: 0 = clean reference, 1 = noisy target);
only the target is read out.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from diffusers import ZImageTransformer2DModel
from transformers import AutoModel, AutoTokenizer

from .base import Backbone, resolve_subfolder
from .vae import AnyVAE, LatentCodec

MAX_PROMPT_TOKENS = 512

# Qwen chat layout the transformer was trained on; the editing layout wraps the reference image.
_T2I_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
_EDIT_SEGMENTS = (
    "<|im_start|>user\n<|vision_start|>",
    "<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>",
    "<|vision_end|><|im_end|>",
)


class ZImageBackbone(Backbone):
    """Text encoder + VAE of a Z-Image checkpoint and the calling convention of its transformer."""

    family = "zimage"
    transformer_classes = (ZImageTransformer2DModel,)

    def __init__(self, text_encoder, tokenizer, vae):
        super().__init__()
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.codec = LatentCodec(vae.requires_grad_(False).eval())

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, torch_dtype: torch.dtype = torch.float32) -> "ZImageBackbone":
        """Load tokenizer, text encoder and VAE from a diffusers-layout folder or hub id."""
        path = str(path)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = AutoModel.from_pretrained(path, subfolder="text_encoder", dtype=torch_dtype)
        vae = AnyVAE.from_pretrained(path, subfolder="vae", torch_dtype=torch_dtype)
        return cls(text_encoder, tokenizer, vae)

    # ---- text ------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, texts: list[str]) -> list[torch.Tensor]:
        """Second-to-last hidden states of each text, without padding: list of (L_i, D)."""
        enc = self.tokenizer(
            texts, padding="longest", max_length=MAX_PROMPT_TOKENS, truncation=True, return_tensors="pt",
        )
        device = self.text_encoder.device
        ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device).bool()
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
        return [h[m] for h, m in zip(hidden, mask)]

    def encode_prompt(self, prompts: list[str], *, with_reference: bool):
        """T2I: list of (L, D) per prompt; editing: list of per-prompt segment lists (reference, target, end)."""
        if not with_reference:
            return self._embed([_T2I_TEMPLATE.format(prompt=p) for p in prompts])
        flat = [seg.format(prompt=p) for p in prompts for seg in _EDIT_SEGMENTS]
        emb = self._embed(flat)
        n = len(_EDIT_SEGMENTS)
        return [emb[i * n:(i + 1) * n] for i in range(len(prompts))]

    # ---- latents ---------------------------------------------------------------------------
    @property
    def pixel_multiple(self) -> int:
        return self.codec.downsample * 2  # patch size 2

    # ---- transformers ----------------------------------------------------------------------
    def velocity(self, transformer, x_t, t, cond, reference=None):
        """v = eps - x0 from Z-Image's native output (-v at time 1 - t); x_t (B, C, h, w), t (B,)."""
        dtype = next(transformer.parameters()).dtype
        t_native = (1.0 - t).to(dtype)
        frames = x_t.to(dtype).unsqueeze(2).unbind(0)  # B x (C, 1, h, w)
        if reference is None:
            out = transformer(list(frames), t_native, cond, return_dict=False)[0]
        else:
            refs = reference.to(dtype).unsqueeze(2).unbind(0)
            batch = len(frames)
            out = transformer(
                [[r, x] for r, x in zip(refs, frames)], t_native, cond,
                siglip_feats=[None] * batch, image_noise_mask=[[0, 1]] * batch, return_dict=False,
            )[0]
        return -torch.stack(out).squeeze(2).to(x_t.dtype)

    def load_transformer(self, path, *, subfolder="transformer", for_student=False, torch_dtype=torch.float32):
        """Load a `ZImageTransformer2DModel`; the student needs nothing extra (omni mode is built in)."""
        return ZImageTransformer2DModel.from_pretrained(
            str(path), subfolder=resolve_subfolder(path, subfolder), torch_dtype=torch_dtype
        )

    def prepare_student(self, transformer, reference_mode="tokens"):
        if reference_mode != "tokens":  # Z-Image's omni mode sees the reference as tokens, as it was trained
            raise ValueError(f"the Z-Image family sees the reference as tokens only, not {reference_mode!r}")
        return copy.deepcopy(transformer).requires_grad_(True).train()

    def save_pretrained(self, directory):
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory / "tokenizer")
        self.text_encoder.save_pretrained(directory / "text_encoder")
        self.codec.vae.save_pretrained(directory / "vae")

    def pipeline_components(self):
        return {"vae": self.codec.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
