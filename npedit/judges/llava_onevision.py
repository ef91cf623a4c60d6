"""LLaVA-OneVision judge adapter (SigLIP + Qwen2), differentiable w.r.t. the edited image.

Token layout comes from the real processor, run once per (question text, image count) on blank
placeholder images of the base view size; pixels go through torch ops instead. Every image is
seen only through its base view. The processor gives a one-image question the anyres layout,
which for a placeholder of exactly the base size is the base view plus one tile equal to it, so
the tile reuses the base view's features; a multi-image question gets base view + newline per
image. Both layouts are packed by the model's own `pack_image_features`.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

from npedit.judges.base import ImageRole, Judge, JudgeOutput, Question

LAYOUT_CACHE_SIZE = 4096


def base_view_settings(image_processor) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(side, mean, std) of the square base view, read from a loaded LLaVA-OneVision image processor."""
    size = image_processor.size
    height, width = (size.height, size.width) if size.height else (size.shortest_edge, size.shortest_edge)
    if height != width:
        raise ValueError(f"expected a square base view, the image processor resizes to {height}x{width}")
    return height, tuple(image_processor.image_mean), tuple(image_processor.image_std)


def round_to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 8-bit grid; the rounding passes gradients straight through."""
    x = x.clamp(0, 1)
    return x + ((x * 255).round() / 255 - x).detach()


def preprocess_images(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised base views (B, 3, size, size), as the HF processor makes them.

    The processor sees 8-bit images and resizes them with torchvision's 8-bit antialiased bicubic,
    which runs a width pass then a height pass and rounds after each; we do the same in float
    with straight-through rounding (max 1/255 apart on photos). Resizing goes straight to a
    square (the single-image base view); inputs are expected square, where the multi-image
    pad-to-square is a no-op.
    """
    x = round_to_8bit(images)
    if x.shape[-2:] != (size, size):
        x = round_to_8bit(F.interpolate(x, size=(x.shape[-2], size), mode="bicubic", antialias=True))  # width pass
        x = round_to_8bit(F.interpolate(x, size=(size, size), mode="bicubic", antialias=True))  # height pass
    mean_t = x.new_tensor(mean).view(1, -1, 1, 1)
    std_t = x.new_tensor(std).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


def conversation(text: str, num_images: int) -> list[dict]:
    """One user turn: the image placeholders, then the question."""
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def chat_prompt(processor, text: str, num_images: int) -> str:
    """The processor's chat template applied to `conversation`, ending where the assistant's answer starts."""
    return processor.apply_chat_template(conversation(text, num_images), add_generation_prompt=True, tokenize=False)


def answer_token_id(processor, word: str) -> int:
    """Id of `word` as the first token of the assistant turn; raises unless it is exactly one token."""
    prompt = chat_prompt(processor, "Answer with Yes or No.", 0)
    tokenizer = processor.tokenizer
    before = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    after = tokenizer(prompt + word, add_special_tokens=False)["input_ids"]
    if len(after) != len(before) + 1 or after[: len(before)] != before:
        pieces = tokenizer.convert_ids_to_tokens(after[len(before) - 1 :])
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} ({tokenizer.name_or_path!r}) does not encode {word!r} as one token "
            f"after the assistant prompt (tail of the encoding: {pieces}); Yes/No scoring needs single tokens"
        )
    return after[-1]


