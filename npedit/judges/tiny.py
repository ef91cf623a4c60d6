"""Tiny random-weight judges (LLaVA-OneVision, Qwen2.5-VL, InternVL3) built offline, for tests and the Shapes world."""

from __future__ import annotations

import os
from typing import Iterable

import torch
from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    SiglipVisionConfig,
)

from npedit.judges.questions import free_question, training_questions
from npedit.tokenization import build_bpe_tokenizer

_INSTRUCTIONS = (
    ("make the red circle blue", "recolor", None),
    ("add a small green square to the left", "add", None),
    ("remove the yellow triangle", "remove", "yellow triangle"),
    ("replace the blue square with a red circle", "replace", None),
    ("change the background to white", "background", None),
    ("make the circle twice as large", "resize", None),
    ("turn the photo into a pencil sketch", "style", None),
    ("remove the dog from the sofa", "remove", "dog"),
    ("put a hat on the man", "add", None),
    ("change the car colour to black", "recolor", None),
)


def text_sizes(tokenizer, hidden_size: int, num_layers: int, num_heads: int) -> dict:
    """The sizes and special tokens every tiny judge's Qwen2-style language model shares."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def qwen2_text_config(tokenizer, hidden_size: int, num_layers: int, num_heads: int) -> Qwen2Config:
    """The tiny Qwen2 language model of the LLaVA-OneVision and InternVL builders."""
    return Qwen2Config(**text_sizes(tokenizer, hidden_size, num_layers, num_heads), tie_word_embeddings=False)


def seeded_model(model_class, config, seed: int):
    """`model_class(config)` in eval mode, its random weights drawn from `seed` without touching the caller's RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return model_class(config).eval()


def save_with_processor(model, processor, directory: str | os.PathLike) -> str:
    """Save a model (safetensors) and its processor to `directory`; return it as a string."""
    directory = str(directory)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory


def default_corpus() -> list[str]:
    """A small English corpus: edit instructions, the judge's questions, and short Yes/No answers."""
    texts = []
    for instruction, edit_type, object_name in _INSTRUCTIONS:
        texts.append(instruction)
        texts += [q.text for q in training_questions(instruction, edit_type, object_name)]
    texts.append(free_question("Is the image sharp and free of artifacts? Answer with Yes or No.").text)
    return texts + ["Yes", "No", "Yes.", "No."]


# Qwen2.5-VL's chat layout: a default system turn, each image as <|vision_start|><|image_pad|><|vision_end|>.
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_qwen2_5_vl(
    directory: str | os.PathLike,
    *,
    corpus: Iterable[str] | None = None,
    patch_size: int = 4,
    merge_size: int = 2,
    window_size: int = 16,
    min_pixels: int = 16 * 16,
    max_pixels: int = 64 * 64,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_width: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vocab_size: int = 1024,
    seed: int = 0,
) -> str:
    """Build a tiny random Qwen2.5-VL (windowed ViT + Qwen2 with 3-D rotary positions) and its processor; save both.

    Images are resized to multiples of patch_size x merge_size holding between min_pixels and max_pixels
    pixels (the real checkpoints: 14 x 2, 56^2 to 28^2 x 1280); the vision tower attends within windows of
    window_size pixels except in its last block, as the real one does between its full-attention blocks.
    """
    texts = [*(default_corpus() if corpus is None else corpus), "system", "You are a helpful assistant."]
    tokenizer = build_bpe_tokenizer(texts, vocab_size=vocab_size, chat_template=QWEN_VL_CHAT_TEMPLATE)
    head_dim = hidden_size // num_heads
    third = head_dim // 2 // 3  # the rotary halves split over (time, height, width), like [16, 24, 24] of 64
    sections = [head_dim // 2 - 2 * third, third, third]
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=vision_layers,
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            num_heads=vision_heads,
            patch_size=patch_size,
            spatial_merge_size=merge_size,
            temporal_patch_size=2,
            window_size=window_size,
            out_hidden_size=hidden_size,
            fullatt_block_indexes=[vision_layers - 1],
        ),
        text_config=dict(
            **text_sizes(tokenizer, hidden_size, num_layers, num_heads),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections},
            bos_token_id=None,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = seeded_model(Qwen2_5_VLForConditionalGeneration, config, seed)
    grid = dict(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2)
    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, **grid),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size, **grid),
        chat_template=QWEN_VL_CHAT_TEMPLATE,
    )
    return save_with_processor(model, processor, directory)


