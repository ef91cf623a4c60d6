"""The InternVL3 (-hf) judge adapter on a tiny random model: layout, preprocessing, gradients."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import cbook
from PIL import Image
from transformers import GotOcr2ImageProcessor

from npedit.judges import (
    contains_question,
    edit_question,
    free_question,
    identity_question,
    load_judge,
    training_questions,
)
from npedit.judges.chat import chat_prompt
from npedit.judges.internvl import InternVLJudge, preprocess_images, view_settings
from npedit.judges.tiny import INTERNVL_SPECIAL_TOKENS, build_tiny_internvl
from npedit.tokenization import build_bpe_tokenizer

SIZE, PATCH = 64, 4  # a 16x16 patch grid, pixel-shuffled to 64 tokens per image (InternVL3: 256)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return build_tiny_internvl(tmp_path_factory.mktemp("internvl"), image_size=SIZE, patch_size=PATCH)


@pytest.fixture(scope="module")
def judge(judge_dir):
    return load_judge(judge_dir)  # dispatches on model_type "internvl"


def random_images(batch, size=SIZE, seed=0):
    """(batch, 3, size, size) in [0, 1] on the 8-bit grid, so PIL round trips are exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g).float() / 255


def to_pil(image):
    """(3, H, W) in [0, 1] -> PIL RGB image."""
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())


def test_round_trip(judge, judge_dir):
    assert isinstance(judge, InternVLJudge)
    assert judge.image_size == SIZE
    assert judge.feature_len == (SIZE // PATCH // 2) ** 2
    assert judge.image_token_id == judge.processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert not any(p.requires_grad for p in judge.parameters())
    assert not judge.train().model.training
    again = InternVLJudge.from_pretrained(judge_dir)
    ref, edited = random_images(1, seed=1), random_images(1, seed=2)
    questions = [[edit_question("make the circle red")]]
    assert torch.equal(judge.answer(ref, edited, questions).logits, again.answer(ref, edited, questions).logits)


def test_yes_no_are_single_tokens(judge):
    tokenizer = judge.processor.tokenizer
    assert tokenizer.encode("Yes", add_special_tokens=False) == [judge.yes_id]
    assert tokenizer.encode("No", add_special_tokens=False) == [judge.no_id]
    assert judge.yes_id != judge.no_id


def test_multi_token_yes_is_refused_at_load(judge_dir, tmp_path):
    broken = shutil.copytree(judge_dir, tmp_path / "broken")
    tokenizer = build_bpe_tokenizer(["no image here", "No"] * 20, vocab_size=300, required_words=("No",),
                                    extra_special_tokens=INTERNVL_SPECIAL_TOKENS)
    assert len(tokenizer.encode("Yes", add_special_tokens=False)) > 1
    tokenizer.save_pretrained(broken)
    with pytest.raises(ValueError, match=r"tokenizer .* does not encode 'Yes' as one token"):
        InternVLJudge.from_pretrained(broken)


def test_processor_and_model_disagreeing_is_refused(judge_dir, tmp_path):
    broken = shutil.copytree(judge_dir, tmp_path / "broken")
    config_file = broken / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["image_seq_length"] = 9
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="processor inserts 9 image tokens per view, the model makes 64"):
        InternVLJudge.from_pretrained(broken)

    judge = InternVLJudge.from_pretrained(judge_dir)
    judge.processor.image_seq_length = 65  # after the load-time check: the layout check still catches it
    with pytest.raises(RuntimeError, match="processor inserted 130 image tokens for 2 image"):
        judge.answer(random_images(1), random_images(1), [[edit_question("make it red")]])