class LlavaOnevisionJudge(Judge):
    """A frozen LLaVA-OneVision answering Yes/No questions; gradients reach the edited image only."""

    def __init__(self, model: LlavaOnevisionForConditionalGeneration, processor):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.size, self.mean, self.std = base_view_settings(processor.image_processor)
        vision = model.config.vision_config
        if model.config.vision_feature_select_strategy != "full":
            # SigLIP has no CLS token; "default" would drop a real patch and break the anyres layout.
            raise ValueError("only vision_feature_select_strategy='full' (the LLaVA-OneVision setting) is supported")
        if vision.image_size != self.size:
            raise ValueError(f"processor base view is {self.size}px but the vision tower expects {vision.image_size}px")
        self.no_id = answer_token_id(processor, "No")
        self.yes_id = answer_token_id(processor, "Yes")
        self.image_token_id = model.config.image_token_id
        if processor.image_token_id != self.image_token_id:
            raise ValueError(f"processor image token {processor.image_token_id} != model's {self.image_token_id}")
        # Features per image in a one-image (anyres) and a multi-image question.
        patches = torch.zeros(1, (vision.image_size // vision.patch_size) ** 2, model.config.text_config.hidden_size)
        self.feature_lens = {single: self._pack(patches, single).shape[1] for single in (True, False)}
        self._layout = functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)(self._build_layout)

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
    ) -> "LlavaOnevisionJudge":
        """Load the model and its processor from a local folder or a (cached) hub id."""
        path = str(path_or_hub_id)
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            path, dtype=torch_dtype, trust_remote_code=trust_remote_code
        )
        return cls(model.to(device or "cpu"), processor)

    @property
    def image_size(self) -> int:
        """Side of the square base view the vision tower sees."""
        return self.size

    def train(self, mode: bool = True) -> "LlavaOnevisionJudge":
        """The judge is frozen: it stays in eval mode whatever the caller asks."""
        return super().train(False)

    # ---- text side ------------------------------------------------------------------------
    def _build_layout(self, text: str, num_images: int) -> torch.Tensor:
        """Prompt ids (L,) with each <image> expanded by the real processor, checked against our features."""
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
        return ids

    def _prompts(self, rows: list[Question]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded prompt ids (N, L), attention mask (N, L) and the answer position of each row (N,)."""
        layouts = [self._layout(q.text, len(q.images)) for q in rows]
        longest = max(len(ids) for ids in layouts)
        pad = self.processor.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, layout in enumerate(layouts):
            ids[i, : len(layout)] = layout
            mask[i, : len(layout)] = 1
        return ids, mask, mask.sum(1) - 1

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

    def _patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> projected features of the base views (N, P, D)."""
        pixels = preprocess_images(images, self.size, self.mean, self.std).to(self.model.dtype)
        layer = self.model.config.vision_feature_layer
        hidden = self.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        feats = hidden[layer] if isinstance(layer, int) else torch.cat([hidden[i] for i in layer], dim=-1)
        return self.model.model.multi_modal_projector(feats)

    def _image_features(self, images: torch.Tensor, layouts: set[bool], grad: bool) -> dict[bool, torch.Tensor]:
        """Packed features {single: (N, T, D)} of each layout asked for; vision runs once per image."""
        with contextlib.nullcontext() if grad else torch.no_grad():
            patches = self._patch_features(images.to(self.model.device))
            return {single: self._pack(patches, single) for single in layouts}

    # ---- scoring --------------------------------------------------------------------------
    def answer(
        self,
        reference: torch.Tensor,
        edited: torch.Tensor,
        questions: Sequence[Sequence[Question]],
    ) -> JudgeOutput:
        """Score `questions[b][q]` on (reference[b], edited[b]) in one language-model pass; logits are [No, Yes]."""
        batch, num_q = check_grid(questions, reference, edited)
        rows = [q for row in questions for q in row]  # (B * Q) conversations, row-major
        wanted: dict[ImageRole, set[bool]] = {"reference": set(), "edited": set()}
        for q in rows:
            for role in q.images:
                wanted[role].add(len(q.images) == 1)
        images = {"reference": reference, "edited": edited}
        feats = {
            role: self._image_features(images[role], layouts, grad=role == "edited")
            for role, layouts in wanted.items()
            if layouts
        }
        # Features in the order their <image> tokens appear, conversation by conversation.
        image_feats = torch.cat(
            [feats[role][len(q.images) == 1][i // num_q] for i, q in enumerate(rows) for role in q.images]
        )  # (total image tokens, D)

        device = self.model.device
        ids, mask, last = (t.to(device) for t in self._prompts(rows))
        embeds = self.model.get_input_embeddings()(ids)  # (N, L, D)
        slots = (ids == self.image_token_id).unsqueeze(-1)
        if int(slots.sum()) != image_feats.shape[0]:
            raise RuntimeError(f"{int(slots.sum())} image tokens but {image_feats.shape[0]} image features")
        embeds = embeds.masked_scatter(slots, image_feats.to(embeds.dtype))
        language_model = self.model.model.language_model
        hidden = language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        # The answer is generated right after the prompt: reading there is teacher-forcing its first token.
        at_answer = hidden[torch.arange(len(rows), device=device), last]  # (N, L, D) -> (N, D)
        vocab_logits = self.model.lm_head(at_answer).float()  # (N, V)
        pair = torch.tensor([self.no_id, self.yes_id], device=device)
        logits = vocab_logits[:, pair].view(batch, num_q, 2)
        vocab_logprobs = vocab_logits.log_softmax(-1)[:, pair].view(batch, num_q, 2)
        return JudgeOutput(logits=logits, vocab_logprobs=vocab_logprobs)

    @torch.no_grad()
    def score(
        self, reference: torch.Tensor, edited: torch.Tensor, questions: Sequence[Sequence[Question]]
    ) -> list[list[float]]:
        """P(Yes) of each question as plain floats (B x Q), without gradient; for CLIs and the app."""
        return self.answer(reference, edited, questions).p_yes.tolist()


def check_grid(
    questions: Sequence[Sequence[Question]], reference: torch.Tensor, edited: torch.Tensor
) -> tuple[int, int]:
    """Validate a rectangular (B, Q) question grid against (B, 3, H, W) images; return (B, Q)."""
    batch = reference.shape[0]
    if edited.shape[0] != batch or reference.dim() != 4 or edited.dim() != 4:
        shapes = f"{tuple(reference.shape)} and {tuple(edited.shape)}"
        raise ValueError(f"reference and edited must be (B, 3, H, W) with one B, got {shapes}")
    lengths = [len(row) for row in questions]
    if len(questions) != batch or len(set(lengths)) != 1 or 0 in lengths:
        raise ValueError(f"questions must be {batch} non-empty rows of equal length, got row lengths {lengths}")
    return batch, lengths[0]
