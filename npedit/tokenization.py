"""Small byte-level BPE tokenizers trained from text, for tiny models and the Shapes world.

Real checkpoints ship their own tokenizers; this builds one offline with the same special
tokens and chat layout as the Qwen family (``<|im_start|>role\\n ... <|im_end|>``), so tiny
models run through the exact code paths of the real ones.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<image>",
    "<video>",
)

# The Qwen chat layout (system turn optional); images appear where the content says so.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'video' %}<video>"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_bpe_tokenizer(
    corpus: Iterable[str],
    *,
    vocab_size: int = 1024,
    special_tokens: Iterable[str] = QWEN_SPECIAL_TOKENS,
    chat_template: str | None = QWEN_CHAT_TEMPLATE,
    model_max_length: int = 4096,
    required_words: Iterable[str] = ("Yes", "No"),
    extra_special_tokens: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `corpus` and wrap it as a transformers fast tokenizer.

    Every string in `required_words` becomes a single token (added to the vocabulary if the
    merges alone do not produce it), so Yes/No scoring works on the result. `extra_special_tokens`
    names special tokens as tokenizer attributes (e.g. InternVL's ``context_image_token``); each is
    added to the special tokens.
    """
    named = dict(extra_special_tokens or {})
    special = list(dict.fromkeys([*special_tokens, *named.values()]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    words = list(required_words)
    texts = list(corpus) + [" ".join(words)] * 50
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=model_max_length,
        additional_special_tokens=[s for s in special if s not in ("<|im_end|>", "<|endoftext|>")],
        **({"extra_special_tokens": named} if named else {}),
    )
    for w in words:
        if len(fast.encode(w, add_special_tokens=False)) != 1:
            fast.add_tokens([w])
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.padding_side = "right"
    return fast
