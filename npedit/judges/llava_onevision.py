"""LLaVA-OneVision judge adapter (SigLIP + Qwen2), differentiable w.r.t. the edited image.

Token layout comes from the real processor, run once per (question text, image sizes) on blank
placeholder images; pixels go through torch ops instead, laid out as the processor lays them out:
- an image of a one-image question gets the "anyres" views: the whole image resized to the square
  base view, then the tiles of a canvas (the image_grid_pinpoints entry that `select_best_resolution`
  picks for its size) holding the image resized with its aspect ratio kept and centred on black. The
  model's own `pack_image_features` unpads the tiles' feature grid, pools it when it exceeds
  vision_aspect_ratio's cap and adds a newline per row. A square image no larger than the base view
  has one tile, equal to the base view, so the vision tower runs once;
- an image of a multi-image question gets one view, padded to a square with the mean colour first,
  plus one newline.
Resizes are the processor's 8-bit antialiased bicubic (`resize_like_processor`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LlavaOnevisionForConditionalGeneration
from transformers.image_processing_utils import select_best_resolution

from npedit.judges.base import Question
from npedit.judges.chat import ChatJudge, chat_prompt, normalise, resize_like_processor

BICUBIC = 3  # PIL's (and transformers' PILImageResampling) code for bicubic, the resize torch ops reproduce


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


def anyres_canvas(height: int, width: int, pinpoints: Sequence[Sequence[int]]) -> tuple[tuple[int, int],
                                                                                           tuple[int, int]]:
    """The processor's anyres canvas for an image of (height, width): the pinpoint it picks, (H*, W*), and the size
    the image is resized to inside it, its aspect ratio kept and one side filling the canvas."""
    best_h, best_w = select_best_resolution((height, width), [list(p) for p in pinpoints])
    if best_w / width < best_h / height:
        return (best_h, best_w), (min(math.ceil(height * best_w / width), best_h), best_w)
    return (best_h, best_w), (best_h, min(math.ceil(width * best_h / height), best_w))


def anyres_tiles(images: torch.Tensor, side: int, pinpoints: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, T, 3, side, side) anyres tiles, row-major, on the 8-bit grid (not normalised).

    The image is resized into its canvas (`anyres_canvas`) and centred on black (the processor pads with zeros,
    the extra pixel of an odd margin going right/bottom), then cut into side x side tiles.
    """
    b, c, h, w = images.shape
    (best_h, best_w), (fit_h, fit_w) = anyres_canvas(h, w, pinpoints)
    fitted = resize_like_processor(images, fit_h, fit_w)
    top, left = (best_h - fit_h) // 2, (best_w - fit_w) // 2
    canvas = F.pad(fitted, (left, best_w - fit_w - left, top, best_h - fit_h - top))  # (B, C, H*, W*)
    rows, cols = best_h // side, best_w // side
    tiles = canvas.reshape(b, c, rows, side, cols, side).permute(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, S, S)
    return tiles.reshape(b, rows * cols, c, side, side)


