"""SD3 family: `SD3Transformer2DModel` (MMDiT), one or two CLIPs (+ optional T5), AutoencoderKL.

Native convention. The diffusers SD3 pipeline passes `timestep = sigma * 1000` to the transformer
and hands its output to `FlowMatchEulerDiscreteScheduler.step`, which computes
`prev = x + (sigma_next - sigma) * out` on states noised by `scale_noise` as
`x_sigma = sigma * eps + (1 - sigma) * x0`. The exact ODE of that path is
`dx/dsigma = eps - x0`, so `out` is v = eps - x0 at t = sigma: our convention, with the time
scaled by 1000 and no sign change (its stochastic step `x0 = x - sigma * out` agrees).

The student sees the reference latent in one of two ways (`reference_mode` in its config):
- "tokens" (default): `NPEditSD3Transformer2DModel` patchifies it with the same patch embedding
  (same sin-cos positions as the target), adds a zero-initialised learned reference-type embedding
  and runs it in ONE sequence with the noisy target tokens; only target tokens are read out. All
  tokens share the time embedding of t (Kontext-style). Copying must be learned through attention.
- "channels": a second, zero-initialised patch projection of the reference is ADDED to each target
  token at the same position (the same as concatenating the reference to the input channels of the
  patch embedding, InstructPix2Pix-style). The sequence stays as long as the teacher's (no reference
  tokens), so each evaluation is cheaper, and copying a patch is a local path, not an attention look-up.
Both start exactly as the teacher (the reference has no effect until trained).

Optionally (`reference_encoder_layers` > 0 in its config) a small convolutional `ReferenceEncoder` over
the reference latent adds one vector per patch to what the student sees of the reference (its tokens,
or its per-patch projection). Its receptive field spans a neighbourhood of patches, so each reference
token can carry the shape of the object it belongs to, which a token made from one patch does not see;
its output is zero at init (a zero projection, or with `reference_encoder_gated` a normalised projection behind a
zero gate), so adding it to a trained student changes nothing until trained.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
# ModelMixin is unused here on purpose: DiffusionPipeline decides how to load a component named
# ["npedit.backbones.sd3", "NPEditSD3Transformer2DModel"] by looking up base-class names in this module.
from diffusers import AutoencoderKL, ModelMixin, SD3Transformer2DModel  # noqa: F401
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from ..config import REFERENCE_MODES
from ..folders import check_size, locate
from .base import Backbone, SizeChecked, check_transformer, resolve_subfolder, set_config
from .vae import AnyVAE, LatentCodec

T_SCALE = 1000.0  # SD3's timestep is sigma * num_train_timesteps


@dataclass(frozen=True)
class SD3Cond:
    """Text conditioning of an SD3 transformer."""

    prompt_embeds: torch.Tensor  # (B, L_clip + L_t5, joint_attention_dim)
    pooled: torch.Tensor  # (B, pooled_projection_dim)


class ReferenceEncoder(nn.Module):
    """`layers` 3x3 convolutions (SiLU) over the reference latent, then a patch projection to one vector per patch:
    (B, C, h, w) -> (B, h/p * w/p, D), in the patch embedding's order.

    Output, either way zero at init (so adding the encoder to a trained student changes nothing):
    - plain (`gated=False`): the projection is zero-initialised. Its output grows only as fast as the projection's
      weights, so how far the student's reference tokens move depends on the lr (at the fine-tuning lr it stayed at
      1-3% of a token's norm; at 10x that it grew without bound).
    - gated (`gated=True`): the projection starts random, a LayerNorm (no affine) fixes each vector's size to
      sqrt(D), and a learnt per-channel gate, zero at init, scales it. The gate alone sets how much of the features
      the student sees, bounded by a token-sized vector at gate 1; the projection learns once the gate opens.
    """

    def __init__(self, in_channels: int, inner_dim: int, patch_size: int, layers: int, width: int,
                 gated: bool = False):
        super().__init__()
        convs: list[nn.Module] = []
        channels = in_channels
        for _ in range(layers):
            convs += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.SiLU()]
            channels = width
        self.body = nn.Sequential(*convs)
        self.proj = nn.Conv2d(channels, inner_dim, kernel_size=patch_size, stride=patch_size)
        self.gated = gated
        if gated:
            self.norm = nn.LayerNorm(inner_dim, elementwise_affine=False)
            self.gate = nn.Parameter(torch.zeros(inner_dim))
        else:
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)

    def tokens(self, reference: torch.Tensor) -> torch.Tensor:
        """The per-patch vectors before the gate (normalised when gated): (B, N, D)."""
        out = self.proj(self.body(reference)).flatten(2).transpose(1, 2)
        return self.norm(out) if self.gated else out

    def forward(self, reference: torch.Tensor) -> torch.Tensor:
        out = self.tokens(reference)
        return out * self.gate if self.gated else out  # (B, N, D)


class NPEditSD3Transformer2DModel(SizeChecked, SD3Transformer2DModel):
    """`SD3Transformer2DModel` plus a reference-type embedding; `forward(..., reference=latents)` edits.

    Without `reference` it is the plain SD3 forward, so diffusers pipelines can run it (load it
    from model_index.json as ["npedit.backbones.sd3", "NPEditSD3Transformer2DModel"]).
    """

    # The signature repeats SD3Transformer2DModel's: diffusers builds models from config keys it reads here.
    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 16,
        num_layers: int = 18,
        attention_head_dim: int = 64,
        num_attention_heads: int = 18,
        joint_attention_dim: int = 4096,
        caption_projection_dim: int = 1152,
        pooled_projection_dim: int = 2048,
        out_channels: int = 16,
        pos_embed_max_size: int = 96,
        dual_attention_layers: tuple[int, ...] = (),
        qk_norm: str | None = None,
        reference_mode: str = "tokens",
        reference_encoder_layers: int = 0,
        reference_encoder_width: int = 64,
        reference_encoder_gated: bool = False,
    ):
        if reference_mode not in REFERENCE_MODES:
            raise ValueError(f"reference_mode must be one of {REFERENCE_MODES}, got {reference_mode!r}")
        if reference_encoder_layers < 0 or reference_encoder_width < 1:
            raise ValueError(f"reference_encoder_layers must be >= 0 and reference_encoder_width >= 1, got "
                             f"{reference_encoder_layers} and {reference_encoder_width}")
        super().__init__(
            sample_size=sample_size, patch_size=patch_size, in_channels=in_channels, num_layers=num_layers,
            attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim, caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim, out_channels=out_channels,
            pos_embed_max_size=pos_embed_max_size, dual_attention_layers=dual_attention_layers, qk_norm=qk_norm,
        )
        if reference_mode == "tokens":
            # Zero at init: the student starts as the teacher with the reference tokens merely visible.
            self.ref_embed = nn.Parameter(torch.zeros(self.inner_dim))
        else:
            # Zero at init: the student starts as the teacher, blind to the reference.
            self.ref_proj = nn.Conv2d(in_channels, self.inner_dim, kernel_size=patch_size, stride=patch_size)
            nn.init.zeros_(self.ref_proj.weight)
            nn.init.zeros_(self.ref_proj.bias)
        if reference_encoder_layers:
            self.ref_encoder = ReferenceEncoder(in_channels, self.inner_dim, patch_size, reference_encoder_layers,
                                                reference_encoder_width, gated=reference_encoder_gated)

    takes_reference = True  # SD3Backbone.velocity refuses a reference for models without it (the plain teacher)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        *args,
        reference: torch.Tensor | None = None,
        **kwargs,
    ):
        """Plain SD3 forward, or with `reference` (B, C, h', w') clean latents joined as extra tokens."""
        if reference is None:
            return super().forward(hidden_states, encoder_hidden_states, pooled_projections, timestep, *args, **kwargs)
        return_dict = kwargs.pop("return_dict", True)
        if args or kwargs:
            raise ValueError(f"forward with a reference takes no other options, got {len(args)} args, {sorted(kwargs)}")
        return _forward_with_reference(self, hidden_states, reference, encoder_hidden_states, pooled_projections,
                                       timestep, return_dict)


def _forward_with_reference(model, x, reference, context, pooled, timestep, return_dict):
    """SD3 forward with the reference joined as tokens or added per patch (`reference_mode`); reads out the target."""
    if reference.shape[:2] != x.shape[:2]:
        raise ValueError(f"reference {tuple(reference.shape)} must match x_t {tuple(x.shape)} in batch and channels")
    patch = model.config.patch_size
    height, width = x.shape[-2:]
    dtype = base_dtype(model)  # the token stream runs in it, as the teacher's does
    target = model.pos_embed(x.to(dtype))  # (B, N, D) patchified + sin-cos positions
    n_target = target.shape[1]
    if model.config.reference_mode == "channels":
        if reference.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"reference {tuple(reference.shape)} must match x_t {tuple(x.shape)} in size "
                             "(reference_mode='channels' adds it patch by patch)")
        ref = _own_dtype(model.ref_proj, reference).flatten(2).transpose(1, 2)  # (B, N, D)
    else:
        # (B, M, D) the same positions, marked by the type embedding (added in its own dtype, rounded once below)
        ref = model.pos_embed(reference.to(dtype)) + model.ref_embed
    if model.config.reference_encoder_layers:
        ref = ref + _own_dtype(model.ref_encoder, reference)  # each patch's neighbourhood (zero until trained)
    ref = ref.to(dtype)
    if model.config.reference_mode == "channels":
        hidden = target + ref
    else:
        hidden = torch.cat([target, ref], dim=1).contiguous()  # (B, N + M, D)
    temb = model.time_text_embed(timestep, pooled)  # (B, D)
    context = model.context_embedder(context)  # (B, L, D)
    for block in model.transformer_blocks:
        # Dual-attention (SD3.5) blocks self-attend over `hidden`, so reference tokens join there too.
        if torch.is_grad_enabled() and model.gradient_checkpointing:
            context, hidden = model._gradient_checkpointing_func(block, hidden, context, temb, None)
        else:
            context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb)
    out = model.proj_out(model.norm_out(hidden[:, :n_target], temb))  # (B, N, p*p*C); the norm is per token
    out = _unpatchify(out, height // patch, width // patch, patch, model.out_channels)
    return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def base_dtype(transformer) -> torch.dtype:
    """The dtype of the transformer's frozen base (its patch embedding): what its inputs and token stream are in.

    Not `next(transformer.parameters())`: a LoRA student's own additions (`ref_embed`, `ref_proj`, `ref_encoder`)
    train in float32 beside a bfloat16 base, and `ref_embed`, a parameter of the model itself, comes first."""
    return transformer.pos_embed.proj.weight.dtype


def _own_dtype(module: nn.Module, reference: torch.Tensor) -> torch.Tensor:
    """`module(reference)` with the reference cast to the module's own dtype (float32 for a LoRA student's trained
    additions, the base's otherwise): no dtype clash outside autocast, no rounding of its input to the base's."""
    return module(reference.to(next(module.parameters()).dtype))


def _unpatchify(tokens: torch.Tensor, rows: int, cols: int, patch: int, channels: int) -> torch.Tensor:
    """(B, rows*cols, p*p*C) in SD3's (p, q, c) order -> (B, C, rows*p, cols*p)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, rows, cols, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, rows * patch, cols * patch)


