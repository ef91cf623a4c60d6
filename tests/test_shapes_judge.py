"""Shapes-world judge training: labels from the grammar, a quick run end to end, the evaluation's shape."""

import json

import numpy as np
import pytest
import torch

from npedit.judges import load_judge, training_questions
from npedit.shapes import Edit, Obj, Scene, case_from_edit, parse, render
from npedit.shapes import judge_training as jt


def recolor_case():
    scene = Scene("gray", (Obj("circle", "red", "large", "top left"), Obj("square", "blue", "small", "center")))
    return case_from_edit(scene, Edit("recolor", "top left", colour="green"))


def remove_case():
    scene = Scene("white", (Obj("triangle", "yellow", "small", "top"), Obj("circle", "red", "large", "bottom")))
    return case_from_edit(scene, Edit("remove", "top"))


def with_object(scene, obj):
    return Scene(scene.background, tuple(o for o in scene.objects if o.cell != obj.cell) + (obj,))


def test_labels_follow_the_grammar():
    case = recolor_case()
    assert jt.true_answers(case, case.expected) == (True, True)  # the true edit: Yes / Yes
    assert jt.true_answers(case, case.reference) == (False, True)  # identical: edit check No
    wrong_colour = with_object(case.reference, Obj("circle", "orange", "large", "top left"))
    assert jt.true_answers(case, wrong_colour) == (False, True)
    extra = with_object(case.expected, Obj("square", "blue", "large", "center"))  # the other object grew
    assert jt.true_answers(case, extra) == (True, False)
    also_resized = with_object(case.expected, Obj("circle", "green", "small", "top left"))  # unnamed attribute
    assert jt.true_answers(case, also_resized) == (True, False)
    new_background = Scene("black", case.expected.objects)
    assert jt.true_answers(case, new_background) == (True, False)
    wrong_object = with_object(case.reference, Obj("square", "green", "small", "center"))
    assert jt.true_answers(case, wrong_object) == (False, False)


def test_removal_labels_use_the_contains_check():
    case = remove_case()
    questions = training_questions(case.instruction, case.edit_type, case.object_name)
    assert [q.kind for q in questions] == ["contains", "identity"]
    assert jt.true_answers(case, case.expected) == (False, True)  # gone: contains No, rest kept
    assert jt.true_answers(case, case.reference) == (True, True)
    other_removed = Scene("white", (Obj("triangle", "yellow", "small", "top"),))
    assert jt.true_answers(case, other_removed) == (True, False)
    assert jt.edit_done(case, False) and not jt.edit_done(case, True)


def test_candidates_are_balanced_and_labelled_by_the_grammar():
    rng = np.random.default_rng(0)
    samples = [jt.sample_training(rng, paraphrase_prob=0.5) for _ in range(600)]
    for s in samples:
        assert s.answers == jt.true_answers(s.case, s.candidate)
        if s.kind == "identical":
            assert s.candidate == s.case.reference and not jt.edit_done(s.case, s.answers[0])
        if s.kind == "true":  # (a removal leaves a same-named twin in view: contains stays Yes, truly)
            twin = sum(o.name == s.case.object_name for o in s.case.reference.objects) > 1
            assert s.answers[1] and (jt.edit_done(s.case, s.answers[0]) or (s.case.category == "remove" and twin))
    done = np.mean([jt.edit_done(s.case, s.answers[0]) for s in samples])
    kept = np.mean([s.answers[1] for s in samples])
    assert 0.42 < done < 0.58 and 0.42 < kept < 0.58
    assert {s.case.category for s in samples} == set(jt.CATEGORIES)
    assert any(s.case.instruction != case_from_edit(s.case.reference, jt.edit_between(
        s.case.reference, s.case.expected, s.case.category)).instruction for s in samples)  # paraphrases used


