"""The Qwen2.5-VL judge adapter on a tiny random model: layout, positions, preprocessing, gradients."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import cbook
from PIL import Image
from transformers import Qwen2VLImageProcessor

from npedit.judges import (
    Qwen25VLJudge,
    contains_question,
    edit_question,
    free_question,
    identity_question,
    load_judge,
    training_questions,
)
from npedit.judges.chat import chat_prompt, normalise, resize_like_processor
from npedit.judges.qwen2_5_vl import patchify
from npedit.judges.tiny import build_tiny_qwen2_5_vl
from npedit.tokenization import build_bpe_tokenizer


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("qwen_judge"))


@pytest.fixture(scope="module")
def judge(judge_dir):
    return load_judge(judge_dir)


def random_images(batch, height=32, width=32, seed=0):
    """(batch, 3, height, width) in [0, 1] on the 8-bit grid, so PIL round trips are exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), generator=g).float() / 255


def to_pil(image):
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())


def photo():
    pil = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    return pil, torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255


def test_round_trip_through_load_judge(judge, judge_dir):
    assert isinstance(judge, Qwen25VLJudge)
    assert not any(p.requires_grad for p in judge.parameters())
    assert not judge.train().model.training
    again = load_judge(judge_dir)
    ref, edited = random_images(1, seed=1), random_images(1, seed=2)
    questions = [[edit_question("make the circle red")]]
    assert torch.equal(judge.answer(ref, edited, questions).logits, again.answer(ref, edited, questions).logits)


def test_yes_no_are_single_tokens_and_a_split_yes_is_refused(judge, judge_dir, tmp_path):
    tokenizer = judge.processor.tokenizer
    assert tokenizer.encode("Yes", add_special_tokens=False) == [judge.yes_id]
    assert tokenizer.encode("No", add_special_tokens=False) == [judge.no_id]
    broken = shutil.copytree(judge_dir, tmp_path / "broken")
    tokenizer = build_bpe_tokenizer(["no image here", "No"] * 20, vocab_size=300, required_words=("No",))
    assert len(tokenizer.encode("Yes", add_special_tokens=False)) > 1
    tokenizer.save_pretrained(broken)
    with pytest.raises(ValueError, match=r"does not encode 'Yes' as one token"):
        load_judge(broken)


@pytest.mark.parametrize("real", [False, True])
def test_preprocessing_matches_hf_processor_on_a_photo(judge, real):
    """Resize, normalisation and the flat patch layout equal the image processor's pixel_values."""
    pil, image = photo()
    # real: configured like the released Qwen2.5-VL checkpoints (14 px patches, 2x2 merge, CLIP statistics)
    processor = Qwen2VLImageProcessor() if real else judge.processor.image_processor
    out = processor(images=pil, return_tensors="pt")
    _, grid_h, grid_w = out["image_grid_thw"][0].tolist()
    patch, merge, temporal = processor.patch_size, processor.merge_size, processor.temporal_patch_size
    height, width = grid_h * patch, grid_w * patch
    if not real:
        assert (height, width) == judge.view_size(*image.shape[-2:])
    resized = resize_like_processor(image, height, width)
    ours = patchify(normalise(resized, processor.image_mean, processor.image_std), patch, merge, temporal)
    theirs = out["pixel_values"]
    assert ours.shape == theirs.shape
    std = torch.tensor(processor.image_std).repeat_interleave(temporal * patch * patch)
    assert ((ours - theirs) * std).abs().max() < 1e-2  # in [0, 1] pixel units


@pytest.mark.parametrize(
    "question", [contains_question("red circle"), edit_question("make the circle red")], ids=["one", "two"]
)
@pytest.mark.parametrize("size", [(32, 32), (40, 56)])
def test_layout_and_positions_match_the_full_hf_forward(judge, question, size):
    """Our scatter path with our 3-D positions equals model(**processor(...)) at the answer position."""
    ref, edited = random_images(1, *size, seed=3), random_images(1, *size, seed=4)
    images = {"reference": ref[0], "edited": edited[0]}
    prompt = chat_prompt(judge.processor, question.text, len(question.images))
    inputs = judge.processor(text=prompt, images=[to_pil(images[r]) for r in question.images], return_tensors="pt")
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
    assert len(judge.score(ref, edited, questions)) == 2


def test_gradient_reaches_edited_image_only(judge):
    ref = random_images(2, 48, 48, seed=7).requires_grad_(True)  # resized inside the judge (48 -> 48, 120 -> 64)
    edited = random_images(2, 120, 120, seed=8).requires_grad_(True)
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


def test_mismatched_processor_is_refused(judge_dir, tmp_path):
    broken = Path(shutil.copytree(judge_dir, tmp_path / "mismatch"))
    config = json.loads((broken / "processor_config.json").read_text())
    config["image_processor"]["patch_size"] = 8  # the model's patches are 4 px
    (broken / "processor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vision tower expects"):
        load_judge(broken)


def test_max_pixels_caps_what_the_judge_sees(judge_dir):
    capped = load_judge(judge_dir, max_pixels=32 * 32)
    assert capped.view_size(64, 64) == (32, 32) and capped.view_size(16, 16) == (16, 16)
    ref, edited = random_images(1, 64, 64, seed=11), random_images(1, 64, 64, seed=12)
    question = edit_question("make the circle red")
    small = random_images(1, 32, 32, seed=13), random_images(1, 32, 32, seed=14)
    with torch.no_grad():  # a 64 px pair seen at 32 px: the same as handing it over resized
        resized = [resize_like_processor(x, 32, 32) for x in (ref, edited)]
        torch.testing.assert_close(capped.answer(ref, edited, [[question]]).logits,
                                   capped.answer(*resized, [[question]]).logits, atol=1e-4, rtol=0)
        assert capped.answer(*small, [[question]]).logits.shape == (1, 1, 2)
    with pytest.raises(ValueError, match="at least 64"):
        load_judge(judge_dir, max_pixels=40)