@pytest.mark.parametrize("size", [SIZE, 448])
def test_preprocessing_matches_hf_processor_on_a_photo(judge, size):
    path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    assert path.is_file()
    pil = Image.open(path).convert("RGB")
    photo = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    if size == SIZE:
        image_processor = judge.processor.image_processor
    else:  # configured like the released InternVL3-hf checkpoints
        image_processor = GotOcr2ImageProcessor(
            size={"height": 448, "width": 448}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, resample=3,
            crop_to_patches=False,
        )
    side, mean, std = view_settings(image_processor)
    ours = preprocess_images(photo, side, mean, std)[0]
    theirs = image_processor(images=pil, crop_to_patches=False, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, size, size)
    # Compared on the 8-bit grid: ImageNet's std (~0.225) turns one 1/255 step into 0.0175 once normalised.
    steps = (ours - theirs).abs() * torch.tensor(std).view(3, 1, 1) * 255  # (3, S, S) 8-bit steps apart
    assert steps.max() < 1.001 and (steps < 0.5).float().mean() > 0.99
    assert (ours - theirs).abs().max() < 1.001 / (255 * min(std))


@pytest.mark.parametrize("question", [contains_question("red circle"), edit_question("make the circle red")])
def test_layout_matches_the_full_hf_forward(judge, question):
    """Processor token counts equal the model's features, and our scatter path equals model(**inputs)."""
    ref, edited = random_images(1, seed=3), random_images(1, seed=4)
    images = {"reference": ref[0], "edited": edited[0]}
    n = len(question.images)
    prompt = chat_prompt(judge.processor, question.text, n)
    inputs = judge.processor(text=prompt, images=[to_pil(images[r]) for r in question.images], crop_to_patches=False,
                             return_tensors="pt")
    assert int((inputs["input_ids"] == judge.image_token_id).sum()) == n * judge.feature_len
    with torch.no_grad():
        full = judge.model(**inputs).logits[0, -1, [judge.no_id, judge.yes_id]]
        ours = judge.answer(ref, edited, [[question]]).logits[0, 0]
    torch.testing.assert_close(ours, full, atol=1e-4, rtol=1e-4)


def test_shapes_and_batching_invariance(judge):
    ref, edited = random_images(2, seed=5), random_images(2, seed=6)
    questions = [
        training_questions("make the circle red", "recolor") + [free_question("Is it sharp?", ("edited",))],
        training_questions("remove the dog", "remove", "dog") + [free_question("Same picture?", expected="No")],
    ]
    out = judge.answer(ref, edited, questions)
    assert out.logits.shape == out.vocab_logprobs.shape == (2, 3, 2)
    assert ((out.p_yes > 0) & (out.p_yes < 1)).all()
    assert (out.vocab_logprobs < 0).all()
    for b in range(2):
        alone = judge.answer(ref[b : b + 1], edited[b : b + 1], questions[b : b + 1])
        torch.testing.assert_close(alone.logits[0], out.logits[b], atol=1e-4, rtol=0)
        torch.testing.assert_close(alone.vocab_logprobs[0], out.vocab_logprobs[b], atol=1e-4, rtol=0)
    scores = judge.score(ref, edited, questions)
    assert len(scores) == 2 and all(len(row) == 3 for row in scores)


def test_gradient_reaches_edited_image_only(judge):
    ref = random_images(2, size=48, seed=7).requires_grad_(True)  # resized inside the judge
    edited = random_images(2, size=48, seed=8).requires_grad_(True)
    questions = [[edit_question("make it blue"), identity_question("make it blue")]] * 2
    judge.answer(ref, edited, questions).margin.sum().backward()
    assert torch.isfinite(edited.grad).all() and edited.grad.abs().sum() > 0
    assert ref.grad is None or not ref.grad.any()


def test_descent_on_pixels_raises_p_yes(judge):
    ref = random_images(1, seed=9)
    question = [[edit_question("make the circle red")]]
    raw = torch.logit(random_images(1, seed=10).clamp(0.05, 0.95)).requires_grad_(True)
    optimizer = torch.optim.Adam([raw], lr=0.1)
    with torch.no_grad():
        before = judge.answer(ref, torch.sigmoid(raw), question).p_yes.item()
    for _ in range(20):
        loss = -F.logsigmoid(judge.answer(ref, torch.sigmoid(raw), question).margin).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = judge.answer(ref, torch.sigmoid(raw), question).p_yes.item()
    assert after > before + 0.05, (before, after)