class LlavaOnevisionJudge(ChatJudge):
    """A frozen LLaVA-OneVision answering Yes/No questions; gradients reach the edited image only."""

    model_class = LlavaOnevisionForConditionalGeneration
    processor_files = ("processor_config.json",)  # its image token count and feature selection

    def __init__(self, model: LlavaOnevisionForConditionalGeneration, processor):
        super().__init__(model, processor)
        # image layout keys -> per-image token counts that matched the processor's ids (None: ask the processor)
        self._expansions: dict[tuple, list[int] | None] = {}
        image_processor = processor.image_processor
        self.size, self.mean, self.std = base_view_settings(image_processor)
        config = model.config
        vision = config.vision_config
        if config.vision_feature_select_strategy != "full":
            # SigLIP has no CLS token; "default" would drop a real patch and break the anyres layout.
            raise ValueError("only vision_feature_select_strategy='full' (the LLaVA-OneVision setting) is supported")
        if vision.image_size != self.size:
            raise ValueError(f"processor base view is {self.size}px but the vision tower expects {vision.image_size}px")
        self.pinpoints = [list(p) for p in image_processor.image_grid_pinpoints]
        if self.pinpoints != [list(p) for p in config.image_grid_pinpoints]:
            raise ValueError(f"the image processor's image_grid_pinpoints {self.pinpoints} differ from the model's "
                             f"{config.image_grid_pinpoints}")
        if any(side % self.size for p in self.pinpoints for side in p):
            raise ValueError(f"every image_grid_pinpoints entry must be a multiple of the {self.size}px base view, "
                             f"got {self.pinpoints}")
        if image_processor.resample != BICUBIC:
            raise ValueError(f"the image processor resamples with {image_processor.resample!r}; only bicubic "
                             f"({BICUBIC}, the LLaVA-OneVision setting) is reproduced with torch ops")
        self._init_answers()
        self.image_token_id = config.image_token_id
        if processor.image_token_id != self.image_token_id:
            raise ValueError(f"processor image token {processor.image_token_id} != model's {self.image_token_id}")

    @property
    def image_size(self) -> int:
        """Side of the square base view the vision tower sees."""
        return self.size

    def image_tokens(self, height: int, width: int, single: bool = True) -> int:
        """Image tokens (= packed features) of an image of this size in a one-image question or beside others."""
        config = self.model.config
        grid = (self.size // config.vision_config.patch_size) ** 2
        views = 1 + self._tile_count(height, width) if single else 1
        packed, _ = self._pack([torch.zeros(views, grid, 1)], [(height, width)] if single else None,
                               newline=torch.zeros(1))
        return packed[0].shape[0]

    def _tile_count(self, height: int, width: int) -> int:
        """Anyres tiles of an image of (height, width): its canvas in base views."""
        (best_h, best_w), _ = anyres_canvas(height, width, self.pinpoints)
        return (best_h // self.size) * (best_w // self.size)

    # ---- text side ------------------------------------------------------------------------
    def _layout_key(self, num_images: int, image_shape: tuple[int, int]) -> tuple[int, int] | None:
        """(H, W) of the image of a one-image question (its anyres layout depends on it), None beside others."""
        return tuple(image_shape) if num_images == 1 else None

    def _build_layout(self, text: str, image_keys: tuple[tuple[int, int] | None, ...]) -> tuple[torch.Tensor]:
        """Prompt ids (L,) with each <image> expanded as the real processor expands it, checked against our features.

        The processor expands each <image> to its image's token count, then tokenizes the whole prompt; it also
        preprocesses blank images to count them (4x the tokenizer's time: 0.65 against 0.17 ms a question alone, and
        85 against 15 ms per update of configs/shapes/npedit.yaml, which asks ~30 new questions, on the 2-core CPU).
        So the processor runs on the first question of each image layout, and the counts that question's
        ids were checked with serve every later question of that layout: the prompt's <image>s expanded by hand,
        then the processor's tokenizer. Where that first comparison differs, that layout keeps the processor."""
        prompt = chat_prompt(self.processor, text, len(image_keys))
        if image_keys not in self._expansions:
            ids = self._processor_ids(prompt, image_keys)
            counts = [self.image_tokens(*(key or (self.size, self.size)), single=key is not None)
                      for key in image_keys]
            expanded = self._expanded_ids(prompt, counts)
            self._expansions[image_keys] = counts if expanded is not None and torch.equal(expanded, ids) else None
            return (ids,)
        counts = self._expansions[image_keys]
        ids = self._expanded_ids(prompt, counts) if counts is not None else None
        return (ids if ids is not None else self._processor_ids(prompt, image_keys),)

    def _expanded_ids(self, prompt: str, counts: list[int]) -> torch.Tensor | None:
        """The processor's tokenizer on `prompt` with its k-th <image> repeated counts[k] times; None when the prompt
        holds another number of <image>s (a question quoting one: the processor alone knows what it makes of it)."""
        token = self.processor.image_token
        pieces = prompt.split(token)
        if len(pieces) != len(counts) + 1:
            return None
        expanded = pieces[0] + "".join(token * n + piece for n, piece in zip(counts, pieces[1:]))
        return self.processor.tokenizer(expanded, return_tensors="pt")["input_ids"][0]

    def _processor_ids(self, prompt: str, image_keys: tuple[tuple[int, int] | None, ...]) -> torch.Tensor:
        """Prompt ids (L,) from the real processor on blank images of these layouts, checked against our packing."""
        blanks = [Image.new("RGB", (self.size, self.size) if key is None else key[::-1]) for key in image_keys]
        ids = self.processor(text=prompt, images=[blanks], return_tensors="pt")["input_ids"][0]
        expected = sum(self.image_tokens(*(key or (self.size, self.size)), single=key is not None)
                       for key in image_keys)
        found = int((ids == self.image_token_id).sum())
        if found != expected:
            sizes = [key or "multi-image" for key in image_keys]
            raise RuntimeError(
                f"processor inserted {found} image tokens for image(s) {sizes}, the model's packing gives "
                f"{expected} features; processor and model configs disagree"
            )
        return ids

    def prompt_ids(self, rows: Sequence[Question], image_shape: tuple[int, int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded prompt ids (N, L), attention mask (N, L) and answer positions (N,) of these questions, on
        images of `image_shape` (H, W) (the base view's size by default)."""
        shape = image_shape or (self.size, self.size)
        layouts = [self._layout(q.text, tuple(self._layout_key(len(q.images), shape) for _ in q.images))
                   for q in rows]
        return self._prompts(layouts)[:3]

    # ---- image side -----------------------------------------------------------------------
    def _pack(self, views: list[torch.Tensor], sizes: list[tuple[int, int]] | None,
              newline: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per image (V, P, D) projected view features -> the model's packed (T, D) features: anyres when `sizes`
        gives each image's (H, W), the multi-image layout (one view + newline) when it is None."""
        sizes = torch.tensor(sizes if sizes is not None else [[self.size, self.size]] * len(views))
        return self.model.model.pack_image_features(
            views,
            sizes,
            image_newline=self.model.model.image_newline if newline is None else newline,
            vision_aspect_ratio=self.model.config.vision_aspect_ratio,
        )

    def _vision(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised views -> projected patch features (N, P, D)."""
        layer = self.model.config.vision_feature_layer
        hidden = self.model.model.vision_tower(pixels.to(self.model.dtype), output_hidden_states=True).hidden_states
        feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
        return self.model.model.multi_modal_projector(feats)

    def _patch_features(self, images: torch.Tensor, single: bool = True) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> projected features of the base views (N, P, D) of a one-image question's
        layout (`single`) or a multi-image one's."""
        return self._vision(preprocess_images(images, self.size, self.mean, self.std, single))

    def _image_features(self, images: torch.Tensor, keys: set[tuple[int, int] | None]
                        ) -> dict[tuple[int, int] | None, torch.Tensor]:
        """Packed features {key: (N, T, D)} of each layout asked for (`_layout_key`), in one vision pass: the base
        view (shared by both layouts of a square image), a non-square image's padded multi-image view, the tiles."""
        n, _, h, w = images.shape
        anyres = next((key for key in keys if key is not None), None)
        square = h == w
        batches = {}  # name -> normalised views (n or n * tiles, 3, S, S), all through the vision tower at once
        if anyres is not None or square:
            batches["base"] = preprocess_images(images, self.size, self.mean, self.std)
        if None in keys and not square:
            batches["padded"] = preprocess_images(images, self.size, self.mean, self.std, single=False)
        (best_h, best_w), fit = anyres_canvas(h, w, self.pinpoints)
        # A square image's canvas of the base view's size holds one tile, equal to the base view: reuse it.
        tile_is_base = (best_h, best_w) == fit == (self.size, self.size)
        if anyres is not None and not tile_is_base:
            tiles = anyres_tiles(images, self.size, self.pinpoints)  # (n, T, 3, S, S)
            batches["tiles"] = normalise(tiles.flatten(0, 1), self.mean, self.std)
        feats = self._vision(torch.cat(list(batches.values())))
        feats = dict(zip(batches, feats.split([len(x) for x in batches.values()])))  # name -> (n or n * T, P, D)
        out = {}
        if None in keys:
            packed, _ = self._pack(list(feats["base" if square else "padded"][:, None]), None)
            out[None] = torch.stack(packed)
        if anyres is not None:
            base = feats["base"][:, None]  # (n, 1, P, D)
            tiles = base if tile_is_base else feats["tiles"].unflatten(0, (n, -1))  # (n, T, P, D)
            packed, _ = self._pack(list(torch.cat([base, tiles], dim=1)), [anyres] * n)
            out[anyres] = torch.stack(packed)
        return out
