"""Judge-guided refinement (npedit.refine) on the bundled Shapes editor and judge."""

import json

import numpy as np
import pytest
import torch

from npedit import assets

pytestmark = pytest.mark.skipif(not (assets.DEFAULT_MODEL / "model_index.json").is_file(),
                                reason="the bundled Shapes models are not in this checkout")


@pytest.fixture(scope="module")
def models():
    from npedit import NPEditPipeline
    from npedit.judges import load_judge

    pipe = NPEditPipeline.from_pretrained(assets.DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_judge(assets.DEFAULT_JUDGE)


def _asked(case):
    return dict(edit_type=case.edit_type, object_name=case.object_name, keep=case.keep, new=case.new, gone=case.gone)


def test_refinement_lowers_the_judges_loss_and_changes_neither_model(models):
    from npedit.refine import refine_edit
    from npedit.shapes.edits import held_out_cases
    from npedit.shapes.world import render

    pipe, judge = models
    before = [p.detach().clone() for p in (*judge.parameters(), *pipe.vae.parameters())]
    fell = []
    for case in held_out_cases(6, seed=3):
        r = refine_edit(pipe, judge, render(case.reference), case.instruction, refine_steps=6,
                        generator=torch.Generator().manual_seed(0), **_asked(case))
        assert len(r.losses) == 7 and r.image.size == r.start.size == (64, 64)
        plain = pipe(image=render(case.reference), prompt=case.instruction,
                     generator=torch.Generator().manual_seed(0)).images[0]
        assert np.array_equal(np.asarray(r.start), np.asarray(plain))  # it starts from the editor's own edit
        fell.append(r.improved)
    assert np.mean(fell) > 0 and sum(f > 0 for f in fell) >= 4, fell
    after = [*judge.parameters(), *pipe.vae.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and all(p.grad is None for p in after)


def test_no_refinement_steps_is_the_plain_edit_and_bad_settings_are_refused(models):
    from npedit.refine import check_refine_settings, refine_edit
    from npedit.shapes.edits import held_out_cases
    from npedit.shapes.world import render

    pipe, judge = models
    case = held_out_cases(1, seed=1)[0]
    r = refine_edit(pipe, judge, render(case.reference), case.instruction, refine_steps=0,
                    generator=torch.Generator().manual_seed(4))
    plain = pipe(image=render(case.reference), prompt=case.instruction,
                 generator=torch.Generator().manual_seed(4)).images[0]
    assert np.array_equal(np.asarray(r.image), np.asarray(plain)) and len(r.losses) == 1 and r.improved == 0
    for bad, words in (((-1, 0.05, 1.0), "steps"), ((501, 0.05, 1.0), "steps"), ((True, 0.05, 1.0), "steps"),
                       ((3, 0.0, 1.0), "learning rate"), ((3, float("nan"), 1.0), "learning rate"),
                       ((3, 0.05, -1.0), "anchor"), ((3, 0.05, float("inf")), "anchor")):
        with pytest.raises(ValueError, match=words):
            check_refine_settings(*bad)
    with pytest.raises(ValueError, match="instruction is empty"):  # refused before the edit runs
        refine_edit(pipe, judge, render(case.reference), "  ")


def test_a_batch_refines_each_sample_as_if_alone(models):
    from npedit.refine import pad_questions, refine_latents
    from npedit.shapes.edits import held_out_cases
    from npedit.shapes.world import render
    from npedit.verdicts import edit_questions

    pipe, judge = models
    cases = held_out_cases(2, seed=5)
    refs = [render(c.reference) for c in cases]
    z = pipe(image=refs, prompt=[c.instruction for c in cases], generator=torch.Generator().manual_seed(0),
             output_type="latent").images
    asked = [edit_questions(c.instruction, **_asked(c)) for c in cases]
    padded, mask = pad_questions(asked)
    assert [len(r) for r in padded] == [max(map(len, asked))] * 2
    assert mask.sum(1).tolist() == [len(a) for a in asked]
    ref = torch.stack([torch.from_numpy(r).permute(2, 0, 1).float() / 255 for r in refs])
    both = refine_latents(pipe.backbone, judge, ref, z, asked, steps=3)
    assert both.losses.shape == (4, 2)
    for b in range(2):
        alone = refine_latents(pipe.backbone, judge, ref[b:b + 1], z[b:b + 1], asked[b:b + 1], steps=3)
        torch.testing.assert_close(alone.latents, both.latents[b:b + 1], atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(alone.losses[:, 0], both.losses[:, b], atol=2e-4, rtol=1e-3)
    with pytest.raises(ValueError, match="question lists"):
        refine_latents(pipe.backbone, judge, ref, z, asked[:1], steps=1)


def test_eval_shapes_refine_writes_its_settings_and_refuses_what_it_cannot_combine(tmp_path, capsys):
    from npedit.cli import UsageError, main

    main(["eval", "shapes", "--n", "6", "--seed", "2", "--refine", "2", "--out", str(tmp_path)])
    name = assets.DEFAULT_MODEL.name + "-refined-2"
    report = json.loads((tmp_path / f"{name}.json").read_text())
    assert report["meta"]["refine"] == {"steps": 2, "lr": 0.05, "anchor": 1.0} and report["meta"]["n"] == 6
    assert f"### {name}" in capsys.readouterr().out
    for extra, words in ((["--candidates", "2"], "no --candidates"), (["--refine-lr", "-1"], "learning rate")):
        with pytest.raises(UsageError, match=words):
            main(["eval", "shapes", "--n", "6", "--refine", "2", "--out", str(tmp_path), *extra])
