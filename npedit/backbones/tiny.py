"""Tiny random-weight backbones of the real classes, saved in diffusers layout (tests, Shapes world)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch
from diffusers import AutoencoderKL, ZImageTransformer2DModel
from transformers import Qwen3Config, Qwen3Model

from ..tokenization import build_bpe_tokenizer

DEFAULT_CORPUS = (
    "a red circle, a blue square on a gray background",
    "a green triangle on a white background",
    "add a small yellow circle at the top left",
    "remove the blue square",
    "make the red circle green",
    "change the background to sky",
    "low quality, artifacts",
    "do nothing",
)


def tiny_vae(latent_channels: int = 4, downsample: int = 8, width: int = 16, seed: int = 0) -> AutoencoderKL:
    """A small `AutoencoderKL` with `downsample` = 2^(blocks - 1)."""
    torch.manual_seed(seed)
    n_blocks = int(downsample).bit_length()
    if 2 ** (n_blocks - 1) != downsample:
        raise ValueError(f"downsample must be a power of two, got {downsample}")
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * n_blocks, up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=tuple(min(width * 2**i, width * 2) for i in range(n_blocks)),
        layers_per_block=1, norm_num_groups=8, sample_size=64, scaling_factor=1.0, shift_factor=0.0,
    )


def tiny_qwen3(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0) -> Qwen3Model:
    """A small Qwen3 text encoder."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=1024,
    )
    return Qwen3Model(cfg)


def tiny_zimage_transformer(in_channels: int, cap_feat_dim: int, dim: int = 64, layers: int = 2, seed: int = 0):
    """A small `ZImageTransformer2DModel` (2 heads, RoPE axes summing to the head size)."""
    torch.manual_seed(seed)
    head = dim // 2
    axes = [head // 4, head * 3 // 8, head - head // 4 - head * 3 // 8]
    return ZImageTransformer2DModel(
        in_channels=in_channels, dim=dim, n_layers=layers, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
        cap_feat_dim=cap_feat_dim, axes_dims=axes, axes_lens=[1024, 64, 64],
    )


def build_tiny_zimage(
    directory: str | os.PathLike,
    *,
    corpus: Iterable[str] = DEFAULT_CORPUS,
    latent_channels: int = 4,
    downsample: int = 8,
    dim: int = 64,
    layers: int = 2,
    text_hidden: int = 32,
    seed: int = 0,
) -> str:
    """Save tokenizer/, text_encoder/, vae/ and transformer/ of a tiny Z-Image-family model; return the path."""
    directory = Path(directory)
    tokenizer = build_bpe_tokenizer(corpus, vocab_size=512)
    text_encoder = tiny_qwen3(len(tokenizer), hidden=text_hidden, seed=seed)
    vae = tiny_vae(latent_channels, downsample, seed=seed)
    transformer = tiny_zimage_transformer(latent_channels, text_hidden, dim=dim, layers=layers, seed=seed)
    tokenizer.save_pretrained(directory / "tokenizer")
    text_encoder.save_pretrained(directory / "text_encoder")
    vae.save_pretrained(directory / "vae")
    transformer.save_pretrained(directory / "transformer")
    return str(directory)


# ---- SD3 family ------------------------------------------------------------------------------


def add_bos_eos(tokenizer, bos: str = "<|im_start|>", eos: str = "<|endoftext|>"):
    """Make a BPE tokenizer wrap every text as `bos text eos`, the layout CLIP's pooled read-out expects.

    As in CLIP-L, eos is also the pad token: CLIP pools at the first eos. Its id must not be 2,
    which transformers' CLIP treats as a legacy config and pools at argmax(input_ids) instead.
    """
    from tokenizers import processors

    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in (bos, eos)}
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} $B:1 {eos}:1", special_tokens=list(ids.items()),
    )
    tokenizer.bos_token, tokenizer.eos_token = bos, eos
    if tokenizer.eos_token_id == 2:
        raise ValueError("CLIP reads eos_token_id == 2 as a legacy config; pick another eos token")
    return tokenizer


