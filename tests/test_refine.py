"""Judge-guided refinement (npedit.refine) on the bundled Shapes editor and judge."""

import json
import re

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
    cases = held_out_cases(6, seed=5)
    refs = [render(c.reference) for c in cases]
    z = pipe(image=refs, prompt=[c.instruction for c in cases], generator=torch.Generator().manual_seed(0),
             output_type="latent").images
    asked = [edit_questions(c.instruction, **_asked(c)) for c in cases]
    padded, mask = pad_questions(asked)
    assert [len(r) for r in padded] == [max(map(len, asked))] * 6
    assert mask.sum(1).tolist() == [len(a) for a in asked]
    ref = torch.stack([torch.from_numpy(r).permute(2, 0, 1).float() / 255 for r in refs])
    both = refine_latents(pipe.backbone, judge, ref, z, asked, steps=20)
    assert both.losses.shape == (21, 6)
    for b in (0, 4):  # (a batch-mean loss scaled each gradient by 1/B, and Adam's epsilon damped small values)
        alone = refine_latents(pipe.backbone, judge, ref[b:b + 1], z[b:b + 1], asked[b:b + 1], steps=20)
        assert (alone.latents - z[b:b + 1]).abs().max() > 0.05  # it moved: the check below means something
        torch.testing.assert_close(alone.latents, both.latents[b:b + 1], atol=2e-3, rtol=0)  # float rounding only
        torch.testing.assert_close(alone.losses[:, 0], both.losses[:, b], atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="question lists"):
        refine_latents(pipe.backbone, judge, ref, z, asked[:1], steps=1)


def test_eval_shapes_refine_writes_its_settings_and_refuses_what_it_cannot_combine(tmp_path, capsys, monkeypatch):
    from npedit import refine
    from npedit.cli import UsageError, main

    calls = []
    real = refine.refine_latents
    monkeypatch.setattr(refine, "refine_latents", lambda *a, **k: calls.append((len(a[3]), k["steps"])) or real(*a, **k))
    main(["eval", "shapes", "--n", "6", "--seed", "2", "--out", str(tmp_path), "--name", "plain"])
    assert calls == []
    main(["eval", "shapes", "--n", "6", "--seed", "2", "--refine", "2", "--out", str(tmp_path)])
    assert calls == [(6, 2)]  # the six cases' edits, refined 2 steps
    name = assets.DEFAULT_MODEL.name + "-refined-2-n6-seed2"  # the settings that differ from the defaults
    report = json.loads((tmp_path / f"{name}.json").read_text())
    assert report["meta"]["refine"] == {"steps": 2, "lr": 0.05, "anchor": 1.0, "keep_checks": True,
                                        "change_checks": True} and report["meta"]["n"] == 6
    assert f"### {name}" in capsys.readouterr().out
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert report["meta"]["refine"] and plain["meta"]["refine"] is None
    calls.clear()  # the zero-shot teacher's SDEdit outputs refined too: a chain of teacher and judge, no editor
    main(["eval", "shapes", "--n", "6", "--seed", "2", "--refine", "2", "--baseline", "teacher", "--teacher-steps", "2",
          "--out", str(tmp_path)])
    assert calls == [(6, 2)]
    report = json.loads((tmp_path / "teacher-sdedit-k2-refined-2-n6-seed2.json").read_text())
    assert report["meta"]["baseline"] == "teacher" and report["meta"]["refine"]["steps"] == 2
    assert (report["meta"]["steps"], report["meta"]["strength"]) == (2, 0.6)  # the teacher's, not the editor's
    for extra, words in ((["--refine-lr", "-1"], "learning rate"),
                         (["--baseline", "teacher", "--candidates", "2"], "not to --baseline teacher"),
                         (["--baseline", "teacher", "--steps", "8"], "--baseline teacher samples --teacher-steps"),
                         (["--candidates", "2", "--change-checks"], "always asks the change checks")):
        with pytest.raises(UsageError, match=words):
            main(["eval", "shapes", "--n", "6", "--refine", "2", "--out", str(tmp_path), *extra])
    for extra in (["--refine-lr", "0.1"], ["--refine-anchor", "3"]):  # without --refine they would shape nothing
        with pytest.raises(UsageError, match="give --refine too"):
            main(["eval", "shapes", "--n", "6", "--out", str(tmp_path), *extra])