def test_degraded_candidates_keep_the_scene():
    rng = np.random.default_rng(1)
    scene = recolor_case().expected
    kept = 0
    for _ in range(20):
        image, degraded = jt.candidate_image(scene, rng, degrade_prob=1.0)
        assert image.shape == (3, 64, 64) and 0 <= image.min() and image.max() <= 1
        assert parse((image * 255).round().byte().permute(1, 2, 0).numpy()) == scene
        kept += degraded
    assert kept >= 15
    clean, degraded = jt.candidate_image(scene, rng, degrade_prob=0.0)
    assert not degraded and torch.equal(clean, jt.to_tensor(render(scene)))


def test_config_presets_and_overrides():
    cfg = jt.build_config(["preset=quick", "lr=0.01", "arch.hidden_size=48"])
    assert cfg.preset == "quick" and cfg.lr == 0.01 and cfg.arch.hidden_size == 48 and cfg.check_steps == 4
    assert jt.build_config().arch.patch_size == 21
    with pytest.raises(ValueError, match="allowed: default, quick"):
        jt.build_config(["preset=huge"])
    with pytest.raises(ValueError, match="unknown config key"):
        jt.build_config(["preset=quick", "learning_rate=1"])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("judge-run")
    threads = torch.get_num_threads()
    try:
        # threads=0 leaves torch's threads as they are, as every other stage reads it (this stage refused it)
        judge_dir = jt.run(["preset=quick", "ramp_batch=2", "align_batch=2", "threads=0", f"output_dir={out}"])
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)
    return out, judge_dir


def test_quick_run_writes_a_loadable_judge(quick_run):
    out, judge_dir = quick_run
    assert (out / "config.yaml").is_file()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_acc" in r for r in rows) and any("answer_loss" in r for r in rows)
    assert any("ramp_loss" in r for r in rows) and any("align_cos" in r for r in rows)  # ramp and alignment pairs
    assert (judge_dir / "model.safetensors").is_file() and not list(judge_dir.glob("*optim*"))
    assert (out / "checkpoints" / "last" / "model.safetensors").is_file()
    judge = load_judge(judge_dir)
    case = recolor_case()
    ref = jt.to_tensor(render(case.reference))[None]
    out_ = judge.answer(ref, ref.clone(), [training_questions(case.instruction, case.edit_type, case.object_name)])
    assert out_.logits.shape == (1, 2, 2) and torch.isfinite(out_.logits).all()