def _zero_ref_embed(model: NPEditSD3Transformer2DModel) -> None:
    """Give `ref_embed` real zeros: diffusers' low-memory loading leaves missing parameters on the meta device."""
    anchor = model.proj_out.weight
    model.ref_embed = nn.Parameter(torch.zeros(model.inner_dim, dtype=anchor.dtype, device=anchor.device))


class SD3Backbone(Backbone):
    """Text encoders + VAE of an SD3 checkpoint and the calling convention of its transformer."""

    family = "sd3"
    transformer_classes = (SD3Transformer2DModel,)
    text_encoder_classes = {"text_encoder": CLIPTextModelWithProjection, "text_encoder_2": CLIPTextModelWithProjection,
                            "text_encoder_3": T5EncoderModel}
    # the first CLIP and the VAE must be there; the second CLIP and T5 may be left out (SD3 runs without them)
    components = ("tokenizer", "text_encoder", "vae")
    optional_components = ("tokenizer_2", "text_encoder_2", "tokenizer_3", "text_encoder_3")
    title = "SD3"

    def __init__(
        self,
        tokenizers: list,
        text_encoders: list[nn.Module],
        vae: nn.Module,
        *,
        tokenizer_3=None,
        text_encoder_3: nn.Module | None = None,
        joint_attention_dim: int | None = None,
        pooled_projection_dim: int | None = None,
        patch_size: int = 2,
        max_sequence_length: int | None = None,
        pos_embed_max_size: int | None = None,
    ):
        """`tokenizers`/`text_encoders`: the 1 or 2 CLIPs in pipeline order; T5 optional.

        `joint_attention_dim` (from the transformer config) sets the width the CLIP states are
        padded to when there is no T5; `max_sequence_length` is the T5 length, or the number of
        zero T5 tokens appended without a T5, as diffusers' SD3 pipeline does (0: none);
        `pos_embed_max_size` (the transformer's position grid, in patches) bounds the image size.
        """
        super().__init__()
        if len(tokenizers) != len(text_encoders) or len(tokenizers) not in (1, 2):
            raise ValueError(f"need 1 or 2 CLIP tokenizer/text encoder pairs, got {len(tokenizers)}/{len(text_encoders)}")
        if (tokenizer_3 is None) != (text_encoder_3 is None):
            raise ValueError("tokenizer_3 and text_encoder_3 come together")
        self.tokenizers = list(tokenizers)
        self.text_encoders = nn.ModuleList(e.requires_grad_(False).eval() for e in text_encoders)
        self.tokenizer_3 = tokenizer_3
        self.text_encoder_3 = text_encoder_3.requires_grad_(False).eval() if text_encoder_3 is not None else None
        self.codec = LatentCodec(vae.requires_grad_(False).eval())
        self.patch_size = int(patch_size)
        self.pos_embed_max_size = pos_embed_max_size
        if max_sequence_length is None:
            # Without a T5, a checkpoint may say how many zero T5 tokens it was trained with (a key
            # kept in the first CLIP's config); diffusers' SD3 pipeline appends 256.
            default = getattr(text_encoders[0].config, "npedit_empty_t5_tokens", 256) if text_encoder_3 is None else 256
            max_sequence_length = default
        self.max_sequence_length = int(max_sequence_length)
        clip_width = sum(e.config.hidden_size for e in text_encoders)
        t5_width = text_encoder_3.config.d_model if text_encoder_3 is not None else None
        self.joint_attention_dim = int(t5_width or joint_attention_dim or clip_width)
        if clip_width > self.joint_attention_dim:
            raise ValueError(f"CLIP width {clip_width} exceeds the joint attention width {self.joint_attention_dim}")
        pooled_width = sum(e.config.projection_dim for e in text_encoders)
        if pooled_projection_dim is not None and pooled_projection_dim != pooled_width:
            raise ValueError(f"CLIP pooled width {pooled_width} != pooled_projection_dim {pooled_projection_dim}")

    @classmethod
    def from_components(cls, transformer=None, **parts) -> "SD3Backbone":
        """Build from pipeline components (names as in `pipeline_components()`), sizing from `transformer`."""
        clips = [(parts.get(f"tokenizer{s}"), parts.get(f"text_encoder{s}")) for s in ("", "_2")]
        clips = [c for c in clips if c[0] is not None]
        cfg = transformer.config if transformer is not None else None
        return cls(
            [t for t, _ in clips], [e for _, e in clips], parts["vae"],
            tokenizer_3=parts.get("tokenizer_3"), text_encoder_3=parts.get("text_encoder_3"),
            joint_attention_dim=cfg.joint_attention_dim if cfg else None,
            pooled_projection_dim=cfg.pooled_projection_dim if cfg else None,
            patch_size=cfg.patch_size if cfg else 2, pos_embed_max_size=cfg.pos_embed_max_size if cfg else None,
        )

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, *, torch_dtype: torch.dtype = torch.float32, max_sequence_length: int | None = None,
    ) -> "SD3Backbone":
        """Load tokenizer(s), CLIP(s), optional T5 and VAE from a diffusers-layout folder or hub id."""
        path = locate(path)
        cls.check_folder(path)  # a part, its config, tokenizer files or weights missing: one line naming each
        parts = {}
        encoders = cls.text_encoder_classes
        for name, loader in (
            ("tokenizer", AutoTokenizer), ("text_encoder", encoders["text_encoder"]),
            ("tokenizer_2", AutoTokenizer), ("text_encoder_2", encoders["text_encoder_2"]),
            ("tokenizer_3", AutoTokenizer), ("text_encoder_3", encoders["text_encoder_3"]), ("vae", AnyVAE),
        ):
            kwargs = {} if name.startswith("tokenizer") else {"torch_dtype": torch_dtype, "use_safetensors": True}
            required = name in ("tokenizer", "text_encoder", "vae")
            parts[name] = _load_component(loader, path, name, required=required, **kwargs)
        try:
            tcfg = SD3Transformer2DModel.load_config(path, subfolder="transformer")
        except (OSError, ValueError):
            tcfg = {}
        clips = [(parts[t], parts[e]) for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
                 if parts[t] is not None and parts[e] is not None]
        has_t5 = parts["tokenizer_3"] is not None and parts["text_encoder_3"] is not None
        return cls(
            [t for t, _ in clips], [e for _, e in clips], parts["vae"],
            tokenizer_3=parts["tokenizer_3"] if has_t5 else None,
            text_encoder_3=parts["text_encoder_3"] if has_t5 else None,
            joint_attention_dim=tcfg.get("joint_attention_dim"), pooled_projection_dim=tcfg.get("pooled_projection_dim"),
            patch_size=tcfg.get("patch_size", 2), max_sequence_length=max_sequence_length,
            pos_embed_max_size=tcfg.get("pos_embed_max_size"),
        )

    # ---- text ------------------------------------------------------------------------------
    @torch.no_grad()
    def _clip(self, tokenizer, encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate hidden states (B, L, D) and projected pooled output (B, P) of one CLIP."""
        length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings)
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds

    @torch.no_grad()
    def _t5(self, prompts: list[str], like: torch.Tensor) -> torch.Tensor:
        """T5 states (B, L5, D5), or zeros of the joint width without a T5 (the SD3 pipeline's fallback)."""
        if self.text_encoder_3 is None:
            return like.new_zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim)
        ids = self.tokenizer_3(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt",
        ).input_ids
        return self.text_encoder_3(ids.to(self.text_encoder_3.device))[0]

    def encode_prompt(self, prompts: list[str], *, with_reference: bool) -> SD3Cond:
        """SD3 text conditioning; the same for the student (`with_reference`) as for T2I: SD3 has no edit template.

        prompt_embeds = [CLIP states concatenated on channels, zero-padded to the joint width ; T5 states]
        on the sequence axis; pooled = the CLIP pooled projections concatenated.
        """
        clips = [self._clip(tok, enc, list(prompts)) for tok, enc in zip(self.tokenizers, self.text_encoders)]
        device = clips[0][0].device
        clip_states = torch.cat([h.to(device) for h, _ in clips], dim=-1)  # (B, 77, sum D_clip)
        pooled = torch.cat([p.to(device) for _, p in clips], dim=-1)  # (B, sum P)
        t5 = self._t5(list(prompts), clip_states).to(device=device, dtype=clip_states.dtype)  # (B, L5, D_joint)
        clip_states = nn.functional.pad(clip_states, (0, t5.shape[-1] - clip_states.shape[-1]))
        return SD3Cond(prompt_embeds=torch.cat([clip_states, t5], dim=1), pooled=pooled)

    # ---- latents ---------------------------------------------------------------------------
    @property
    def pixel_multiple(self) -> int:
        return self.codec.downsample * self.patch_size

    @property
    def max_side(self) -> int | None:
        """SD3 crops its positional embedding from a grid of `pos_embed_max_size` patches a side: no larger."""
        return self.pos_embed_max_size * self.pixel_multiple if self.pos_embed_max_size else None

    # ---- transformers ----------------------------------------------------------------------
    def velocity(self, transformer, x_t, t, cond: SD3Cond, reference=None):
        """v = eps - x0: SD3's output at timestep 1000 t as is (see the module docstring); x_t (B, C, h, w), t (B,)."""
        _check_cond(transformer.config, cond)
        dtype = base_dtype(transformer)
        batch = x_t.shape[0]
        # Kept in float32: 1000 t in bf16 would round (947.4 -> 948); the time projection casts itself.
        timestep = (torch.as_tensor(t, device=x_t.device).float() * T_SCALE).expand(batch)
        kwargs = dict(
            hidden_states=x_t.to(dtype), encoder_hidden_states=cond.prompt_embeds.to(dtype),
            pooled_projections=cond.pooled.to(dtype), timestep=timestep, return_dict=False,
        )
        if reference is not None:
            if not getattr(transformer, "takes_reference", False):
                raise TypeError(
                    f"{type(transformer).__name__} cannot take a reference: load the student "
                    "with load_transformer(..., for_student=True) or build it with prepare_student(teacher)"
                )
            kwargs["reference"] = reference  # cast inside, for each part that reads it (see _forward_with_reference)
        return transformer(**kwargs)[0].to(x_t.dtype)

    def load_transformer(self, path, *, subfolder="transformer", for_student=False, torch_dtype=torch.float32):
        """Teacher/critic: plain `SD3Transformer2DModel`; student: `NPEditSD3Transformer2DModel` (ref_embed 0 if absent)."""
        path = locate(path)  # offline: a hub id's cached snapshot, or one error at once
        subfolder = resolve_subfolder(path, subfolder)
        check_transformer(path, subfolder, "sd3", torch_dtype)
        if not for_student:
            return SD3Transformer2DModel.from_pretrained(str(path), subfolder=subfolder, torch_dtype=torch_dtype,
                                                         use_safetensors=True)
        model, info = NPEditSD3Transformer2DModel.from_pretrained(
            str(path), subfolder=subfolder, torch_dtype=torch_dtype, output_loading_info=True, use_safetensors=True,
        )
        if "ref_embed" in info["missing_keys"]:  # a plain SD3 checkpoint
            _zero_ref_embed(model)
        return model

    @classmethod
    def prepare_student(cls, transformer, reference_mode: str = "tokens"):
        """An `NPEditSD3Transformer2DModel` with the teacher's config and copied weights, its reference parameters
        zero (`ref_embed` or `ref_proj`, by `reference_mode`), trainable."""
        with torch.device("meta"):  # no random init of a multi-billion-parameter model
            student = NPEditSD3Transformer2DModel.from_config({**transformer.config, "reference_mode": reference_mode})
        state = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
        anchor = state["proj_out.weight"]
        zeros = dict(dtype=anchor.dtype, device=anchor.device)
        if reference_mode == "tokens":
            state["ref_embed"] = torch.zeros(student.inner_dim, **zeros)
        else:
            state["ref_proj.weight"] = torch.zeros(student.ref_proj.weight.shape, **zeros)
            state["ref_proj.bias"] = torch.zeros(student.inner_dim, **zeros)
        student.load_state_dict(state, strict=True, assign=True)
        left = [n for n, p in [*student.named_parameters(), *student.named_buffers()] if p.is_meta]
        if left and not anchor.is_meta:  # (a teacher on the meta device, for a memory estimate, gives a meta student)
            raise RuntimeError(f"prepare_student left tensors uninitialised: {left}")
        return student.requires_grad_(True).train()

    @classmethod
    def add_reference_encoder(cls, student, layers: int, width: int = 64, gated: bool = False):
        """Give `student` a `ReferenceEncoder` of `layers` convolutions whose output is zero at init (see the module
        docstring; `gated` picks the normalised, gated output); a student that has one of that depth is returned
        as it is."""
        have = student.config.reference_encoder_layers
        if layers == have or layers == 0:
            return student
        if have:
            raise ValueError(f"the student already has a reference encoder of {have} layers; "
                             f"model.reference_encoder={layers} asks for another")
        anchor = student.proj_out.weight
        student.ref_encoder = ReferenceEncoder(student.config.in_channels, student.inner_dim, student.config.patch_size,
                                               layers, width, gated=gated).to(device=anchor.device, dtype=anchor.dtype)
        set_config(student, reference_encoder_layers=layers, reference_encoder_width=width,
                   reference_encoder_gated=gated)
        return student.requires_grad_(True)

    @classmethod
    def add_layers(cls, student, count: int):
        """`student` with `count` more transformer blocks, inserted before its last one (which, in SD3, reads the
        text tokens without updating them). Each new block starts as a copy of the block before the insertion
        point whose output projections (attention and feed-forward, image and text stream) are zero, so it passes
        both streams through unchanged and the grown student computes exactly what it did. Its gates stay as
        copied (open), so the zero projections, whole weight matrices, get a gradient from the first step (as a
        LoRA's zero half does); zeroing the adaLN gates instead would leave one row per channel to start from
        (on the Shapes plateau both stayed near zero: docs/shapes_experiments.md). Returns the student and the
        indices of the new blocks."""
        if count < 0:
            raise ValueError(f"model.add_layers must be >= 0, got {count}")
        blocks = student.transformer_blocks
        if count == 0:
            return student, []
        if len(blocks) < 2:
            raise ValueError("model.add_layers needs a student of at least 2 blocks (a block to copy before the last)")
        at = len(blocks) - 1  # the new blocks go before the last block
        template = blocks[at - 1]
        fresh = []
        for _ in range(count):
            block = copy.deepcopy(template)
            outputs = [block.attn.to_out[0], block.attn.to_add_out, block.ff.net[2], block.ff_context.net[2]]
            if block.use_dual_attention:
                outputs.append(block.attn2.to_out[0])
            with torch.no_grad():
                for layer in outputs:
                    layer.weight.zero_()
                    if layer.bias is not None:
                        layer.bias.zero_()
            fresh.append(block.requires_grad_(True))
        student.transformer_blocks = nn.ModuleList([*blocks[:at], *fresh, *blocks[at:]])
        dual = [i if i < at else i + count for i in student.config.dual_attention_layers]
        dual += [at + k for k in range(count) if template.use_dual_attention]
        set_config(student, num_layers=len(student.transformer_blocks), dual_attention_layers=tuple(sorted(dual)))
        return student, list(range(at, at + count))

    def save_pretrained(self, directory):
        """Save the present tokenizer*/, text_encoder*/ and vae/ in diffusers layout."""
        directory = Path(directory)
        for name, part in self.pipeline_components().items():
            if part is not None:
                part.save_pretrained(directory / name)

    def pipeline_components(self) -> dict[str, Any]:
        """vae + tokenizer/text_encoder(_2, _3) under StableDiffusion3Pipeline's names; absent ones are None."""
        parts: dict[str, Any] = {"vae": self.codec.vae}
        clips = list(zip(self.tokenizers, self.text_encoders)) + [(None, None)] * (2 - len(self.tokenizers))
        for suffix, (tok, enc) in zip(("", "_2"), clips):
            parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = tok, enc
        parts["tokenizer_3"], parts["text_encoder_3"] = self.tokenizer_3, self.text_encoder_3
        return parts


def _load_component(loader, path: str, subfolder: str, *, required: bool, **kwargs):
    """`loader.from_pretrained(path, subfolder=...)`; None when an optional component is absent."""
    local = Path(path)
    if local.is_dir() and not (local / subfolder).is_dir():
        if required:
            raise FileNotFoundError(f"{path} has no {subfolder}/ folder; an SD3 checkpoint needs one")
        return None
    if hasattr(loader, "config_class"):  # a transformers model (the VAE and tokenizers check their own); a hub id's
        check_size(path, loader, kwargs.get("torch_dtype"), subfolder)  # on its cached copy, where there is one
    if local.is_dir():
        return loader.from_pretrained(str(local / subfolder), **kwargs)
    if required:
        return loader.from_pretrained(path, subfolder=subfolder, **kwargs)
    try:
        return loader.from_pretrained(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError):  # the hub repo has no such subfolder
        return None


def _check_cond(config, cond: SD3Cond) -> None:
    """Fail early, with the numbers, when the text conditioning does not fit the transformer."""
    if not isinstance(cond, SD3Cond):
        raise TypeError(f"SD3 conditioning must be an SD3Cond from SD3Backbone.encode_prompt, got {type(cond).__name__}")
    if cond.prompt_embeds.shape[-1] != config.joint_attention_dim:
        raise ValueError(
            f"prompt_embeds width {cond.prompt_embeds.shape[-1]} != transformer joint_attention_dim "
            f"{config.joint_attention_dim}: text encoders and transformer come from different checkpoints"
        )
    if cond.pooled.shape[-1] != config.pooled_projection_dim:
        raise ValueError(
            f"pooled width {cond.pooled.shape[-1]} != transformer pooled_projection_dim {config.pooled_projection_dim}"
        )
