"""LLaVA-OneVision judge adapter (SigLIP + Qwen2), differentiable w.r.t. the edited image.

Token layout comes from the real processor, run once per (question text, image count) on blank
placeholder images of the base view size; pixels go through torch ops instead. Every image is
seen only through its base view (an image of a multi-image question padded to a square first, as the
processor does). The processor gives a one-image question the anyres layout,
which for a placeholder of exactly the base size is the base view plus one tile equal to it, so
the tile reuses the base view's features; a multi-image question gets base view + newline per
image. Both layouts are packed by the model's own `pack_image_features`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration

from npedit.judges.base import Question
from npedit.judges.chat import ChatJudge, chat_prompt, normalise, resize_like_processor


def base_view_settings(image_processor) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(side, mean, std) of the square base view, read from a loaded LLaVA-OneVision image processor."""
    size = image_processor.size
    height, width = (size.height, size.width) if size.height else (size.shortest_edge, size.shortest_edge)
    if height != width:
        raise ValueError(f"expected a square base view, the image processor resizes to {height}x{width}")
    return height, tuple(image_processor.image_mean), tuple(image_processor.image_std)


def pad_to_square(images: torch.Tensor, mean: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, S, S), S = max(H, W): centred on the 8-bit mean colour, as the processor
    pads each image of a multi-image question (differentiable; square images pass through)."""
    b, c, h, w = images.shape
    side = max(h, w)
    if h == w:
        return images
    fill = torch.tensor([int(m * 255) / 255 for m in mean], dtype=images.dtype, device=images.device)
    canvas = fill.view(1, c, 1, 1).expand(b, c, side, side)
    top, left = (side - h) // 2, (side - w) // 2
    rows = torch.cat([canvas[:, :, :top, :w], images, canvas[:, :, top + h:, :w]], dim=2)  # (B, C, S, W)
    return torch.cat([canvas[:, :, :, :left], rows, canvas[:, :, :, left + w:]], dim=3)


def preprocess_images(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                      single: bool = True) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised base views (B, 3, size, size), as the HF processor makes them.

    A one-image question's base view is the whole image resized to the square; an image of a multi-image
    question is first padded to a square with the mean colour (`pad_to_square`).
    """
    if not single:
        images = pad_to_square(images, mean)
    return normalise(resize_like_processor(images, size, size), mean, std)


class LlavaOnevisionJudge(ChatJudge):
    """A frozen LLaVA-OneVision answering Yes/No questions; gradients reach the edited image only."""

    model_class = LlavaOnevisionForConditionalGeneration

    def __init__(self, model: LlavaOnevisionForConditionalGeneration, processor):
        super().__init__(model, processor)
        self.size, self.mean, self.std = base_view_settings(processor.image_processor)
        vision = model.config.vision_config
        if model.config.vision_feature_select_strategy != "full":
            # SigLIP has no CLS token; "default" would drop a real patch and break the anyres layout.
            raise ValueError("only vision_feature_select_strategy='full' (the LLaVA-OneVision setting) is supported")
        if vision.image_size != self.size:
            raise ValueError(f"processor base view is {self.size}px but the vision tower expects {vision.image_size}px")
        self._init_answers()
        self.image_token_id = model.config.image_token_id
        if processor.image_token_id != self.image_token_id:
            raise ValueError(f"processor image token {processor.image_token_id} != model's {self.image_token_id}")
        # Features per image in a one-image (anyres) and a multi-image question.
        patches = torch.zeros(1, (vision.image_size // vision.patch_size) ** 2, model.config.text_config.hidden_size)
        self.feature_lens = {single: self._pack(patches, single).shape[1] for single in (True, False)}

    @property
    def image_size(self) -> int:
        """Side of the square base view the vision tower sees."""
        return self.size

    # ---- text side ------------------------------------------------------------------------
    def _layout_key(self, num_images: int, image_shape: tuple[int, int]) -> bool:
        """True for the one-image (anyres) layout, False for the multi-image one."""
        return num_images == 1

    def _build_layout(self, text: str, image_keys: tuple[bool, ...]) -> tuple[torch.Tensor]:
        """Prompt ids (L,) with each <image> expanded by the real processor, checked against our features."""
        num_images = len(image_keys)
        prompt = chat_prompt(self.processor, text, num_images)
        blank = Image.new("RGB", (self.size, self.size))
        ids = self.processor(text=prompt, images=[[blank] * num_images], return_tensors="pt")["input_ids"][0]
        expected = num_images * self.feature_lens[num_images == 1]
        found = int((ids == self.image_token_id).sum())
        if found != expected:
            raise RuntimeError(
                f"processor inserted {found} image tokens for {num_images} image(s), the base-view layout gives "
                f"{expected} features; processor and model configs disagree"
            )
        return (ids,)

    def prompt_ids(self, rows: Sequence[Question]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded prompt ids (N, L), attention mask (N, L) and answer positions (N,) of these questions."""
        layouts = [self._layout(q.text, tuple(len(q.images) == 1 for _ in q.images)) for q in rows]
        return self._prompts(layouts)[:3]

    # ---- image side -----------------------------------------------------------------------
    def _pack(self, patches: torch.Tensor, single: bool) -> torch.Tensor:
        """(N, P, D) projected patch features -> (N, T, D) in the one-image or multi-image token layout."""
        views = [torch.stack([p, p]) if single else p[None] for p in patches]  # base view (+ its equal anyres tile)
        sizes = torch.tensor([[self.size, self.size]] * len(views))
        packed, _ = self.model.model.pack_image_features(
            views,
            sizes,
            image_newline=self.model.model.image_newline,
            vision_aspect_ratio=self.model.config.vision_aspect_ratio,
        )
        return torch.stack(packed)

    def _patch_features(self, images: torch.Tensor, single: bool = True) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> projected features of the base views (N, P, D) of a one-image question's
        layout (`single`) or a multi-image one's."""
        pixels = preprocess_images(images, self.size, self.mean, self.std, single).to(self.model.dtype)
        layer = self.model.config.vision_feature_layer
        hidden = self.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
        return self.model.model.multi_modal_projector(feats)

    def _image_features(self, images: torch.Tensor, keys: set[bool]) -> dict[bool, torch.Tensor]:
        """Packed features {single: (N, T, D)} of each layout asked for; vision runs once per image (twice for a
        non-square one asked about in both layouts: the multi-image view is padded, the one-image view is not)."""
        if images.shape[-1] == images.shape[-2]:
            patches = self._patch_features(images)
            return {single: self._pack(patches, single) for single in keys}
        return {single: self._pack(self._patch_features(images, single), single) for single in keys}
