"""What every chat-VLM judge adapter shares: prompts from the real processor, image features scattered
at the image tokens, all questions in one language-model pass, the answer read where it would start.

An adapter (one file per VLM family) says how its images become token features (`_image_features`),
how its processor lays out a question (`_build_layout`) and, where its language model needs more than
embeddings and a mask (Qwen2.5-VL's 3-D positions), how to run it (`_language_hidden`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from pathlib import Path
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoProcessor

from npedit.judges.base import ImageRole, Judge, JudgeOutput, Question

LAYOUT_CACHE_SIZE = 4096


def round_to_8bit(x: torch.Tensor) -> torch.Tensor:
    """Clamp to [0, 1] and round to the 8-bit grid; the rounding passes gradients straight through."""
    if not (torch.is_grad_enabled() and x.requires_grad):  # nothing to pass through: one copy, rounded in place (the
        return x.clamp(0, 1).mul_(255).round_().div_(255)  # straight-through form held four of a 12-MP photo's 144 MB)
    x = x.clamp(0, 1)
    return x + ((x * 255).round() / 255 - x).detach()


def resize_like_processor(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, height, width) on the 8-bit grid, as HF image processors resize.

    They see 8-bit images and resize them with torchvision's 8-bit antialiased bicubic, which runs a
    width pass then a height pass and rounds after each; this does the same in float with straight-through
    rounding (at most 1/255 apart on photos).
    """
    x = round_to_8bit(images)
    if x.shape[-2:] != (height, width):
        x = round_to_8bit(F.interpolate(x, size=(x.shape[-2], width), mode="bicubic", antialias=True))
        x = round_to_8bit(F.interpolate(x, size=(height, width), mode="bicubic", antialias=True))
    return x


def normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel (x - mean) / std of a (B, 3, H, W) batch."""
    return (x - x.new_tensor(mean).view(1, -1, 1, 1)) / x.new_tensor(std).view(1, -1, 1, 1)


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


def check_grid(
    questions: Sequence[Sequence[Question]], reference: torch.Tensor, edited: torch.Tensor
) -> tuple[int, int]:
    """Validate a rectangular (B, Q) question grid against (B, 3, H, W) edited images and (B or 1, 3, H, W)
    references (one reference shared by every row); return (B, Q)."""
    batch = edited.shape[0]
    if reference.shape[0] not in (1, batch) or reference.dim() != 4 or edited.dim() != 4:
        shapes = f"{tuple(reference.shape)} and {tuple(edited.shape)}"
        raise ValueError(f"reference and edited must be (B, 3, H, W) with one B (or one shared reference), got {shapes}")
    lengths = [len(row) for row in questions]
    if len(questions) != batch or len(set(lengths)) != 1 or 0 in lengths:
        raise ValueError(f"questions must be {batch} non-empty rows of equal length, got row lengths {lengths}")
    return batch, lengths[0]


def control_tokens(processor) -> tuple[str, ...]:
    """The strings a judge's processor or tokenizer turns into control tokens wherever they stand in a prompt: its
    special added tokens and its image and video placeholders, longest first."""
    tokenizer = processor.tokenizer
    tokens = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    tokens |= {getattr(processor, name, None) for name in ("image_token", "video_token")}
    return tuple(sorted((t for t in tokens if isinstance(t, str) and t), key=lambda t: (-len(t), t)))


def first_control_token(text: str, tokens: Sequence[str]) -> str | None:
    """The first of `tokens` (`control_tokens`, longest first) that `text` holds, else None."""
    return next((token for token in tokens if token in text), None)


def load_processor(path_or_hub_id: str | os.PathLike, trust_remote_code: bool = False):
    """The judge's processor; ImportError in one line naming the package it lacks (transformers' video processors
    of all three families need torchvision, and say so in a paragraph about a "VideoProcessor")."""
    try:
        return AutoProcessor.from_pretrained(str(path_or_hub_id), trust_remote_code=trust_remote_code)
    except ImportError as exc:
        # a module not found names itself; transformers' backend checks name the library in their text only
        missing = (getattr(exc, "name", None) or "").split(".")[0] or next(
            (pkg for pkg in ("torchvision", "sentencepiece", "tiktoken") if pkg in str(exc).lower()), None)
        if missing is None:
            raise
        raise ImportError(f"the judge {str(path_or_hub_id)!r} needs {missing} to build its processor, and it is not "
                          f"installed here: pip install {missing} (requirements.txt pins the versions that work "
                          "together)", name=missing) from None


def _excerpt(text: str, at: int, length: int, around: int = 40) -> str:
    """The words of `text` around text[at:at + length], with "..." where it was cut."""
    return ("..." if at > around else "") + text[max(0, at - around):at + length + around] + (
        "..." if at + length + around < len(text) else "")


def _json_object(file: Path) -> dict:
    """The JSON object in `file`; {} when it is missing or holds something else."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class ChatJudge(Judge):
    """A frozen chat VLM answering Yes/No questions; gradients reach the edited image only.

    Subclasses set `model`, `processor`, `image_token_id` and call `_init_answers()`; they implement
    `_layout_key`, `_image_features` and `_build_layout`. A subclass whose reference image should carry
    gradients too (a judge being trained) sets `reference_grad = True`.
    """

    reference_grad = False
    model_class: type = None  # the transformers class the adapter wraps
    own_size = False  # True: sees each image at its own size, so `max_pixels` applies (`cap_pixels`)
    # processor files a judge folder must hold beyond the tokenizer's and the image processor's: without them
    # transformers builds the processor from defaults (e.g. no image token count), which fails later or lays out wrong
    processor_files: tuple[str, ...] = ()

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        max_pixels: int | None = None,
    ) -> "ChatJudge":
        """Load the model and its processor from a local folder or a (cached) hub id; `max_pixels` caps the
        pixels per image of a judge that sees images at their own size (`cap_pixels`). Weights are read from
        safetensors only (a folder of pickle .bin files is refused, never unpickled)."""
        from npedit.folders import check_size, locate

        path_or_hub_id = locate(path_or_hub_id, "judge folder")  # offline: a cached snapshot, or one error at once
        local = Path(path_or_hub_id)
        if local.is_dir() and not any(local.glob("*.safetensors")):
            from npedit.folders import CheckpointError, pickled_note

            raise CheckpointError(f"{local} holds no safetensors weights{pickled_note(local)}: a judge folder holds "
                                  "model*.safetensors")
        if local.is_dir():  # a file missing: one line naming it, not a processor of defaults that fails later
            cls.check_folder(local)
        # a config asking for a far larger model than its weights: one line, before any build (a hub id: its cache)
        check_size(path_or_hub_id, cls.model_class, torch_dtype, device=device)  # RAM, and a CUDA device's free memory
        processor = load_processor(path_or_hub_id, trust_remote_code)
        if not getattr(processor, "chat_template", None):  # before the weights: a real judge's take minutes to read
            from npedit.folders import CheckpointError

            raise CheckpointError(
                f"the judge {str(path_or_hub_id)!r} has no chat template (chat_template.jinja or chat_template.json "
                "beside its processor_config.json): each question is asked in the model's chat format; copy that "
                "file from the model's hub repo")
        if max_pixels is not None:
            cls.check_max_pixels(max_pixels)
            cls.cap_pixels(processor, max_pixels)
        model = cls.model_class.from_pretrained(
            str(path_or_hub_id), dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
        return cls(model.to(device or "cpu"), processor)

    @classmethod
    def check_folder(cls, folder: Path) -> None:
        """CheckpointError naming what a local judge folder lacks to load as its hub repo does: weights that load
        (`folders.weights_problem`), its tokenizer's files, an image processor config, and `processor_files`."""
        from npedit.folders import CheckpointError, tokenizer_problem, weights_problem

        # the image processor's settings: their own file (as the hub repos hold them) or inside processor_config.json
        # (as transformers 5 saves a processor)
        holds_image_processor = (folder / "preprocessor_config.json").is_file() or (
            "image_processor" in _json_object(folder / "processor_config.json"))
        problems = [weights_problem(folder, "the folder"), tokenizer_problem(folder, "the folder"),
                    None if holds_image_processor else "no preprocessor_config.json (the image processor's settings)",
                    *(f"no {name}" for name in cls.processor_files if not (folder / name).is_file())]
        problems = [p for p in problems if p]
        if problems:
            raise CheckpointError(f"{folder} is an incomplete judge folder: {'; '.join(problems)}; copy what is "
                                  "missing from the model's hub repo")

    @classmethod
    def check_max_pixels(cls, max_pixels: int) -> None:
        """ValueError unless this family sees images at their own size (so a pixel cap means something) and
        `max_pixels` is positive; needs no checkpoint, so a run's config can be checked before it starts."""
        if not cls.own_size:
            raise ValueError(f"{cls.model_class.config_class.model_type} judges see each image at one fixed size; "
                             "max_pixels applies to judges that see images at their own size (qwen2_5_vl)")
        if max_pixels <= 0:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")

    @classmethod
    def cap_pixels(cls, processor, max_pixels: int) -> None:
        """Make `processor` resize each image to at most `max_pixels` (families with `own_size` override it)."""
        raise NotImplementedError(f"{cls.__name__} sets own_size but does not say how to cap its processor")

    def __init__(self, model, processor):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.control_tokens = control_tokens(processor)
        self._layout = functools.lru_cache(maxsize=LAYOUT_CACHE_SIZE)(self._checked_layout)

    def _init_answers(self) -> None:
        """Read the single-token ids of "No" and "Yes" (raising when either is not one token)."""
        self.no_id = answer_token_id(self.processor, "No")
        self.yes_id = answer_token_id(self.processor, "Yes")

    def train(self, mode: bool = True) -> "ChatJudge":
        """The judge is frozen: it stays in eval mode whatever the caller asks."""
        return super().train(False)

    # ---- what an adapter supplies -----------------------------------------------------------
    def _layout_key(self, num_images: int, image_shape: tuple[int, int]) -> Hashable:
        """Which feature layout an image of (H, W) gets in a question showing `num_images` images."""
        raise NotImplementedError

    def _image_features(self, images: torch.Tensor, keys: set[Hashable]) -> dict[Hashable, torch.Tensor]:
        """(N, 3, H, W) in [0, 1] -> {layout key: (N, T, D) features}; the vision tower runs once per image."""
        raise NotImplementedError

    def _build_layout(self, text: str, image_keys: tuple[Hashable, ...]) -> tuple[torch.Tensor, ...]:
        """(prompt ids (L,), ...) of one question whose images have these layout keys; extra tensors are per-token
        inputs the language model needs (shape (..., L)), passed on to `_language_hidden`."""
        raise NotImplementedError

    def _language_hidden(self, embeds: torch.Tensor, mask: torch.Tensor, extras: list[torch.Tensor]) -> torch.Tensor:
        """Last hidden states (N, L, D) of the language model on scattered embeddings."""
        language_model = self.model.model.language_model
        return language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state

    # ---- shared -----------------------------------------------------------------------------
    def control_token_in(self, text: str) -> str | None:
        """The first of the judge's control tokens (`control_tokens`, longest first) that `text` holds, else None."""
        return first_control_token(text, self.control_tokens)

    @property
    def max_positions(self) -> int | None:
        """How many token positions the judge's language model was built to read (its max_position_embeddings)."""
        return getattr(self.model.config.get_text_config(), "max_position_embeddings", None)

    def text_lengths(self, texts: Sequence[str]) -> list[int]:
        """How many tokens the judge's tokenizer reads in each of `texts` on its own (no chat turn, no images)."""
        tokenizer = self.processor.tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer itself: train checks 20,000 cases in 0.9 s, not 4.8 s (2-core CPU)
            return [len(e.ids) for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        # verbose=False: a text past the tokenizer's model_max_length is ours to name, not transformers' to warn about
        return [len(i) for i in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]]

    def prompt_length(self, question: Question, image_shape: tuple[int, int]) -> int:
        """Tokens in the prompt of `question` (its chat turn, its text, its images of (H, W) `image_shape`)."""
        keys = tuple(self._layout_key(len(question.images), tuple(image_shape)) for _ in question.images)
        return len(self._build_layout(question.text, keys)[0])

    def _checked_layout(self, text: str, image_keys: tuple[Hashable, ...]) -> tuple[torch.Tensor, ...]:
        """`_build_layout` of a question whose text holds none of the judge's control tokens and whose prompt fits
        the judge's positions (else a ValueError)."""
        # the processor and tokenizer read such a string in the text as the token itself: an image placeholder made
        # the processor count one image too many, and a turn's end ("<|im_end|>") silently rewrote the prompt
        found = self.control_token_in(text)
        if found is not None:
            raise ValueError(f"a question holds {found!r} ({_excerpt(text, text.index(found), len(found))!r}), which "
                             "this judge's tokenizer reads as one of its control tokens (an image placeholder, a "
                             "turn's start or end), not as text: reword the instruction, object name or question "
                             "without it")
        limit = self.max_positions
        words = self.text_lengths([text])[0] if limit is not None else 0
        # a text past the limit on its own is refused before the processor reads it (and warns of its length)
        layout = self._build_layout(text, image_keys) if limit is None or words <= limit else None
        length = words if layout is None else len(layout[0])
        if limit is not None and length > limit:
            # rotary positions past the trained ones raise nothing: the answer would be read, in silence, from
            # positions the judge never saw (a 2,000-character Japanese instruction is ~6,000 tokens)
            size = (f"{length} tokens long ({words} of them its text, " if layout else
                    f"{words} tokens long in its text alone (")
            raise ValueError(f"a question is {size}{_excerpt(text, len(text) // 2, 0)!r}), past the {limit} "
                             "positions this judge reads (its language model's max_position_embeddings): its answer "
                             "would come from positions it never saw; shorten the instruction, object name or question")
        return layout

    def _prompts(self, layouts: list[tuple[torch.Tensor, ...]]):
        """Right-padded ids (N, L), attention mask (N, L), answer positions (N,) and padded extras."""
        longest = max(len(layout[0]) for layout in layouts)
        pad = self.processor.tokenizer.pad_token_id or 0
        ids = torch.full((len(layouts), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(layouts), longest), dtype=torch.long)
        extras = []
        for k in range(1, len(layouts[0])):  # each extra padded by repeating its last column
            first = layouts[0][k]
            extras.append(torch.zeros((*first.shape[:-1], len(layouts), longest), dtype=first.dtype))
        for i, layout in enumerate(layouts):
            n = len(layout[0])
            ids[i, :n] = layout[0]
            mask[i, :n] = 1
            for k, extra in enumerate(layout[1:]):
                extras[k][..., i, :n] = extra
                extras[k][..., i, n:] = extra[..., -1:]
        return ids, mask, mask.sum(1) - 1, extras

    def answer(
        self,
        reference: torch.Tensor,
        edited: torch.Tensor,
        questions: Sequence[Sequence[Question]],
    ) -> JudgeOutput:
        """Score `questions[b][q]` on (reference[b], edited[b]) in one language-model pass; logits are [No, Yes]. A
        reference of batch 1 is shared by every row: its features are computed once."""
        batch, num_q = check_grid(questions, reference, edited)
        rows = [q for row in questions for q in row]  # (B * Q) conversations, row-major
        images = {"reference": reference, "edited": edited}
        shapes = {role: tuple(images[role].shape[-2:]) for role in images}
        row_keys = [tuple(self._layout_key(len(q.images), shapes[role]) for role in q.images) for q in rows]
        wanted: dict[ImageRole, set] = {"reference": set(), "edited": set()}
        for q, keys in zip(rows, row_keys):
            for role, key in zip(q.images, keys):
                wanted[role].add(key)
        # before the vision tower runs: a question the judge refuses (control token, too long) costs nothing
        layouts = [self._layout(q.text, keys) for q, keys in zip(rows, row_keys)]
        device = self.model.device
        feats = {}
        for role, keys in wanted.items():
            if keys:
                with contextlib.nullcontext() if role == "edited" or self.reference_grad else torch.no_grad():
                    feats[role] = self._image_features(images[role].to(device), keys)
        # Features in the order their image tokens appear, conversation by conversation.
        shared = {role: images[role].shape[0] == 1 for role in images}
        image_feats = torch.cat([
            feats[role][key][0 if shared[role] else i // num_q]
            for i, (q, keys) in enumerate(zip(rows, row_keys))
            for role, key in zip(q.images, keys)
        ])  # (total image tokens, D)

        ids, mask, last, extras = self._prompts(layouts)
        ids, mask, last = ids.to(device), mask.to(device), last.to(device)
        embeds = self.model.get_input_embeddings()(ids)  # (N, L, D)
        slots = (ids == self.image_token_id).unsqueeze(-1)
        if int(slots.sum()) != image_feats.shape[0]:
            raise RuntimeError(f"{int(slots.sum())} image tokens but {image_feats.shape[0]} image features")
        embeds = embeds.masked_scatter(slots, image_feats.to(embeds.dtype))
        hidden = self._language_hidden(embeds, mask, [e.to(device) for e in extras])
        # The answer is generated right after the prompt: reading there is teacher-forcing its first token.
        at_answer = hidden[torch.arange(len(rows), device=device), last]  # (N, L, D) -> (N, D)
        vocab_logits = self.model.lm_head(at_answer).float()  # (N, V)
        pair = torch.tensor([self.no_id, self.yes_id], device=device)
        logits = vocab_logits[:, pair].view(batch, num_q, 2)
        vocab_logprobs = vocab_logits.log_softmax(-1)[:, pair].view(batch, num_q, 2)
        return JudgeOutput(logits=logits, vocab_logprobs=vocab_logprobs)
