"""The Qwen2.5-VL judge adapter on a tiny random model: layout, positions, preprocessing, gradients."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessor

from npedit.judges import (
    Qwen25VLJudge,
    contains_question,
    edit_question,
    load_judge,
)
from npedit.judges.chat import chat_prompt, normalise, resize_like_processor
from npedit.judges.qwen2_5_vl import patchify
from npedit.judges.tiny import build_tiny_qwen2_5_vl


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


def test_loads_as_qwen(judge):
    assert isinstance(judge, Qwen25VLJudge)
    assert judge.image_token_id == judge.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")



@pytest.mark.parametrize("real", [False, True])
def test_preprocessing_matches_hf_processor_on_a_photo(judge, real, photo):
    """Resize, normalisation and the flat patch layout equal the image processor's pixel_values."""
    pil, image = photo
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