def build_tiny_llava_onevision(
    directory: str | os.PathLike,
    *,
    corpus: Iterable[str] | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_width: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vocab_size: int = 1024,
    mean: float = 0.5,
    std: float = 0.5,
    anyres_grid: int = 3,
    seed: int = 0,
) -> str:
    """Build a tiny random LLaVA-OneVision (SigLIP + Qwen2) and its processor; save both to `directory`.

    A one-image question's image is tiled on a canvas of up to anyres_grid x anyres_grid base views (the real
    checkpoints: 6, whose largest canvases are pooled down under the default vision_aspect_ratio anyres_max_9).
    """
    tokenizer = build_bpe_tokenizer(default_corpus() if corpus is None else corpus, vocab_size=vocab_size)
    # Multiples of the base view, like the real checkpoints' anyres grid (which contains the base size).
    steps = range(1, anyres_grid + 1)
    pinpoints = [[image_size * i, image_size * j] for i in steps for j in steps]
    vision = SiglipVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text = qwen2_text_config(tokenizer, hidden_size, num_layers, num_heads)
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
    )
    model = seeded_model(LlavaOnevisionForConditionalGeneration, config, seed)

    view = {"height": image_size, "width": image_size}
    stats = {"image_mean": [mean] * 3, "image_std": [std] * 3}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=view, image_grid_pinpoints=pinpoints, **stats),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=view, **stats),
        num_image_tokens=(image_size // patch_size) ** 2,  # SigLIP's strided conv floors (384 // 14 = 27)
        vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template,
    )
    return save_with_processor(model, processor, directory)


# InternVL3-hf's chat layout (no default system turn): each image as <IMG_CONTEXT> and a newline, which the
# processor expands to <img> + image_seq_length x <IMG_CONTEXT> + </img> per view.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The tokenizer attributes InternVLProcessor reads, with the InternVL3 token strings.
INTERNVL_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def build_tiny_internvl(
    directory: str | os.PathLike,
    *,
    corpus: Iterable[str] | None = None,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vision_width: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    vocab_size: int = 1024,
    mean: float = 0.5,
    std: float = 0.5,
    seed: int = 0,
) -> str:
    """Build a tiny random InternVL3-hf (InternViT + pixel shuffle + Qwen2) and its processor; save to `directory`."""
    if (image_size // patch_size) % 2:
        raise ValueError(f"the pixel shuffle halves the patch grid: image_size // patch_size must be even, "
                         f"got {image_size} // {patch_size}")
    tokenizer = build_bpe_tokenizer(
        default_corpus() if corpus is None else corpus,
        vocab_size=vocab_size,
        chat_template=INTERNVL_CHAT_TEMPLATE,
        extra_special_tokens=INTERNVL_SPECIAL_TOKENS,
    )
    vision = InternVLVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
    )
    text = qwen2_text_config(tokenizer, hidden_size, num_layers, num_heads)
    tokens_per_view = (image_size // patch_size // 2) ** 2  # downsample_ratio 0.5 on each side of the grid
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=tokens_per_view,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    model = seeded_model(InternVLForConditionalGeneration, config, seed)

    view = {"height": image_size, "width": image_size}
    stats = {"image_mean": [mean] * 3, "image_std": [std] * 3}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=view, crop_to_patches=False, resample=3, **stats),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=view, **stats),
        image_seq_length=tokens_per_view,
        chat_template=tokenizer.chat_template,
    )
    return save_with_processor(model, processor, directory)