EXAMPLE = assets.EXAMPLES_DIR / "recolor-0000.png"
RECOLOR = ["--instruction", "make the triangle at the right green", "--edit-type", "recolor", "--keep",
           "green triangle"]
LOSS = re.compile(r"^(?:(\S+): )?refined (\d+) steps: judge loss (\d+\.\d+) -> (\d+\.\d+)$")


def _losses(err: str) -> list[tuple[str | None, int, float, float]]:
    """(id, steps, loss before, loss after) of each `edit --refine` line on stderr."""
    found = [LOSS.match(line) for line in err.splitlines()]
    return [(m[1], int(m[2]), float(m[3]), float(m[4])) for m in found if m]


def test_edit_refine_saves_the_refined_edit_and_says_the_judges_loss_fell(tmp_path, capsys):
    from npedit.cli import main

    def edit(name, *extra):
        capsys.readouterr()
        assert main(["edit", "--image", str(EXAMPLE), *RECOLOR, "--seed", "3", "--output", str(tmp_path / name),
                     *extra]) == 0
        return (tmp_path / name).read_bytes(), capsys.readouterr().err

    plain, said = edit("plain.png")
    assert _losses(said) == []
    off, said = edit("off.png", "--refine", "0")  # 0: off, the editor's own edit
    assert off == plain and _losses(said) == []
    refined, said = edit("refined.png", "--refine", "4")
    [(name, steps, before, after)] = _losses(said)
    assert name is None and steps == 4 and after < before, said
    assert refined != plain
    again, _ = edit("again.png", "--refine", "4")  # same seed, same result
    assert again == refined
    other, _ = edit("lr.png", "--refine", "4", "--refine-lr", "0.2", "--refine-anchor", "0")
    assert other != refined  # the step size and anchor reach the refinement


