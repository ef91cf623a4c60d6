"""The LLaVA-OneVision judge adapter on a tiny random model: layout, preprocessing, gradients."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib import cbook
from PIL import Image
from transformers import LlavaOnevisionImageProcessor

from npedit.judges import (
    LlavaOnevisionJudge,
    change_questions,
    contains_question,
    edit_question,
    free_question,
    identity_question,
    keep_questions,
    load_judge,
    training_questions,
)
from npedit.judges.llava_onevision import base_view_settings, chat_prompt, preprocess_images
from npedit.judges.tiny import build_tiny_llava_onevision
from npedit.tokenization import build_bpe_tokenizer

SIZE = 32


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    return build_tiny_llava_onevision(tmp_path_factory.mktemp("judge"), image_size=SIZE)


@pytest.fixture(scope="module")
def judge(judge_dir):
    return load_judge(judge_dir)


def random_images(batch, size=SIZE, seed=0):
    """(batch, 3, size, size) in [0, 1] on the 8-bit grid, so PIL round trips are exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g).float() / 255


def to_pil(image):
    return Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy())


def test_round_trip_through_load_judge(judge, judge_dir, tmp_path):
    assert isinstance(judge, LlavaOnevisionJudge)
    assert judge.image_size == SIZE
    assert not any(p.requires_grad for p in judge.parameters())
    assert not judge.train().model.training
    again = load_judge(judge_dir)
    ref, edited = random_images(1, seed=1), random_images(1, seed=2)
    questions = [[edit_question("make the circle red")]]
    assert torch.equal(judge.answer(ref, edited, questions).logits, again.answer(ref, edited, questions).logits)

    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert'.*supported judge types: .*llava_onevision"):
        load_judge(tmp_path / "bert")
    with pytest.raises(ValueError, match="no readable config.json.*llava_onevision"):
        load_judge(tmp_path / "missing")
    with pytest.raises(ValueError, match="llava_onevision judges see each image at one fixed size.*qwen2_5_vl"):
        load_judge(judge_dir, max_pixels=4096)


def test_yes_no_are_single_tokens(judge):
    tokenizer = judge.processor.tokenizer
    assert tokenizer.encode("Yes", add_special_tokens=False) == [judge.yes_id]
    assert tokenizer.encode("No", add_special_tokens=False) == [judge.no_id]
    assert judge.yes_id != judge.no_id


def test_multi_token_yes_is_refused_at_load(judge_dir, tmp_path):
    broken = shutil.copytree(judge_dir, tmp_path / "broken")
    tokenizer = build_bpe_tokenizer(["no image here", "No"] * 20, vocab_size=300, required_words=("No",))
    assert len(tokenizer.encode("Yes", add_special_tokens=False)) > 1
    tokenizer.save_pretrained(broken)
    with pytest.raises(ValueError, match=r"tokenizer .* does not encode 'Yes' as one token"):
        load_judge(broken)


def hf_base_view(image_processor, pil):
    return image_processor(images=pil, return_tensors="pt")["pixel_values"][0, 0]  # (3, S, S)


@pytest.mark.parametrize("size", [SIZE, 384])
def test_preprocessing_matches_hf_processor_on_a_photo(judge, size):
    path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    assert path.is_file()
    pil = Image.open(path).convert("RGB")
    photo = torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    if size == SIZE:
        image_processor = judge.processor.image_processor
    else:  # configured like the released LLaVA-OneVision checkpoints
        image_processor = LlavaOnevisionImageProcessor(
            size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        )
    side, mean, std = base_view_settings(image_processor)
    ours = preprocess_images(photo, side, mean, std)[0]
    theirs = hf_base_view(image_processor, pil)
    assert ours.shape == theirs.shape == (3, size, size)
    assert (ours - theirs).abs().max() < 1e-2


@pytest.mark.parametrize("question", [contains_question("red circle"), edit_question("make the circle red")])
def test_layout_matches_the_full_hf_forward(judge, question):
    """Processor token counts equal the model's features, and our scatter path equals model(**inputs)."""
    ref, edited = random_images(1, seed=3), random_images(1, seed=4)
    images = {"reference": ref[0], "edited": edited[0]}
    n = len(question.images)
    prompt = chat_prompt(judge.processor, question.text, n)
    inputs = judge.processor(text=prompt, images=[[to_pil(images[r]) for r in question.images]], return_tensors="pt")
    assert int((inputs["input_ids"] == judge.image_token_id).sum()) == n * judge.feature_lens[n == 1]
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


