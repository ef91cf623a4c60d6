"""What every judge family must do the same way: load by model_type, answer in bfloat16, pass gradients."""

import pytest
import torch

from npedit.judges import JUDGES, free_question, load_judge, training_questions
from npedit.judges import tiny

BUILDERS = {
    "internvl": tiny.build_tiny_internvl,
    "llava_onevision": tiny.build_tiny_llava_onevision,
    "qwen2_5_vl": tiny.build_tiny_qwen2_5_vl,
}


def test_every_registered_family_has_a_tiny_builder():
    assert set(BUILDERS) == set(JUDGES)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_bfloat16_judge_answers_like_float32_and_passes_gradients(family, tmp_path):
    """The trainer's judge.dtype=bfloat16: same answers within bf16 precision, finite gradients on the pixels."""
    path = BUILDERS[family](tmp_path / family)
    full, half = load_judge(path), load_judge(path, torch_dtype=torch.bfloat16)
    assert type(full) is JUDGES[family] and next(half.parameters()).dtype == torch.bfloat16
    g = torch.Generator().manual_seed(0)
    ref, edited = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    questions = [training_questions("make the circle red", "recolor") + [free_question("Sharp?", ("edited",))]] * 2
    edited.requires_grad_(True)
    out = half.answer(ref, edited, questions)
    out.margin.sum().backward()
    assert out.logits.dtype == torch.float32  # read out in float32 whatever the judge's dtype
    assert torch.isfinite(edited.grad).all() and edited.grad.abs().sum() > 0
    with torch.no_grad():
        expected = full.answer(ref, edited, questions).p_yes
    assert (out.p_yes.detach() - expected).abs().max() < 0.02