def test_edit_batch_refine_asks_each_lines_questions_and_judges_the_refined_image(models, tmp_path, capsys):
    from npedit.cli import main
    from npedit.verdicts import judge_edit

    _, judge = models
    lines = [{"id": "recolor", "image": str(EXAMPLE), "instruction": "make the triangle at the right green",
              "edit_type": "recolor", "keep": "green triangle", "new": "green triangle"},
             {"id": "remove", "image": str(assets.EXAMPLES_DIR / "remove-0000.png"),
              "instruction": "remove the green circle", "edit_type": "remove", "object_name": "green circle",
              "keep": ["blue triangle", "orange circle"], "gone": "green circle"}]
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    capsys.readouterr()
    assert main(["edit", "--batch", str(tmp_path / "cases.jsonl"), "--output-dir", str(tmp_path / "out"),
                 "--refine", "3", "--verdicts", str(tmp_path / "verdicts.jsonl")]) == 0
    said = _losses(capsys.readouterr().err)
    assert [(name, steps) for name, steps, *_ in said] == [("recolor", 3), ("remove", 3)], said
    rows = [json.loads(r) for r in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["recolor", "remove"]
    for line, row in zip(lines, rows):
        saved = tmp_path / "out" / f"{line['id']}.png"
        assert row["target"] == str(saved.resolve())
        asked = {k: line.get(k) for k in ("keep", "new", "gone")}
        v = judge_edit(judge, line["image"], str(saved), line["instruction"], edit_type=line["edit_type"],
                       object_name=line.get("object_name"), **asked)  # the saved, refined image, all its questions
        assert row["score"] == pytest.approx(v.score, abs=1e-4) and row["p_edit"] == pytest.approx(v.p_edit, abs=1e-5)


@pytest.mark.parametrize("extra, says", [
    (["--trace", "tr", "--candidates", "2"], "error: --trace records one edit's steps"),
    (["--refine-lr", "0"], "error: --refine: the refinement learning rate must be in (0, 10], got 0.0"),
    (["--refine-anchor", "-1"], "error: --refine: the refinement anchor must be a finite number >= 0, got -1.0"),
    (["--refine", "501"], "error: --refine: refinement steps must be a whole number between 0 and 500, got 501"),
])
def test_edit_refine_refuses_what_it_cannot_run_in_one_line_before_any_model_loads(tmp_path, capsys, monkeypatch,
                                                                                  extra, says):
    from npedit import cli
    from npedit.pipeline import NPEditPipeline

    def loaded(*a, **k):
        raise AssertionError("a model loaded")

    monkeypatch.setattr(cli, "load_cli_judge", loaded)
    monkeypatch.setattr(NPEditPipeline, "from_pretrained", loaded)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.main(["edit", "--image", str(EXAMPLE), *RECOLOR, "--output", "o.png", "--refine", "2", *extra])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.splitlines() == [err.strip()] and err.startswith(says), err
    assert not any(tmp_path.iterdir())


def test_bench_refine_times_a_refined_edit(capsys, monkeypatch):
    from npedit.cli import UsageError, main
    from npedit.pipeline import NPEditPipeline

    capsys.readouterr()
    assert main(["bench", "--repeats", "1", "--batch", "1", "--teacher-steps", "1", "--refine", "2", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    res = json.loads(out[-1])
    assert res["refine_steps"] == 2 and res["refined_edit_latency_ms"] > 0
    assert any(re.fullmatch(r"refined_edit_latency_ms +\d+\.\d{3}", line) for line in out)
    assert main(["bench", "--repeats", "1", "--batch", "1", "--teacher-steps", "1", "--json"]) == 0
    assert "refine" not in capsys.readouterr().out  # without --refine, what bench printed before
    with pytest.raises(UsageError, match="refinement steps"):
        main(["bench", "--refine", "-1"])
    with pytest.raises(UsageError, match="--judge is the judge of --refine"):  # (it was silently not loaded)
        main(["bench", "--judge", str(assets.DEFAULT_JUDGE)])
    monkeypatch.setattr(NPEditPipeline, "from_pretrained", lambda *a, **k: pytest.fail("the editor loaded"))
    with pytest.raises(SystemExit, match="cannot load a judge from"):  # said before the editor loads and is timed
        main(["bench", "--refine", "2", "--judge", str(assets.DEFAULT_MODEL)])


def test_refined_candidates_keep_each_cases_lowest_judge_loss(models, tmp_path):
    from npedit.cli import main
    from npedit.images import tensor_to_pil
    from npedit.refine import refine_latents
    from npedit.shapes.edits import held_out_cases
    from npedit.shapes.evaluate import refined_editor
    from npedit.shapes.world import render
    from npedit.verdicts import edit_questions

    pipe, judge = models
    cases = held_out_cases(3, seed=8)
    refs = [render(c.reference) for c in cases]
    got = refined_editor(pipe, judge, refine_steps=2, lr=0.05, anchor=1.0, seed=3, candidates=3)(refs, cases)
    z = pipe(image=refs, prompt=[c.instruction for c in cases], generator=torch.Generator().manual_seed(3),
             output_type="latent", num_images_per_prompt=3).images
    asked = [edit_questions(c.instruction, **_asked(c)) for c in cases for _ in range(3)]
    ref = torch.stack([torch.from_numpy(r).permute(2, 0, 1).float() / 255 for r in refs]).repeat_interleave(3, 0)
    refined = refine_latents(pipe.backbone, judge, ref, z, asked, steps=2)
    final = refined.losses[-1].view(3, 3)
    assert all(len(set(row.tolist())) == 3 for row in final)  # three candidates of each case, each its own loss
    with torch.no_grad():
        decoded = pipe.backbone.decode_latents(refined.latents).clamp(-1, 1)
    for i, image in enumerate(got):
        k = int(final[i].argmin())
        assert np.array_equal(image, np.asarray(tensor_to_pil(decoded[i * 3 + k])))
    from npedit.shapes import evaluate

    monkeypatch_chunk = evaluate.REFINE_CHUNK
    evaluate.REFINE_CHUNK = 4  # 9 latents in chunks of 4: the same picks as one pass
    try:
        chunked = refined_editor(pipe, judge, refine_steps=2, lr=0.05, anchor=1.0, seed=3, candidates=3)(refs, cases)
    finally:
        evaluate.REFINE_CHUNK = monkeypatch_chunk
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(chunked, got))
    main(["eval", "shapes", "--n", "6", "--refine", "1", "--candidates", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / f"{assets.DEFAULT_MODEL.name}-best-of-2-refined-1-n6.json").read_text())
    assert report["meta"]["candidates"] == 2 and report["meta"]["refine"]["steps"] == 1


def test_refined_candidates_are_each_seeds_own_refinement_and_the_lowest_loss_is_kept(models):
    from npedit.refine import refine_candidates, refine_edit
    from npedit.shapes.edits import held_out_cases
    from npedit.shapes.world import render

    pipe, judge = models
    case = held_out_cases(2, seed=6)[1]
    picked = refine_candidates(pipe, judge, render(case.reference), case.instruction, candidates=3, seed=7,
                               refine_steps=4, chunk=2, **_asked(case))  # chunks of 2: candidates 0-1, then 2
    assert picked.seeds == [7, 8, 9] and len(picked.refinements) == 3
    finals = [r.losses[-1] for r in picked.refinements]
    assert len(set(finals)) == 3 and picked.best == int(np.argmin(finals)) and picked.image is picked.refinements[
        picked.best].image
    for k, got in enumerate(picked.refinements):  # candidate k is the single refined edit seeded 7 + k
        alone = refine_edit(pipe, judge, render(case.reference), case.instruction, refine_steps=4,
                            generator=torch.Generator().manual_seed(7 + k), **_asked(case))
        assert np.abs(np.asarray(alone.image, int) - np.asarray(got.image, int)).max() <= 1
        assert np.allclose(alone.losses, got.losses, atol=1e-3)
    with pytest.raises(ValueError, match="candidates and chunk must be >= 1"):
        refine_candidates(pipe, judge, render(case.reference), case.instruction, candidates=0)


CANDIDATE = re.compile(r"^candidate (\d) \(seed (\d+)\): refined (\d+) steps: judge loss (\d+\.\d+) -> (\d+\.\d+)"
                       r"(  <- kept)?$")


def test_edit_refine_candidates_keeps_the_lowest_loss_and_its_verdict_line_says_which(tmp_path, capsys):
    from npedit.cli import main

    capsys.readouterr()
    assert main(["edit", "--image", str(EXAMPLE), *RECOLOR, "--seed", "5", "--output", str(tmp_path / "best.png"),
                 "--refine", "3", "--candidates", "3", "--verdicts", str(tmp_path / "v.jsonl")]) == 0
    lines = [CANDIDATE.match(line) for line in capsys.readouterr().err.splitlines()]
    lines = [m for m in lines if m]
    assert [(int(m[1]), int(m[2]), int(m[3])) for m in lines] == [(0, 5, 3), (1, 6, 3), (2, 7, 3)]
    finals = [float(m[5]) for m in lines]
    [kept] = [int(m[1]) for m in lines if m[6]]
    assert kept == int(np.argmin(finals))
    [row] = [json.loads(r) for r in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert (row["candidate"], row["candidates"]) == (kept, 3)
    # the kept candidate is that seed's single refined edit
    assert main(["edit", "--image", str(EXAMPLE), *RECOLOR, "--seed", str(5 + kept), "--output",
                 str(tmp_path / "alone.png"), "--refine", "3"]) == 0
    from PIL import Image

    best, alone = (np.asarray(Image.open(tmp_path / n), int) for n in ("best.png", "alone.png"))
    assert np.abs(best - alone).max() <= 1


def test_edit_batch_candidates_ask_each_lines_new_and_gone_objects(models, tmp_path, capsys):
    from PIL import Image

    from npedit.best_of import best_of
    from npedit.cli import main
    from npedit.refine import refine_candidates
    from npedit.verdicts import judge_edit

    pipe, judge = models
    line = {"id": "recolor", "image": str(EXAMPLE), "instruction": "make the triangle at the right green",
            "edit_type": "recolor", "keep": "green triangle", "new": "green triangle", "gone": "purple triangle"}
    (tmp_path / "cases.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(line | {"id": "again"}) + "\n")
    for extra in (["--candidates", "2"], ["--candidates", "2", "--refine", "2"]):
        capsys.readouterr()
        assert main(["edit", "--batch", str(tmp_path / "cases.jsonl"), "--output-dir", str(tmp_path / "out"),
                     "--verdicts", str(tmp_path / "v.jsonl"), *extra]) == 0
        rows = [json.loads(r) for r in (tmp_path / "v.jsonl").read_text().splitlines()]
        assert [r["id"] for r in rows] == ["recolor", "again"]
        asked = judge_edit(judge, line["image"], str(tmp_path / "out" / "recolor.png"), line["instruction"],
                           edit_type="recolor", keep=line["keep"], new=line["new"], gone=line["gone"])
        assert len(asked.questions) == 5 and rows[0]["score"] == pytest.approx(asked.score, abs=1e-4)
        # the pick itself weighed new and gone: the library's pick with those questions
        questions = dict(edit_type="recolor", keep=[line["keep"]], new=[line["new"]], gone=[line["gone"]])
        if "--refine" in extra:
            picked = refine_candidates(pipe, judge, EXAMPLE, line["instruction"], candidates=2, seed=0,
                                       refine_steps=2, **questions)
        else:
            picked = best_of(pipe, judge, EXAMPLE, line["instruction"], candidates=2, seed=0, **questions)
        saved = np.asarray(Image.open(tmp_path / "out" / "recolor.png"), int)
        assert np.abs(saved - np.asarray(picked.image, int)).max() <= 1
        assert (rows[0]["candidate"], rows[0]["candidates"]) == (picked.best, 2)
    said = capsys.readouterr().err.splitlines()  # with --refine, one line per job
    for name in ("recolor", "again"):
        assert sum(s.startswith(f"{name}: best of 2 refined 2 steps: candidate ") for s in said) == 1, said


def test_edit_trace_refine_refines_the_traced_sampling_and_the_trace_holds_it(tmp_path, capsys):
    from npedit.cli import main

    def edit(*extra):
        capsys.readouterr()
        assert main(["edit", "--image", str(EXAMPLE), *RECOLOR, "--seed", "2", *extra]) == 0
        return capsys.readouterr().err

    said = edit("--output", str(tmp_path / "traced.png"), "--refine", "3", "--trace", str(tmp_path / "tr"))
    [(_, steps, before, after)] = _losses(said)
    edit("--output", str(tmp_path / "refined.png"), "--refine", "3")
    edit("--output", str(tmp_path / "plain.png"))
    trace = tmp_path / "tr"
    read = {n: (trace / n).read_bytes() for n in ("edited.png", "refined.png")}
    assert (tmp_path / "traced.png").read_bytes() == read["refined.png"] == (tmp_path / "refined.png").read_bytes()
    assert read["edited.png"] == (tmp_path / "plain.png").read_bytes() != read["refined.png"]
    record = json.loads((trace / "trace.json").read_text())
    ref = record["refinement"]
    assert (ref["steps"], ref["lr"], ref["anchor"], ref["keep"], ref["refined"]) == (3, 0.05, 1.0, ["green triangle"],
                                                                                      "refined.png")
    assert len(ref["losses"]) == 4 and (round(ref["losses"][0], 3), round(ref["losses"][-1], 3)) == (before, after)
    assert record["timings"]["refine_s"] > 0 and len(record["steps_table"]) == 4
    edit("--output", str(tmp_path / "again.png"), "--trace", str(trace))  # the same folder, not refined
    assert json.loads((trace / "trace.json").read_text())["refinement"] is None
    assert not (trace / "refined.png").exists()  # the earlier trace's refined image is not left as this one's


def test_refined_sdedit_starts_from_the_teachers_own_edits_and_returns_the_refined_ones(models):
    from npedit.backbones import load_backbone
    from npedit.shapes.edits import held_out_cases
    from npedit.shapes.evaluate import refined_sdedit_editor, sdedit_editor
    from npedit.shapes.world import render

    _, judge = models
    base = str(assets.DEFAULT_TEACHER)
    backbone = load_backbone(base)
    teacher = backbone.load_transformer(base).eval()
    cases = held_out_cases(6, seed=4)
    refs = [render(c.reference) for c in cases]
    plain = sdedit_editor(backbone, teacher, steps=2, seed=1)(refs, cases)
    same = refined_sdedit_editor(backbone, teacher, judge, refine_steps=0, lr=0.05, anchor=1.0, steps=2,
                                 seed=1)(refs, cases)
    assert all(np.array_equal(a, b) for a, b in zip(plain, same))  # 0 steps: the teacher's own edits
    refined = refined_sdedit_editor(backbone, teacher, judge, refine_steps=3, lr=0.05, anchor=1.0, steps=2,
                                    seed=1)(refs, cases)
    assert sum(not np.array_equal(a, b) for a, b in zip(plain, refined)) >= 4  # and the refined ones are returned
