"""Z-Image family: `ZImageTransformer2DModel` (omni mode for the student), Qwen3 text encoder, AutoencoderKL.

Native convention: the transformer's time is 1 at the clean end (t_native = 1 - t) and it
predicts the negated velocity. A student sees the reference latent as a clean frame in one of two
layouts (its config's `reference_layout`; only the target is read out):
- "omni" (what our trainer builds): the transformer's own omni mode, the instruction wrapped around
  the reference in the editing chat layout, per-image noise mask 0 = clean reference, 1 = noisy target;
- "frames": reference and target as frames 0 and 1 of one latent video, both on the same spatial
  positions, the reference's tokens modulated at the clean time and the target's at t, the instruction
  as a plain chat prompt after them: the layout of the authors' re-implementation, whose released
  checkpoint `python -m npedit import-reimpl` converts (`NPEditZImageTransformer2DModel` records it).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
# ModelMixin is unused here on purpose: DiffusionPipeline decides how to load a component named
# ["npedit.backbones.zimage", ...] in model_index.json by looking up its base classes in this module.
from diffusers import ModelMixin, ZImageTransformer2DModel  # noqa: F401
from diffusers.configuration_utils import register_to_config
from transformers import AutoModel, AutoTokenizer

from ..folders import check_size, locate
from .base import Backbone, SizeChecked, check_transformer, onload, resolve_subfolder
from .vae import AnyVAE, LatentCodec

MAX_PROMPT_TOKENS = 512

# Qwen chat layout the transformer was trained on; the editing layout wraps the reference image.
_T2I_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
_EDIT_SEGMENTS = (
    "<|im_start|>user\n<|vision_start|>",
    "<|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n<|vision_start|>",
    "<|vision_end|><|im_end|>",
)
# The "frames" layout's instruction: Qwen3's chat template with thinking switched off (an empty think block),
# as the re-implementation encodes it.
_FRAMES_TEMPLATE = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
REFERENCE_LAYOUTS = ("omni", "frames")
SEQ_MULTIPLE = 32  # Z-Image pads its image and caption token runs to multiples of this


class NPEditZImageTransformer2DModel(SizeChecked, ZImageTransformer2DModel):
    """`ZImageTransformer2DModel` that records how it sees a reference (`reference_layout`, see the module).

    Its weights are the plain class's; without a reference it is the plain text-to-image forward, so diffusers
    can load and run it (model_index.json: ["npedit.backbones.zimage", "NPEditZImageTransformer2DModel"]).
    """

    # The signature repeats ZImageTransformer2DModel's: diffusers builds models from config keys it reads here.
    @register_to_config
    def __init__(
        self,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=16,
        dim=3840,
        n_layers=30,
        n_refiner_layers=2,
        n_heads=30,
        n_kv_heads=30,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=2560,
        siglip_feat_dim=None,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=(32, 48, 48),
        axes_lens=(1024, 512, 512),
        reference_layout: str = "frames",
    ) -> None:
        if reference_layout not in REFERENCE_LAYOUTS:
            raise ValueError(f"reference_layout must be one of {REFERENCE_LAYOUTS}, got {reference_layout!r}")
        super().__init__(
            all_patch_size=all_patch_size, all_f_patch_size=all_f_patch_size, in_channels=in_channels, dim=dim,
            n_layers=n_layers, n_refiner_layers=n_refiner_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
            norm_eps=norm_eps, qk_norm=qk_norm, cap_feat_dim=cap_feat_dim, siglip_feat_dim=siglip_feat_dim,
            rope_theta=rope_theta, t_scale=t_scale, axes_dims=list(axes_dims), axes_lens=list(axes_lens),
        )


def reference_layout(transformer) -> str:
    """The reference layout a Z-Image transformer was trained with ("omni" unless its config says otherwise)."""
    return getattr(transformer.config, "reference_layout", "omni")


def _padded(n: int) -> int:
    """`n` rounded up to a multiple of SEQ_MULTIPLE."""
    return n + (-n) % SEQ_MULTIPLE


def frames_forward(transformer, reference, x_t, t_native, captions):
    """The "frames" layout: native output (B, C, h, w) for the target frame.

    reference, x_t: (B, C, h, w) latents (clean reference, noisy target); t_native (B,) at Z-Image's convention;
    captions: one (L_i, D) instruction embedding per sample. Each sample's image tokens (reference frame, then
    target frame, padded to a multiple of 32 with the pad token, the padding masked out) and caption tokens (padded
    likewise, masked likewise) sit at RoPE positions (L_pad + 1 + frame, row, column) and (1 ... L_pad, 0, 0);
    only the reference frame's tokens are modulated at the clean time.
    """
    tf = transformer
    p, fp = tf.all_patch_size[0], tf.all_f_patch_size[0]
    if fp != 1:
        raise ValueError(f"the frames layout puts reference and target on frames of their own: f_patch_size must "
                         f"be 1, got {fp}")
    key = f"{p}-{fp}"

    def run(layer, *args):
        """One block, under gradient checkpointing when the transformer has it on (as its own forward does)."""
        if torch.is_grad_enabled() and tf.gradient_checkpointing:
            return tf._gradient_checkpointing_func(layer, *args)
        return layer(*args)

    batch, channels, h, w = x_t.shape
    rows, cols = h // p, w // p
    per_frame = rows * cols
    n_img = 2 * per_frame
    img_len = _padded(n_img)
    device, dtype = x_t.device, x_t.dtype
    # Patchify both frames: (B, C, 2, h, w) -> (B, 2 * rows * cols, p * p * C), frame-major, row-major.
    video = torch.stack([reference, x_t], dim=2)
    patches = video.reshape(batch, channels, 2, rows, p, cols, p).permute(0, 2, 3, 5, 4, 6, 1)
    patches = patches.reshape(batch, n_img, p * p * channels)
    x = tf.all_x_embedder[key](patches)
    x = torch.cat([x, tf.x_pad_token.to(dtype).expand(batch, img_len - n_img, -1)], dim=1)

    adaln_noisy = tf.t_embedder(t_native * tf.t_scale).type_as(x)
    adaln_clean = tf.t_embedder(torch.ones_like(t_native) * tf.t_scale).type_as(x)

    cap_lens = [len(c) for c in captions]
    cap_pads = [_padded(n) for n in cap_lens]
    # Image token positions: frame axis after the sample's own (padded) caption, then row and column.
    grid = torch.stack(torch.meshgrid(torch.arange(2), torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    grid = grid.reshape(n_img, 3).to(device)
    img_pos = torch.zeros(batch, img_len, 3, dtype=torch.long, device=device)
    for i, pad in enumerate(cap_pads):
        img_pos[i, :n_img] = grid + torch.tensor([pad + 1, 0, 0], device=device)
    img_freqs = tf.rope_embedder(img_pos.reshape(-1, 3)).reshape(batch, img_len, -1)
    img_mask = torch.zeros(batch, img_len, dtype=torch.bool, device=device)
    img_mask[:, :n_img] = True
    noise_img = torch.ones(batch, img_len, dtype=torch.long, device=device)
    noise_img[:, :per_frame] = 0  # the reference frame: clean modulation

    for layer in tf.noise_refiner:
        x = run(layer, x, img_mask, img_freqs, None, noise_img, adaln_noisy, adaln_clean)

    # Captions: embedded, padded with the pad token to each one's multiple of 32, then to the batch's longest.
    cap_len = max(cap_pads)
    cap = torch.zeros(batch, cap_len, captions[0].shape[-1], dtype=dtype, device=device)
    cap_mask = torch.zeros(batch, cap_len, dtype=torch.bool, device=device)
    for i, c in enumerate(captions):
        cap[i, : len(c)] = c.to(dtype)
        cap_mask[i, : len(c)] = True
    cap = tf.cap_embedder(cap)
    cap = torch.where(cap_mask[..., None], cap, tf.cap_pad_token.to(cap.dtype))
    cap_pos = torch.zeros(cap_len, 3, dtype=torch.long, device=device)
    cap_pos[:, 0] = torch.arange(1, cap_len + 1, device=device)
    cap_freqs = tf.rope_embedder(cap_pos)[None].expand(batch, -1, -1)
    for layer in tf.context_refiner:
        cap = run(layer, cap, cap_mask, cap_freqs)

    unified = torch.cat([x, cap], dim=1)
    freqs = torch.cat([img_freqs, cap_freqs], dim=1)
    mask = torch.cat([img_mask, cap_mask], dim=1)
    noise = torch.cat([noise_img, torch.ones(batch, cap_len, dtype=torch.long, device=device)], dim=1)
    for layer in tf.layers:
        unified = run(layer, unified, mask, freqs, None, noise, adaln_noisy, adaln_clean)
    out = tf.all_final_layer[key](unified, noise_mask=noise, c_noisy=adaln_noisy, c_clean=adaln_clean)
    target = out[:, per_frame:n_img].reshape(batch, rows, cols, p, p, tf.out_channels)
    return target.permute(0, 5, 1, 3, 2, 4).reshape(batch, tf.out_channels, h, w)


def transformer_class(path, subfolder: str | None, dtype=None) -> type[ZImageTransformer2DModel]:
    """The class a Z-Image transformer's config.json names (a local folder or a hub id: its config alone is read);
    `CheckpointError` when it is not a Z-Image transformer or is larger than its weights or memory allow."""
    named = check_transformer(path, subfolder, "zimage", dtype).get("_class_name")
    if named == NPEditZImageTransformer2DModel.__name__:
        return NPEditZImageTransformer2DModel
    return ZImageTransformer2DModel


class ZImageBackbone(Backbone):
    """Text encoder + VAE of a Z-Image checkpoint and the calling convention of its transformer."""

    family = "zimage"
    transformer_classes = (ZImageTransformer2DModel, NPEditZImageTransformer2DModel)
    text_encoder_classes = {"text_encoder": AutoModel}
    components = ("tokenizer", "text_encoder", "vae")
    title = "Z-Image"

    def __init__(self, text_encoder, tokenizer, vae, reference_layout: str = "omni", max_patches: int | None = None):
        super().__init__()
        self.max_patches = max_patches  # the transformer's RoPE table length along rows and columns (None: unknown)
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.codec = LatentCodec(vae.requires_grad_(False).eval())
        self.reference_layout = reference_layout  # how the student's instruction is encoded: its own layout

    @classmethod
    def from_components(cls, transformer=None, **components) -> "ZImageBackbone":
        """Build from loaded parts; the instruction layout follows the transformer's reference layout."""
        layout = reference_layout(transformer) if transformer is not None else "omni"
        patches = min(transformer.config.axes_lens[1:]) if transformer is not None else None
        return cls(**components, reference_layout=layout, max_patches=patches)

    def follow_student(self, student) -> None:
        """Encode instructions in the layout `student` was trained with."""
        self.reference_layout = reference_layout(student)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, torch_dtype: torch.dtype = torch.float32) -> "ZImageBackbone":
        """Load tokenizer, text encoder and VAE from a diffusers-layout folder or hub id."""
        path = locate(path)
        cls.check_folder(path)  # a part, its config, tokenizer files or weights missing: one line naming each
        # a config asking for a far larger model than its weights fails here, at once (a hub id: on its cached copy)
        encoder_class = cls.text_encoder_classes["text_encoder"]
        check_size(path, encoder_class, torch_dtype, "text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = encoder_class.from_pretrained(path, subfolder="text_encoder", dtype=torch_dtype,
                                                     use_safetensors=True)
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
        if self.reference_layout == "frames":
            return self._embed([_FRAMES_TEMPLATE.format(prompt=p) for p in prompts])
        flat = [seg.format(prompt=p) for p in prompts for seg in _EDIT_SEGMENTS]
        emb = self._embed(flat)
        n = len(_EDIT_SEGMENTS)
        return [emb[i * n:(i + 1) * n] for i in range(len(prompts))]

    # ---- latents ---------------------------------------------------------------------------
    @property
    def pixel_multiple(self) -> int:
        return self.codec.downsample * 2  # patch size 2

    @property
    def max_side(self) -> int | None:
        """Z-Image's rotary table holds `axes_lens` positions along rows and columns (in patches): no larger."""
        return self.max_patches * self.pixel_multiple if self.max_patches else None

    # ---- transformers ----------------------------------------------------------------------
    def velocity(self, transformer, x_t, t, cond, reference=None):
        """v = eps - x0 from Z-Image's native output (-v at time 1 - t); x_t (B, C, h, w), t (B,)."""
        onload(transformer)  # under model offload: the frames layout calls its blocks, never its hooked forward
        dtype = transformer.x_pad_token.dtype  # the base's, never a trainable addition's (see sd3.base_dtype)
        t_native = (1.0 - t).float()  # kept in float32 (as diffusers' pipeline does): bf16 would round 1000 t by ~1
        frames = x_t.to(dtype).unsqueeze(2).unbind(0)  # B x (C, 1, h, w)
        if reference is None:
            out = transformer(list(frames), t_native, cond, return_dict=False)[0]
        elif reference_layout(transformer) == "frames":
            out = frames_forward(transformer, reference.to(dtype), x_t.to(dtype), t_native, cond)
            return -out.to(x_t.dtype)
        else:
            refs = reference.to(dtype).unsqueeze(2).unbind(0)
            batch = len(frames)
            out = transformer(
                [[r, x] for r, x in zip(refs, frames)], t_native, cond,
                siglip_feats=[None] * batch, image_noise_mask=[[0, 1]] * batch, return_dict=False,
            )[0]
        return -torch.stack(out).squeeze(2).to(x_t.dtype)

    def load_transformer(self, path, *, subfolder="transformer", for_student=False, torch_dtype=torch.float32):
        """Load a `ZImageTransformer2DModel` (or our subclass, when its config names it: a "frames" student)."""
        path = locate(path)  # offline: a hub id's cached snapshot, or one error at once
        subfolder = resolve_subfolder(path, subfolder)
        model_class = transformer_class(path, subfolder, torch_dtype)
        return model_class.from_pretrained(str(path), subfolder=subfolder, torch_dtype=torch_dtype, use_safetensors=True)

    @classmethod
    def prepare_student(cls, transformer, reference_mode="tokens"):
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
