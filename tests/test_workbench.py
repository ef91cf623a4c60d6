"""The workbench on tiny models: per-step tracing, model checks, data tables, batch judging, runs, plots, jobs."""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from PIL import Image

from npedit import assets, domain, processes
from npedit.config import LossConfig, load_config
from npedit.pairs import QUESTION_COLUMNS, VERDICT_COLUMNS
from workbench import datasets, jobs, judging, models, plots, presets, runs
from workbench.inspect import trace_edit


@pytest.fixture(scope="module")
def loaded(tiny_set):
    ms = models.ModelSet(models.resolve_paths(**{k: tiny_set[k] for k in ("model", "judge", "teacher", "critic")},
                                              env={}), device="cpu")
    pipe = ms.editor()
    return ms, pipe


def shapes_image(seed=0):
    return datasets.random_shapes_case(seed)


def test_trace_edit_records_every_step(loaded):
    ms, pipe = loaded
    judge, teacher, critic, loss, judge_note, dmd_note = ms.inspectors(None, pipe)
    assert judge_note is None and dmd_note is None
    image, instruction, caption, edit_type, obj, _ = shapes_image(1)
    calls = []
    trace = trace_edit(pipe, judge, teacher, critic, image, instruction, caption, steps=3, seed=5,
                       edit_type=edit_type, object_name=obj or None, loss=loss, progress=lambda f, d: calls.append(f))
    assert [s.step for s in trace.steps] == [0, 1, 2] and trace.steps[0].t == 1.0
    assert trace.image.size == (64, 64) and trace.caption_target == caption and trace.caption_from == "given"
    for s in trace.steps:
        assert s.x0.size == (64, 64)
        assert 0 < s.p_edit < 1 and 0 < s.p_identity < 1
        assert s.dmd_map.shape == (8, 8) and np.isfinite(s.dmd_map).all() and s.dmd_mean > 0
    assert calls == sorted(calls) and calls[-1] == pytest.approx(1.0)
    # The last step's x0 is the pipeline's output: tracing runs the same sampler.
    plain = pipe(image=image, prompt=instruction, num_inference_steps=3,
                 generator=__import__("torch").Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(trace.steps[-1].x0))
    rows = trace.table()
    assert len(rows) == 3 and rows[0]["step"] == 1
    fig = plots.steps_figure(trace)
    assert len(fig.axes) == 2 * 3 + 1  # x0 row, DMD row, one shared colour bar


def test_dmd_map_is_zero_when_teacher_and_critic_agree(loaded):
    ms, pipe = loaded
    teacher = ms.transformer("teacher", ms.paths.teacher, pipe)
    trace = trace_edit(pipe, None, teacher, teacher, shapes_image(2)[0], "make the circle blue", steps=2,
                       loss=LossConfig(cfg_scale=1.0))  # CFG 1 = conditional teacher = critic
    assert all(np.abs(s.dmd_map).max() < 1e-5 for s in trace.steps)  # uncond + 1 (cond - uncond): rounding only
    assert trace.caption_target == "make the circle blue" and trace.caption_from == "instruction"
    assert trace.judge_note == "no judge loaded" and trace.steps[0].p_edit is None


def test_dmd_map_is_of_each_steps_x0_noised_as_dmd_does(loaded):
    import torch

    from npedit import flow
    from npedit.guidance import teacher_critic_x0
    from workbench.inspect import dmd_map

    ms, pipe = loaded
    _, teacher, critic, loss, _, _ = ms.inspectors(None, pipe)
    traces = [trace_edit(pipe, None, teacher, critic, shapes_image(k)[0], "make the circle blue", "a blue circle",
                         steps=2, seed=4, loss=loss) for k in (2, 3)]
    # step 1's map is of its x0, not of the sampler's x_t (pure noise at t = 1, the same for every image)
    assert not np.array_equal(traces[0].steps[0].dmd_map, traces[1].steps[0].dmd_map)
    trace = traces[1]
    assert trace.dmd_t == pytest.approx((loss.dmd_t_min + loss.dmd_t_max) / 2)
    x = pipe(image=shapes_image(3)[0], prompt="make the circle blue", num_inference_steps=2,
             generator=torch.Generator().manual_seed(4), output_type="latent").images  # the last step's x0
    x_t = flow.add_noise(x, torch.randn(x.shape, generator=torch.Generator().manual_seed(4)), trace.dmd_t)
    bb = pipe.backbone
    cond_x, cond_neg = (bb.encode_prompt([p], with_reference=False) for p in ("a blue circle", loss.negative_prompt))
    with torch.no_grad():
        expected = dmd_map(*teacher_critic_x0(bb, teacher, critic, x_t, torch.full((1,), trace.dmd_t), cond_x,
                                              cond_neg, trace.cfg_scale))
    assert np.allclose(trace.steps[-1].dmd_map, expected, atol=1e-5)
    assert f"t={trace.dmd_t:.2f}" in plots.steps_figure(trace).axes[-1].get_ylabel()


def test_a_removal_is_labelled_by_what_its_number_is(loaded):
    from npedit.verdicts import judge_edit

    ms, pipe = loaded
    trace = trace_edit(pipe, ms.judge(), None, None, shapes_image(3)[0], "remove the square", steps=1,
                       edit_type="remove", object_name="square")
    contains = judge_edit(ms.judge(), trace.reference, trace.steps[0].x0, "remove the square", edit_type="remove",
                          object_name="square").questions[0]
    assert contains["kind"] == "contains" and trace.steps[0].p_edit == pytest.approx(1 - contains["p_yes"])
    assert trace.table()[0]["P(edit done)"] == pytest.approx(1 - contains["p_yes"], abs=1e-4)  # not its P(Yes)
    assert plots.steps_figure(trace).axes[0].get_xlabel().startswith("P(edit done)")



def _random_trace(steps: int, seed: int = 0):
    """A trace of `steps` steps of random 32-px pictures and DMD maps, as `trace_edit` records one."""
    from npedit.trace import EditTrace, StepTrace

    rng = np.random.default_rng(seed)
    picture = lambda: Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8))  # noqa: E731
    records = [StepTrace(step=k, t=1.0 - k / steps, x0=picture(), sample_s=0.1, p_edit=0.5, p_identity=0.25,
                         dmd_map=rng.random((4, 4)).astype(np.float32), dmd_mean=0.5) for k in range(steps)]
    return EditTrace(picture(), picture(), "make it blue", "a blue circle", "given", 3, 3.5, dmd_t=0.5, steps=records)


def test_a_trace_zip_holds_the_folders_files_and_stores_its_pngs_as_they_are(tmp_path):
    """`save_trace` to a .zip holds byte for byte what it writes to a folder; PNGs (deflated already) are stored, not
    compressed again (0.3 s of a 1024-px trace's zip on the 2-core CPU), the numbers are deflated."""
    import zipfile

    from npedit.trace import save_trace

    trace = _random_trace(2)
    save_trace(trace, tmp_path / "folder")
    save_trace(trace, tmp_path / "t.zip")
    with zipfile.ZipFile(tmp_path / "t.zip") as z:
        assert sorted(z.namelist()) == sorted(p.name for p in (tmp_path / "folder").iterdir())
        for info in z.infolist():
            assert z.read(info) == (tmp_path / "folder" / info.filename).read_bytes()
            png = info.filename.endswith(".png")
            assert info.compress_type == (zipfile.ZIP_STORED if png else zipfile.ZIP_DEFLATED), info.filename

def test_a_trace_saved_again_keeps_the_earlier_one_until_it_is_whole(tmp_path, ctrl_c_at_fsync):
    """`edit --trace t.zip` (and the app's trace download) wrote the zip in place: a Ctrl-C or a full disk midway left
    a cut zip where the earlier trace was. Into a folder, a trace of fewer steps left the earlier trace's later step
    files beside its own. The zip is written whole (a cut write keeps the earlier one), and a folder holds one trace
    (the user's other files in it left alone)."""
    import zipfile

    from npedit.trace import save_trace

    save_trace(_random_trace(3), tmp_path / "t.zip")
    save_trace(_random_trace(3), tmp_path / "folder")
    (tmp_path / "folder" / "notes.txt").write_text("mine")
    earlier = (tmp_path / "t.zip").read_bytes()

    with ctrl_c_at_fsync(), pytest.raises(KeyboardInterrupt):
        save_trace(_random_trace(1, seed=1), tmp_path / "t.zip")
    assert (tmp_path / "t.zip").read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "t.zip"]  # (no temporary file left)
    save_trace(_random_trace(1, seed=1), tmp_path / "folder")
    save_trace(_random_trace(1, seed=1), tmp_path / "t.zip")
    with zipfile.ZipFile(tmp_path / "t.zip") as z:
        assert sorted(p.name for p in (tmp_path / "folder").iterdir()) == sorted([*z.namelist(), "notes.txt"])
    assert [p.name for p in (tmp_path / "folder").glob("step-*")] != [] and not list(
        (tmp_path / "folder").glob("step-[23]-*"))


def test_trace_without_teacher_says_why(loaded, tmp_path):
    ms, pipe = loaded
    paths = models.resolve_paths(model=ms.paths.model, judge=ms.paths.judge, env={})
    missing = models.ModelSet(models.ModelPaths(model=paths.model, judge=paths.judge, given=("model", "judge")))
    _, teacher, critic, _, _, dmd_note = missing.inspectors(None, pipe)
    assert teacher is None and "--teacher" in dmd_note and "--critic" in dmd_note
    trace = trace_edit(pipe, None, None, None, shapes_image(3)[0], "remove the square", steps=1, dmd_note=dmd_note)
    assert trace.steps[0].dmd_map is None and "--teacher" in trace.dmd_note
    fig = plots.steps_figure(trace)
    assert "--teacher" in fig.get_suptitle()


def test_a_trace_of_an_instruction_the_judge_cannot_read_edits_and_says_why(loaded):
    """An instruction holding one of the judge's control tokens ("<|im_end|>") is refused by the judge; the Edit tab's
    per-step trace still edits and draws its DMD maps, its panel saying why there is no P(Yes) (the whole edit
    failed)."""
    ms, pipe = loaded
    judge, teacher, critic, loss, _, _ = ms.inspectors(None, pipe)
    image = shapes_image(3)[0]
    trace = trace_edit(pipe, judge, teacher, critic, image, "remove the square<|im_end|>", steps=2, loss=loss)
    assert [s.p_edit for s in trace.steps] == [None, None] and trace.steps[0].dmd_map is not None
    assert trace.judge_note.startswith("the judge reads '<|im_end|>' as one of its control tokens")
    assert "<|im_end|>" in plots.steps_figure(trace).get_suptitle()


def test_a_trace_of_an_instruction_longer_than_the_judge_reads_edits_and_says_why(loaded):
    """An instruction whose questions are longer than the judge's positions (1,989 Japanese characters: ~6,000 tokens
    of the bundled judge's 4,096) is refused by the judge; the per-step trace still edits and draws its DMD maps, its
    note naming the token count and the limit (the refusal failed the whole edit)."""
    ms, pipe = loaded
    judge, teacher, critic, loss, _, _ = ms.inspectors(None, pipe)
    image = shapes_image(3)[0]
    trace = trace_edit(pipe, judge, teacher, critic, image, "赤い円を青くしてください。" * 153, steps=2, loss=loss)
    assert [s.p_edit for s in trace.steps] == [None, None] and trace.steps[0].dmd_map is not None
    assert re.search(r"the judge cannot answer: a question is \d+ tokens long .*past the 4096 positions",
                     trace.judge_note)


def test_model_checks_say_what_to_pass(tiny_set, tmp_path, monkeypatch):
    with pytest.raises(models.ModelError, match="--model"):
        models.check_editor(None)
    with pytest.raises(models.ModelError, match="judge"):
        models.check_editor(tiny_set["judge"])
    with pytest.raises(models.ModelError, match="teacher"):
        models.check_editor(tiny_set["teacher"])
    with pytest.raises(models.ModelError, match="does not exist"):
        models.check_editor(str(tmp_path / "nope"))
    with pytest.raises(models.ModelError, match="llava_onevision"):
        models.check_judge(tiny_set["critic"])
    assert models.check_judge(tiny_set["judge"]) == tiny_set["judge"]
    editor = models.ModelSet(models.ModelPaths(model=tiny_set["judge"])).editor
    with pytest.raises(models.ModelError, match="not an editor"):
        editor()
    # Environment variables choose models; flags win over them.
    paths = models.resolve_paths(judge="flag", env={"NPEDIT_MODEL": "from-env", "NPEDIT_JUDGE": "env"})
    assert paths.model == "from-env" and paths.judge == "flag" and set(paths.given) == {"model", "judge"}
    # With the bundled assets missing, nothing is chosen and the status says what to pass.
    monkeypatch.setattr(models.assets, "DEFAULT_MODEL", tmp_path / "missing" / "editor")
    for kind in ("DEFAULT_JUDGE", "DEFAULT_TEACHER", "DEFAULT_CRITIC"):
        monkeypatch.setattr(models.assets, kind, tmp_path / "missing" / kind)
    none = models.ModelSet(models.resolve_paths(env={}))
    assert none.paths.model is None
    status = none.status()
    assert "No editor" in status and "--model" in status and "--judge" in status


def test_companions_of_a_bundled_or_run_editor(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths resolve here, not in a checkout that may hold runs/
    editor = tmp_path / "run" / "pipeline"
    editor.mkdir(parents=True)
    (editor / "training_config.json").write_text(json.dumps(
        {"model": {"base": "runs/shapes/teacher/base"}, "loss": {"negative_prompt": "", "cfg_scale": 2.0}}))
    defaults = models.ModelPaths(model=str(editor), teacher="bundled-teacher", critic="bundled-critic")
    comp = models.companions(str(editor), defaults)
    # The training machine's relative teacher path is not here: the app's teacher is used; the loss settings
    # follow the run. The bundled critic was fitted to another editor's outputs: no DMD maps, and the note says why.
    assert comp.teacher == "bundled-teacher" and comp.critic is None and "--critic" in comp.missing
    assert comp.loss.negative_prompt == "" and comp.loss.cfg_scale == 2.0
    (tmp_path / "run" / "critic").mkdir()
    (tmp_path / "run" / "critic" / "config.json").write_text("{}")
    other = models.companions(str(editor), models.ModelPaths(model="elsewhere", critic="flag", given=("critic",)))
    assert other.critic == str(tmp_path / "run" / "critic")  # a run's own critic wins for editors picked in the list
    flagged = models.companions(str(editor), models.ModelPaths(model=str(editor), critic="flag", given=("critic",)))
    assert flagged.critic == "flag" and "--teacher" in flagged.missing  # flags win for the editor the app started with
    # a critic inside the editor folder (how the bundled editors carry theirs) is its own, before one beside it
    (editor / "critic").mkdir()
    (editor / "critic" / "config.json").write_text("{}")
    inside = models.companions(str(editor), models.ModelPaths(model="elsewhere", critic="flag", given=("critic",)))
    assert inside.critic == str(editor / "critic")
    bare = tmp_path / "bare-editor"  # no training record, but a critic of its own
    (bare / "critic").mkdir(parents=True)
    (bare / "critic" / "config.json").write_text("{}")
    assert models.companions(str(bare), models.ModelPaths(model="elsewhere", critic="app")).critic == str(bare / "critic")


def test_domain_file(tmp_path):
    assert models.read_domain(tmp_path) == domain.Domain()
    domain.write_domain(tmp_path, domain.SHAPES_DOMAIN)
    assert models.read_domain(tmp_path).is_shapes and models.read_domain(tmp_path).resolution == 64
    (tmp_path / domain.DOMAIN_FILE).write_text('{"domain": "shapes", "resolution": "big"}')
    assert models.read_domain(tmp_path) == domain.Domain()  # a broken file: a general editor, no fixed size
    describe = models.describe_editor(str(assets.DEFAULT_MODEL))
    assert "Shapes-world editor, 64x64" in describe and "nothing cropped" in describe


def test_a_json_lines_manifest_fills_a_table_and_says_what_it_left_out(tmp_path):
    """cases.jsonl too (list cells as the table writes them); a name that differs only in case is pointed at; one name
    standing for two of the manifest's files (uploads keep no folders), an unreadable image and a line naming no
    image leave their rows out, each said once however many rows name it."""
    for name in ("a.png", "B.png", "one.png"):
        folder = tmp_path / name.removesuffix(".png")
        folder.mkdir()
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / name)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "c.png").write_bytes(b"\x89PNG not really")
    lines = [{"image": "x/a.png", "instruction": "make it red", "keep": ["tree", "house"], "new": "red a"},
             {"image": "x/b.png", "instruction": "make it blue"},
             {"image": "p/one.png", "instruction": "add a hat"}, {"image": "q/one.png", "instruction": "add a cap"},
             {"image": "c.png", "instruction": "x"}, {"image": "c.png", "instruction": "y"},
             {"image": "", "instruction": "z"}]
    manifest = tmp_path / "cases.jsonl"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    paths = [str(tmp_path / n) for n in ("a/a.png", "B/B.png", "one/one.png", "broken/c.png")]
    table, notes = datasets.table_for_uploads([str(manifest), *paths])
    assert table.to_dict("records") == [{**dict.fromkeys(datasets.TABLE_COLUMNS, ""), "image": "a.png",
                                         "instruction": "make it red", "edit_type": "edit", "keep": "tree; house",
                                         "new": "red a"}]
    assert notes[0] == ("1 row of cases.jsonl left out of the table, 1 image not uploaded: b.png (line 2; uploaded "
                        "as B.png? names must match exactly). Upload it too (with cases.jsonl).")
    assert notes[1] == "cases.jsonl: line 7 names no image, left out."
    assert notes[2].startswith("The rows of 1 image left out: c.png: cannot read ")  # (once, for its two rows)
    assert notes[3] == ("Uploads keep no folders, so these rows of cases.jsonl are left out, as each name stands for "
                        "several files: one.png (p/one.png, q/one.png: line 3, 4). Give the files names of their own.")
    assert notes[4] == "1 uploaded file not named in cases.jsonl, left out of the table: B.png."
    assert len(notes) == 5


def test_two_target_files_of_one_name_in_a_manifest_leave_their_rows_out(tmp_path):
    """Two target paths of one file name (first/x.png, second/x.png) were both shown as x.png: both rows trained
    towards whichever x.png was uploaded. Like two images of one name, their rows are now left out, said once; so
    is a target spelled apart from an image of its name (targets/c.png vs images/c.png)."""
    for name in ("a.png", "b.png", "c.png", "d.png", "x.png", "d-edit.png"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / name)
    manifest = tmp_path / "cases.csv"
    manifest.write_text("image,instruction,target\nimages/a.png,edit a,first/x.png\nimages/b.png,edit b,second/x.png\n"
                        "images/c.png,edit c,targets/c.png\nimages/d.png,edit d,targets/d-edit.png\n"
                        "images/x.png,edit x,\n")
    paths = [str(tmp_path / n) for n in ("a.png", "b.png", "c.png", "d.png", "x.png", "d-edit.png")]
    table, notes = datasets.table_for_uploads([str(manifest), *paths])
    assert list(table["image"]) == ["d.png"] and list(table["target"]) == ["d-edit.png"]
    assert notes == ["Uploads keep no folders, so these rows of cases.csv are left out, as each name stands for "
                     "several files: x.png (first/x.png, images/x.png, second/x.png: line 2, 3, 6); c.png "
                     "(images/c.png, targets/c.png: line 4). Give the files names of their own."]


def test_an_image_another_row_names_as_its_target_is_no_row_of_its_own(tmp_path):
    """Images uploaded without a manifest each became a row, targets too: a target's row, with no instruction,
    failed Start. A row is a target only when another row names its image as target and nothing is typed in it; a
    row with something typed stays (an image can be one edit's target and another's reference)."""
    table = pd.DataFrame([{"image": "cat.png", "instruction": "make it blue", "target": "cat-blue.png"},
                          {"image": "cat-blue.png", "edit_type": "edit"},
                          {"image": "dog.png", "instruction": "make it red", "target": "dog.png"},
                          {"image": "cow.png", "instruction": "add a hat", "target": "targets\\cow-hat.png"},
                          {"image": "cow-hat.png", "instruction": "remove the hat", "target": "cow.png"}],
                         columns=datasets.TABLE_COLUMNS)
    assert datasets.target_rows(table) == [1]  # dog.png names itself; cow.png and cow-hat.png have typed text
    for i in (1, 2, 3):
        Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / ["cat.png", "cat-blue.png", "dog.png"][i - 1])
    uploads = {n: str(tmp_path / n) for n in ("cat.png", "cat-blue.png", "dog.png")}
    manifest = datasets.write_manifest(table.iloc[:3], tmp_path / "data", uploads, targets_for="stage sft")
    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert [(x["id"], x["target"]) for x in lines] == [("00001", "targets/00001_cat-blue.png"),
                                                       ("00003", "targets/00003_dog.png")]  # rows keep their numbers
    again, _ = datasets.table_for_images(list(uploads.values()), table.iloc[:1])
    assert list(again["image"]) == ["cat.png", "dog.png"]  # added files send every file again: no target row back


def test_a_table_with_targets_writes_them_only_for_a_run_that_reads_them(tmp_path):
    """Paired SFT needs a target per row: write_manifest copies each beside the manifest (the Shapes cases' true
    edits), refuses at once naming every row without one, and leaves the column out for other stages."""
    from npedit.data import load_manifest
    from npedit.shapes import read_cases_jsonl, render

    table = datasets.shapes_table(6, tmp_path / "cases", seed=1)
    cases = read_cases_jsonl(tmp_path / "cases")
    sft = load_manifest(datasets.write_manifest(table, tmp_path / "sft", targets_for="stage sft"))
    assert [np.asarray(Image.open(r.target).convert("RGB")).tolist() for r in sft] == [
        render(c.expected).tolist() for c in cases]  # the true edits, in the rows' order
    other = datasets.write_manifest(table, tmp_path / "npedit")
    assert all(not r.target for r in load_manifest(other)) and not (tmp_path / "npedit" / "targets").exists()
    table.loc[[1, 4], "target"] = ""
    with pytest.raises(ValueError, match=r"^stage sft needs a target image \(the true edit\) in every row: rows 2, 5 "
                                         r"have none\."):
        datasets.write_manifest(table, tmp_path / "lacking", targets_for="stage sft")
    assert not (tmp_path / "lacking").exists()  # refused before a file is copied
    table.loc[1, "target"] = str(tmp_path / "nowhere.png")
    with pytest.raises(ValueError, match="^row 2: target "):
        datasets.write_manifest(table.drop(index=4), tmp_path / "missing", targets_for="stage sft")


def test_training_table_to_manifest(tmp_path):
    from npedit.data import load_manifest

    table = datasets.shapes_table(6, tmp_path / "cases", seed=1)
    assert list(table.columns) == datasets.TABLE_COLUMNS and len(table) == 6
    assert set(table["edit_type"]) == {"add", "remove", "replace", "recolor", "resize", "background"}
    assert datasets.table_domain(table) == domain.SHAPES_DOMAIN
    manifest = datasets.write_manifest(table, tmp_path / "run" / "data", domain=datasets.table_domain(table))
    records = load_manifest(manifest)
    assert len(records) == 6 and all(Path(r.image).is_file() for r in records)
    assert [r.keep_names for r in records] == [[n.strip() for n in k.split(";") if n.strip()] for k in table["keep"]]
    assert any(r.keep_names for r in records)  # Shapes cases name the objects the edit leaves alone
    assert [r.new_names for r in records] == [[n.strip() for n in k.split(";") if n.strip()] for k in table["new"]]
    assert [r.gone_names for r in records] == [[n.strip() for n in k.split(";") if n.strip()] for k in table["gone"]]
    assert any(r.new_names for r in records) and any(r.gone_names for r in records)  # and the edit's own result
    assert models.read_domain(manifest.parent).is_shapes
    # as the app shows them: by file name, the names mapped back to the files (domain included)
    named, files = datasets.named_images(table)
    assert list(named["image"]) == [Path(x).name for x in table["image"]]
    assert list(named["target"]) == [Path(x).name for x in table["target"]]  # the true edits, named apart
    assert list(files.values()) == [*table.image, *table.target]
    assert datasets.table_domain(named, files) == domain.SHAPES_DOMAIN and datasets.table_domain(named) is None
    # Uploaded images: rows name files by base name; empty captions are allowed (c^x falls back to the instruction).
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp_path / "cat.png")
    (tmp_path / "notes.txt").write_text("not an image")
    uploaded, skipped = datasets.table_for_images([str(tmp_path / "cat.png"), str(tmp_path / "notes.txt")])
    assert len(uploaded) == 1 and skipped == [f"notes.txt: cannot read {tmp_path / 'notes.txt'} as an image: "
                                              f"cannot identify image file '{tmp_path / 'notes.txt'}'"]
    uploaded.loc[0, "image"] = "cat.png"
    with pytest.raises(ValueError, match="row 1: .*empty instruction"):
        datasets.write_manifest(uploaded, tmp_path / "u1", {"cat.png": str(tmp_path / "cat.png")})
    uploaded.loc[0, "instruction"] = "remove the cat " * 500  # refused at Start, not in the job (cells are stripped)
    with pytest.raises(ValueError, match="row 1: .*instruction is 7,499 characters long"):
        datasets.write_manifest(uploaded, tmp_path / "u6", {"cat.png": str(tmp_path / "cat.png")})
    uploaded.loc[0, ["instruction", "edit_type"]] = ["remove the cat", "remove"]
    with pytest.raises(ValueError, match="row 1: .*object_name"):
        datasets.write_manifest(uploaded, tmp_path / "u2", {"cat.png": str(tmp_path / "cat.png")})
    uploaded.loc[0, "object_name"] = "cat"
    uploaded.loc[0, "edit_type"] = "remvoe"  # a typed edit type that is none: refused, naming the row
    with pytest.raises(ValueError, match="row 1: .*unknown edit_type 'remvoe'"):
        datasets.write_manifest(uploaded, tmp_path / "u5", {"cat.png": str(tmp_path / "cat.png")})
    uploaded.loc[0, "edit_type"] = " Removal"
    out = datasets.write_manifest(uploaded, tmp_path / "u3", {"cat.png": str(tmp_path / "cat.png")})
    assert load_manifest(out)[0].target_caption == "remove the cat"
    assert json.loads(out.read_text())["edit_type"] == "remove"  # written as the manifest reads it
    with pytest.raises(ValueError, match="empty"):
        datasets.write_manifest(datasets.empty_table(), tmp_path / "u4")


def test_a_start_copying_generated_cases_while_the_same_seed_is_generated_again_reads_them_whole(tmp_path):
    """The Train tab's Generate and Start are separate events: two visitors on the default seed and count share one
    staging folder, and one's Start copied the cases while the other's Generate rewrote them in place, finding images
    cut short or empty ("row 6: ... is an empty file (0 bytes)"). Each file is now replaced whole."""
    import threading

    folder = tmp_path / "staging" / "shapes-0-6"
    table = datasets.shapes_table(6, folder, seed=0)
    stop = time.monotonic() + 1.5

    failed = []

    def generate_again():
        try:
            while time.monotonic() < stop:
                datasets.shapes_table(6, folder, seed=0)
        except Exception as exc:  # noqa: BLE001  (asserted below: a thread's exception does not fail the test)
            failed.append(exc)

    generating = threading.Thread(target=generate_again)
    generating.start()
    starts = 0
    try:
        while time.monotonic() < stop:
            datasets.write_manifest(table, tmp_path / f"run-{starts}" / "data", targets_for="stage sft")
            starts += 1
    finally:
        generating.join()
    assert starts > 0 and not failed and not list(folder.rglob(".*.tmp"))
    copied = sorted((tmp_path / f"run-{starts - 1}" / "data").rglob("*.png"))
    assert len(copied) == 12 and all(Image.open(p).size == (64, 64) for p in copied)  # 6 references, 6 targets


def test_adding_images_to_an_upload_keeps_what_was_typed(tmp_path, monkeypatch):
    """Adding files to the Train tab's upload sends every file again: rows of images already in the table keep their
    instruction and captions (and are not read again), new images get empty rows, rows of images no longer uploaded
    go."""
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / name)
    a, b, c = (str(tmp_path / n) for n in ("a.png", "b.png", "c.png"))
    table = datasets.table_for_images([a, b])[0]
    assert list(table["image"]) == ["a.png", "b.png"]  # as the user named them, not the server's copies
    table.loc[0, ["instruction", "caption_target", "keep"]] = ["make it red", "a red square", "blue circle"]
    table.loc[1, "instruction"] = np.nan  # a cell the user cleared
    read = []
    monkeypatch.setattr(datasets, "load_image", lambda p: read.append(Path(p).name))
    again = datasets.table_for_images([b, a, c], table)[0]
    assert read == ["c.png"]  # a and b were read when they first arrived
    monkeypatch.undo()
    assert list(again["image"]) == ["b.png", "a.png", "c.png"] and list(again.columns) == datasets.TABLE_COLUMNS
    assert again.loc[1, "instruction"] == "make it red" and again.loc[1, "caption_target"] == "a red square"
    assert again.loc[1, "keep"] == "blue circle" and again.loc[0, "instruction"] == ""
    assert again.loc[2, "instruction"] == "" and again.loc[2, "edit_type"] == "edit"
    assert list(datasets.table_for_images([c], again)[0]["image"]) == ["c.png"]


def test_an_upload_keeps_every_image_it_can_read_and_says_which_it_left_out(tmp_path):
    """The Train tab's upload took only eight file extensions and dropped the rest without a word: a .jfif or .avif
    photo (readable) vanished, as did a .heic one. Now every file is tried with the one loader: the readable ones
    get rows, each other one is named with the reason (an empty, truncated or unreadable file too)."""
    photo = tmp_path / "photo.jfif"
    Image.new("RGB", (8, 6), (200, 30, 30)).save(photo, "JPEG")
    (tmp_path / "empty.png").write_bytes(b"")
    cut = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(cut)
    cut.write_bytes(cut.read_bytes()[:2000])
    table, skipped = datasets.table_for_images([str(photo), str(tmp_path / "empty.png"), str(cut)])
    assert list(table["image"]) == ["photo.jfif"]
    assert skipped == [f"empty.png: {tmp_path / 'empty.png'} is an empty file (0 bytes)",
                       f"cut.png: cannot read {cut} as an image: image file is truncated"]


def test_examples(tmp_path):
    rows = datasets.shapes_examples(tmp_path / "ex")
    assert len(rows) == 6 and all(Path(r[0]).is_file() and r[1] for r in rows)
    assert [r[4] != "" for r in rows] == [r[3] == "remove" for r in rows]  # the removed object only for removals
    cases = datasets.shapes_cases(6)
    assert [r[5] for r in rows] == ["; ".join(c.keep) for c in cases] and any(r[5] for r in rows)  # objects to keep
    (tmp_path / "bundled").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "bundled" / "a.png")
    (tmp_path / "bundled" / "a.txt").write_text("make it red\n")
    first = datasets.bundled_examples(tmp_path / "bundled")[0]
    assert first[:2] == [str(tmp_path / "bundled" / "a.png"), "make it red"]
    assert datasets.bundled_examples(tmp_path / "absent") == []
    (tmp_path / "bundled" / "examples.jsonl").write_text(json.dumps(
        {"image": "a.png", "instruction": "remove the dot", "caption_target": "nothing", "edit_type": "remove",
         "object_name": "dot", "keep": ["red square", "blue dot"]}) + "\n")  # as scripts/bundle_shapes_assets.py writes
    assert datasets.bundled_examples(tmp_path / "bundled") == [
        [str(tmp_path / "bundled" / "a.png"), "remove the dot", "nothing", "remove", "dot", "red square; blue dot"]]


def test_batch_judging(loaded, tmp_path):
    ms, _ = loaded
    ref, ins, *_ = datasets.random_shapes_case(4)
    Image.fromarray(ref).save(tmp_path / "ref.png")
    Image.fromarray(ref[::-1].copy()).save(tmp_path / "out.png")
    listing = tmp_path / "pairs.csv"
    pd.DataFrame([{"reference": "ref.png", "edited": "out.png", "instruction": ins},
                  {"id": "r", "reference": "ref.png", "edited": "out.png", "instruction": "remove the square",
                   "edit_type": "remove", "object": "red square", "keep": "blue circle;green triangle",
                   "gone": "red square; blue square"},
                  {"reference": "ref.png", "edited": "missing.png", "instruction": ins}]).to_csv(listing, index=False)
    uploads = [str(listing), str(tmp_path / "ref.png"), str(tmp_path / "out.png")]
    pairs = judging.read_pairs(uploads)
    assert [p.id for p in pairs] == ["2", "r", "4"] and pairs[1].object_name == "red square"  # the CSV's line numbers
    out, questions = judging.judge_pairs(ms.judge(), pairs)
    assert list(out.columns) == VERDICT_COLUMNS and list(questions.columns) == QUESTION_COLUMNS
    kinds = list(questions["kind"].fillna(""))
    assert kinds == ["edit", "identity", "contains", "identity", "keep", "keep", "change", ""]  # "" : the failed pair
    assert questions["error"].iloc[-1] == out.loc[2, "error"] and set(questions["edited"]) == {"out.png", "missing.png"}
    assert 0 < out.loc[0, "p_edit"] < 1 and out.loc[0, "error"] == ""
    assert pd.isna(out.loc[0, "p_keep"]) and 0 < out.loc[1, "p_keep"] < 1  # keep checks only where a row names some
    assert pairs[1].gone == "red square; blue square" and pd.isna(out.loc[0, "p_change"])
    assert 0 < out.loc[1, "p_change"] < 1
    assert out.loc[2, "error"] and "missing.png" in out.loc[2, "error"]
    with pytest.raises(ValueError, match="exactly one"):
        judging.read_pairs([str(tmp_path / "ref.png")])
    assert judging.extra_questions("a?\n\n b? ") == ["a?", "b?"]


def test_inspector_tables_give_the_numbers_the_cli_prints(loaded, tmp_path):
    """The batch verdicts, the question table and the per-step table rounded P(Yes) to 4 decimals (up to 5e-5 from
    what `python -m npedit judge` and `judge_edit` give for the same pair); the batch now keeps every digit and the
    tables show 6."""
    from npedit.verdicts import judge_edit

    ms, pipe = loaded
    ref, ins, *_ = datasets.random_shapes_case(4)
    Image.fromarray(ref).save(tmp_path / "ref.png")
    Image.fromarray(ref[::-1].copy()).save(tmp_path / "out.png")
    listing = tmp_path / "pairs.jsonl"
    listing.write_text(json.dumps({"reference": "ref.png", "edited": "out.png", "instruction": ins,
                                   "keep": "blue circle", "new": "red square"}) + "\n")
    out, _ = judging.judge_pairs(ms.judge(), judging.read_pairs([str(listing)]))
    v = judge_edit(ms.judge(), tmp_path / "ref.png", tmp_path / "out.png", ins, keep="blue circle", new="red square")
    for key in ("p_edit", "p_identity", "p_keep", "p_change"):
        assert out.loc[0, key] == pytest.approx(getattr(v, key), abs=1e-7), key
    table = judging.verdict_table(v)
    assert np.allclose(table["P(Yes)"], [q["p_yes"] for q in v.questions], rtol=0, atol=1e-6)
    assert np.allclose(table["margin (logit Yes − No)"], [q["margin"] for q in v.questions], rtol=0, atol=1e-6)
    trace = trace_edit(pipe, ms.judge(), None, None, tmp_path / "ref.png", ins, steps=2)
    shown = [(row["P(edit done)"], row["P(Yes) identity"]) for row in trace.table()]
    assert np.allclose(shown, [(s.p_edit, s.p_identity) for s in trace.steps], rtol=0, atol=1e-6)


def test_a_batch_list_finds_every_uploaded_image_whatever_its_extension(tmp_path):
    """An uploaded image matched the list only with one of eight extensions: a .jfif or .avif photo uploaded with
    the list was "not among the uploaded files" in a public app. Every uploaded file but the list is one now (the
    loader says, pair by pair, which it cannot read)."""
    listing = tmp_path / "pairs.csv"
    pd.DataFrame([{"reference": "ref.jfif", "edited": "out.png", "instruction": "make it red"}]).to_csv(listing,
                                                                                                         index=False)
    uploads = [str(listing), str(tmp_path / "ref.jfif"), str(tmp_path / "out.png")]
    pairs = judging.read_pairs(uploads, uploads_only=True)
    assert [p.reference_path for p in pairs] == [str(tmp_path / "ref.jfif")]


def test_batch_list_lines_that_are_not_objects_and_questions_without_bound_are_refused(tmp_path):
    """A .jsonl line of valid JSON that is not an object is one clear line, not an AttributeError; a text longer
    than an instruction may be, or more questions than one judge pass holds, is refused before the judge runs
    (a 100,000-character instruction took 23 GB in the Judge inspector)."""
    from npedit.verdicts import MAX_QUESTIONS, edit_questions

    listing = tmp_path / "pairs.jsonl"
    listing.write_text('{"reference": "a.png", "edited": "b.png", "instruction": "x"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:2: not a JSON object"):
        judging.read_pairs([str(listing)])
    listing.write_text('{"reference": "a.png", "edited": "b.png", "instruction": "remove it", "object": ["cat"]}\n')
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: object must be text \(a string\), got \['cat'\]"):
        judging.read_pairs([str(listing)])
    broken = tmp_path / "pairs.csv"
    broken.write_text('reference,edited,instruction\n"a.png,b.png\n')
    with pytest.raises(ValueError, match="pairs.csv:2: not a readable CSV list of pairs: unexpected end of data"):
        judging.read_pairs([str(broken)])
    with pytest.raises(ValueError, match="the instruction has 100000 characters"):
        edit_questions("x" * 100_000)
    with pytest.raises(ValueError, match="an extra question has 3000 characters"):
        edit_questions("make it red", extra=["y" * 3000])
    with pytest.raises(ValueError, match=f"at most {MAX_QUESTIONS}"):
        edit_questions("make it red", keep=[f"object {i}" for i in range(MAX_QUESTIONS)])
    assert len(edit_questions("make it red", extra=["Is it red?"] * (MAX_QUESTIONS - 2))) == MAX_QUESTIONS


def test_resuming_a_run_that_finished_all_its_steps_is_refused(tmp_path):
    """A run whose newest checkpoint is at max_steps has nothing left to train: resume says so instead of starting
    a job that loads every model to do nothing; a time-limited run that stopped early still resumes."""
    run = tmp_path / "runs" / "done"
    (run / "pipeline").mkdir(parents=True)
    (run / "pipeline" / "model_index.json").write_text("{}")
    (run / "checkpoints" / "step_000004").mkdir(parents=True)
    (run / "checkpoints" / "step_000004" / "trainer_state.json").write_text("{}")
    (run / "config.yaml").write_text("max_steps: 4\n")
    (run / "job.json").write_text(json.dumps({"pid": 2**22 + 7, "device": "cpu", "args": ["max_steps=4"],
                                              "started": time.time()}))
    (run / "exit_code").write_text("0\n")
    assert jobs.job_status(run).state == "finished"
    with pytest.raises(ValueError, match="finished all its 4 steps: nothing to resume"):
        jobs.start_job(run, resume=True, runs_root=tmp_path / "runs", device="cpu")
    assert not (tmp_path / "runs" / ".locks" / "cpu.lock").exists()


def _fake_run(root: Path, name: str, lr: float, losses: list[float], stage: str = "npedit"):
    run = root / name
    run.mkdir(parents=True)
    config = {"stage": stage, "max_steps": len(losses), "optim": {"lr": lr},
              "loss": {"lambda_dmd": 1.0, "lambda_vlm": 0.02}, "data": {"train": "shapes"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))  # as npedit.config.save_config writes it
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "time": 100.0 + i, "student_loss": v,
                                                           "dmd_loss": v / 2}) + "\n" for i, v in enumerate(losses))
                                       + '{"step": 9, "tim')  # a line still being written is skipped
    (run / "samples").mkdir()
    Image.fromarray(np.zeros((8, 16, 3), np.uint8)).save(run / "samples" / "step_000002.png")
    return run


def test_runs_table_compare_and_plots(tmp_path):
    import pandas as pd

    a = _fake_run(tmp_path, "a", 1e-4, [1.0, 0.5, 0.25])
    b = _fake_run(tmp_path, "b", 2e-5, [1.0, 0.8])
    _fake_run(tmp_path / "group", "c", 1e-3, [2.0], stage="warmup")  # runs may sit one level down (runs/shapes/x)
    (tmp_path / ".locks").mkdir()
    table = runs.runs_table(tmp_path)
    assert set(table["run"]) == {"a", "b", "group/c"} and set(table["lr"]) == {1e-4, 2e-5, 1e-3}
    weights = dict(zip(table["run"], table["λ_dmd"]))  # a warm-up has no DMD weight to show
    assert weights["a"] == 1.0 and pd.isna(weights["group/c"])
    assert set(table["status"]) == {"external"}  # not started from the workbench
    assert dict(zip(table["run"], table["student_loss"])) == {"a": 0.25, "b": 0.8, "group/c": 2.0}
    diff = runs.compare([a, b])
    assert "optim.lr" in list(diff["key"]) and "stage" not in list(diff["key"])
    frames = {r.name: runs.read_metrics(r) for r in (a, b)}
    assert runs.metric_keys(frames) == ["student_loss", "dmd_loss"]
    fig = plots.loss_curves(frames, ["student_loss", "dmd_loss"])
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2

    blown = pd.DataFrame({"step": [1, 2, 3, 4], "student_loss": [1.0, float("inf"), 2.0, float("nan")]})
    lines = plots.loss_curves({"x": blown}, ["student_loss"], smooth=2).axes[0].lines
    crosses, line = lines  # the infinite step marked, the line over the finite ones (NaN: not logged)
    assert list(crosses.get_xdata()) == [2] and crosses.get_label() == "not finite"
    assert list(line.get_xdata()) == [1, 3] and list(line.get_ydata()) == [1.0, 1.5]
    assert len(plots.bar_chart({"a": 0.25, "b": 0.8}, "last").axes[0].patches) == 2
    assert runs.samples(a) == [(str(a / "samples" / "step_000002.png"), "step 2")]
    assert runs.finished_editors(tmp_path) == []
    for step in ("step_000002", "step_000010"):  # checkpoint exports (`npedit export`) are editors too
        (a / "exports" / step).mkdir(parents=True)
        (a / "exports" / step / "model_index.json").write_text("{}")
    (a / "exports" / "step_000010-lora").mkdir()  # adapters alone (`npedit export --adapters`)
    (a / "exports" / "step_000010-lora" / "npedit_lora.json").write_text("{}")
    assert runs.finished_editors(tmp_path) == [
        ("run: a (step 10, LoRA adapters)", str(a / "exports/step_000010-lora")),
        ("run: a (step 10)", str(a / "exports/step_000010")), ("run: a (step 2)", str(a / "exports/step_000002"))]


def test_compared_runs_keep_one_colour_and_one_legend_and_bars_name_every_run():
    """With several runs of mixed kinds compared, a run that lacked the first panel's metric took another run's colour
    in the next panel (each panel's colour cycle started over), each panel's legend covered its lines, a run with no
    values showed nowhere, and the bar chart's slanted names overlapped and left a run without the metric as a gap.
    Now each run keeps one colour (also its bar), one legend below the panels names every run (and those with no
    values yet), and the bars run sideways, named, each value written beside its bar."""
    import pandas as pd

    warmup = pd.DataFrame({"step": [1, 2], "fm_loss": [0.5, 0.25]})  # no student_loss
    npedit = pd.DataFrame({"step": [1, 2], "student_loss": [1.0, 0.5], "fm_loss": [0.2, 0.1]})
    frames = {"warmup": warmup, "npedit": npedit, "just-started": pd.DataFrame()}
    fig = plots.loss_curves(frames, ["student_loss", "fm_loss"])
    student, fm = fig.axes[0].lines, fig.axes[1].lines
    assert student[0].get_color() == fm[1].get_color() != fm[0].get_color()  # npedit in both panels, warmup apart
    colors = plots.run_colors(list(frames))
    assert [line.get_label() for line in student] == ["npedit"] and student[0].get_color() == colors["npedit"]
    assert [line.get_color() for line in fm] == [colors["warmup"], colors["npedit"]]
    assert all(ax.get_legend() is None for ax in fig.axes) and len(fig.legends) == 1
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["warmup", "npedit"]
    assert "just-started" in legend.get_title().get_text()
    last = {"warmup": None, "npedit": 0.5, "killed": float("nan"), "ablation": 0.75}
    ax = plots.bar_chart(last, "last").axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(last)
    assert [t.get_text().strip() for t in ax.texts] == ["no value", "0.5", "no value", "0.75"]
    assert tuple(ax.patches[1].get_facecolor()) == plots.run_colors(list(last))["npedit"]
    many = plots.run_colors([f"r{k}" for k in range(12)])
    assert len(set(many.values())) == 12  # past ten runs, still one colour each


def test_compare_ignores_a_run_without_config_and_progress_reads_a_critic_bar(tmp_path):
    import pandas as pd

    a = _fake_run(tmp_path, "a", 1e-4, [1.0, 0.5])
    b = _fake_run(tmp_path, "b", 2e-5, [1.0])
    starting = tmp_path / "starting"  # a job whose trainer has not written config.yaml yet
    starting.mkdir()
    (starting / "metrics.jsonl").write_text('{"step": 1, "student_loss": 2.0}\n7\n')  # a stray non-row line
    diff = runs.compare([a, b, starting], tmp_path)
    keys = list(diff["key"])
    assert keys == ["status", "step", "student_loss", "dmd_loss", "max_steps", "optim.lr"]
    assert diff.loc[keys.index("max_steps"), "starting"] is None and pd.isna(diff.loc[3, "starting"])
    assert runs.read_metrics(starting)["step"].tolist() == [1] and jobs.job_status(starting).step == 1
    (starting / "train.log").write_text("critic:  40%|####      | 4/10 [00:01<00:02,  2.00it/s]\n")
    assert jobs.job_status(starting).step == 4  # the stage-critic trainer's progress bar counts too


def test_compare_puts_progress_and_metrics_above_the_differing_keys(tmp_path):
    """The config differences listed status, step and the last metrics below every differing key: with a dozen keys
    apart, what a researcher compares first sat at the bottom. Now they come first, then the keys in order."""
    a = _fake_run(tmp_path, "a", 1e-4, [1.0, 0.5])
    b = _fake_run(tmp_path, "b", 2e-5, [1.0])
    extra = {f"judge.k{i:02d}": i for i in range(12)}  # a dozen more keys set in `a` only
    (a / "config.yaml").write_text((a / "config.yaml").read_text() + yaml.safe_dump({"judge": {
        k.split(".")[1]: v for k, v in extra.items()}}))
    diff = runs.compare([a, b], tmp_path)
    keys = list(diff["key"])
    assert keys[:4] == ["status", "step", "student_loss", "dmd_loss"]
    assert keys[4:] == sorted([*extra, "max_steps", "optim.lr"])
    row = dict(zip(keys, diff["b"]))
    assert (row["step"], row["student_loss"], row["max_steps"], row["judge.k03"]) == (1, 1.0, 1, None)


def test_presets_build_valid_configs(tiny_set, tmp_path):
    quick = presets.PRESETS["Quick check (CPU, minutes)"]
    args = presets.train_args(quick.values(), base=tiny_set["teacher"], judge=tiny_set["judge"],
                              student=tiny_set["model"], data="shapes", config_file=quick.config_file)
    cfg = presets.check_train_args(args)
    assert cfg.judge.path == tiny_set["judge"] and cfg.model.student == tiny_set["model"] and cfg.max_steps == 30
    assert cfg.judge.keep_questions == 0
    assert cfg.judge.change_questions == 0
    assert cfg.gradient_accumulation_steps == 1
    keep = presets.train_args({**quick.values(), "keep_questions": 2, "change_questions": 1, "grad_accum": 4},
                              base=tiny_set["teacher"],
                              judge=tiny_set["judge"], student=tiny_set["model"], data="shapes",
                              config_file=quick.config_file)
    assert presets.check_train_args(keep).judge.keep_questions == 2
    assert presets.check_train_args(keep).judge.change_questions == 1
    assert presets.check_train_args(keep).gradient_accumulation_steps == 4
    assert presets.check_train_args(keep).model.lora_rank == 0  # the presets fine-tune in full unless asked
    lora = presets.train_args({**quick.values(), "lora_rank": 8}, base=tiny_set["teacher"], judge=tiny_set["judge"],
                              student=tiny_set["model"], data="shapes", config_file=quick.config_file)
    assert presets.check_train_args(lora).model.lora_rank == 8
    if quick.config_file:  # the Shapes recipe supplies what the tab does not show
        assert args[:2] == ["--config", quick.config_file] and cfg.loss.negative_prompt == ""
    warm = presets.PRESETS["Shapes identity warm-up"]
    cfg = presets.check_train_args(presets.train_args(warm.values(), base=tiny_set["teacher"], judge=tiny_set["judge"],
                                                      student="", data="shapes", config_file=warm.config_file))
    assert cfg.stage == "warmup" and cfg.judge.path == "" and cfg.model.student == ""
    quoted = presets.train_args({"negative_prompt": "it's low quality, artifacts"}, base=tiny_set["teacher"],
                                judge=tiny_set["judge"], student="", data="shapes")
    assert presets.check_train_args(quoted).loss.negative_prompt == "it's low quality, artifacts"
    with pytest.raises(ValueError, match="--teacher"):
        presets.check_train_args(presets.train_args({}, base=str(tmp_path / "no-teacher"), judge=tiny_set["judge"],
                                                    student="", data="shapes"))
    with pytest.raises(ValueError, match="stage"):
        presets.check_train_args(presets.train_args({"stage": "dance"}, base=tiny_set["teacher"], judge="",
                                                    student="", data="shapes"))
    # paired SFT on a manifest: its targets are checked where the table is written (write_manifest)
    sft = presets.check_train_args(presets.train_args({"stage": "sft"}, base=tiny_set["teacher"], judge="",
                                                      student="", data=str(tmp_path / "cases.jsonl")))
    assert presets.targets_for(sft) == "stage sft (paired SFT)"
    with pytest.raises(ValueError, match="optim.lr must be >= 0"):  # refused before a job loads its models
        presets.check_train_args(presets.train_args({"lr": -1.0}, base=tiny_set["teacher"], judge=tiny_set["judge"],
                                                    student="", data="shapes"))
    # a recipe file cannot let a job the app starts read files outside its manifest's folder
    recipe = tmp_path / "outside.yaml"
    recipe.write_text("data: {allow_outside_paths: true}\n")
    assert not presets.check_train_args(presets.train_args({}, base=tiny_set["teacher"], judge=tiny_set["judge"],
                                                           student="", data="shapes", config_file=str(recipe))
                                        ).data.allow_outside_paths


def test_judge_pixel_cap_reaches_the_judge_and_the_runs(tiny_set, tmp_path):
    """--judge-max-pixels: the app's Qwen2.5-VL judge sees at most that many pixels, the runs the app starts get
    judge.max_pixels, and a fixed-view judge refuses it (at load, and before a run starts)."""
    from npedit.judges.tiny import build_tiny_qwen2_5_vl

    qwen = str(build_tiny_qwen2_5_vl(tmp_path / "qwen"))
    capped = models.ModelSet(models.ModelPaths(model=tiny_set["model"], judge=qwen), device="cpu",
                             judge_max_pixels=1024)
    assert capped.judge().processor.image_processor.size["longest_edge"] == 1024
    assert "at most 1,024 pixels per image" in capped.status()
    plain = models.ModelSet(models.ModelPaths(model=tiny_set["model"], judge=qwen), device="cpu")
    assert plain.judge().processor.image_processor.size["longest_edge"] > 1024 and "pixels" not in plain.status()
    fixed = models.ModelSet(models.ModelPaths(model=tiny_set["model"], judge=tiny_set["judge"]), device="cpu",
                            judge_max_pixels=1024)
    with pytest.raises(models.ModelError, match="one fixed size"):
        fixed.judge()
    quick = presets.PRESETS["Quick check (CPU, minutes)"]
    common = dict(base=tiny_set["teacher"], student=tiny_set["model"], data="shapes", config_file=quick.config_file)
    cfg = presets.check_train_args(presets.train_args(quick.values(), judge=qwen, judge_max_pixels=1024, **common))
    assert cfg.judge.path == qwen and cfg.judge.max_pixels == 1024
    assert presets.check_train_args(presets.train_args(quick.values(), judge=qwen, **common)).judge.max_pixels == 0
    warm = presets.PRESETS["Shapes identity warm-up"]  # no judge in this stage: no cap either
    args = presets.train_args(warm.values(), judge=qwen, judge_max_pixels=1024, **{**common, "student": ""})
    assert presets.check_train_args(args).judge.max_pixels == 0
    with pytest.raises(ValueError, match="llava_onevision judges see each image at one fixed size"):
        presets.check_train_args(presets.train_args(quick.values(), judge=tiny_set["judge"], judge_max_pixels=1024,
                                                    **common))


def test_a_recipe_with_a_typo_keeps_its_preset_which_says_so_and_start_refuses(tiny_set, tmp_path, monkeypatch,
                                                                                 capsys):
    """A recipe of configs/shapes/ that did not read (a key mistyped while editing it) was swapped, in silence, for
    built-in values without the file (another lr, none of its other settings), or its preset vanished. It now keeps
    its preset, the error first in the note (and on the app's stderr), and Start refuses it naming the key."""
    for path in presets.RECIPES.glob("*.yaml"):
        shutil.copyfile(path, tmp_path / path.name)
    (tmp_path / "npedit.yaml").write_text((tmp_path / "npedit.yaml").read_text().replace("max_steps:", "max_step:"))
    (tmp_path / "sft.yaml").write_text("stage: sft\noptim: {lr: 1.0e-4, lrr: 1}\n")
    monkeypatch.setattr(presets, "RECIPES", tmp_path)
    offered = presets.build_presets()
    said = "⚠️ **npedit.yaml does not read** (unknown config key(s) max_step (did you mean max_steps?); valid keys"
    for name in ("Quick check (CPU, minutes)", "Shapes NP-Edit", "Judge only (λ_DMD = 0)", "DMD only (λ_VLM = 0)"):
        assert offered[name].note.startswith(said) and offered[name].config_file == str(tmp_path / "npedit.yaml")
    assert offered["Shapes paired SFT (baseline)"].note.startswith("⚠️ **sft.yaml does not read** (unknown config "
                                                                   "key(s) optim.lrr (did you mean optim.lr?)")
    assert "warning: the recipe " + str(tmp_path / "npedit.yaml") in capsys.readouterr().err
    assert not offered["Shapes identity warm-up"].note.startswith("⚠️")
    quick = offered["Quick check (CPU, minutes)"]
    with pytest.raises(ValueError, match=r"unknown config key\(s\) max_step \(did you mean max_steps\?\)"):
        presets.check_train_args(presets.train_args(quick.values(), base=tiny_set["teacher"], judge=tiny_set["judge"],
                                                    student="", data="shapes", config_file=quick.config_file))
    # fixed while the app runs, the file would read, and the stand-in knobs (stage npedit for the SFT recipe) would
    # override it: Start keeps refusing until a restart reads the file again
    sft = offered["Shapes paired SFT (baseline)"]
    assert sft.broken and sft.stage == "npedit" and "restart the app" in presets.start_problem(sft)
    assert all(offered[name].broken for name in ("Quick check (CPU, minutes)", "DMD only (λ_VLM = 0)"))
    assert not presets.start_problem(offered["Shapes identity warm-up"])


def test_shipped_recipes_load_and_become_presets(tiny_set):
    """Every configs/shapes recipe validates, and the Train tab offers each one with the recipe's own knobs."""
    recipes = sorted(presets.RECIPES.glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"warmup", "npedit", "sft", "npedit-from-sft", "unroll"}
    for path in recipes:
        load_config(path)  # raises on an unknown key or a bad value
    offered = {p.config_file for p in presets.PRESETS.values()}
    assert {str(p) for p in recipes} <= offered
    from_sft = presets.PRESETS["Shapes SFT then NP-Edit (bundled editors' recipe)"]
    assert (from_sft.lr, from_sft.keep_questions, from_sft.change_questions) == (2e-5, 2, 2)
    assert from_sft.batch_size * from_sft.grad_accum == 512
    args = presets.train_args(from_sft.values(), base=tiny_set["teacher"], judge=tiny_set["judge"],
                              student=tiny_set["model"], data="shapes", config_file=from_sft.config_file)
    cfg = presets.check_train_args(args)
    assert cfg.data.pool == 2_000_000 and cfg.judge.temperature_warmup_steps == 100  # from the file, not the knobs
    assert cfg.gradient_accumulation_steps == 8 and cfg.model.student == tiny_set["model"]
    unroll = presets.PRESETS["Shapes unrolled regression (pairs)"]
    assert (unroll.lambda_dmd, unroll.lambda_vlm, unroll.batch_size) == (0.0, 0.0, 32)
    args = presets.train_args(unroll.values(), base=tiny_set["teacher"], judge=tiny_set["judge"],
                              student=tiny_set["model"], data="shapes", config_file=unroll.config_file)
    cfg = presets.check_train_args(args)
    assert cfg.loss.lambda_target == 1.0 and cfg.judge.path == ""  # the regression from the file; no judge loaded
    assert presets.targets_for(cfg) == "the regression onto the true edit (loss.lambda_target)"
    pixels = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, lambda_target=0.0, lambda_target_pixels=4.0))
    assert presets.targets_for(pixels) == "the regression onto the true edit (loss.lambda_target_pixels)"
    assert presets.targets_for(presets.check_train_args(presets.train_args(
        {}, base=tiny_set["teacher"], judge=tiny_set["judge"], student="", data="shapes"))) == ""


def _wait(run, until, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = jobs.job_status(run)
        if until(st):
            return st
        time.sleep(0.3)
    raise AssertionError(f"timed out; last status {st}\n{jobs.log_tail(run, 30)}")


def test_jobs_start_progress_busy_kill_resume_cancel_and_finish(tiny_set, tmp_path):
    root = tmp_path / "runs"
    data = datasets.write_manifest(datasets.shapes_table(4, tmp_path / "cases"), tmp_path / "data",
                                   domain=domain.SHAPES_DOMAIN)
    common = dict(base=tiny_set["teacher"], judge=tiny_set["judge"], student=tiny_set["model"], data=str(data))
    warmup = presets.PRESETS["Shapes identity warm-up"].values()  # cheap steps
    long = presets.train_args({**warmup, "max_steps": 10000, "batch_size": 1, "log_every": 1, "sample_every": 0,
                               "save_every": 1}, **common)
    st = jobs.start_job(root / "long", long, runs_root=root, device="cpu")
    assert st.active and st.device == "cpu" and (root / "long" / "job.json").is_file()
    with pytest.raises(jobs.JobBusy, match="busy with run 'long'"):
        jobs.start_job(root / "other", long, runs_root=root, device="cpu")
    assert not (root / "other").exists()
    assert jobs.active_job(root, "cpu") == (root / "long").resolve()
    st = _wait(root / "long", lambda s: s.step >= 2 and s.checkpoint)
    assert st.state == "running" and st.eta_s > 0 and st.max_steps == 10000 and "step" in st.message

    # A crash (the whole process group killed, no exit code) reads as failed and resumable.
    os.killpg(st.pid, signal.SIGKILL)
    st = _wait(root / "long", lambda s: not s.active, timeout=20)
    assert st.state == "failed" and "killed halfway" in st.message and st.resumable
    assert jobs.active_job(root, "cpu") is None
    assert json.loads((root / "long/status.json").read_text())["state"] == "failed"

    st = jobs.start_job(root / "long", resume=True, runs_root=root, device="cpu")
    assert "--resume" in json.loads((root / "long/job.json").read_text())["command"]
    resumed_from = st.step
    st = _wait(root / "long", lambda s: s.step > resumed_from)
    st = jobs.cancel_job(root / "long", timeout=10)
    assert st.state == "cancelled" and not st.active and jobs.active_job(root, "cpu") is None

    short = presets.train_args({"max_steps": 2, "critic_steps": 1, "batch_size": 2, "log_every": 1,
                                "sample_every": 2, "save_every": 2}, **common)
    jobs.start_job(root / "short", short, runs_root=root, device="cpu")
    st = _wait(root / "short", lambda s: not s.active)
    assert st.state == "finished", jobs.log_tail(root / "short", 30)
    assert st.step == 2 and st.pipeline and st.latest_sample and st.elapsed_s > 0
    # the log opens with the command as one would type it (not the launcher's `-c` snippet)
    assert (root / "short/train.log").read_text().lstrip().startswith(f"$ {sys.executable} -m npedit train ")
    assert [s.state for s in jobs.list_jobs(root)] == ["finished", "cancelled"]
    # The finished editor is listed, is recognised as a Shapes editor, loads and edits.
    assert runs.finished_editors(root) == [("run: short", st.pipeline)]
    assert models.read_domain(st.pipeline).is_shapes
    comp = models.companions(st.pipeline, models.ModelPaths())
    assert comp.teacher == tiny_set["teacher"] and comp.critic == str(root / "short" / "critic")
    pipe = models.ModelSet(models.ModelPaths(), device="cpu").editor(st.pipeline)
    assert pipe(image=datasets.random_shapes_case(0)[0], prompt="remove the circle").images[0].size == (64, 64)


def test_a_job_killed_by_a_signal_says_so_and_relative_model_paths_survive_the_run_folder(tmp_path, monkeypatch):
    """A trainer killed by the kernel (exit 137 from the wrapper shell) reads as that, not as its last progress bar;
    the Train tab's relative paths are made absolute, so they mean the same wherever the job or its resume runs."""
    run = tmp_path / "runs" / "oom"
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"pid": 2**22 + 7, "device": "cpu", "args": [], "started": time.time()}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 12, "time": time.time()}) + "\n")
    (run / "train.log").write_text("warmup:   0%|          | 12/10000 [00:01<15:13, fm_loss=1.5]Killed\n")
    (run / "exit_code").write_text("137\n")
    st = jobs.job_status(run)
    assert st.state == "failed" and st.message == ("killed at step 12 by signal 9 (Killed) (out of memory? the "
                                                   "kernel's OOM killer sends it)")
    (run / "exit_code").write_text("1\n")
    assert jobs.job_status(run).message.startswith("exited with code 1: ")
    for step, state in ((4, "{}"), (8, "")):  # a newer checkpoint cut short: the status names what a resume loads
        (run / f"checkpoints/step_{step:06d}").mkdir(parents=True)
        (run / f"checkpoints/step_{step:06d}/trainer_state.json").write_text(state)
    st = jobs.job_status(run)
    assert st.resumable and st.checkpoint.endswith("step_000004") and st.message.endswith(
        "; resumable from step_000004 (step_000008 is damaged (trainer_state.json is empty), passed over)")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher").mkdir()
    args = presets.train_args({}, base="teacher", judge="org/judge-on-the-hub", student="", data="shapes")
    assert f"model.base={tmp_path / 'teacher'}" in args and "judge.path=org/judge-on-the-hub" in args
    assert "data.train=shapes" in args and "model.student=" in args


def test_a_stopped_job_continued_from_a_shell_reads_as_that_and_then_as_finished(tmp_path):
    """A job killed (or cancelled), then continued by `npedit train --resume` typed in a shell, read as "killed at
    step N; resumable" for good, and the app offered a resume with nothing to do. While a trainer holds the run it
    is "external", naming its pid; once it saved an editor newer than the job's end, "finished"."""
    from npedit import files

    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"pid": 2**22 + 7, "device": "cpu", "args": [], "started": 1000.0}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 12, "time": time.time()}) + "\n")
    (run / "exit_code").write_text("137\n")
    os.utime(run / "exit_code", (2000.0, 2000.0))
    assert jobs.job_status(run).state == "failed"
    with files.run_lock(run):  # this process trains there now
        st = jobs.job_status(run)
        assert (st.state, st.message) == ("external", f"trained outside the workbench by pid {os.getpid()} (the job "
                                                      "failed): step 12")
        assert not st.resumable and not st.active
    assert jobs.job_status(run).state == "failed"  # the lock file left behind names a pid that holds nothing
    (run / "pipeline").mkdir()
    (run / "pipeline" / "model_index.json").write_text("{}")
    os.utime(run / "pipeline" / "model_index.json", (1500.0, 1500.0))  # the job's own editor, before it was killed
    assert jobs.job_status(run).state == "failed"
    os.utime(run / "pipeline" / "model_index.json", (3000.0, 3000.0))
    st = jobs.job_status(run)
    assert (st.state, st.message) == ("finished", f"finished 12 steps outside the workbench (the job failed); "
                                                  f"editor saved to {run / 'pipeline'}")
    (run / "cancelled").write_text("")  # cancelled after that editor was saved: the job's word stands
    os.utime(run / "cancelled", (4000.0, 4000.0))
    assert jobs.job_status(run).state == "cancelled"
    os.utime(run / "pipeline" / "model_index.json", (5000.0, 5000.0))
    assert jobs.job_status(run).message.startswith("finished 12 steps outside the workbench (the job was cancelled)")
    (run / "cancelled").unlink()
    (run / "exit_code").write_text("0\n")  # a job that finished, then resumed from a shell for more steps
    assert jobs.job_status(run).state == "finished"
    with files.run_lock(run):
        assert jobs.job_status(run).message == (f"trained outside the workbench by pid {os.getpid()} (after the job "
                                                "finished): step 12")
    (run / "job.json").unlink()  # a run never started here, trained from a shell
    with files.run_lock(run):
        assert jobs.job_status(run).message == f"trained outside the workbench by pid {os.getpid()}: step 12"
    assert jobs.job_status(run).state == "finished"


