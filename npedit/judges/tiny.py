"""Tiny random-weight LLaVA-OneVision judges built offline, for tests and the Shapes world."""

from __future__ import annotations

import os
from typing import Iterable

import torch
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
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


def default_corpus() -> list[str]:
    """A small English corpus: edit instructions, the judge's questions, and short Yes/No answers."""
    texts = []
    for instruction, edit_type, object_name in _INSTRUCTIONS:
        texts.append(instruction)
        texts += [q.text for q in training_questions(instruction, edit_type, object_name)]
    texts.append(free_question("Is the image sharp and free of artifacts? Answer with Yes or No.").text)
    return texts + ["Yes", "No", "Yes.", "No."]


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
    seed: int = 0,
) -> str:
    """Build a tiny random LLaVA-OneVision (SigLIP + Qwen2) and its processor; save both to `directory`."""
    tokenizer = build_bpe_tokenizer(default_corpus() if corpus is None else corpus, vocab_size=vocab_size)
    # Multiples of the base view, like the real checkpoints' anyres grid (which contains the base size).
    pinpoints = [[image_size * i, image_size * j] for i in (1, 2, 3) for j in (1, 2, 3)]
    vision = SiglipVisionConfig(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
    )
    with torch.random.fork_rng():  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).eval()

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
    directory = str(directory)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory
