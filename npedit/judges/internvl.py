"""InternVL3 judge adapter (InternViT + pixel shuffle + Qwen2), differentiable w.r.t. the edited image.

This is transformers' native `InternVLForConditionalGeneration` (config model_type "internvl"), i.e. the
HF-format checkpoints such as `OpenGVLab/InternVL3-14B-hf` or `OpenGVLab/InternVL3-1B-hf`. The original
remote-code repos (`OpenGVLab/InternVL3-14B`, model_type "internvl_chat") are another class: use the `-hf` ones.

Every image is seen as ONE square view at the vision tower's size (448px for InternVL3), resized straight to
it, with no dynamic tiling: layouts are built by the real processor with `crop_to_patches=False` (one
`<img>` + T x `<IMG_CONTEXT>` + `</img>` block per image), and pixels go through torch ops that match the HF
image processor. An image's features do not depend on the question, so every image has the same layout.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from transformers import InternVLForConditionalGeneration

from npedit.judges.chat import ChatJudge, chat_prompt, normalise, resize_like_processor

BICUBIC = 3  # PIL's (and PILImageResampling's) code for bicubic, what `resize_like_processor` reproduces


def view_settings(image_processor) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(side, mean, std) of the single square view, read from a loaded InternVL (GotOcr2) image processor."""
    size = image_processor.size
    if size.height != size.width:
        raise ValueError(f"expected a square view, the image processor resizes to {size.height}x{size.width}")
    resample = getattr(image_processor.resample, "value", image_processor.resample)
    if resample not in (BICUBIC, "bicubic"):
        raise ValueError(f"only bicubic resizing (resample=3, the InternVL3 setting) is supported, got {resample!r}")
    return size.height, tuple(image_processor.image_mean), tuple(image_processor.image_std)


def preprocess_images(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised single views (B, 3, size, size), as the HF processor makes them untiled."""
    return normalise(resize_like_processor(images, size, size), mean, std)


class InternVLJudge(ChatJudge):
    """A frozen InternVL3 (`-hf` checkpoint) answering Yes/No questions; gradients reach the edited image only."""

    model_class = InternVLForConditionalGeneration

    def __init__(self, model: InternVLForConditionalGeneration, processor):
        super().__init__(model, processor)
        config = model.config
        vision = config.vision_config
        self.size, self.mean, self.std = view_settings(processor.image_processor)
        if tuple(vision.image_size) != (self.size, self.size):
            raise ValueError(f"processor view is {self.size}px but the vision tower expects {tuple(vision.image_size)}")
        if config.vision_feature_select_strategy != "default":
            # The pixel shuffle needs a square patch grid: the CLS token must go ("default", the InternVL3 setting).
            raise ValueError("only vision_feature_select_strategy='default' (the InternVL3 setting) is supported")
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(f"vision_feature_layer must be one layer index, got {config.vision_feature_layer!r}")
        self._init_answers()
        self.image_token_id = config.image_token_id
        if processor.image_token_id != self.image_token_id:
            raise ValueError(f"processor image token {processor.image_token_id} != model's {self.image_token_id}")
        # Features per image: the (side / patch)^2 patch grid, pixel-shuffled by downsample_ratio on each side.
        grid = self.size // vision.patch_size[0]
        self.feature_len = round((grid * config.downsample_ratio) ** 2)
        if processor.image_seq_length != self.feature_len:
            raise ValueError(
                f"processor inserts {processor.image_seq_length} image tokens per view, the model makes "
                f"{self.feature_len} features from a {self.size}px view"
            )

    @property
    def image_size(self) -> int:
        """Side of the square view the vision tower sees."""
        return self.size

    # ---- text side ------------------------------------------------------------------------
    def _layout_key(self, num_images: int, image_shape: tuple[int, int]) -> None:
        """One layout for every image: a single view, whatever the question shows."""
        return None

    def _build_layout(self, text: str, image_keys: tuple[None, ...]) -> tuple[torch.Tensor]:
        """Prompt ids (L,) with each image placeholder expanded (untiled) by the real processor, checked against us."""
        num_images = len(image_keys)
        prompt = chat_prompt(self.processor, text, num_images)
        blank = Image.new("RGB", (self.size, self.size))
        inputs = self.processor(text=prompt, images=[blank] * num_images, crop_to_patches=False, return_tensors="pt")
        ids = inputs["input_ids"][0]
        expected = num_images * self.feature_len
        found = int((ids == self.image_token_id).sum())
        if found != expected:
            raise RuntimeError(
                f"processor inserted {found} image tokens for {num_images} image(s), one {self.size}px view each gives "
                f"{expected} features; processor and model configs disagree"
            )
        return (ids,)

    # ---- image side -----------------------------------------------------------------------
    def _image_features(self, images: torch.Tensor, keys: set[None]) -> dict[None, torch.Tensor]:
        """(N, 3, H, W) in [0, 1] -> {None: projected, pixel-shuffled features (N, T, D)} of the single views."""
        pixels = preprocess_images(images, self.size, self.mean, self.std).to(self.model.dtype)
        out = self.model.model.get_image_features(
            pixel_values=pixels,
            vision_feature_layer=self.model.config.vision_feature_layer,
            vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
            return_dict=True,
        )
        return {key: out.pooler_output for key in keys}  # pooler_output: (N, T, D) after the projector