def test_an_app_killed_right_after_starting_a_job_leaves_it_tracked(tmp_path, monkeypatch):
    """job.json was written only after the process started: an app killed in between left the trainer running
    untracked (the run "not started", the device's lock free after 30 s, so a second job could join it on the GPU, and
    nothing to cancel). The job is recorded before it starts and writes its own pid (job.pid) first thing."""
    root = tmp_path / "runs"
    started = []
    real_popen = jobs.subprocess.Popen

    def popen_then_killed(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        raise KeyboardInterrupt  # the app dies here (no handler of start_job runs, as under SIGKILL)

    monkeypatch.setattr(jobs, "_MAIN", "import time; time.sleep(60)")  # a trainer that runs until stopped
    monkeypatch.setattr(jobs.subprocess, "Popen", popen_then_killed)
    with pytest.raises(KeyboardInterrupt):
        jobs.start_job(root / "orphan", ["max_steps=1"], runs_root=root, device="cpu")
    monkeypatch.setattr(jobs.subprocess, "Popen", real_popen)
    try:
        _wait(root / "orphan", lambda s: s.pid is not None, timeout=30)  # the job has written job.pid
        # long past its start: the pid must come from somewhere (set only now: a status read before the job wrote
        # its pid, within the real grace, would otherwise count it as never started and free the device)
        monkeypatch.setattr(jobs, "STARTING_GRACE_S", 0.0)
        st = jobs.job_status(root / "orphan")
        assert st.state == "running" and st.pid == started[0].pid
        assert jobs.active_job(root, "cpu") == (root / "orphan").resolve()
        with pytest.raises(jobs.JobBusy, match="busy with run 'orphan'"):
            jobs.start_job(root / "second", ["max_steps=1"], runs_root=root, device="cpu")
        assert jobs.cancel_job(root / "orphan", timeout=5).state == "cancelled"
        assert started[0].wait(timeout=5) is not None
    finally:
        if started[0].poll() is None:
            os.killpg(started[0].pid, signal.SIGKILL)  # the job's whole group: its shell and the sleeping trainer
            started[0].wait()



def test_two_resumes_of_one_stopped_run_at_once_start_one_job(tmp_path, monkeypatch):
    """Two Resume clicks on a stopped run (two tabs, a double click) both found it stopped and both started a trainer
    in its folder; the device lock naming that same run was taken over by the second. Now the check, the device lock
    and job.json are one turn: one starts, the other is told the run is already running."""
    root = tmp_path / "runs"
    run = root / "stopped"
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"pid": 2**22 + 7, "device": "cpu", "args": ["max_steps=1"],
                                              "started": time.time() - 100, "cwd": str(tmp_path)}))
    monkeypatch.setattr(jobs, "_MAIN", "import time; time.sleep(60)")  # a trainer that runs until stopped
    both_read = threading.Barrier(2)
    real_turn, waited = jobs._lock_turn, threading.local()

    def turn_once_both_have_read(*args):
        if not getattr(waited, "done", False):  # each thread's first turn: both have found the run stopped
            waited.done = True
            both_read.wait(timeout=30)
        return real_turn(*args)

    monkeypatch.setattr(jobs, "_lock_turn", turn_once_both_have_read)
    said = []

    def resume():
        try:
            said.append(jobs.start_job(run, resume=True, runs_root=root, device="cpu").pid)
        except jobs.JobBusy as exc:
            said.append(str(exc))

    threads = [threading.Thread(target=resume) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(said, key=str) == sorted([jobs.job_status(run).pid, "run 'stopped' is already running"], key=str)
        assert jobs.active_job(root, "cpu") == run.resolve()
    finally:
        for pid in [p for p in said if isinstance(p, int)]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def test_the_job_wrapper_records_its_pid_and_the_exit_status_as_a_shell_does(tmp_path):
    """The job's wrapper was `/bin/sh -c`, which Windows has not; job_wrapper.py, run by this Python, writes the same
    two files: its own pid first, then the trainer's status, 128 + N for one killed by signal N (137: the OOM killer's
    SIGKILL), 127 for a program that cannot run."""
    env = {**os.environ, "NPEDIT_PID_FILE": str(tmp_path / "job.pid"), "NPEDIT_EXIT_FILE": str(tmp_path / "exit")}
    wrapper = [sys.executable, "-I", str(jobs._WRAPPER)]
    for program, status in ((["-c", "import sys; sys.exit(3)"], 3),
                            (["-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], 137)):
        proc = subprocess.run([*wrapper, sys.executable, *program], env=env, capture_output=True, timeout=60)
        assert proc.returncode == status and (tmp_path / "exit").read_text() == f"{status}\n"
        assert int((tmp_path / "job.pid").read_text()) not in (os.getpid(), 0)
    proc = subprocess.run([*wrapper, str(tmp_path / "no-such-program")], env=env, capture_output=True, timeout=60)
    assert proc.returncode == 127 and (tmp_path / "exit").read_text() == "127\n" and b"cannot run" in proc.stderr


def test_the_job_wrapper_outlives_a_cancel_until_the_trainer_has_ended(tmp_path):
    """A cancel sends SIGTERM to the job's whole group. The wrapper died of it at once, leaving the trainer (still
    saving) to whoever adopts orphans: with the app as a container's PID 1, the app, which never reaps it, so the job
    read as running for good, and no exit code was written. The wrapper now waits for the trainer and records it."""
    ready = tmp_path / "ready"
    trainer = ("import pathlib, signal, sys, time\n"
               "def stop(*_):\n    time.sleep(0.5)\n    sys.exit(7)\n"  # (a trainer saving before it stops)
               "signal.signal(signal.SIGTERM, stop)\n"
               f"pathlib.Path({str(ready)!r}).write_text('1')\n"
               "time.sleep(60)\n")
    env = {**os.environ, "NPEDIT_PID_FILE": str(tmp_path / "job.pid"), "NPEDIT_EXIT_FILE": str(tmp_path / "exit")}
    proc = subprocess.Popen([sys.executable, "-I", str(jobs._WRAPPER), sys.executable, "-c", trainer], env=env,
                            start_new_session=True)
    try:
        deadline = time.time() + 60
        while not ready.is_file() and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 7 and (tmp_path / "exit").read_text() == "7\n"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_windows_job_is_followed_and_stopped_through_its_process_tree(tmp_path, monkeypatch):
    """Windows has no process groups, killpg or /proc: there a job is its wrapper, checked (pid reuse included) and
    stopped through psutil, the trainer terminated first so the wrapper still records its exit, and an exit code of
    128 + N is a code, not a signal. Run here with the Windows branches on and POSIX's Popen options (its
    creationflags exist only on Windows), an app restarted in between (no Popen object to poll)."""
    root = tmp_path / "runs"
    monkeypatch.setattr(jobs, "_WINDOWS", True)
    monkeypatch.setattr(jobs, "_detached", lambda: {"start_new_session": True})
    monkeypatch.setattr(jobs, "_MAIN", "import time; time.sleep(60)")  # a trainer that runs until stopped
    run = root / "win"
    st = jobs.start_job(run, ["max_steps=1"], runs_root=root, device="cpu")
    wrapper = jobs._CHILDREN.pop(st.pid)  # the app restarted: the job is found through psutil alone
    try:
        _wait(run, lambda s: (run / "job.pid").is_file(), timeout=30)
        trainer = psutil.Process(st.pid).children()
        assert [" ".join(p.cmdline()) for p in trainer] == [" ".join(json.loads((run / "job.json").read_text())
                                                                       ["command"])]
        assert jobs.job_status(run).state == "running" and jobs.active_job(root, "cpu") == run.resolve()
        assert not jobs._alive(os.getpid(), run.resolve())  # a live pid of another program is not the job
        st = jobs.cancel_job(run, timeout=10)
        assert st.state == "cancelled" and jobs.active_job(root, "cpu") is None
        assert wrapper.wait(timeout=10) == 128 + signal.SIGTERM and (run / "exit_code").is_file()
        assert not trainer[0].is_running()
    finally:
        if wrapper.poll() is None:
            os.killpg(wrapper.pid, signal.SIGKILL)
            wrapper.wait()
    (run / "cancelled").unlink()
    (run / "exit_code").write_text("137\n")  # Windows' exit codes are codes (and it has no signal.SIGKILL)
    (run / "status.json").unlink()
    assert jobs.job_status(run).message.startswith("exited with code 137")


def test_a_windows_job_started_here_ends_when_its_wrapper_exits(tmp_path, monkeypatch):
    """On Windows a process this app started stays in the process table while its handle is open here, and psutil
    may be refused a look at it (AccessDenied, read as "still running"): a finished job would then read as running
    for as long as the app runs. There the wrapper's exit, which the app sees itself, ends the job."""
    monkeypatch.setattr(jobs, "_WINDOWS", True)
    monkeypatch.setattr(jobs, "_detached", lambda: {"start_new_session": True})
    monkeypatch.setattr(jobs, "_MAIN", "pass")  # a trainer that ends at once

    def refused(pid):
        raise psutil.AccessDenied(pid)

    monkeypatch.setattr(jobs.psutil, "Process", refused)
    root = tmp_path / "runs"
    st = jobs.start_job(root / "quick", ["max_steps=1"], runs_root=root, device="cpu")
    jobs._CHILDREN[st.pid].wait(timeout=60)
    assert not jobs.job_status(root / "quick").active and jobs.active_job(root, "cpu") is None


def test_a_jobs_log_is_utf8_whatever_the_locale(tmp_path, monkeypatch):
    """train.log is read as UTF-8; a trainer printing an instruction in a locale that is not UTF-8 (Windows' cp1252;
    here ASCII) stopped with UnicodeEncodeError. The job is told to write UTF-8 (PYTHONIOENCODING)."""
    for name, value in (("LC_ALL", "C"), ("LANG", "C"), ("PYTHONUTF8", "0"), ("PYTHONCOERCECLOCALE", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PYTHONIOENCODING", raising=False)
    # (the program in ASCII: a POSIX command line in the C locale is bytes, read back as surrogates)
    monkeypatch.setattr(jobs, "_MAIN", "print('rendre le cercle rouge \\u2192 "
                                       "\\u628a\\u5706\\u53d8\\u6210\\u7ea2\\u8272')")
    root = tmp_path / "runs"
    jobs.start_job(root / "utf8", ["max_steps=1"], runs_root=root, device="cpu")
    _wait(root / "utf8", lambda s: not s.active, timeout=60)
    assert (root / "utf8/exit_code").read_text(encoding="utf-8") == "0\n", jobs.log_tail(root / "utf8")
    assert jobs.log_tail(root / "utf8").endswith("rendre le cercle rouge → 把圆变成红色")


def test_two_starts_at_once_past_a_stale_lock_run_one_job(tmp_path, monkeypatch):
    """Start and Resume are separate gradio events, so two visitors' starts can run at once. Both found the device's
    lock stale (its job long ended), and one removed the lock the other had just written: two jobs trained on one
    device. Taking the lock is now one step per device, for threads and processes alike."""
    import threading

    root = tmp_path / "runs"
    (root / ".locks").mkdir(parents=True)
    (root / ".locks" / "cpu.lock").write_text(json.dumps({"run_dir": str(root / "old"), "time": 0}))  # stale
    monkeypatch.setattr(jobs, "_MAIN", "import time; time.sleep(60)")  # a trainer that runs until stopped
    real_active = jobs.active_job
    checked = threading.Event()
    lock = root / ".locks" / "cpu.lock"

    def active_job(runs_root, device=None):  # "a" goes on once "b" has seen the stale lock; "b" once "a" made its own
        holder = real_active(runs_root, device)
        if threading.current_thread().name == "a":
            checked.wait(timeout=1.0)
        else:
            checked.set()
            deadline = time.time() + 1.0
            made = str((root / "a").resolve())
            while time.time() < deadline and (jobs._read_json(lock) or {}).get("run_dir") != made:
                time.sleep(0.01)
        return holder

    monkeypatch.setattr(jobs, "active_job", active_job)
    outcome = {}

    def start(name):
        try:
            outcome[name] = jobs.start_job(root / name, ["max_steps=1"], runs_root=root, device="cpu").state
        except jobs.JobBusy as exc:
            outcome[name] = f"busy: {exc}"

    threads = [threading.Thread(target=start, args=(n,), name=n) for n in ("a", "b")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        running = sorted(n for n, state in outcome.items() if state == "running")
        assert len(running) == 1 and len(outcome) == 2, outcome
        other = ({"a", "b"} - set(running)).pop()
        assert outcome[other].startswith(f"busy: cpu is busy with run '{running[0]}'")
        assert real_active(root, "cpu") == (root / running[0]).resolve()
    finally:
        for name in ("a", "b"):
            jobs.cancel_job(root / name, timeout=5)


def test_a_trainer_started_from_a_shell_keeps_the_app_from_starting_a_second_on_its_device(tmp_path, monkeypatch):
    """The device lock names the app's own jobs only: with `python -m npedit train` running from a shell, the app saw
    the device free and started a second trainer there. A start now reads the process table and refuses, naming the
    trainer; a trainer hidden from the device (CUDA_VISIBLE_DEVICES) or a job of these runs (the lock's business) does
    not count."""
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setattr(jobs, "_MAIN", "import time; time.sleep(60)")  # a job that runs until stopped
    env = {k: v for k, v in os.environ.items() if k not in ("NPEDIT_PID_FILE", "CUDA_VISIBLE_DEVICES")}
    sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
    procs = {name: subprocess.Popen([*sleep, "-m", "npedit", "train", f"output_dir={tmp_path / name}"], env=extra)
             for name, extra in (("shell", env), ("gpu1", {**env, "CUDA_VISIBLE_DEVICES": "1"}),
                                 ("ours", {**env, "NPEDIT_PID_FILE": str(root / "r" / "job.pid")}))}
    try:
        for proc in procs.values():  # (until exec, a child shows its parent's command line)
            deadline = time.time() + 10
            while time.time() < deadline and "train" not in psutil.Process(proc.pid).cmdline():
                time.sleep(0.01)
        mine = {p.pid for p in procs.values()}
        monkeypatch.setattr(processes, "listing",
                            lambda: (p for p in psutil.process_iter(["pid", "ppid", "cmdline"]) if p.pid in mine))
        assert jobs.outside_trainer(root, "cuda:0") == (f"pid {procs['shell'].pid}: {sys.executable} -c 'import time; "
                                                        f"time.sleep(60)' -m npedit train output_dir={tmp_path}/shell")
        with pytest.raises(jobs.JobBusy, match=f"cpu is busy with a trainer started outside this app \\(pid "
                                               f"{procs['shell'].pid}: .*One job runs per device"):
            jobs.start_job(root / "new", ["max_steps=1"], runs_root=root, device="cpu")
        assert not (root / "new").exists() and jobs.active_job(root, "cpu") is None
        shell = procs.pop("shell")
        shell.kill()
        shell.wait()
        assert jobs.outside_trainer(root, "cuda:0") is None  # on GPU 1, and a job of these runs
        assert jobs.outside_trainer(root, "cuda:1") == f"pid {procs['gpu1'].pid}: " + " ".join(
            procs["gpu1"].args[:2]) + " 'import time; time.sleep(60)' -m npedit train " + f"output_dir={tmp_path}/gpu1"
        assert jobs.outside_trainer(tmp_path / "other-runs", "cuda:0") is not None  # another app's job
        monkeypatch.setattr(processes, "listing", lambda: (p for p in psutil.process_iter(["pid", "ppid", "cmdline"])
                                                             if p.pid == procs["ours"].pid))
        assert jobs.start_job(root / "new", ["max_steps=1"], runs_root=root, device="cpu").state == "running"
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
        jobs.cancel_job(root / "new", timeout=5)
    assert processes.trains(["npedit", "train", "--resume"])
    assert processes.trains(["C:\\env\\Scripts\\npedit.exe", "train"])
    assert processes.trains(["accelerate", "launch", "-m", "npedit", "train"])
    assert not processes.trains([sys.executable, "-m", "npedit", "edit", "--model", "train"])
    assert not processes.trains([sys.executable, "-m", "pytest", "-k", "train"])


def test_a_poll_freeing_an_ended_runs_lock_leaves_a_new_starts_lock(tmp_path, monkeypatch):
    """A status poll of a run that had ended frees the device's lock if it still names that run; a start running at
    the same moment (another visitor's) could replace the stale lock in between, and the poll then removed the new
    job's lock: the device read as free while that job trained, so a third start joined it."""
    import threading

    root = tmp_path / "runs"
    old = root / "old"
    (old / "pipeline").mkdir(parents=True)
    (old / "pipeline" / "model_index.json").write_text("{}")
    (old / "job.json").write_text(json.dumps({"pid": 2**22 + 7, "device": "cpu", "args": [], "started": time.time(),
                                              "runs_root": str(root)}))
    (old / "exit_code").write_text("0\n")
    (old / "status.json").write_text(json.dumps({"state": "running"}))  # the last poll saw it running
    lock = root / ".locks" / "cpu.lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"run_dir": str(old.resolve()), "time": 0}))
    monkeypatch.setattr(jobs, "_MAIN", "import time; time.sleep(60)")  # a trainer that runs until stopped
    real_read, real_active = jobs._read_json, jobs.active_job
    polled = threading.Event()

    def read_json(path):  # the poll reads the lock, then goes on once the start has written its own (or 1 s passed)
        data = real_read(path)
        if threading.current_thread().name == "poll" and Path(path) == lock:
            polled.set()
            deadline = time.time() + 1.0
            mine = str((root / "new").resolve())
            while time.time() < deadline and (real_read(lock) or {}).get("run_dir") != mine:
                time.sleep(0.01)
        return data

    def active_job(runs_root, device=None):  # the start replaces the stale lock once the poll has read it
        polled.wait(timeout=1.0)
        return real_active(runs_root, device)

    monkeypatch.setattr(jobs, "_read_json", read_json)
    monkeypatch.setattr(jobs, "active_job", active_job)
    threads = [threading.Thread(target=jobs.job_status, args=(old,), name="poll"),
               threading.Thread(target=jobs.start_job, args=(root / "new", ["max_steps=1"]),
                                kwargs={"runs_root": root, "device": "cpu"}, name="start")]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert jobs.job_status(root / "new").state == "running"
        assert real_active(root, "cpu") == (root / "new").resolve()
    finally:
        jobs.cancel_job(root / "new", timeout=5)


def test_a_jobs_records_are_written_whole_and_leave_no_partial_file(tmp_path, full_disk):
    """job.json and status.json went through a copy of files.write_atomic without its clean-up: a full disk left a cut
    `.job.json.tmp` holding the space; they use write_atomic itself now."""
    record = tmp_path / "job.json"
    jobs._write_json(record, {"pid": 1})
    with pytest.raises(OSError), full_disk(64):
        jobs._write_json(record, {"pid": 2, "args": ["x" * 200]})
    assert json.loads(record.read_text()) == {"pid": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["job.json"]


def test_two_visitors_polling_a_run_as_it_finishes_both_read_its_status(tmp_path, monkeypatch):
    """The Train tab's status poll runs without a concurrency limit: two visitors' polls of a run that had just ended
    both rewrote status.json through its one temporary name, and one of them renamed the other's half-written file
    or failed on it gone (FileNotFoundError, an error box every 2 s). Writers of one file now take turns."""
    import threading

    from npedit import files

    run = tmp_path / "runs" / "done"
    (run / "pipeline").mkdir(parents=True)
    (run / "pipeline" / "model_index.json").write_text("{}")
    (run / "job.json").write_text(json.dumps({"pid": 2**22 + 7, "device": "cpu", "args": ["max_steps=4"],
                                              "started": time.time(), "runs_root": str(tmp_path / "runs")}))
    (run / "exit_code").write_text("0\n")
    (run / "status.json").write_text(json.dumps({"state": "running"}))  # what the polls saw last, as it ended
    both_writing = threading.Barrier(2, timeout=1.0)
    real_fsync = files.os.fsync

    def fsync_together(fd):  # both polls inside the write at once, as two threads get there
        try:
            both_writing.wait()
        except threading.BrokenBarrierError:  # (writers taking turns: the first waits alone, then goes on)
            pass
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync_together)
    seen, errors = [], []

    def poll():
        try:
            seen.append(jobs.job_status(run).state)
        except Exception as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=poll) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == [] and seen == ["finished", "finished"]
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert sorted(p.name for p in run.iterdir()) == ["exit_code", "job.json", "pipeline", "status.json"]


def test_a_job_that_fails_to_start_leaves_its_folder_free(tmp_path, monkeypatch):
    """job.json is written before the process starts; a start that fails (no such program, no memory to fork) takes
    it back, so the same run name can be started again."""
    root = tmp_path / "runs"

    def refused(*args, **kwargs):
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(jobs.subprocess, "Popen", refused)
    with pytest.raises(OSError, match="Cannot allocate memory"):
        jobs.start_job(root / "again", ["max_steps=1"], runs_root=root, device="cpu")
    assert not (root / "again" / "job.json").exists() and jobs.active_job(root, "cpu") is None


def test_jobs_that_ended_are_reaped_and_forgotten(tmp_path, monkeypatch):
    """A long-lived app held every job it started that was not cancelled (its Popen, for good), and one that ended
    with no tab open stayed a zombie process until some status read polled it. Any status read, and the device check
    of every page load and start, now waits for the jobs that ended and forgets them."""
    monkeypatch.setattr(jobs, "_MAIN", "raise SystemExit(3)")  # a trainer that exits at once
    root, pids = tmp_path / "runs", []

    def zombie(pid):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
        except OSError:  # gone: waited for
            return False
        return stat[stat.rindex(")") + 2] == "Z"

    for k in range(3):
        run = root / f"j{k}"
        pids.append(jobs.start_job(run, ["max_steps=1"], runs_root=root, device="cpu").pid)
        deadline = time.time() + 30
        # the wrapper exits after writing its exit code (its interpreter takes a moment to shut down): the next
        # start must find the device free, not this job still ending
        while not ((run / "exit_code").is_file() and zombie(pids[-1])) and time.time() < deadline:
            time.sleep(0.05)
    assert zombie(pids[-1])  # (nothing has read its status yet)
    assert jobs.active_job(root, "cpu") is None
    assert not any(zombie(pid) for pid in pids) and not set(pids) & set(jobs._CHILDREN)
    assert jobs.job_status(root / "j0").state == "failed"


def test_a_job_does_not_get_the_apps_training_token(tmp_path, monkeypatch):
    """The public app's NPEDIT_TRAIN_TOKEN stays in the app: the training process it launches has no use for it."""
    seen = {}

    class Started:
        pid = 2**22 + 9

        def __init__(self, command, env, **kwargs):
            seen.update(env)

        def poll(self):
            return 0

    monkeypatch.setenv("NPEDIT_TRAIN_TOKEN", "s3cret")
    monkeypatch.setenv("HF_TOKEN", "hub")  # what a job may need to fetch gated weights is passed on
    monkeypatch.setattr(jobs.subprocess, "Popen", Started)
    jobs.start_job(tmp_path / "runs" / "j", ["max_steps=1"], runs_root=tmp_path / "runs", device="cpu")
    assert "NPEDIT_TRAIN_TOKEN" not in seen and seen["HF_TOKEN"] == "hub"


def test_a_run_folders_yaml_bomb_is_read_as_no_config(tmp_path):
    """The Runs tab, a job's status and a resume read a run's config.yaml; a downloaded run's could be a YAML bomb
    (anchors repeating each other: 10**7 values from 300 bytes, seconds and gigabytes to copy out). Each reader goes
    through npedit.config.read_yaml, which refuses it at once: the run reads as one without a config."""
    run = tmp_path / "runs" / "downloaded"
    run.mkdir(parents=True)
    items = ['l0: &l0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    items += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 7)]
    (run / "config.yaml").write_text("\n".join(items) + "\nmax_steps: 3\n")
    start = time.perf_counter()
    assert runs.read_config(run) == {}
    assert jobs._config_value(run, {"args": ["max_steps=5"]}, "max_steps", int) == 5  # the job's argument instead
    assert time.perf_counter() - start < 1.0


def test_a_resumed_run_folder_from_elsewhere_cannot_run_its_own_python_code(tmp_path):
    """A job runs where it was started (a resume: where job.json says, else in its run folder), and `python -m`
    puts that folder first on sys.path: a downloaded run folder holding an `npedit/` (or `yaml.py`, `torch/`, ...)
    shadowed the real package, so Resume in the Runs tab ran the stranger's code. The job no longer imports from
    the folder it runs in."""
    root = tmp_path / "runs"
    run = root / "downloaded"
    (run / "npedit").mkdir(parents=True)
    marker = tmp_path / "ran-the-run-folders-code"
    (run / "npedit" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    (run / "npedit" / "__main__.py").write_text("")
    (run / "job.json").write_text(json.dumps({"pid": 2**22 + 11, "device": "cpu", "args": ["no_such_key=1"],
                                              "started": time.time(), "cwd": str(run)}))
    (run / "exit_code").write_text("1\n")
    jobs.start_job(run, resume=True, runs_root=root, device="cpu")
    st = _wait(run, lambda s: not s.active)
    assert not marker.exists()
    assert st.state == "failed" and "unknown config key(s) no_such_key" in jobs.log_tail(run, 30)  # ours ran


def test_a_job_reads_relative_paths_from_where_it_was_started_as_the_command_does(tiny_set, tiny_manifest, tmp_path,
                                                                                   monkeypatch):
    """`start_job(RUN, ["--config", "my.yaml"])` means what `python -m npedit train --config my.yaml` means from the
    same folder: the config file and the relative paths in it are read from there (a resume too), not from RUN."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_set["teacher"], "teacher")
    shutil.copytree(tiny_manifest.parent, "data")
    Path("my.yaml").write_text("stage: warmup\nmax_steps: 1\nlog_every: 1\nsample_every: 0\nsave_every: 1\n"
                               "model: {base: teacher}\ndata: {train: data/cases.jsonl, batch_size: 1}\n")
    jobs.start_job("runs/mine", ["--config", "my.yaml"], device="cpu")
    st = _wait(Path("runs/mine"), lambda s: not s.active)
    assert st.state == "finished", jobs.log_tail("runs/mine", 30)


def refused(capsys, main, argv, says):
    """`main(argv)` stops as argparse's error does (status 2) with `says` on stderr, not for some other reason."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err, err


def test_benchmark_comparison_table_and_chart(tmp_path, capsys):
    import json

    from npedit.shapes import CATEGORIES
    from workbench.benchmarks import comparison_chart, load_reports, main, read_markdown, select, to_markdown

    for name, exact in (("a", 0.5), ("b", 0.25)):
        summary = {c: {"exact": exact, "followed": 1.0, "preserved": 1.0, "clean": 1.0, "count": 1}
                   for c in [*CATEGORIES, "overall"]}
        (tmp_path / f"{name}.json").write_text(json.dumps({"meta": {"seed": 0}, "summary": summary, "rows": []}))
    table = load_reports(tmp_path)
    assert list(table.index) == ["a", "b"] and table.loc["b", "exact"] == 0.25
    assert "| a | 0.500 |" in to_markdown(table)
    fig = comparison_chart(table)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["a", "b"]  # few variants: columns
    many = pd.concat([table] * 6)
    many.index = [f"v{i}" for i in range(12)]
    fig = comparison_chart(many)  # many variants: one row each, first on top, bars as long as the metric
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == list(many.index)
    widths = sorted({round(p.get_width(), 3) for p in fig.axes[0].patches})
    assert widths == [0.25, 0.5, 1.0]
    main([str(tmp_path), "--chart", str(tmp_path / "c.png"), "--table", str(tmp_path / "t.md")])
    assert (tmp_path / "c.png").stat().st_size > 1000 and (tmp_path / "t.md").is_file()
    main([str(tmp_path), "--chart", str(tmp_path / "new" / "c.png"), "--table", str(tmp_path / "new" / "t.md")])
    assert (tmp_path / "new" / "c.png").is_file() and (tmp_path / "new" / "t.md").is_file()  # (was a traceback)
    assert list(select(many, ["v1*", "v0", "v1"]).index) == ["v1", "v10", "v11", "v0"]  # pattern order, no repeats
    with pytest.raises(ValueError, match="no variant matches 'zz'"):
        select(many, ["zz"])
    main([str(tmp_path), "--only", "b", "a", "--table", str(tmp_path / "only.md")])
    assert (tmp_path / "only.md").read_text().splitlines()[2].startswith("| b |")
    # --extend: a table written earlier, whose reports are gone, takes new variants and replaced rows
    assert to_markdown(read_markdown(tmp_path / "t.md")) + "\n" == (tmp_path / "t.md").read_text()
    newer = tmp_path / "newer"
    newer.mkdir()
    for name, exact in (("b", 0.75), ("c", 0.125)):
        summary = {c: {"exact": exact, "followed": 1.0, "preserved": 1.0, "clean": 1.0, "count": 1}
                   for c in [*CATEGORIES, "overall"]}
        (newer / f"{name}.json").write_text(json.dumps({"meta": {"seed": 1}, "summary": summary, "rows": []}))
    main([str(newer), "--extend", str(tmp_path / "t.md"), "--table", str(tmp_path / "t2.md")])
    merged = read_markdown(tmp_path / "t2.md")
    assert list(merged.index) == ["a", "b", "c"] and merged.loc["b", "exact"] == 0.75
    assert merged.loc["a", "seed"] == 0 and merged.loc["c", "seed"] == 1 and merged.loc["a", "exact_add"] == 0.5
    (tmp_path / "bad.md").write_text("| name | score |\n|---|---|\n| a | 1 |\n")
    with pytest.raises(ValueError, match="expected a benchmark table"):
        read_markdown(tmp_path / "bad.md")
    (tmp_path / "bad2.md").write_text((tmp_path / "t.md").read_text().replace("0.500", "high", 1))
    with pytest.raises(ValueError, match="row 'a' holds a cell that is not a number"):
        read_markdown(tmp_path / "bad2.md")
    refused(capsys, main, [str(newer), "--extend", str(tmp_path / "bad.md")],
            "bad.md: expected a benchmark table with columns variant")


def test_a_benchmark_table_extended_in_place_is_replaced_whole(tmp_path, ctrl_c_at_fsync):
    """`workbench.benchmarks REPORTS --extend t.md --table t.md` (a table grown from itself, whose earlier reports may
    be gone) rewrote t.md in place, and the chart too: a Ctrl-C or a full disk midway left the only copy cut short.
    Both are written whole: a cut write keeps the earlier table and chart."""
    import json

    from npedit.shapes import CATEGORIES
    from workbench.benchmarks import main, read_markdown

    for folder, name, exact in (("old", "a", 0.5), ("new", "b", 0.25)):
        summary = {c: {"exact": exact, "followed": 1.0, "preserved": 1.0, "clean": 1.0, "count": 1}
                   for c in [*CATEGORIES, "overall"]}
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f"{name}.json").write_text(json.dumps({"meta": {"seed": 0}, "summary": summary,
                                                                    "rows": []}))
    table, chart = tmp_path / "t.md", tmp_path / "c.png"
    main([str(tmp_path / "old"), "--table", str(table), "--chart", str(chart)])
    earlier = table.read_bytes(), chart.read_bytes()

    grown = [str(tmp_path / "new"), "--extend", str(table), "--table", str(table), "--chart", str(chart)]
    with ctrl_c_at_fsync(), pytest.raises(KeyboardInterrupt):
        main(grown)
    assert (table.read_bytes(), chart.read_bytes()) == earlier
    main(grown)
    assert list(read_markdown(table).index) == ["a", "b"] and chart.read_bytes() != earlier[1]


def test_time_limited_job_stops_by_itself_with_a_bounded_eta(tiny_set, tmp_path):
    root = tmp_path / "runs"
    data = datasets.write_manifest(datasets.shapes_table(2, tmp_path / "cases"), tmp_path / "data",
                                   domain=domain.SHAPES_DOMAIN)
    warmup = presets.PRESETS["Shapes identity warm-up"].values()
    args = presets.train_args({**warmup, "max_steps": 1_000_000, "max_minutes": 0.25, "batch_size": 1,
                               "log_every": 1, "sample_every": 0, "save_every": 0},
                              base=tiny_set["teacher"], judge=tiny_set["judge"], student=tiny_set["model"],
                              data=str(data))
    assert presets.check_train_args(args).max_minutes == 0.25
    jobs.start_job(root / "timed", args, runs_root=root, device="cpu")
    st = _wait(root / "timed", lambda s: s.active and s.step >= 3)
    assert st.eta_s is not None and st.eta_s <= 15  # the time limit, not a million steps
    st = _wait(root / "timed", lambda s: not s.active, timeout=120)
    assert st.state == "finished" and 3 <= st.step < 1_000_000 and st.pipeline, jobs.log_tail(root / "timed", 30)


def test_paired_benchmark_comparison(tmp_path, capsys):
    import json

    from workbench.benchmarks import main, paired

    def report(name, right, seed=0, ids=None):
        rows = [{"id": i, "category": "add", "exact": float(r), "followed": 1.0, "preserved": float(r), "clean": 1.0}
                for i, r in zip(ids or [f"c{k}" for k in range(len(right))], right)]
        (tmp_path / f"{name}.json").write_text(json.dumps({"meta": {"seed": seed}, "summary": {}, "rows": rows}))

    report("old", [1, 1, 0, 0, 0, 0, 0, 1])
    report("new", [1, 0, 1, 1, 1, 1, 1, 1])  # right where old is wrong 5 times, the reverse once
    report("old1", [0, 0], seed=1)
    report("new1", [1, 0], seed=1)
    table = paired(tmp_path, [("old", "new"), ("old1", "new1")])
    first, pooled = table.iloc[0], table.iloc[-1]
    assert (first["n"], first["only_a"], first["only_b"], first["exact_A"], first["exact_B"]) == (8, 1, 5, 0.375, 0.875)
    assert first["z"] == round(4 / 6 ** 0.5, 2) and first["p"] == round(2 * 7 / 64, 4)  # P(X <= 1), X ~ Bin(6, 1/2)
    assert pooled["A"] == "pooled" and (pooled["n"], pooled["only_a"], pooled["only_b"]) == (10, 1, 6)
    assert paired(tmp_path, [("old", "old")]).iloc[0]["p"] == 1.0  # no discordant case
    assert main([str(tmp_path), "--paired", "old", str(tmp_path / "new.json"), "--metric", "preserved"]) == 0
    assert "| old | new | 0 | 8 | 0.375 | 0.875 | 1 | 5 |" in capsys.readouterr().out
    report("other", [1] * 8, ids=[f"d{k}" for k in range(8)])
    with pytest.raises(ValueError, match="not scored on the same cases"):
        paired(tmp_path, [("old", "other")])
    refused(capsys, main, [str(tmp_path), "--paired", "old", "missing"], f"no report {tmp_path / 'missing.json'}")
    with pytest.raises(ValueError, match="per-case 0/1"):
        paired(tmp_path, [("old", "new")], metric="clean")


def test_benchmark_skips_a_broken_report_and_pairs_only_the_same_training_cases(tmp_path, capsys):
    import json

    from npedit.shapes import CATEGORIES
    from workbench.benchmarks import load_reports, main, paired

    summary = {c: {"exact": 0.5, "followed": 1.0, "preserved": 1.0, "clean": 1.0, "count": 2}
               for c in [*CATEGORIES, "overall"]}
    rows = [{"id": f"train-{i:06d}", "category": "add", "exact": 1.0, "followed": 1.0, "preserved": 1.0}
            for i in range(2)]
    for name, seed in (("fit0", 0), ("fit1", 1)):  # --train-pool reports: the same ids whatever the training seed
        meta = {"seed": 0, "cases": f"training (data.pool=40, seed {seed})"}
        (tmp_path / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}))
    (tmp_path / "cut.json").write_text('{"meta": {"seed": 0}, "summ')  # a report cut short
    assert list(load_reports(tmp_path).index) == ["fit0", "fit1"]
    err = capsys.readouterr().err
    assert "skipped" in err and "cut.json" in err
    with pytest.raises(ValueError, match="not scored on the same cases"):
        paired(tmp_path, [("fit0", "fit1")])
    refused(capsys, main, [str(tmp_path / "empty")], "error: no benchmark reports (*.json")  # one line, no traceback


def test_exact_by_object_count_pooled_over_reports(tmp_path, capsys):
    import json

    from npedit.shapes import held_out_cases
    from workbench.benchmarks import main, objects_split

    cases = held_out_cases(12, seed=3)
    counts = [len(c.reference.objects) for c in cases]

    def report(name, right, with_objects):
        rows = [{"id": c.id, "category": c.category, "exact": float(r), "followed": 1.0, "preserved": 1.0,
                 "clean": 1.0, **({"objects": k} if with_objects else {})} for c, r, k in zip(cases, right, counts)]
        (tmp_path / f"{name}.json").write_text(json.dumps({"meta": {"n": 12, "seed": 3}, "summary": {}, "rows": rows}))

    report("new", [1] * 12, with_objects=True)
    report("old", [0] * 12, with_objects=False)  # written before rows carried "objects": regenerated from n, seed
    table = objects_split(tmp_path, ["new", "old"])
    overall = table.strip().splitlines()[-1]
    for k in sorted(set(counts)):  # every case twice, right once: 0.5 at every object count
        assert f"0.500 ({2 * counts.count(k)})" in overall
    assert main([str(tmp_path), "--by-objects", "new"]) == 0
    assert "| overall |" in capsys.readouterr().out
    refused(capsys, main, [str(tmp_path), "--by-objects", "new", "--paired", "new", "old"],  # one question per call
            "argument --paired: not allowed with argument --by-objects")
    (tmp_path / "foreign.json").write_text(json.dumps({"meta": {"n": 12, "seed": 3}, "summary": {},
                                                       "rows": [{"id": "zzz", "category": "add", "exact": 1.0}]}))
    with pytest.raises(ValueError, match="case ids"):
        objects_split(tmp_path, ["foreign"])


def test_exact_by_reference_form_pooled_over_reports(tmp_path, capsys):
    import json

    from npedit.shapes import held_out_cases, reference_form
    from workbench.benchmarks import form_split, main

    cases = held_out_cases(24, seed=4)
    rows = [{"id": c.id, "category": c.category, "exact": 1.0, "followed": 1.0, "preserved": 1.0, "clean": 1.0}
            for c in cases]  # a report written before rows carried "objects" and "form": regenerated from n, seed
    (tmp_path / "old.json").write_text(json.dumps({"meta": {"n": 24, "seed": 4}, "summary": {}, "rows": rows}))
    table = form_split(tmp_path, ["old"])
    object_edits = [c for c in cases if reference_form(c)]
    assert object_edits and "| overall |" in table and "lone object" in table
    overall = table.strip().splitlines()[-1]
    assert sum(int(cell.split("(")[1].rstrip(") ")) for cell in overall.split("|")[2:-1] if "(" in cell) == len(object_edits)
    assert main([str(tmp_path), "--by-form", "old"]) == 0
    assert "`the {shape}`" in capsys.readouterr().out
    refused(capsys, main, [str(tmp_path), "--by-form", "old", "--by-objects", "old"],
            "argument --by-objects: not allowed with argument --by-form")


def test_learning_curve_pools_seeds_per_step(tmp_path, capsys):
    import json

    from npedit.shapes import held_out_cases, reference_form
    from npedit.shapes.scoring import form_group
    from workbench.benchmarks import curve_chart, learning_curve, main, wilson

    cases = held_out_cases(40, seed=5)

    def report(name, right):
        rows = [{"id": c.id, "category": c.category, "exact": float(right(c)), "followed": 1.0, "preserved": 1.0,
                 "clean": 1.0} for c in cases]  # no "objects"/"form": regenerated from n, seed
        (tmp_path / f"{name}.json").write_text(json.dumps({"meta": {"n": 40, "seed": 5}, "summary": {}, "rows": rows}))

    first = {c.id: i % 2 == 0 for i, c in enumerate(cases)}
    report("run100-seed0", lambda c: False)
    report("run100-seed1", lambda c: True)   # step 100 pooled over two reports: exactly half right
    report("run20", lambda c: first[c.id])   # steps sort by number, not by name
    report("start-seed0", lambda c: True)
    report("runaway300", lambda c: True)     # another prefix: not part of the "run" series
    table = learning_curve(tmp_path, {"ctrl": "run"}, form="shape", baseline={"start": "start"})
    ctrl = table[table["series"] == "ctrl"]
    assert list(ctrl["step"]) == [20, 100] and list(ctrl["reports"]) == [1, 2] and list(ctrl["n"]) == [40, 80]
    at100 = ctrl.iloc[1]
    assert at100["exact"] == 0.5 and at100["lo"] < 0.5 < at100["hi"] and (at100["lo"], at100["hi"]) == wilson(40, 80)
    shape_cases = [c for c in cases
                   if form_group({"form": reference_form(c), "objects": len(c.reference.objects)}) == "shape"]
    assert shape_cases and at100["form_n"] == 2 * len(shape_cases)
    base = table[table["series"] == "start"].iloc[0]
    assert pd.isna(base["step"]) and base["exact"] == 1.0 and base["hi"] == 1.0
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    chart = tmp_path / "curve.png"
    assert main([str(tmp_path), "--curve", "ctrl=run", "--baseline", "start=start", "--form", "shape",
                 "--chart", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "| ctrl | 100 | 2 | 80 | 0.500 (" in out and "| start |  | 1 | 40 | 1.000 (" in out
    assert chart.stat().st_size > 1000
    fig = curve_chart(learning_curve(tmp_path, {"ctrl": "run", "one": "runaway"}))  # one point: an error bar
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["ctrl", "one"]
    with pytest.raises(ValueError, match="no report named zz<step>"):
        learning_curve(tmp_path, {"x": "zz"})
    with pytest.raises(ValueError, match="--form must be one of"):
        learning_curve(tmp_path, {"ctrl": "run"}, form="circle")
    refused(capsys, main, [str(tmp_path), "--form", "shape"], "--baseline and --form go with --curve")


def test_describe_editor_says_how_far_its_last_run_went(tmp_path):
    """The step an editor was exported at when recorded; a run's limits otherwise (max_steps is only a cap when
    max_minutes ended the run)."""
    base = {"stage": "npedit", "data": {"train": "shapes"}, "max_steps": 1000000}
    for extra, says in (({"step": 134}, "exported at step 134"), ({"max_minutes": 35.0}, "up to 1000000 steps or 35 "
                                                                                          "minutes"),
                        ({}, "1000000 steps")):
        editor = tmp_path / f"e{len(extra)}{'step' in extra}"
        (editor / "transformer").mkdir(parents=True)
        (editor / "model_index.json").write_text(json.dumps({"_class_name": "NPEditPipeline"}))
        (editor / "transformer" / "config.json").write_text(json.dumps({"_class_name": "NPEditSD3Transformer2DModel"}))
        (editor / "training_config.json").write_text(json.dumps({**base, **extra}))
        line = models.describe_editor(str(editor))
        assert f"Last training stage: `npedit` on `shapes`, {says}." in line, line
    (editor / "training_config.json").write_text(json.dumps({**base, "step": 40, "model": {"lora_rank": 16}}))
    assert ("Last training stage: `npedit` on `shapes` with LoRA adapters of rank 16, folded into its weights, exported "
            "at step 40.") in models.describe_editor(str(editor))


def test_dmd_map_time_is_not_rounded_in_a_bf16_model_set(tiny_set):
    """The app's models are bf16 on a GPU: the DMD map's time must reach teacher and critic as float32 (in bf16,
    t = 0.7 is 0.6992, Z-Image's 1000 (1 - t) 300.8 for 300)."""
    import torch

    ms = models.ModelSet(models.resolve_paths(**{k: tiny_set[k] for k in ("model", "judge", "teacher", "critic")},
                                              env={}), device="cpu", dtype="bfloat16")
    pipe = ms.editor()
    _, teacher, critic, _, _, _ = ms.inspectors(None, pipe)
    seen = []
    for net in (teacher, critic):
        net.t_embedder.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    trace_edit(pipe, None, teacher, critic, shapes_image(2)[0], "make the circle blue", steps=1, dmd_t=0.7)
    assert seen and all(s.dtype == torch.float32 for s in seen)
    assert all(abs(float(s[0]) - 300.0) < 1e-3 for s in seen)


def test_upload_ledger_counts_each_client_over_a_sliding_hour():
    """The public app's upload budget: bytes per client within the last hour; a refusal says how long until enough of
    them expire and records nothing; a body larger than the whole budget is refused for good (inf)."""
    from workbench.uploads import Ledger

    now = [0.0]
    ledger = Ledger(100, clock=lambda: now[0])
    assert ledger.charge("a", 60) is None and ledger.used("a") == 60
    now[0] = 10.0
    assert ledger.charge("a", 60) == 3590.0 and ledger.used("a") == 60  # the first 60 bytes expire at t = 3600
    assert ledger.charge("b", 100) is None  # each client has its own budget
    assert ledger.charge("c", 101) == float("inf")
    now[0] = 3600.0
    assert ledger.charge("a", 60) is None and ledger.used("a") == 60
    assert ledger.used("b") == 100 and ledger.charge("b", 1) == 10.0  # sent at t = 10: counted until t = 3610
    now[0] = 3610.0
    assert ledger.charge("b", 100) is None


def test_upload_client_is_the_address_the_proxy_saw():
    """A client is the rightmost public address of X-Forwarded-For (a proxy appends what it saw; what a client wrote
    itself stands to the left, and the Space's own hops are private addresses), else the TCP peer; an IPv6 client by
    its /64, since one host holds all of it."""
    from workbench.uploads import client_of

    assert client_of({"x-forwarded-for": "8.8.8.8"}, "10.16.3.80") == "8.8.8.8"
    assert client_of({"x-forwarded-for": "1.2.3.4, 8.8.8.8, 10.0.0.2"}, "127.0.0.1") == "8.8.8.8"
    assert client_of({"x-forwarded-for": "unknown, 10.0.0.2"}, "127.0.0.1") == "127.0.0.1"
    assert client_of({}, "127.0.0.1") == "127.0.0.1" and client_of({}, None) == "unknown"
    same = {client_of({"x-forwarded-for": f"2001:4860:4860::{k}"}, None) for k in (1, 2, "8888")}
    assert same == {"2001:4860:4860::/64"}
    assert client_of({"x-forwarded-for": "::ffff:8.8.8.8"}, None) == "8.8.8.8"


def test_an_upload_refusal_reads_as_its_message_in_the_page():
    """gradio's page shows a refused upload (multipart) as "HTTP 429: <body text>", but reads a refused event call
    (JSON, e.g. queue/join once the budget is spent) as JSON and showed "Could not parse server response:
    SyntaxError: Unexpected token 'U'..." for a text body. A JSON request now gets {"detail": message}, which the page
    shows as the message itself; an upload keeps the plain text."""
    import asyncio

    from workbench.uploads import MB, UploadLimit

    async def refused(content_type: str, size: int) -> tuple[dict, bytes]:
        sent = []

        async def send(message):
            sent.append(message)

        async def app(scope, receive, send):  # what the limit lets through
            raise AssertionError("this request should have been refused")

        limit = UploadLimit(app, mb_per_hour=0.001, min_free_mb=0, folder="/")
        scope = {"type": "http", "client": ("8.8.8.8", 1), "headers": [
            (b"content-type", content_type.encode()), (b"content-length", str(size).encode())]}
        await limit(scope, None, send)
        return dict(sent[0]["headers"]), sent[1]["body"]

    headers, body = asyncio.run(refused("application/json", 2 * MB))
    assert headers[b"content-type"] == b"application/json"
    assert json.loads(body)["detail"].startswith("This upload (2.0 MB) is larger than this public app accepts")
    headers, body = asyncio.run(refused("multipart/form-data; boundary=x", 2 * MB))
    assert headers[b"content-type"].startswith(b"text/plain") and body.startswith(b"This upload (2.0 MB)")


def test_a_spent_upload_budget_still_lets_the_visitor_press_buttons():
    """Every request body counted against the hourly budget, so a visitor who spent it on photos could not even run
    an example for up to an hour: each button press (a small JSON event call) was refused too. Small event calls
    now pass uncharged; a large JSON body and any further upload are still refused."""
    import asyncio

    from workbench.uploads import SMALL_EVENT, UploadLimit

    passed = []

    async def app(scope, receive, send):
        passed.append(dict(scope["headers"])[b"content-type"])

    async def send(message):
        pass

    limit = UploadLimit(app, mb_per_hour=0.1, min_free_mb=0, folder="/")

    def request(content_type: str, size: int, body: bytes = b"") -> bool:
        before = len(passed)
        body = body + b" " * (size - len(body))
        scope = {"type": "http", "client": ("8.8.8.8", 1), "headers": [
            (b"content-type", content_type.encode()), (b"content-length", str(size).encode())]}
        parts = [body[:1000], body[1000:]]  # a body may come in several messages

        async def receive():
            return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)} if parts else \
                {"type": "http.disconnect"}
        asyncio.run(limit(scope, receive, send))
        return len(passed) > before

    multipart = "multipart/form-data; boundary=x"
    assert request(multipart, 100_000)  # most of the 104,857-byte budget
    assert not request(multipart, 10_000)  # spent
    assert request("application/json", 2_000) and request("application/json", SMALL_EVENT)  # buttons still work
    assert not request("application/json", SMALL_EVENT + 1)  # a large body counts, whatever its type
    assert not request(multipart, 10_000)  # and the small calls charged nothing, nor unlocked uploads
    inline = b'{"data": [{"url": "data:image/png;base64,iVBORw0KGgo"}]}'
    assert not request("application/json", 40_000, inline)  # a file sent inline in a small call is charged


def test_a_small_call_sending_a_file_inline_is_charged_however_it_spells_the_data_url():
    """Only `;base64,` in the raw bytes marked a small call as carrying a file, yet gradio decodes any string that
    starts with `data:` (the text after its last comma, `;base64` or not) into a file in its cache, and JSON lets a
    client escape any letter (`\\u003b` for `;`) or send UTF-16: each spelling sent files uncharged, however spent the
    budget."""
    import asyncio

    from workbench.uploads import UploadLimit

    passed = []

    async def app(scope, receive, send):
        passed.append(True)

    async def send(message):
        pass

    limit = UploadLimit(app, mb_per_hour=0.1, min_free_mb=0, folder="/")

    def request(body: bytes) -> bool:
        before = len(passed)
        scope = {"type": "http", "client": ("8.8.8.8", 1), "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
        parts = [body]

        async def receive():
            return {"type": "http.request", "body": parts.pop(0), "more_body": False} if parts else \
                {"type": "http.disconnect"}
        asyncio.run(limit(scope, receive, send))
        return len(passed) > before

    pad = b"A" * 30_000
    assert request(b'{"data": ["make the sky pink", "' + pad + b'"]}')  # plain text: uncharged
    spellings = [b'{"data": [{"url": "data:image/png,' + pad + b'"}]}',
                 b'{"data": [{"url": "data:image/png\\u003bbase64,' + pad + b'"}]}',
                 b'{"data": [{"url": "\\u0064ata:image/png,' + pad + b'"}]}',
                 '{"data": [{"url": "data:image/png;base64,AAAA"}]}'.encode("utf-16")]  # JSON may be UTF-16
    for body in spellings:  # each passes, charged: ~90 kB of 104,857
        before = limit.ledger.used("8.8.8.8")
        assert request(body) and limit.ledger.used("8.8.8.8") == before + len(body), body[:40]
    assert not request(spellings[0])  # the budget is spent


def test_a_small_event_reaches_the_app_whole_after_the_limit_read_it():
    """The limit reads a small event call's body (to charge one that sends a file inline as base64): the app behind
    it must still receive that body, byte for byte, and an inline file within the budget passes, charged."""
    import asyncio

    from workbench.uploads import UploadLimit

    got = []

    async def app(scope, receive, send):
        chunks, more = [], True
        while more:
            message = await receive()
            chunks.append(message["body"])
            more = message["more_body"]
        got.append(b"".join(chunks))

    limit = UploadLimit(app, mb_per_hour=0.1, min_free_mb=0, folder="/")
    body = b'{"data": ["data:image/png;base64,' + b"A" * 40_000 + b'"]}'

    def post() -> None:
        parts = [body[:7000], body[7000:20000], body[20000:]]

        async def receive():
            return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}
        scope = {"type": "http", "client": ("8.8.8.8", 1), "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}

        async def send(message):
            got.append(message)
        asyncio.run(limit(scope, receive, send))

    post()
    assert got == [body]
    assert limit.ledger.used("8.8.8.8") == len(body)
    post(), post()  # the third inline file passes the 104,857-byte budget
    assert got[1] == body and got[2]["status"] == 429, got[2:]


def test_a_judge_missing_a_package_is_named_once(tiny_set, monkeypatch):
    """Without torchvision the app said "cannot load the judge DIR: ImportError: the judge 'DIR' needs torchvision
    ...": the path twice. npedit's one line says it all; the app shows that line."""
    from npedit.judges import chat

    def without_torchvision(*args, **kwargs):
        raise ImportError("Qwen2VLVideoProcessor requires the Torchvision library but it was not found in your "
                          "environment.")

    monkeypatch.setattr(chat.AutoProcessor, "from_pretrained", without_torchvision)
    with pytest.raises(models.ModelError) as caught:
        models.ModelSet(models.ModelPaths(model=tiny_set["model"], judge=tiny_set["judge"]), device="cpu").judge()
    message = str(caught.value)
    assert message.count(tiny_set["judge"]) == 1 and message.startswith("the judge"), message
    assert "pip install torchvision" in message and "ImportError" not in message


def test_the_whole_grid_memo_stays_bounded(tmp_path, monkeypatch):
    """whole_grid remembers each grid file version it decoded (once per file, not per tick); an app up for weeks sees
    every grid of every run, so the memo keeps its newest entries within a bound instead of growing without end."""
    from PIL import Image

    monkeypatch.setattr(runs, "_WHOLE", {})
    monkeypatch.setattr(runs, "_WHOLE_MAX", 8)
    paths = []
    for i in range(20):
        paths.append(tmp_path / f"step_{i:06d}.png")
        Image.new("RGB", (4, 4), (i, 0, 0)).save(paths[-1])
        assert runs.whole_grid([paths[-1]]) == str(paths[-1])
        assert len(runs._WHOLE) <= 8
    assert (str(paths[-1]), paths[-1].stat().st_mtime_ns, paths[-1].stat().st_size) in runs._WHOLE


def test_a_public_app_fetches_no_file_a_caller_names_by_web_address(monkeypatch):
    """gradio downloads an input file named by web address (a file object whose "path" is https://...) into its cache
    before the event runs, whatever its size: a request of a few bytes, uncharged, could fill the disk. The limit
    refuses such an event call (400, said as the page shows it); a file the page uploaded (a local path, the server's
    own URL beside it) still passes. Bodies it would read over MAX_JSON are refused unread (413)."""
    import socket

    import gradio as gr
    import httpx
    from gradio import processing_utils
    from starlette.middleware import Middleware

    from workbench.uploads import MAX_JSON, UploadLimit

    fetched = []

    def fetch(url, *args, **kwargs):  # (what gradio would download; nothing leaves this machine)
        fetched.append(url)
        raise ValueError("no download in this test")

    async def fetch_async(url, *args, **kwargs):
        return fetch(url)

    for name in ("ssrf_protected_download", "save_url_to_cache"):
        monkeypatch.setattr(processing_utils, name, fetch)
    monkeypatch.setattr(processing_utils, "async_ssrf_protected_download", fetch_async)
    with gr.Blocks() as demo:
        image, text = gr.Image(type="filepath"), gr.Textbox()
        gr.Button().click(lambda path: str(path), image, text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    limit = Middleware(UploadLimit, mb_per_hour=200, min_free_mb=0, folder="/tmp")
    _, url, _ = demo.queue().launch(server_port=port, prevent_thread_lock=True, quiet=True,
                                    app_kwargs={"middleware": [limit]})
    try:
        def join(path: str, pad: int = 0) -> httpx.Response:
            file = {"path": path, "url": f"{url}gradio_api/file={path}", "meta": {"_type": "gradio.FileData"}}
            return httpx.post(f"{url}gradio_api/queue/join", timeout=30, json={
                "data": [file], "fn_index": next(iter(demo.fns)), "session_hash": "probe", "event_data": None,
                "trigger_id": None, "pad": " " * pad})

        for pad in (0, 100_000):  # a small call, and one over SMALL_EVENT (charged first, then read)
            refused = join(" HTTPS://example.com/huge.bin", pad)
            assert refused.status_code == 400 and "not as web addresses" in refused.json()["detail"]
        assert join("/tmp/gradio/abc/photo.png").status_code == 200  # (gradio itself then refuses a stranger's path)
        big = httpx.post(f"{url}gradio_api/queue/join", content=b" " * (MAX_JSON + 1), timeout=30,
                         headers={"content-type": "application/json"})
        assert big.status_code == 413
    finally:
        demo.close()
    assert fetched == []


def test_app_examples_written_by_another_app_at_the_same_moment_are_written_again(tmp_path, monkeypatch):
    """Two apps starting at once render the same examples into the shared temp folder: one found its temporary file
    renamed by the other (FileNotFoundError) and the app did not start. It writes them again."""
    real, calls = datasets.shapes_table, []

    def raced(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise FileNotFoundError("[Errno 2] No such file or directory: '.shapes-0-00000.png.tmp'")
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "shapes_table", raced)
    rows = datasets.shapes_examples(tmp_path / "examples", n=6)
    assert len(calls) == 2 and len(rows) == 6 and all(Path(r[0]).is_file() for r in rows)


def test_a_metrics_line_that_is_not_utf8_is_skipped_by_the_tables_and_dropped_by_a_resume(tmp_path):
    """One damaged line (bytes that are not UTF-8) in one run's metrics.jsonl raised UnicodeDecodeError from the
    whole Runs table, every run's, and stopped `train --resume` of that run with a line naming no file."""
    from npedit.training.logging import MetricsLogger

    a = _fake_run(tmp_path, "a", 1e-4, [1.0, 0.5, 0.25])
    _fake_run(tmp_path, "b", 2e-5, [1.0, 0.8])
    with (a / "metrics.jsonl").open("ab") as f:
        f.write(b'\n\xff\xfe\x00garbage\n{"step": 3, "time": 1.0, "student_loss": 0.2}\n')
    table = runs.runs_table(tmp_path)
    assert set(table["run"]) == {"a", "b"}
    assert list(runs.read_metrics(a)["step"]) == [1, 2, 3, 3]
    log = MetricsLogger(a, enabled=True)
    log.rewind(2)
    log.close()
    assert [json.loads(line)["step"] for line in (a / "metrics.jsonl").read_text(encoding="utf-8").splitlines()] == [1, 2]


def test_a_run_from_a_shapes_student_at_its_resolution_trains_a_shapes_editor(tmp_path, monkeypatch):
    """The README's quick start fine-tunes the bundled Shapes editor on assets/examples/examples.jsonl (no domain
    file there) at 64 px: its export was a general editor, which edited a 256 px image at 128 px into noise. A run
    keeps its student's domain when its data names none and it kept the student's resolution."""
    import json

    from npedit.assets import DEFAULT_MODEL
    from npedit.domain import Domain, SHAPES_DOMAIN, read_domain, run_domain

    monkeypatch.chdir(tmp_path)
    manifest = str(DEFAULT_MODEL.parents[1] / "examples" / "examples.jsonl")
    assert run_domain(manifest, str(DEFAULT_MODEL), 64) == SHAPES_DOMAIN
    assert run_domain(manifest, str(DEFAULT_MODEL), 256) == Domain()  # retrained at another size: general
    assert run_domain(manifest, "someone/an-editor", 64) == Domain()  # (a hub id: nothing to read here)
    assert run_domain(manifest, "", 64) == Domain()
    # a config's repository-relative student read from outside the clone: the bundle's (it was general from elsewhere)
    assert run_domain(manifest, "assets/shapes/editor", 64) == SHAPES_DOMAIN
    # an export of older days (no domain file) reads its training config the same way; one naming itself ends
    old = tmp_path / "old"
    old.mkdir()
    (old / "training_config.json").write_text(json.dumps({"data": {"train": manifest, "resolution": 64},
                                                          "model": {"student": str(DEFAULT_MODEL)}}))
    assert read_domain(old) == SHAPES_DOMAIN
    (old / "training_config.json").write_text(json.dumps({"data": {"train": manifest, "resolution": 64},
                                                          "model": {"student": str(old)}}))
    assert read_domain(old) == Domain()


def test_resuming_a_shell_run_as_a_job_says_the_command_that_continues_it(tmp_path):
    """A run typed in a shell (no job.json) and killed: resuming it from the workbench said "not started by the
    workbench; nothing to resume" though it held checkpoints."""
    run = tmp_path / "shell-run"
    (run / "checkpoints" / "step_000005").mkdir(parents=True)
    (run / "checkpoints" / "step_000005" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError) as said:
        jobs.start_job(run, ["--config", "c.yaml"], resume=True)
    assert str(said.value) == (f"{run.resolve()} was not started by the workbench, so it does not know the command; "
                               f"continue it from step_000005 in a shell: python -m npedit train --config "
                               f"{run.resolve() / 'config.yaml'} --resume output_dir={run.resolve()}")
    (run / "checkpoints" / "step_000005" / "config.yaml").write_text("stage: npedit\n")  # its own deleted: the copy
    with pytest.raises(ValueError, match=re.escape(f"--config {run.resolve() / 'checkpoints/step_000005/config.yaml'} "
                                                   "--resume")):
        jobs.start_job(run, ["--config", "c.yaml"], resume=True)
    (run / "checkpoints" / "step_000005" / "trainer_state.json").unlink()
    with pytest.raises(ValueError, match="holds no checkpoint; nothing to resume"):
        jobs.start_job(run, ["--config", "c.yaml"], resume=True)


def test_a_diverged_run_shows_its_skipped_updates_and_not_finite_losses(tmp_path):
    """A run whose losses went NaN logged no loss at all from then on (only its skip counts): the Runs table showed it
    like a run that never logged, its curves stopped with no mark, and the Compare bar chart showed its last finite
    loss, better than a healthy run's. The trainer logs such a loss as inf now; the tables count the skipped updates."""
    import math

    from npedit.training.trainer import _not_finite

    import torch

    assert _not_finite({"student_loss": torch.tensor(float("nan")), "dmd_loss": 0.5, "vlm_loss": float("-inf")}) == {
        "student_loss": math.inf, "vlm_loss": math.inf}
    ok = _fake_run(tmp_path, "ok", 1e-4, [1.0, 0.5])
    bad = _fake_run(tmp_path, "key", 1e-3, [1.0, 0.9])  # (named as compare's first column was)
    with (bad / "metrics.jsonl").open("a") as f:  # as the trainer logs a skipped step whose loss was not finite
        f.write("\n" + json.dumps({"step": 3, "time": 1.0, "student_loss": math.inf, "student_skipped": 1.0,
                                   "skipped_student": 1, "skipped_critic": 0}) + "\n")
    table = runs.runs_table(tmp_path).set_index("run")
    assert table.loc["key", "skipped"] == 1 and pd.isna(table.loc["ok", "skipped"])
    assert table.loc["key", "student_loss"] == math.inf
    both = runs.compare([ok, bad], tmp_path)
    assert list(both.columns) == ["key ", "ok", "key"] and "skipped" in list(both["key "])
    fig = plots.bar_chart({"ok": 0.5, "key": math.inf, "none": None}, "last student_loss")
    assert [t.get_text().strip() for t in fig.axes[0].texts] == ["0.5", "not finite", "no value"]


def test_a_run_whose_config_was_deleted_reads_its_newest_checkpoints_copy(tmp_path):
    """A run's config.yaml deleted (or damaged): the Runs table showed blank settings with no note, and `train --config
    RUN/config.yaml --resume` said only "config file not found", though each checkpoint keeps a copy."""
    from npedit.config import load_config

    run = _fake_run(tmp_path, "a", 1e-4, [1.0, 0.5])
    for step, lr in ((2, 3e-4), (10, 5e-4)):
        saved = run / "checkpoints" / f"step_{step:06d}"
        saved.mkdir(parents=True)
        (saved / "trainer_state.json").write_text("{}")
        (saved / "config.yaml").write_text(yaml.safe_dump({"stage": "npedit", "optim": {"lr": lr}}))
    assert runs.read_config(run)["optim"]["lr"] == 1e-4  # its own, while it is there
    (run / "config.yaml").write_text("a: [")  # damaged
    assert runs.read_config(run)["optim"]["lr"] == 5e-4
    (run / "config.yaml").unlink()
    assert runs.runs_table(tmp_path).set_index("run").loc["a", "lr"] == 5e-4
    with pytest.raises(FileNotFoundError, match=re.escape(f"(the run's settings as of its newest checkpoint: "
                                                          f"{run / 'checkpoints/step_000010/config.yaml'}")):
        load_config(run / "config.yaml")
