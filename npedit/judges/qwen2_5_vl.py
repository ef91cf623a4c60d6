"""Qwen2.5-VL judge adapter (`Qwen2_5_VLForConditionalGeneration`), differentiable w.r.t. the edited image.

Each image is resized as the real image processor would (`smart_resize`: both sides multiples of
patch x merge size, the pixel count kept between its min and max), normalised, and cut into the
processor's flat patch layout with torch ops, so gradients reach the pixels. The prompt, the number
of image tokens and the 3-D rotary positions (`get_rope_index`) come from the real processor and
model, built once per (question, image sizes) on blank placeholder images of the resized size.
"""

from __future__ import annotations


import torch
from PIL import Image
from transformers import Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from npedit.judges.chat import ChatJudge, chat_prompt, normalise, resize_like_processor


def patchify(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """(N, C, H, W) normalised images -> (N * H/patch * W/patch, C * temporal * patch^2), the processor's layout.

    Patches are ordered merge window by merge window (each window's patches row-major), and a still
    image fills every temporal slot of a patch with itself, as Qwen2-VL's image processor does.
    """
    n, c, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = pixels.reshape(n, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # (N, gh/m, gw/m, m, m, C, P, P)
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
    return x.reshape(n * gh * gw, c * temporal * patch * patch)


class Qwen25VLJudge(ChatJudge):
    """A frozen Qwen2.5-VL answering Yes/No questions; gradients reach the edited image only."""

    model_class = Qwen2_5_VLForConditionalGeneration
    own_size = True

    def __init__(self, model: Qwen2_5_VLForConditionalGeneration, processor):
        super().__init__(model, processor)
        image_processor = processor.image_processor
        vision = model.config.vision_config
        self.patch = image_processor.patch_size
        self.merge = image_processor.merge_size
        self.temporal = image_processor.temporal_patch_size
        model_layout = (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)
        if (self.patch, self.merge, self.temporal) != model_layout:
            raise ValueError(
                f"image processor patches (patch, merge, temporal) = {(self.patch, self.merge, self.temporal)} "
                f"but the vision tower expects {model_layout}"
            )
        size = image_processor.size
        self.min_pixels, self.max_pixels = size["shortest_edge"], size["longest_edge"]
        self.mean, self.std = tuple(image_processor.image_mean), tuple(image_processor.image_std)
        self._init_answers()
        self.image_token_id = model.config.image_token_id
        if processor.image_token_id != self.image_token_id:
            raise ValueError(f"processor image token {processor.image_token_id} != model's {self.image_token_id}")

    @classmethod
    def cap_pixels(cls, processor, max_pixels: int) -> None:
        """At most `max_pixels` per image (the processor's own cap otherwise; the released checkpoints allow
        28^2 x 1280 = 1M, 1,280 tokens per image): e.g. 448 * 448 for 256 tokens, what a fixed-view judge costs."""
        image_processor = processor.image_processor
        factor = image_processor.patch_size * image_processor.merge_size
        if max_pixels < factor * factor:
            smallest = factor * factor
            raise ValueError(f"max_pixels must be at least {smallest} (one {factor}x{factor} block), got {max_pixels}")
        low = min(image_processor.size["shortest_edge"], max_pixels)
        image_processor.size = type(image_processor.size)(shortest_edge=low, longest_edge=max_pixels)

    def view_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) the processor resizes an image of this size to."""
        return smart_resize(
            height, width, factor=self.patch * self.merge, min_pixels=self.min_pixels, max_pixels=self.max_pixels
        )

    # ---- text side ------------------------------------------------------------------------
    def _layout_key(self, num_images: int, image_shape: tuple[int, int]) -> tuple[int, int]:
        """The resized (height, width): it sets the image's token count and rotary positions."""
        return self.view_size(*image_shape)

    def _build_layout(self, text: str, image_keys: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt ids (L,) expanded by the real processor and their 3-D rotary positions (3, L)."""
        prompt = chat_prompt(self.processor, text, len(image_keys))
        blanks = [Image.new("RGB", (w, h)) for h, w in image_keys]
        inputs = self.processor(text=prompt, images=blanks, return_tensors="pt")
        ids = inputs["input_ids"][0]
        grid = inputs.get("image_grid_thw")
        ours = torch.tensor([[1, h // self.patch, w // self.patch] for h, w in image_keys], dtype=torch.long)
        if not torch.equal(grid, ours):
            raise RuntimeError(
                f"processor patch grid {grid.tolist()} != ours {ours.tolist()}; processor and model disagree"
            )
        expected = sum(int(g.prod()) // self.merge**2 for g in ours)
        found = int((ids == self.image_token_id).sum())
        if found != expected:
            raise RuntimeError(f"processor inserted {found} image tokens, the patch grid gives {expected} features")
        types = inputs.get("mm_token_type_ids")
        types = (ids == self.image_token_id).int()[None] if types is None else types
        positions, _ = self.model.model.get_rope_index(ids[None], mm_token_type_ids=types, image_grid_thw=grid)
        return ids, positions[:, 0]

    def _language_hidden(self, embeds: torch.Tensor, mask: torch.Tensor, extras: list[torch.Tensor]) -> torch.Tensor:
        """The language model with the 3-D rotary positions of each prompt."""
        (positions,) = extras
        language_model = self.model.model.language_model
        return language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state

    # ---- image side -----------------------------------------------------------------------
    def _image_features(self, images: torch.Tensor, keys: set[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
        """{(height, width): merged vision features (N, T, D)} of the images resized to that size."""
        (key,) = keys  # one size per batch of images
        height, width = key
        pixels = normalise(resize_like_processor(images, height, width), self.mean, self.std)
        visual = self.model.model.visual
        flat = patchify(pixels, self.patch, self.merge, self.temporal).to(visual.dtype)
        grid = torch.tensor([[1, height // self.patch, width // self.patch]] * len(images), device=flat.device)
        merged = visual(flat, grid_thw=grid).pooler_output  # (N * T, D)
        return {key: merged.reshape(len(images), -1, merged.shape[-1])}