def test_a_full_disk_stops_judge_training_and_keeps_the_best_judge(tmp_path, full_disk, monkeypatch):
    """save_judge deleted the judge folder and wrote the new one in place: the disk filling up (or a kill) midway left
    neither the best judge so far nor a whole new one, and the run ended in a traceback. Now each save is published
    whole and the run stops with one line naming the best judge it keeps."""
    from npedit.training.checkpoint import WriteError

    real, calls = jt.save_judge, []

    def fill_up_on_the_second(judge, directory, *args):  # the best judge is saved, then the disk fills up
        calls.append(directory)
        if len(calls) == 2:
            with full_disk((tmp_path / "run" / "judge" / "model.safetensors").stat().st_size // 2):
                return real(judge, directory, *args)
        return real(judge, directory, *args)

    monkeypatch.setattr(jt, "save_judge", fill_up_on_the_second)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(WriteError, match=r"checkpoints/step-000005 \(.*\); .*run/judge holds the best judge so "
                                             r"far \(step 4\) whole: free space and train again"):
            jt.run(["preset=quick", f"output_dir={tmp_path / 'run'}"])
    finally:
        torch.set_num_threads(threads)
    judge = load_judge(tmp_path / "run" / "judge")
    assert judge is not None and json.loads((tmp_path / "run" / "judge" / "eval.json").read_text())["step"] == 4
    assert not (tmp_path / "run" / "checkpoints").exists() or not list((tmp_path / "run" / "checkpoints").iterdir())


def test_evaluate_judge_structure(quick_run):
    _, judge_dir = quick_run
    result = jt.evaluate_judge(load_judge(judge_dir), n=6, seed=3)
    assert result["overall"]["count"] == 6 * 4 * 2
    assert set(result["by_category"]) == set(jt.CATEGORIES)
    assert set(result["by_kind"]) == {"edit", "contains", "identity"}
    assert all(0 <= v["accuracy"] <= 1 for v in result["by_category"].values())
    assert "true" in result["by_candidate"] and "add/edit" in result["by_category_kind"]
    # every question about an object edit falls in exactly one referring-form group
    from npedit.shapes.scoring import FORM_GROUPS, reference_form

    samples = jt.evaluation_samples(6, seed=3)
    object_edit_questions = sum(len(s.questions) for s in samples if reference_form(s.case))
    assert sum(v["count"] for v in result["by_form_kind"].values()) == object_edit_questions > 0
    assert {name.rsplit("/", 1)[0] for name in result["by_form_kind"]} <= set(FORM_GROUPS.values())
    assert "overall" in jt.format_table(result) and "form_kind:" in jt.format_table(result)


def test_keep_samples_follow_the_grammar():
    items = jt.keep_samples(24, seed=3)
    assert {kind for *_, kind in items} == set(jt.KEEP_CANDIDATES)
    for case, scene, name, kind in items:
        has = any(o.name == name for o in scene.objects)
        assert has == (kind == "kept")  # the truth of "does it contain <name>?"
        assert name in case.keep and scene.background == case.expected.background


def test_change_samples_follow_the_grammar():
    items = jt.change_samples(24, seed=3)
    assert {kind for *_, kind in items} == set(jt.CHANGE_CANDIDATES)
    for case, scene, name, truth, kind in items:
        assert name in case.new + case.gone and truth == any(o.name == name for o in scene.objects)
        if kind == "edited":  # the true result: created objects there, vanished ones not
            assert truth == (name in case.new)
        if kind == "unchanged" and name in case.gone:
            assert truth  # the copier still shows the object the edit had to change


def test_eval_main_writes_json_and_markdown(quick_run, tmp_path, capsys):
    _, judge_dir = quick_run
    assert jt.eval_main(["--judge", str(judge_dir), "--n", "6", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "judge_eval.json").read_text())
    assert result["overall"]["count"] == 48
    assert 0 < result["keep"]["overall"]["count"] == sum(v["count"] for v in result["keep"]["by_candidate"].values())
    assert "| **overall** |" in (tmp_path / "judge_eval.md").read_text()
    assert "keep check: kept" in (tmp_path / "judge_eval.md").read_text()
    assert 0 < result["change"]["overall"]["count"] == sum(v["count"] for v in result["change"]["by_side"].values())
    assert "change check: edited" in (tmp_path / "judge_eval.md").read_text()
    assert "overall" in capsys.readouterr().out


def test_editor_outputs_become_hard_examples_labelled_from_their_parse():
    from npedit.assets import DEFAULT_MODEL

    samples, counts = jt.editor_samples(str(DEFAULT_MODEL), 6, seed=0, batch_size=4)
    assert counts["cases"] == 6 and counts["parsed"] == len(samples) > 0
    rng = np.random.default_rng(0)
    for s in samples:
        assert s.kind == "editor" and s.image.shape == (64, 64, 3)
        assert parse(s.image) == s.candidate and s.answers == jt.true_answers(s.case, s.candidate)
        assert torch.equal(jt.sample_image(s, rng, degrade_prob=1.0), jt.to_tensor(s.image))  # never re-rendered
    with pytest.raises(ValueError, match="hard_prob"):
        jt.build_config(["hard_prob=1.5"])


def test_path_pairs_lie_on_the_path_with_soft_ramp_targets():
    rng = np.random.default_rng(5)
    questions, ref, cand, _, a_drawn = jt.path_pairs(rng, 40)
    soft = jt.ramp_targets(questions, a_drawn)
    assert ref.shape == cand.shape == (40, 3, 64, 64) and soft.shape == (40, 2, 2)
    assert torch.allclose(soft.sum(-1), torch.ones(40, 2)) and torch.all(soft[:, 1, 1] == 1)  # identity: Yes
    rng = np.random.default_rng(5)  # the same draws again, to recover each case and its blend weight
    cases = [jt.sample_case(rng, paraphrase_prob=0.5) for _ in range(40)]
    a = rng.uniform(0.0, 1.0, 40)
    kinds = set()
    for i, (case, q) in enumerate(zip(cases, questions)):
        true = jt.to_tensor(render(case.expected))
        assert torch.allclose(cand[i], ref[i] + float(a[i]) * (true - ref[i]), atol=1e-6)
        expected_yes = a[i] if q[0].expected == "Yes" else 1 - a[i]  # a removal's contains check expects No
        assert soft[i, 0, 1].item() == pytest.approx(expected_yes, abs=1e-6)
        kinds.add(q[0].kind)
    assert "contains" in kinds and len(kinds) > 1
    with pytest.raises(ValueError, match="ramp_batch"):
        jt.build_config(["ramp_batch=-1"])


def test_gradient_alignment_is_a_cosine_that_training_raises(quick_run):
    _, judge_dir = quick_run
    torch.manual_seed(0)
    judge = jt.TrainableJudge.from_pretrained(judge_dir, device="cpu")
    questions, ref, cand, true, a = jt.path_pairs(np.random.default_rng(1), 4, high=0.5)
    assert torch.all(a <= 0.5) and torch.equal(jt.path_pairs(np.random.default_rng(1), 4, high=0.5)[2], cand)
    batch = (questions, ref, cand, true)
    before = jt.gradient_alignment(judge, *batch)
    assert before.shape == (4,) and torch.all(before.abs() <= 1)
    opt = torch.optim.Adam(judge.model.parameters(), lr=3e-3)
    for _ in range(15):  # double backpropagation: the cosine itself is trained
        loss = (1 - jt.gradient_alignment(judge, *batch, create_graph=True)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = jt.gradient_alignment(judge, *batch)
    assert after.mean() > before.mean() + 0.1, (before, after)
    with pytest.raises(ValueError, match="align_max"):
        jt.build_config(["align_max=2"])


def test_exclude_held_out_keeps_the_judge_training_clear_of_benchmark_cases():
    import hashlib

    from npedit.shapes.edits import held_out_keys

    rng = np.random.default_rng(3)  # pinned: the draws as they were before the option existed (bundled judge)
    assert hashlib.sha256(repr([jt.sample_training(rng) for _ in range(200)]).encode()).hexdigest()[:16] == \
        "82b9fb15367bca80"
    held = held_out_keys((2024,))
    plain, clear = np.random.default_rng(0), np.random.default_rng(0)
    drawn = [jt.sample_training(plain) for _ in range(2085)]
    assert (drawn[2084].case.reference, drawn[2084].case.expected) in held  # a benchmark case, drawn by chance
    kept = [jt.sample_training(clear, excluded=held) for _ in range(2085)]
    assert kept[:2084] == drawn[:2084]  # the same draws until the first excluded case
    assert (kept[2084].case.reference, kept[2084].case.expected) not in held
    assert jt.build_config().exclude_held_out == ()
    assert jt._excluded(jt.build_config(["exclude_held_out=[2024]"])) == held
    with pytest.raises(ValueError, match="exclude_held_out lists benchmark seeds"):
        jt.build_config(["exclude_held_out=[-3]"])


def test_eval_main_never_writes_into_the_bundle(quick_run, tmp_path, monkeypatch):
    """Without --out, judge-eval wrote beside the judge: for the bundled one, judge_eval.json and .md landed in the
    repository's tracked assets/shapes/ (or failed on an install's read-only copy). A bundled judge's report now goes
    to runs/judge-eval in the working folder; a trained judge's still beside it, in its run."""
    import shutil

    from npedit import assets

    _, judge_dir = quick_run
    bundle = tmp_path / "bundle"
    shutil.copytree(judge_dir, bundle / "shapes" / "judge")
    monkeypatch.setattr(assets, "ASSETS_DIR", bundle)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert jt.eval_main(["--judge", str(bundle / "shapes" / "judge"), "--n", "2"]) == 0
    assert sorted(p.name for p in (bundle / "shapes").iterdir()) == ["judge"]
    assert (work / "runs" / "judge-eval" / "judge_eval.json").is_file()
    assert jt.eval_main(["--judge", str(judge_dir), "--n", "2"]) == 0
    assert (judge_dir.parent / "judge_eval.md").is_file()
