"""scripts/judge_gradient_alignment.py: the questions per kind, the cosine's sign, a small real measurement."""

from pathlib import Path

import pytest
import torch

from script_modules import load_script  # tests/script_modules.py

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ga():
    return load_script("judge_gradient_alignment")


def test_questions_per_kind_follow_training(ga):
    from npedit.shapes.edits import held_out_cases

    cases = {c.category: c for c in held_out_cases(12, seed=3)}
    remove = ga.case_questions(cases["remove"])
    assert remove["edit"][0][0].kind == "contains" and remove["edit"][0][0].expected == "No"
    assert not any(remove["change"][1])  # the removal check already asks the removed object's name
    recolor = ga.case_questions(cases["recolor"])
    asked = [q for q, m in zip(*recolor["change"]) if m]
    assert {q.expected for q in asked} == {"Yes", "No"}  # the new colour there, the old one gone
    assert len(recolor["edit+identity+change"][0]) == 2 + len(recolor["change"][0])
    assert not any(ga.case_questions(cases["background"])["change"][1])


def test_cosine_is_taken_against_the_descent_direction(ga):
    toward = torch.randn(3, 3, 8, 8)
    assert torch.allclose(ga.cosines(-toward, toward), torch.ones(3))
    assert torch.allclose(ga.cosines(toward, toward), -torch.ones(3))


def test_focus_is_the_gradient_density_on_the_changed_pixels(ga):
    ref = torch.zeros(2, 3, 10, 10)
    tgt = ref.clone()
    tgt[:, :, 4:6, 4:6] = 1.0  # a 2x2 edit, grown by 1 pixel: 4x4 = 16% of the image
    changed = ga.changed_pixels(ref, tgt, grow=1)
    assert changed.shape == (2, 10, 10) and int(changed[0].sum()) == 16
    grad = torch.zeros(2, 3, 10, 10)
    grad[0, 0, 5, 5] = -2.0  # all on the edit: 1 / 0.16
    grad[1] = 0.5  # even everywhere: 1
    assert torch.allclose(ga.focus(grad, changed), torch.tensor([1 / 0.16, 1.0]))
    assert float(ga.focus(torch.zeros(1, 3, 10, 10), changed[:1])) == 0.0  # no gradient, no focus (not NaN)


def test_measure_on_bundled_judge_and_vae(ga):
    from npedit.backbones import load_backbone
    from npedit.judges import load_judge
    from npedit.shapes.edits import held_out_cases

    judge = load_judge(ROOT / "assets" / "shapes" / "judge")
    judge.model.requires_grad_(False)
    backbone = load_backbone(ROOT / "assets" / "shapes" / "editor")
    cases = held_out_cases(6, seed=0)  # one per category
    result = ga.measure(judge, backbone, cases, ga.blend_start(0.0), batch=3)
    for space in ("pixel", "latent"):
        assert sum(len(v) for v in result[space]["edit"].values()) == 6
        values = [v for kind in result[space].values() for vs in kind.values() for v in vs]
        assert all(-1.0 <= v <= 1.0 for v in values) and any(abs(v) > 1e-4 for v in values)
        # change checks exist for add, replace, recolor and resize, not for remove and background
        assert set(result[space]["change"]) <= {"add", "replace", "recolor", "resize"}
    lifts = [v for vs in result["focus"]["edit"].values() for v in vs]
    assert len(lifts) == 6 and all(v >= 0 for v in lifts) and any(v > 0 for v in lifts)
    table = ga.summarise(result["pixel"]["edit"])
    assert table["count"] == 6 and 0.0 <= table["positive"] <= 1.0
    assert "| edit |" in ga.markdown({"edit": table})


def test_editor_start_is_the_editors_own_output(ga):
    from npedit import NPEditPipeline
    from npedit.backbones import load_backbone
    from npedit.judges import load_judge
    from npedit.shapes.edits import held_out_cases

    pipe = NPEditPipeline.from_pretrained(ROOT / "assets" / "shapes" / "editor")
    pipe.set_progress_bar_config(disable=True)
    backbone = load_backbone(ROOT / "assets" / "shapes" / "editor")
    cases = held_out_cases(6, seed=0)[:2]
    ref = torch.stack([ga.to_tensor(ga.render(c.reference)) for c in cases])
    z_ref = backbone.encode_image(ref * 2 - 1)
    pixels, z = ga.editor_start(pipe, backbone)(cases, ref, ref, z_ref, z_ref)
    assert z.shape == z_ref.shape and pixels.shape == ref.shape
    assert 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    assert not torch.equal(z, z_ref)  # the editor's latents, not the encoded reference
    judge = load_judge(ROOT / "assets" / "shapes" / "judge")
    judge.model.requires_grad_(False)
    result = ga.measure(judge, backbone, cases, ga.editor_start(pipe, backbone), batch=2)
    assert sum(len(v) for v in result["latent"]["edit"].values()) == 2
