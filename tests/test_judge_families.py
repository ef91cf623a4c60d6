"""What every judge family must do the same way, on a tiny random model of each: single-token answers, one-pass
scoring independent of the batch, gradients to the edited image only, pixels that descend toward Yes, bfloat16.

Each family's own file checks what is particular to it: its preprocessing against its image processor, and its
layout against its model's full forward pass.
"""

import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from npedit.judges import (
    JUDGES,
    edit_question,
    free_question,
    identity_question,
    load_judge,
    training_questions,
)
from npedit.images import tensor_to_pil
from npedit.judges import tiny
from npedit.tokenization import build_bpe_tokenizer

# Each family's tiny builder, with enough image tokens for 20 steps of pixel descent to move P(Yes).
BUILDERS = {
    "internvl": lambda d: tiny.build_tiny_internvl(d, image_size=64, patch_size=4),
    "llava_onevision": tiny.build_tiny_llava_onevision,
    "qwen2_5_vl": tiny.build_tiny_qwen2_5_vl,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def judge_dir(request, tmp_path_factory):
    return BUILDERS[request.param](tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def judge(judge_dir):
    return load_judge(judge_dir)


def random_images(batch, size=32, seed=0):
    """(batch, 3, size, size) in [0, 1] on the 8-bit grid."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=g).float() / 255


def test_every_registered_family_has_a_tiny_builder():
    assert set(BUILDERS) == set(JUDGES)


def test_loads_frozen_by_model_type(judge, judge_dir):
    assert type(judge) is JUDGES[judge.model.config.model_type]
    assert not any(p.requires_grad for p in judge.parameters())
    assert not judge.train().model.training
    ref, edited = random_images(1, seed=1), random_images(1, seed=2)
    questions = [[edit_question("make the circle red")]]
    again = load_judge(judge_dir)
    assert torch.equal(judge.answer(ref, edited, questions).logits, again.answer(ref, edited, questions).logits)


def test_yes_no_are_single_tokens_and_a_split_yes_is_refused(judge, judge_dir, tmp_path):
    tokenizer = judge.processor.tokenizer
    assert tokenizer.encode("Yes", add_special_tokens=False) == [judge.yes_id]
    assert tokenizer.encode("No", add_special_tokens=False) == [judge.no_id]
    assert judge.yes_id != judge.no_id
    broken = shutil.copytree(judge_dir, tmp_path / "broken")
    named = {k: getattr(tokenizer, k) for k in tiny.INTERNVL_SPECIAL_TOKENS if hasattr(tokenizer, k)}
    split = build_bpe_tokenizer(["no image here", "No"] * 20, vocab_size=300, required_words=("No",),
                                extra_special_tokens=named or None)
    assert len(split.encode("Yes", add_special_tokens=False)) > 1
    split.save_pretrained(broken)
    with pytest.raises(ValueError, match=r"tokenizer .* does not encode 'Yes' as one token"):
        load_judge(broken)


def test_a_judge_without_a_chat_template_is_refused_before_its_weights(judge, judge_dir, tmp_path, monkeypatch):
    """Every question goes through the processor's chat template: a folder without one said only "Cannot use
    apply_chat_template ...", after the weights were read (minutes for a real judge), naming neither folder nor file."""
    bare = shutil.copytree(judge_dir, tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read")

    monkeypatch.setattr(type(judge).model_class, "from_pretrained", no_weights)
    with pytest.raises(ValueError, match=r"the judge '.*bare' has no chat template \(chat_template.jinja"):
        load_judge(bare)


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
    shared = judge.answer(ref[:1], edited, questions)  # one reference for every row: as if repeated
    repeated = judge.answer(ref[:1].expand(2, -1, -1, -1), edited, questions)
    torch.testing.assert_close(shared.logits, repeated.logits, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="one shared reference"):
        judge.answer(random_images(3), edited, questions)


def test_gradient_reaches_edited_image_only(judge):
    ref = random_images(2, size=48, seed=7).requires_grad_(True)  # resized inside the judge
    edited = random_images(2, size=120, seed=8).requires_grad_(True)
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


def test_bfloat16_judge_answers_like_float32_and_passes_gradients(judge, judge_dir):
    """The trainer's judge.dtype=bfloat16: same answers within bf16 precision, finite gradients on the pixels."""
    half = load_judge(judge_dir, torch_dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    ref, edited = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    questions = [training_questions("make the circle red", "recolor") + [free_question("Sharp?", ("edited",))]] * 2
    edited.requires_grad_(True)
    out = half.answer(ref, edited, questions)
    out.margin.sum().backward()
    assert out.logits.dtype == torch.float32  # read out in float32 whatever the judge's dtype
    assert torch.isfinite(edited.grad).all() and edited.grad.abs().sum() > 0
    with torch.no_grad():
        expected = judge.answer(ref, edited, questions).p_yes
    assert (out.p_yes.detach() - expected).abs().max() < 0.02


def test_answer_gradients_are_each_questions_own(judge):
    """`answer_gradients`: each question's row holds d log P(expected) / d pixel of the edited image (checked by a
    finite difference along it), its numbers are the joint verdict's, and the training signal is the mean over
    the questions NP-Edit trains on (the free-form one left out)."""
    import numpy as np

    from npedit.images import tensor_to_pil
    from npedit.verdicts import answer_gradients, edit_questions, judge_edit

    ref, edited = (tensor_to_pil(x[0] * 2 - 1) for x in (random_images(1, seed=5), random_images(1, seed=6)))
    asked = dict(edit_type="remove", object_name="red circle", keep=["blue square"],
                 extra=["Is the second image sharp? Answer with Yes or No."])
    grads = answer_gradients(judge, ref, edited, "remove the red circle", **asked)
    kinds = [q["kind"] for q in grads.questions]
    assert kinds == ["contains", "identity", "keep", "extra"] and grads.grads.shape == (4, 3, 32, 32)
    joint = judge_edit(judge, ref, edited, "remove the red circle", **asked)
    for mine, theirs in zip(grads.questions, joint.questions):
        assert mine["margin"] == pytest.approx(theirs["margin"], abs=1e-4) and mine["text"] == theirs["text"]
    np.testing.assert_allclose(grads.training, grads.grads[:3].mean(axis=0), rtol=1e-6, atol=1e-9)
    assert grads.magnitude(grads.grads[0]).shape == (32, 32) and grads.image.size == (32, 32)
    small = answer_gradients(judge, ref, edited.resize((64, 48)), "remove the red circle", max_side=40, **asked)
    assert small.image.size == (40, 30) and small.grads.shape == (4, 3, 30, 40)  # a larger image: a resized copy
    questions = edit_questions("remove the red circle", **asked)
    pixels = torch.from_numpy(np.asarray(edited, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    for k in (0, 1):
        g = torch.from_numpy(grads.grads[k])[None]
        assert g.abs().max() > 0
        step = 0.02 / g.abs().max()  # up to 5 levels of 8 bits: the judges round pixels to them (straight through)
        sign = 1.0 if questions[k].expected == "Yes" else -1.0

        def log_p(x):
            margin = judge.answer(torch.from_numpy(np.asarray(ref, dtype=np.float32) / 255).permute(2, 0, 1)[None],
                                  x, [[questions[k]]]).margin[0, 0].double()
            return F.logsigmoid(sign * margin)

        with torch.no_grad():
            slope = (log_p(pixels + step * g) - log_p(pixels - step * g)) / (2 * step)
        assert float(slope) == pytest.approx(float(g.double().pow(2).sum()), rel=0.1)  # measured within 4%


def test_a_control_token_in_the_text_is_refused_by_name(judge):
    """The family's image placeholder or a turn's end typed into an instruction or question is one ValueError naming
    it (the processor counted one image too many, and "<|im_end|>" silently rewrote the prompt's turns); the same
    words without it are judged."""
    from npedit.verdicts import judge_edit

    ref, edited = (tensor_to_pil(x[0] * 2 - 1) for x in (random_images(1, seed=7), random_images(1, seed=8)))
    for token in (judge.processor.image_token, "<|im_end|>"):
        said = [f"holds {token!r} (", f'"put {token} on the wall"', "which this judge's tokenizer reads as one"]
        with pytest.raises(ValueError, match=".*".join(map(re.escape, said))):  # the words around it, not the start
            judge_edit(judge, ref, edited, f"put {token} on the wall")
        with pytest.raises(ValueError, match=re.escape(repr(token))):
            judge_edit(judge, ref, edited, "make it red", extra=[f"Is there a {token}? Answer with Yes or No."])
    assert 0 < judge_edit(judge, ref, edited, "put image on the wall").p_edit < 1


def test_a_question_past_the_judges_positions_is_refused_naming_its_length(judge):
    """A question longer than the judge's language model's positions ran with a transformers warning only, its answer
    read from positions the judge never saw (a 2,000-character Japanese instruction: ~6,000 tokens of the tiny
    judges' 4,096); now it is one ValueError naming its token count and the limit, and one that fits is judged."""
    from npedit.judges import edit_question
    from npedit.verdicts import judge_edit

    ref, edited = (tensor_to_pil(x[0] * 2 - 1) for x in (random_images(1, seed=7), random_images(1, seed=8)))
    limit = judge.max_positions
    assert limit == 4096
    japanese = "赤い円を青くしてください。" * 153  # 1,989 characters: within the editor's 2,000
    words = judge.text_lengths([japanese])[0]
    assert words > limit
    with pytest.raises(ValueError, match=rf"is \d+ tokens long in its text alone .*past the {limit} positions") as e:
        judge_edit(judge, ref, edited, japanese)
    assert int(re.search(r"is (\d+) tokens", str(e.value))[1]) > words  # the question's text quotes the instruction
    # text within the limit, the question around it and the images past it: the whole prompt's length is named
    instruction = "make the circle blue " + "x" * 40
    shape = tuple(random_images(1, seed=7).shape[-2:])
    question = edit_question(instruction)
    length, words = judge.prompt_length(question, shape), judge.text_lengths([question.text])[0]
    text_config = judge.model.config.get_text_config()
    try:
        text_config.max_position_embeddings = length - 1
        said = rf"a question is {length} tokens long \({words} of them its text, .*past the {length - 1} positions"
        with pytest.raises(ValueError, match=said):
            judge_edit(judge, ref, edited, instruction)
        text_config.max_position_embeddings = 10 * length  # the identity question is longer than the edit check
        assert 0 < judge_edit(judge, ref, edited, instruction + " now").p_edit < 1
    finally:
        text_config.max_position_embeddings = limit


def test_a_verdict_says_how_much_of_the_judges_answer_yes_and_no_hold(judge):
    """P(Yes) is between the two answers only (sigmoid of the margin: the loss's reading, method.md 5.4), so a judge
    whose next token is mostly neither word showed confident numbers; each question row (and the gradient maps',
    and the batch list's) now also holds p_yes_or_no, the full-vocabulary probability of Yes or No."""
    from npedit.pairs import QUESTION_COLUMNS
    from npedit.verdicts import _pixels01, answer_gradients, edit_questions, judge_edit

    ref, edited = (tensor_to_pil(x[0] * 2 - 1) for x in (random_images(1, seed=9), random_images(1, seed=10)))
    asked = dict(keep=["red square"], extra=["Describe the second image."])
    verdict = judge_edit(judge, ref, edited, "make the circle blue", **asked)
    out = judge.answer(_pixels01(ref), _pixels01(edited), [edit_questions("make the circle blue", **asked)])
    share = out.vocab_logprobs[0].exp().sum(-1)
    assert len(verdict.questions) == 4 and "p_yes_or_no" in QUESTION_COLUMNS
    for row, p, s, m in zip(verdict.questions, out.p_yes[0], share, out.margin[0]):
        assert row["p_yes_or_no"] == pytest.approx(float(s), rel=1e-5) and 0 < row["p_yes_or_no"] < 1
        assert row["p_yes"] == pytest.approx(float(p), abs=1e-6) == pytest.approx(float(torch.sigmoid(m)), abs=1e-6)
    grads = answer_gradients(judge, ref, edited, "make the circle blue", **asked)
    for mine, theirs in zip(grads.questions, verdict.questions):
        assert mine["p_yes_or_no"] == pytest.approx(theirs["p_yes_or_no"], rel=1e-3)
