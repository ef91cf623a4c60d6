"""The InternVL3 (-hf) judge adapter on a tiny random model: layout, preprocessing, gradients."""

import json
import shutil

import pytest
import torch
from PIL import Image
from transformers import GotOcr2ImageProcessor

from npedit.judges import (
    contains_question,
    edit_question,
    load_judge,
)
from npedit.judges.chat import chat_prompt
from npedit.judges.internvl import InternVLJudge, preprocess_images, view_settings
from npedit.judges.tiny import build_tiny_internvl

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


def test_view_and_tokens(judge):
    assert isinstance(judge, InternVLJudge)
    assert judge.image_size == SIZE
    assert judge.feature_len == (SIZE // PATCH // 2) ** 2
    assert judge.image_token_id == judge.processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")




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
def test_preprocessing_matches_hf_processor_on_a_photo(judge, size, photo):
    pil, image = photo
    if size == SIZE:
        image_processor = judge.processor.image_processor
    else:  # configured like the released InternVL3-hf checkpoints
        image_processor = GotOcr2ImageProcessor(
            size={"height": 448, "width": 448}, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, resample=3,
            crop_to_patches=False,
        )
    side, mean, std = view_settings(image_processor)
    ours = preprocess_images(image, side, mean, std)[0]
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