def tiny_clip(tokenizer, hidden: int = 32, projection_dim: int = 32, layers: int = 2, seed: int = 0):
    """A small `CLIPTextModelWithProjection` with the tokenizer's bos/eos/pad ids (eos marks the pooled position)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=2, projection_dim=projection_dim, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(cfg)


def tiny_t5(vocab_size: int, hidden: int = 48, layers: int = 1, seed: int = 0):
    """A small `T5EncoderModel`."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab_size, d_model=hidden, d_kv=hidden // 2, d_ff=hidden * 2, num_layers=layers, num_heads=2,
    )
    return T5EncoderModel(cfg)


def tiny_sd3_transformer(
    in_channels: int,
    joint_attention_dim: int,
    pooled_projection_dim: int,
    *,
    dim: int = 32,
    layers: int = 2,
    heads: int = 2,
    sample_size: int = 8,
    pos_embed_max_size: int = 64,
    dual_attention_layers: tuple[int, ...] = (),
    qk_norm: str | None = None,
    seed: int = 0,
):
    """A small `SD3Transformer2DModel` (patch 2); `dual_attention_layers` + `qk_norm="rms_norm"`: SD3.5 layout."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=in_channels, out_channels=in_channels, num_layers=layers,
        attention_head_dim=dim // heads, num_attention_heads=heads, joint_attention_dim=joint_attention_dim,
        caption_projection_dim=dim, pooled_projection_dim=pooled_projection_dim, pos_embed_max_size=pos_embed_max_size,
        dual_attention_layers=tuple(dual_attention_layers), qk_norm=qk_norm,
    )


def build_tiny_sd3(
    directory: str | os.PathLike,
    *,
    corpus: Iterable[str] = DEFAULT_CORPUS,
    latent_channels: int = 4,
    downsample: int = 8,
    dim: int = 32,
    layers: int = 2,
    text_hidden: int = 32,
    projection_dim: int = 32,
    max_text_tokens: int = 77,
    num_clips: int = 1,
    t5_hidden: int = 0,
    dual_attention_layers: tuple[int, ...] = (),
    empty_t5_tokens: int | None = None,
    seed: int = 0,
) -> str:
    """Save tokenizer*/, text_encoder*/ (1-2 CLIPs, optional T5), vae/ and transformer/ of a tiny SD3-family model.

    The transformer's joint_attention_dim is the T5 width (``t5_hidden > 0``) or the CLIPs' summed
    width, and its pooled_projection_dim the CLIPs' summed projection width, as in SD3.
    """
    if num_clips not in (1, 2):
        raise ValueError(f"num_clips must be 1 or 2, got {num_clips}")
    directory = Path(directory)
    tokenizer = add_bos_eos(build_bpe_tokenizer(corpus, vocab_size=512, model_max_length=max_text_tokens))
    suffixes = ["", "_2"][:num_clips]
    for i, suffix in enumerate(suffixes):
        clip = tiny_clip(tokenizer, hidden=text_hidden, projection_dim=projection_dim, seed=seed + i)
        if empty_t5_tokens is not None:  # recorded for SD3Backbone: zero T5 tokens used without a T5
            clip.config.npedit_empty_t5_tokens = int(empty_t5_tokens)
        tokenizer.save_pretrained(directory / f"tokenizer{suffix}")
        clip.save_pretrained(directory / f"text_encoder{suffix}")
    joint_dim = text_hidden * num_clips
    if t5_hidden:
        if t5_hidden < joint_dim:
            raise ValueError(f"t5_hidden ({t5_hidden}) must be >= the CLIPs' summed width ({joint_dim})")
        tokenizer.save_pretrained(directory / "tokenizer_3")
        tiny_t5(len(tokenizer), hidden=t5_hidden, seed=seed).save_pretrained(directory / "text_encoder_3")
        joint_dim = t5_hidden
    tiny_vae(latent_channels, downsample, seed=seed).save_pretrained(directory / "vae")
    transformer = tiny_sd3_transformer(
        latent_channels, joint_dim, projection_dim * num_clips, dim=dim, layers=layers,
        dual_attention_layers=dual_attention_layers, qk_norm="rms_norm" if dual_attention_layers else None, seed=seed,
    )
    transformer.save_pretrained(directory / "transformer")
    return str(directory)