def test_training_questions():
    edit = training_questions("make the circle red", "recolor")
    assert [q.kind for q in edit] == ["edit", "identity"]
    assert [q.expected for q in edit] == ["Yes", "Yes"]
    assert all(q.images == ("reference", "edited") for q in edit)
    assert "make the circle red" in edit[0].text and "identical" in edit[0].text

    remove = training_questions("remove the dog", "remove", "dog")
    assert [q.kind for q in remove] == ["contains", "identity"]
    assert [q.expected for q in remove] == ["No", "Yes"]
    assert remove[0].images == ("edited",) and "dog" in remove[0].text and "dog" in remove[1].text

    assert len(training_questions("make it red", "recolor", identity=False)) == 1
    assert len(training_questions("remove the dog", "remove", "dog", identity=False)) == 1
    with pytest.raises(ValueError, match="object_name"):
        training_questions("remove the dog", "remove")


def test_change_questions_ask_for_new_objects_and_against_gone_ones():
    qs, used = change_questions(["green circle", "green circle"], ["red circle", "green circle", "blue square"], 4,
                                removed="blue square")
    assert [(q.expected, q.kind) for q in qs[:2]] == [("Yes", "change"), ("No", "change")]
    assert "green circle" in qs[0].text and "red circle" in qs[1].text and qs[0].images == ("edited",)
    assert used == [True, True, False, False]  # duplicates, a name on both sides and the removed object dropped
    assert change_questions([], [], 2)[1] == [False, False] and change_questions(["a"], ["b"], 0) == ([], [])
    assert [q.expected for q in change_questions(["a"], ["b"], 1)[0]] == ["Yes"]  # new objects first
    gen = torch.Generator().manual_seed(0)
    picks = {change_questions(["a"], ["b"], 1, generator=gen)[0][0].expected for _ in range(30)}
    assert picks == {"Yes", "No"}
    with pytest.raises(ValueError, match="slots"):
        change_questions(["a"], [], -1)


def test_removal_of_a_shared_name_asks_the_edit_question():
    plain = training_questions("remove the red circle on the left", "remove", "red circle")
    assert plain[0].kind == "contains" and plain[0].expected == "No"
    shared = training_questions("remove the red circle on the left", "remove", "red circle",
                                kept=["blue square", " red circle"])
    assert [q.kind for q in shared] == ["edit", "identity"] and shared[0].expected == "Yes"
    assert training_questions("remove the dog", "remove", "dog", kept=["cat"])[0].kind == "contains"


def test_keep_questions_pad_to_a_fixed_count():
    qs, used = keep_questions(["blue square", "red circle", "blue square", " "], 3, removed="red circle")
    assert used == [True, False, False] and len(qs) == 3  # duplicate, removed and empty names dropped
    assert all(q.kind == "keep" and q.expected == "Yes" and q.images == ("edited",) for q in qs)
    assert "blue square" in qs[0].text and qs[1] == qs[0]
    qs, used = keep_questions([], 2)
    assert len(qs) == 2 and used == [False, False]
    assert keep_questions(["a", "b", "c"], 2)[1] == [True, True] and keep_questions(["a"], 0) == ([], [])
    names = ["red circle", "blue square", "green triangle"]
    assert ["red circle" in q.text for q in keep_questions(names, 2)[0]] == [True, False]  # the first ones
    gen = torch.Generator().manual_seed(0)
    picks = {tuple(q.text for q in keep_questions(names, 1, generator=gen)[0]) for _ in range(30)}
    assert len(picks) == 3  # with a generator, a random choice among all three
    state = gen.get_state()
    keep_questions(names, 0, generator=gen)  # nothing asked: the training RNG stream is untouched
    assert torch.equal(gen.get_state(), state)
    with pytest.raises(ValueError, match="slots"):
        keep_questions(["a"], -1)
