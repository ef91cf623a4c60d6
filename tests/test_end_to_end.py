"""Train-save-load-edit on tiny real-class models, through the CLI, as a user would run it."""

import errno
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cli_runner import run_npedit  # tests/cli_runner.py

ROOT = Path(__file__).resolve().parent.parent


def cli(capsys, *args):
    """`python -m npedit ARGS` in this process (what `run_npedit` does without a new interpreter's ~10 s of imports);
    its stdout. The `trained` fixture and `test_cli_edit_and_judge` keep one real `python -m npedit` run each."""
    from npedit.cli import main

    capsys.readouterr()
    assert main([str(a) for a in args]) in (0, None)
    return capsys.readouterr().out


def refused(*args, says: str) -> None:
    """`python -m npedit ARGS` stops with one line holding `says` (a SystemExit message, so no traceback; status 1, or
    2 for a usage error, whose line `main` prints)."""
    from npedit.cli import main

    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in args])
    code = exit_.value.code
    assert (isinstance(code, str) or code == 2) and says in str(exit_.value), exit_.value


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_zimage, tiny_judge, tiny_manifest):
    work = tmp_path_factory.mktemp("e2e")
    common = [f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", "data.batch_size=2", "log_every=1",
              "optim.skip_grad_norm=1e9", "optim.lr=1e-4"]
    run_npedit("train", "stage=warmup", "output_dir=runs/warmup", "max_steps=2", *common, cwd=work)
    stage2 = ["stage=npedit", "output_dir=runs/npedit", f"judge.path={tiny_judge}", "critic_steps=2",
              f"model.student={work}/runs/warmup/pipeline", "sample_every=3", "data.do_nothing_prob=0.25",
              "judge.keep_questions=2", "judge.change_questions=2", "gradient_accumulation_steps=2", *common]
    run_npedit("train", "max_steps=3", *stage2, cwd=work)
    first = (work / "runs/npedit/checkpoints/step_000003/student/diffusion_pytorch_model.safetensors").read_bytes()
    run_npedit("train", "--resume", "max_steps=4", *stage2, cwd=work)
    return work, first


def test_training_runs_and_resumes(trained):
    work, first_weights = trained
    run_dir = work / "runs/npedit"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # resumed at 3, one more step
    keep = [r["vlm_keep_p_yes"] for r in rows if "vlm_keep_p_yes" in r]  # batches naming `keep` objects
    assert keep and all(0 <= p <= 1 for p in keep)
    change = [r["vlm_change_p_expected"] for r in rows if "vlm_change_p_expected" in r]  # batches naming new/gone
    assert change and all(0 <= p <= 1 for p in change)
    for r in rows:
        assert np.isfinite([r["dmd_loss"], r["vlm_loss"], r["critic_fm_loss"]]).all()
        assert r["student_skipped"] == 0
    assert (run_dir / "samples/step_000003.png").is_file() and (run_dir / "config.yaml").is_file()
    assert (run_dir / "tensorboard").is_dir()
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_000003", "step_000004"]
    last = (run_dir / "checkpoints/step_000004/student/diffusion_pytorch_model.safetensors").read_bytes()
    assert last != first_weights  # the resumed step changed the student
    assert not list(run_dir.rglob("*.pt")) and not list(run_dir.rglob("*.bin")) and not list(run_dir.rglob("*.pkl"))
    state = json.loads((run_dir / "checkpoints/step_000004/trainer_state.json").read_text())
    assert state["step"] == 4 and state["stage"] == "npedit"
    assert json.loads((run_dir / "pipeline/training_config.json").read_text())["step"] == 4  # where the run ended


def test_pipeline_loads_and_edits(trained):
    from npedit import NPEditPipeline

    work, _ = trained
    pipe = NPEditPipeline.from_pretrained(work / "runs/npedit/pipeline")
    card = (work / "runs/npedit/pipeline/README.md").read_text()
    assert "NP-Edit: no before/after pairs" in card and "runs/warmup/pipeline" in card  # says how it was trained
    warmup_card = (work / "runs/warmup/pipeline/README.md").read_text()
    assert "identity warm-up only" in warmup_card and "no before/after pairs" not in warmup_card
    img = Image.fromarray((np.random.default_rng(1).random((40, 56, 3)) * 255).astype(np.uint8))
    steps = []
    out = pipe(image=img, prompt="make the red circle green", generator=torch.Generator().manual_seed(0),
               callback_on_step_end=lambda p, i, t, kw: steps.append((i, t, kw["x0"].shape)))
    again = pipe(image=img, prompt="make the red circle green", generator=torch.Generator().manual_seed(0))
    assert out.images[0].size == (56, 40) and len(steps) == 4 and steps[0][1] == 1.0
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0]))  # seeded = reproducible
    with pytest.raises(ValueError, match="instruction is empty"):
        pipe(image=img, prompt="   ")


def test_export_of_a_checkpoint_or_an_editor_folder_says_what_to_export(trained, capsys, monkeypatch):
    """`export RUN/checkpoints/step_N` (or the checkpoints folder, or an exported editor) said "no complete checkpoint
    in .../step_N/checkpoints"; it names the run to export, and the step."""
    from npedit.cli import main

    work, _ = trained
    monkeypatch.chdir(work)
    for target, says in (("runs/npedit/checkpoints/step_000003", f"{Path('runs/npedit/checkpoints/step_000003')} is "
                          f"one checkpoint of the run {Path('runs/npedit')}: export the run, with --step 3 for this "
                          "step"),
                         ("runs/npedit/checkpoints", f"{Path('runs/npedit/checkpoints')} is the checkpoints folder of "
                          f"the run {Path('runs/npedit')}: export the run"),
                         ("runs/npedit/pipeline", f"{Path('runs/npedit/pipeline')} is already an editor")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            main(["export", target])
        said = str(exit_.value.code) if isinstance(exit_.value.code, str) else capsys.readouterr().err
        assert says in said, said
    monkeypatch.chdir(work / "runs/npedit/checkpoints")  # typed inside checkpoints/: the run by its full path
    with pytest.raises(SystemExit, match=re.escape(f"step_000003 is one checkpoint of the run {work / 'runs/npedit'}: "
                                                   "export the run, with --step 3")):
        main(["export", "step_000003"])


def test_export_turns_a_checkpoint_into_an_editor(trained, tiny_zimage, capsys, monkeypatch):
    from safetensors.torch import load_file

    from npedit import NPEditPipeline
    from npedit.cli import main

    work, first_weights = trained
    monkeypatch.chdir(work)  # the run's model.base and these paths are relative to where it trained
    out = cli(capsys, "export", "runs/npedit", "--step", "3").strip()
    assert Path(work, out) == work / "runs/npedit/exports/step_000003"
    exported = load_file(str(work / out / "transformer/diffusion_pytorch_model.safetensors"))
    saved = load_file(str(work / "runs/npedit/checkpoints/step_000003/student/diffusion_pytorch_model.safetensors"))
    assert exported.keys() == saved.keys() and all(torch.equal(exported[k], saved[k]) for k in saved)
    info = json.loads((work / out / "training_config.json").read_text())
    assert info["step"] == 3 and info["stage"] == "npedit" and info["gradient_accumulation_steps"] == 2
    assert "step 3" in (work / out / "README.md").read_text()
    pipe = NPEditPipeline.from_pretrained(work / out)
    img = Image.fromarray((np.random.default_rng(2).random((32, 32, 3)) * 255).astype(np.uint8))
    assert pipe(image=img, prompt="make the red circle green").images[0].size == (32, 32)
    newest = cli(capsys, "export", "runs/npedit", "--out", "newest").strip()
    assert json.loads((work / newest / "training_config.json").read_text())["step"] == 4  # the newest by default
    (work / "newest/critic").mkdir()
    (work / "newest/critic/config.json").write_text("{}")  # another editor's critic, once copied there
    capsys.readouterr()
    main(["export", "runs/npedit", "--out", "newest"])
    assert capsys.readouterr().err.endswith(  # it was kept in silence, and the app took it for this editor's
        "note: newest also holds files this export did not write (critic/config.json), left as they were: remove "
        "those of another editor (a critic/ is this editor's to the app), or export to a new folder\n")
    moved = cli(capsys, "export", "runs/npedit", "--base", str(tiny_zimage), "--out", "moved", "--keep-paths").strip()
    assert json.loads((work / moved / "training_config.json").read_text())["base"] == str(tiny_zimage)
    mean = cli(capsys, "export", "runs/npedit", "--average", "2").strip()
    assert Path(work, mean) == work / "runs/npedit/exports/step_000004-avg2"
    four = load_file(str(work / "runs/npedit/checkpoints/step_000004/student/diffusion_pytorch_model.safetensors"))
    averaged = load_file(str(work / mean / "transformer/diffusion_pytorch_model.safetensors"))
    floats = [k for k in saved if saved[k].is_floating_point()]
    assert floats and any(not torch.equal(saved[k], four[k]) for k in floats)  # the two steps differ
    for k in floats:
        torch.testing.assert_close(averaged[k].float(), (saved[k].float() + four[k].float()) / 2)
    info = json.loads((work / mean / "training_config.json").read_text())
    assert info["averaged_steps"] == [3, 4] and "steps 3, 4" in (work / mean / "README.md").read_text()
    (work / "runs/empty").mkdir(exist_ok=True)
    for args, message in ((["runs/npedit", "--step", "7"], "has step(s) 3, 4"), (["runs/empty"], "no complete"),
                          (["runs/npedit", "--step", "3", "--average", "2"], "only step(s) 3 there"),
                          (["runs/npedit", "--average", "0"], "number of checkpoints >= 1"),
                          (["runs/npedit", "--base", "moved/base"], "cannot load the run's base model 'moved/base'"),
                          (["runs/nothing"], "run folder not found")):
        refused("export", *args, says=message)


class FakeHfApi:
    """huggingface_hub.HfApi with no network: records create_repo and upload_folder (no real upload runs)."""

    calls: list = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{kwargs['repo_id']}/commit/0"})()


def test_an_export_is_shareable_loads_by_hub_id_and_pushes(trained, tiny_zimage, tiny_judge, tiny_manifest, capsys,
                                                          monkeypatch, tmp_path):
    """The export a user uploads held the trainer's paths (the base, judge, manifest and run folder in
    training_config.json, each component's `_name_or_path`, the student's origin in the card) and a card without a
    license or the run's settings. Now every local path is named only (`local:NAME`), the card has the Hub's front
    matter, how to load it by hub id and the training settings, and it loads from a hub cache by id (Python, CLI,
    app); `--push` uploads it with upload_folder (HfApi faked here: no real upload runs)."""
    import huggingface_hub
    import yaml

    from npedit import NPEditPipeline
    from npedit.sharing import private_traces
    from test_hub_ids import cached

    work, _ = trained
    monkeypatch.chdir(work)
    out = work / cli(capsys, "export", "runs/npedit", "--out", "shared", "--license", "apache-2.0").strip()
    local = [str(work), str(tiny_zimage), str(tiny_judge), str(tiny_manifest), str(Path(tiny_manifest).parent)]
    for file in out.rglob("*"):
        if file.suffix in (".json", ".md"):
            text = file.read_text()
            assert not [p for p in local if p in text] and "_name_or_path" not in text, file
    assert private_traces(out, (str(work),)) == []
    config = json.loads((out / "training_config.json").read_text())
    assert config["model"]["base"] == f"local:{Path(tiny_zimage).name}"
    assert config["judge"]["path"] == f"local:{Path(tiny_judge).name}"
    assert config["data"]["train"] == f"local:{Path(tiny_manifest).name}" and config["output_dir"] == "local:npedit"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["pipeline_tag"] == "image-to-image" and front["license"] == "apache-2.0"
    assert front["library_name"] == "diffusers" and "image-editing" in front["tags"]
    assert f"judge.path: local:{Path(tiny_judge).name}" in card and "step: 4" in card
    assert 'NPEditPipeline.from_pretrained("OWNER/NAME")' in card
    kept = work / cli(capsys, "export", "runs/npedit", "--out", "kept", "--keep-paths").strip()
    assert any(str(work) in t for t in private_traces(kept, (str(work),)))  # what --keep-paths would publish

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cached(cache, "alice/editor", out)
    pipe = NPEditPipeline.from_pretrained("alice/editor")
    img = Image.fromarray((np.random.default_rng(2).random((32, 32, 3)) * 255).astype(np.uint8))
    assert pipe(image=img, prompt="make the red circle green").images[0].size == (32, 32)
    img.save(tmp_path / "in.png")
    cli(capsys, "edit", "--model", "alice/editor", "--image", tmp_path / "in.png", "--instruction", "make it red",
        "--output", tmp_path / "edited.png")
    assert Image.open(tmp_path / "edited.png").size == (32, 32)
    from workbench.models import ModelSet, resolve_paths

    assert ModelSet(resolve_paths(model="alice/editor"), device="cpu").editor().family == pipe.family  # the app's

    FakeHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    pushed = work / cli(capsys, "export", "runs/npedit", "--out", "pushed", "--push", "alice/editor").strip()
    assert [c[:2] for c in FakeHfApi.calls] == [("create_repo", "alice/editor"), ("upload_folder", "alice/editor")]
    assert Path(FakeHfApi.calls[1][2]["folder_path"]).resolve() == pushed.resolve()
    assert 'NPEditPipeline.from_pretrained("alice/editor")' in (pushed / "README.md").read_text()
    refused("export", "runs/npedit", "--push", "not a repo", says="--push takes a hub repo id OWNER/NAME")
    # an existing --out is written into: exported there again it pushes, but not with a file of another export in it
    cli(capsys, "export", "runs/npedit", "--out", "pushed", "--push", "alice/editor")
    assert len(FakeHfApi.calls) == 4
    (pushed / "notes-of-an-old-export.txt").write_text("private notes", encoding="utf-8")
    refused("export", "runs/npedit", "--out", "pushed", "--push", "alice/editor",
            says="also holds files this export did not write (notes-of-an-old-export.txt)")
    assert len(FakeHfApi.calls) == 4


def test_an_export_card_shows_an_editors_report_as_what_it_measured(tmp_path, monkeypatch):
    """`export --metrics` put any `eval shapes` report in the card as "N steps; scored against the true edit, no
    judge": a `--baseline teacher` report published the teacher's SDEdit figures as the editor's, and a
    `--candidates 4` one showed best-of-4 figures, the judge picking, as one call's. The baseline's is refused before
    the run is read; best-of-N is said."""
    from npedit.sharing import metrics_section

    summary = {"overall": {"exact": 0.5, "followed": 0.6, "preserved": 0.7, "clean": 0.8, "count": 10}}
    meta = {"n": 10, "seed": 0, "steps": 4, "cases": "held-out", "candidates": 1, "baseline": None}
    assert "best of" not in metrics_section({"meta": meta, "summary": summary})
    assert "each output the best of 4 samples picked by the judge" in metrics_section(
        {"meta": {**meta, "candidates": 4}, "summary": summary})
    refined = {**meta, "refine": {"steps": 20, "lr": 0.05, "anchor": 1.0}}  # a judge-refined report is said too
    assert "each output then refined by the judge for 20 steps at test time (`--refine 20`)" in metrics_section(
        {"meta": refined, "summary": summary})
    assert "then refined" not in metrics_section({"meta": {**meta, "refine": None}, "summary": summary})
    with pytest.raises(ValueError, match="--baseline teacher"):
        metrics_section({"meta": {**meta, "baseline": "teacher"}, "summary": summary})
    report = tmp_path / "teacher-sdedit.json"
    report.write_text(json.dumps({"meta": {**meta, "baseline": "teacher"}, "summary": summary}))
    monkeypatch.chdir(tmp_path)  # (no run there: the report is refused first)
    refused("export", "runs/npedit", "--metrics", report, says="is of --baseline teacher")


def test_an_export_beside_its_run_still_finds_the_runs_teacher(trained, tiny_zimage, capsys, monkeypatch):
    """An export names its base only (`local:NAME`), so the app's DMD maps for RUN/exports/step_N lost the run's
    teacher they had read from its training_config.json; beside its run, the run's config.yaml gives it, and its
    checkpoint its critic (an export had none: no DMD maps). A copy elsewhere (what is shared) names it and needs
    none."""
    from npedit.trace import own_companions

    work, _ = trained
    monkeypatch.chdir(work)
    out = work / cli(capsys, "export", "runs/npedit", "--step", "3").strip()
    assert out.parent.name == "exports" and own_companions(out)[0] == str(tiny_zimage)
    # its critic: the one of the checkpoint it came from (the run's critic/ is step 4's, fitted to another student)
    assert own_companions(out)[1] == str(out.parent.parent / "checkpoints" / "step_000003" / "critic")
    averaged = work / cli(capsys, "export", "runs/npedit", "--average", "2").strip()
    assert own_companions(averaged)[1] is None  # the mean of two students: no critic was fitted to it
    copy = work / cli(capsys, "export", "runs/npedit", "--step", "3", "--out", "elsewhere").strip()
    assert own_companions(copy)[:2] == (None, None)


def test_an_export_of_a_run_on_marked_data_keeps_its_domain_wherever_it_is_loaded(trained, tmp_path, capsys,
                                                                                   monkeypatch):
    """A run on a manifest in a folder marked as Shapes cases, named relative to where it trained: its export says
    so in its own npedit_domain.json, so loaded from another folder it still edits at 64 px (its training config's
    relative data.train named nothing there)."""
    import shutil

    import yaml

    from npedit import NPEditPipeline
    from npedit.domain import SHAPES_DOMAIN, write_domain

    shutil.copytree(trained[0] / "runs/npedit", tmp_path / "run", ignore=shutil.ignore_patterns("exports"))
    config = tmp_path / "run/checkpoints/step_000004/config.yaml"
    config = config if config.is_file() else tmp_path / "run/config.yaml"
    cfg = yaml.safe_load(config.read_text())
    shutil.copytree(Path(cfg["data"]["train"]).parent, tmp_path / "marked")
    write_domain(tmp_path / "marked", SHAPES_DOMAIN)
    cfg["data"]["train"] = "marked/cases.jsonl"
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)  # where it "trained": marked/cases.jsonl is here
    out = Path(cli(capsys, "export", "run", "--out", "export").strip()).resolve()
    monkeypatch.chdir(tmp_path / "run")
    assert NPEditPipeline.from_pretrained(out).domain == SHAPES_DOMAIN


def test_export_of_the_newest_checkpoint_survives_a_live_run_pruning_it(trained, tmp_path, monkeypatch):
    """With no --step, export reads the newest checkpoint; a running job may prune it meanwhile (it saved a newer one):
    the export then takes the new newest instead of failing. With --step that checkpoint is the one asked for."""
    import shutil

    from npedit.training import export

    work, _ = trained
    run_dir = shutil.copytree(work / "runs/npedit", tmp_path / "live")
    monkeypatch.chdir(work)  # the run's model.base is relative to where it trained
    read = export.checkpoint_config

    def while_the_run_moves_on(run, path):
        if path.name == "step_000004":  # the job saves step 5, then prunes step 4 as the export starts reading it
            shutil.copytree(path, path.with_name("step_000005"))
            shutil.rmtree(path)
        return read(run, path)

    monkeypatch.setattr(export, "checkpoint_config", while_the_run_moves_on)
    out = export.export_checkpoint(run_dir, out=tmp_path / "newest")
    assert json.loads((out / "training_config.json").read_text())["exported_from"].endswith("step_000005")
    shutil.move(run_dir / "checkpoints/step_000005", run_dir / "checkpoints/step_000004")
    with pytest.raises(FileNotFoundError):  # a checkpoint asked for by its step is not swapped for another
        export.export_checkpoint(run_dir, step=4, out=tmp_path / "four")


def test_cli_edit_and_judge(trained, tiny_judge, tiny_manifest, capsys, monkeypatch):
    work, _ = trained
    src = tiny_manifest.parent / "images/0.png"
    Image.open(src).resize((48, 80)).save(work / "in.png")
    run_npedit("edit", "--model", "runs/npedit/pipeline", "--image", "in.png", "--instruction",
               "make the red circle green", "--output", "out/edited.png", cwd=work)
    assert Image.open(work / "out/edited.png").size == (48, 80)
    monkeypatch.chdir(work)
    verdict = json.loads(cli(capsys, "judge", "--judge", tiny_judge, "--reference", "in.png", "--edited",
                             "out/edited.png", "--instruction", "make the red circle green"))
    assert 0 < verdict["p_edit"] < 1 and 0 < verdict["p_identity"] < 1
    removal = json.loads(cli(capsys, "judge", "--judge", tiny_judge, "--reference", "in.png", "--edited",
                             "out/edited.png", "--instruction", "remove the red circle", "--edit-type", "remove",
                             "--object", "red circle"))
    contains = next(q for q in removal["questions"] if q["kind"] == "contains")
    assert removal["p_edit"] == pytest.approx(1 - contains["p_yes"]) and removal["p_keep"] is None
    kept = json.loads(cli(capsys, "judge", "--judge", tiny_judge, "--reference", "in.png", "--edited",
                          "out/edited.png", "--instruction", "remove the red circle", "--edit-type", "remove",
                          "--object", "red circle", "--keep", "blue square; red circle; green dot"))
    keeps = [q for q in kept["questions"] if q["kind"] == "keep"]  # the removed object is not a keep check
    assert [("blue square" in q["text"], "green dot" in q["text"]) for q in keeps] == [(True, False), (False, True)]
    assert kept["p_keep"] == pytest.approx(min(q["p_yes"] for q in keeps))
    # another red circle stays: "does it contain a red circle?" cannot tell, so the edit check is asked instead
    assert [q["kind"] for q in kept["questions"][:2]] == ["edit", "identity"] and kept["p_change"] is None
    changed = json.loads(cli(capsys, "judge", "--judge", tiny_judge, "--reference", "in.png", "--edited",
                             "out/edited.png", "--instruction", "make the red circle green", "--new", "green circle",
                             "--gone", "red circle"))
    checks = [q for q in changed["questions"] if q["kind"] == "change"]
    assert [(q["expected"], "green circle" in q["text"]) for q in checks] == [("Yes", True), ("No", False)]
    p_expected = [q["p_yes"] if q["expected"] == "Yes" else 1 - q["p_yes"] for q in checks]
    assert changed["p_change"] == pytest.approx(min(p_expected))


def test_cli_batch_modes(trained, tiny_judge, tiny_manifest):
    from npedit.cli import main
    from npedit.pairs import VERDICT_COLUMNS

    work, _ = trained
    main(["edit", "--model", str(work / "runs/npedit/pipeline"), "--batch", str(tiny_manifest),
          "--output-dir", str(work / "batch")])
    assert sorted(p.name for p in (work / "batch").iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    pairs = work / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps({"id": i, "reference": str(tiny_manifest.parent / f"images/{i}.png"),
                                           "edited": str(work / f"batch/{i}.png"), "instruction": "remove the red circle",
                                           "edit_type": "remove", "object": "red circle",
                                           **({"keep": ["blue square"], "gone": "red circle; blue dot"}
                                              if i == "1" else {})}) for i in "01") + "\n")
    main(["judge", "--judge", tiny_judge, "--batch", str(pairs), "--output", str(work / "verdicts.jsonl")])
    rows = [json.loads(line) for line in (work / "verdicts.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["0", "1"] and all(list(r) == VERDICT_COLUMNS and not r["error"] for r in rows)
    assert rows[1]["edited"] == str(work / "batch/1.png")  # as the list names it
    assert rows[0]["p_keep"] is None and 0 < rows[1]["p_keep"] < 1
    assert rows[0]["p_change"] is None and 0 < rows[1]["p_change"] < 1  # "blue dot" (the removed one is asked already)


def test_best_of_keeps_the_candidate_the_judge_rates_highest(trained, tiny_judge):
    from npedit import NPEditPipeline
    from npedit.best_of import best_of
    from npedit.judges import load_judge
    from npedit.verdicts import judge_edit

    work, _ = trained
    pipe = NPEditPipeline.from_pretrained(work / "runs/npedit/pipeline")
    judge = load_judge(tiny_judge)
    img = Image.fromarray((np.random.default_rng(2).random((40, 56, 3)) * 255).astype(np.uint8))
    asked = dict(edit_type="remove", object_name="red circle", keep=["blue square"])
    picked = best_of(pipe, judge, img, "remove the red circle", candidates=3, chunk=2,
                     generator=torch.Generator().manual_seed(0), **asked)
    assert len(picked.images) == 3 and all(im.size == (56, 40) for im in picked.images)
    alone = [judge_edit(judge, img, im, "remove the red circle", **asked) for im in picked.images]
    assert [q["kind"] for q in alone[0].questions] == ["contains", "identity", "keep"]
    for v, a in zip(picked.verdicts, alone):  # one batched judge pass = each candidate asked alone
        assert v.score == pytest.approx(a.score, abs=1e-4)
        expected = sum(np.log(q["p_yes"] if q["expected"] == "Yes" else 1 - q["p_yes"]) for q in a.questions)
        assert a.score == pytest.approx(expected, abs=1e-4)
    scores = [v.score for v in picked.verdicts]
    assert picked.best == int(np.argmax(scores)) and picked.image is picked.images[picked.best]
    one = best_of(pipe, judge, img, "remove the red circle", candidates=1, generator=torch.Generator().manual_seed(0))
    plain = pipe(image=img, prompt="remove the red circle", generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(one.image), np.asarray(plain))  # one candidate: the plain edit
    with pytest.raises(ValueError, match="candidates"):
        best_of(pipe, judge, img, "remove the red circle", candidates=0)
    # with a seed, candidate k is the single edit seeded seed + k, however the candidates are batched or counted
    seeded = [best_of(pipe, judge, img, "remove the red circle", candidates=n, chunk=c, seed=5, **asked)
              for n, c in ((3, 8), (4, 1))]
    assert seeded[0].seeds == [5, 6, 7] and seeded[1].seeds == [5, 6, 7, 8]
    for k in range(3):
        single = pipe(image=img, prompt="remove the red circle", generator=torch.Generator().manual_seed(5 + k),
                      output_type="latent").images
        for picks in seeded:
            batch = pipe(image=[img] * len(picks.seeds), prompt="remove the red circle", output_type="latent",
                         generator=[torch.Generator().manual_seed(s) for s in picks.seeds]).images
            torch.testing.assert_close(batch[k:k + 1], single, atol=1e-5, rtol=1e-5)
        a, b = (np.asarray(p.images[k], dtype=int) for p in seeded)
        assert np.abs(a - b).max() <= 1  # the same edit, batched otherwise (rounding at most)
    with pytest.raises(ValueError, match="one per sample"):
        pipe(image=[img, img], prompt="x", generator=[torch.Generator()])


def test_cli_edit_best_of(trained, tiny_judge, tiny_manifest):
    work, _ = trained
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "npedit", "edit", "--model", "runs/npedit/pipeline", "--image",
                          str(tiny_manifest.parent / "images/1.png"), "--instruction", "remove the red circle",
                          "--output", "best/edited.png", "--candidates", "3", "--judge", tiny_judge, "--edit-type",
                          "remove", "--object", "red circle"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("candidate ")]
    assert len(lines) == 3 and sum("<- kept" in line for line in lines) == 1
    # no pipeline progress bar per candidate batch (the denoising bar has no description; loading bars have one)
    assert not re.search(r"(?:^|[\r\n]) *\d+%\|[^|\r\n]*\| *\d+/\d+ \[", out.stderr), out.stderr[-3000:]
    assert Image.open(work / "best/edited.png").size == (64, 64)
    from npedit.cli import main

    batch = ["edit", "--model", str(work / "runs/npedit/pipeline"), "--batch", str(tiny_manifest), "--candidates", "2",
             "--judge", tiny_judge]  # the judge's questions from each line's edit_type, object_name and keep
    main([*batch, "--output-dir", str(work / "best-batch"), "--verdicts", str(work / "verdicts/all.jsonl")])
    assert sorted(p.name for p in (work / "best-batch").iterdir()) == ["0.png", "1.png", "2.png", "3.png"]
    from npedit.data import load_manifest

    lines = [json.loads(line) for line in (work / "verdicts/all.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == ["0", "1", "2", "3"] and all(r["score"] < 0 and r["candidates"] == 2
                                                                    for r in lines)
    # a training manifest, the accepted edits as targets, naming images outside its folder: the CLI trains on it
    with pytest.raises(ValueError, match="all.jsonl:1: image .* is outside .* data.allow_outside_paths=true"):
        load_manifest(work / "verdicts/all.jsonl", allow_outside_paths=False)
    records = load_manifest(work / "verdicts/all.jsonl")
    assert [Path(r.target).name for r in records] == ["0.png", "1.png", "2.png", "3.png"]
    assert records[1].edit_type == "remove" and records[1].object_name == "red circle" and Path(records[1].image).is_file()
    top = max(r["score"] for r in lines)
    main([*batch, "--output-dir", str(work / "best-batch2"), "--verdicts", str(work / "verdicts/top.jsonl"),
          "--min-score", str(top - 1e-9)])
    kept = [json.loads(line)["id"] for line in (work / "verdicts/top.jsonl").read_text().splitlines()]
    assert kept == [r["id"] for r in lines if r["score"] >= top - 1e-9] and len(kept) >= 1
    with pytest.raises(SystemExit, match="--verdicts"):
        main([*batch, "--output-dir", str(work / "x"), "--min-score", "-1"])
    with pytest.raises(SystemExit, match="candidates"):
        main(["edit", "--image", "x.png", "--instruction", "a", "--output", "y.png", "--candidates", "0"])


def test_cli_edit_dtype_judge_pixels_and_wrong_folders(trained, tiny_judge, tiny_manifest, tmp_path, capsys):
    """`edit --dtype` loads editor and judge in that dtype; --judge-max-pixels caps a Qwen2.5-VL judge of
    --candidates; a folder that is not an editor, or a cap a judge cannot take, is one clear line."""
    from npedit import NPEditPipeline
    from npedit.cli import main
    from npedit.folders import CheckpointError
    from npedit.judges.tiny import build_tiny_qwen2_5_vl

    work, _ = trained
    editor = str(work / "runs/npedit/pipeline")
    src = str(tiny_manifest.parent / "images/0.png")
    one = ["edit", "--model", editor, "--image", src, "--instruction", "make the red circle green"]
    assert main([*one, "--output", str(tmp_path / "full.png")]) == 0
    assert main([*one, "--output", str(tmp_path / "half.png"), "--dtype", "bfloat16"]) == 0
    full, half = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=float) for n in ("full", "half"))
    assert full.shape == half.shape and 0 < np.abs(full - half).max() and np.abs(full - half).mean() < 8
    qwen = str(build_tiny_qwen2_5_vl(tmp_path / "qwen"))
    capsys.readouterr()
    assert main([*one, "--output", str(tmp_path / "best.png"), "--candidates", "2", "--judge", qwen,
                 "--judge-max-pixels", "256"]) == 0
    assert sum(line.startswith("candidate ") for line in capsys.readouterr().err.splitlines()) == 2
    with pytest.raises(SystemExit, match="llava_onevision judges see each image at one fixed size"):
        main([*one, "--output", str(tmp_path / "x.png"), "--candidates", "2", "--judge", tiny_judge,
              "--judge-max-pixels", "256"])
    with pytest.raises(SystemExit, match="--judge-max-pixels is for the judge of --candidates"):
        main([*one, "--output", str(tmp_path / "x.png"), "--judge-max-pixels", "256"])
    checkpoint = sorted((work / "runs/npedit/checkpoints").glob("step_*"))[-1]
    for folder, says in ((tmp_path / "nothing", "does not exist"), (tiny_judge, "a judge/VLM, not an editor"),
                         (work / "runs/npedit", f"a training run folder; its editor is {editor}"),
                         (checkpoint, f"a training checkpoint, not an editor: `python -m npedit export "
                                      f"{work / 'runs/npedit'} --step {int(checkpoint.name[5:])}`")):
        with pytest.raises(SystemExit, match=re.escape(says)):
            main(["edit", "--model", str(folder), "--image", src, "--instruction", "x", "--output", "y.png"])
        with pytest.raises(CheckpointError, match=re.escape(says)):
            NPEditPipeline.from_pretrained(folder)
    assert not (tmp_path / "x.png").exists()


def test_critic_stage_fits_a_critic_to_a_frozen_editor(trained, tiny_zimage, tiny_manifest, capsys, monkeypatch):
    """stage=critic: the critic (starting as the teacher) learns the editor's outputs, the editor is not touched or
    saved again; the run resumes, exports its critic, and says clearly what it needs."""
    from safetensors.torch import load_file

    work, _ = trained
    editor = work / "runs/npedit/pipeline"
    common = ["stage=critic", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", "data.batch_size=2",
              f"model.student={editor}", "output_dir=runs/critic", "log_every=1", "save_every=2",
              "optim.skip_grad_norm=1e9", "optim.lr=1e-3"]
    before = (editor / "transformer/diffusion_pytorch_model.safetensors").read_bytes()
    monkeypatch.chdir(work)
    out = cli(capsys, "train", "max_steps=3", *common)
    assert "critic from the teacher, fitted to the outputs of" in out and out.strip().endswith("runs/critic/critic")
    cli(capsys, "train", "--resume", "max_steps=4", *common)
    run_dir = work / "runs/critic"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["critic_fm_loss"]) for r in rows)
    assert all(r["critic_skipped"] == 0 and r["lr"] == pytest.approx(1e-3) for r in rows)
    assert not {"student_loss", "dmd_loss", "vlm_loss"} & {k for r in rows for k in r}
    assert (editor / "transformer/diffusion_pytorch_model.safetensors").read_bytes() == before
    step3 = run_dir / "checkpoints/step_000003"
    assert (step3 / "critic").is_dir() and not (step3 / "student").exists() and not (run_dir / "pipeline").exists()
    teacher = load_file(str(Path(tiny_zimage) / "transformer/diffusion_pytorch_model.safetensors"))
    critic = load_file(str(run_dir / "critic/diffusion_pytorch_model.safetensors"))
    assert critic.keys() == teacher.keys() and any(not torch.equal(critic[k], teacher[k]) for k in teacher)
    assert json.loads((run_dir / "critic/npedit_critic.json").read_text()) == {
        "editor": str(editor), "base": str(tiny_zimage), "step": 4}
    exported = cli(capsys, "export", "runs/critic", "--step", "3").strip()
    assert Path(work, exported) == run_dir / "exports/step_000003/critic"
    got = load_file(str(work / exported / "diffusion_pytorch_model.safetensors"))
    saved = load_file(str(step3 / "critic/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(got[k], saved[k]) for k in saved)
    from npedit.backbones import load_backbone

    load_backbone(str(tiny_zimage)).load_transformer(work / exported)  # loads as the app loads a critic
    for bad_args, message in ((["model.student="], "set model.student to that editor"),
                              (["model.add_layers=1"], "keeps the editor as it is")):
        refused("train", "max_steps=1", *common, *bad_args, says=message)


def _without_targets(manifest: Path, out: Path) -> Path:
    """`manifest` with every line's target emptied (its images named by absolute path), written to `out`."""
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    out.write_text("".join(json.dumps({**r, "image": str(manifest.parent / r["image"]), "target": ""}) + "\n"
                           for r in lines))
    return out


def test_target_regression_trains_the_unroll_toward_given_results(tmp_path, tiny_zimage, tiny_manifest):
    from npedit.config import load_config
    from npedit.training.trainer import Trainer

    common = ["stage=npedit", f"model.base={tiny_zimage}", "data.batch_size=2", "optim.skip_grad_norm=1e9",
              "loss.lambda_dmd=0", "loss.lambda_vlm=0", "loss.lambda_target=1", "data.do_nothing_prob=0"]
    trainer = Trainer(load_config(None, [f"output_dir={tmp_path}/t", f"data.train={tiny_manifest}", *common]))
    before = [p.detach().clone() for p in trainer.student.parameters()]
    metrics = trainer.iteration()
    assert metrics["target_loss"] > 0 and metrics["student_skipped"] == 0
    assert not {"dmd_loss", "vlm_loss", "critic_fm_loss"} & set(metrics)  # only the regression was asked for
    assert trainer.critic is None and trainer.teacher is None  # nothing held, updated or saved for a DMD not asked for
    trainer.save_checkpoint()
    saved = [d.name for d in (tmp_path / "t/checkpoints").iterdir()]
    assert saved == [f"step_{trainer.step:06d}"] and not (tmp_path / "t/checkpoints" / saved[0] / "critic").exists()
    with_dmd = Trainer(load_config(None, [f"output_dir={tmp_path}/t", f"data.train={tiny_manifest}", *common,
                                          "loss.lambda_dmd=0.5"]))
    assert with_dmd.resume() and with_dmd.critic is not None  # DMD added on resume
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    # the line a run prints first names where the student starts and every loss it trains with
    assert trainer.describe() == (f"npedit from step 0 | student from the teacher ({tiny_zimage}) | "
                                  f"2 samples per update | lr 2e-05 | losses: true edits x1 -> {tmp_path}/t")
    bare = _without_targets(tiny_manifest, tmp_path / "no-targets.jsonl")
    with pytest.raises(ValueError, match="lambda_target > 0"):  # (its images lie in the fixture's folder)
        Trainer(load_config(None, [f"output_dir={tmp_path}/u", f"data.train={bare}",
                                   *common]))


def test_pixel_regression_trains_the_unroll_through_the_decoder(tmp_path, tiny_zimage, tiny_manifest):
    from npedit.config import load_config
    from npedit.training.trainer import Trainer

    common = ["stage=npedit", f"model.base={tiny_zimage}", "data.batch_size=2", "optim.skip_grad_norm=1e9",
              "loss.lambda_dmd=0", "loss.lambda_vlm=0", "loss.lambda_target_pixels=1", "data.do_nothing_prob=0"]
    trainer = Trainer(load_config(None, [f"output_dir={tmp_path}/t", f"data.train={tiny_manifest}", *common]))
    before = [p.detach().clone() for p in trainer.student.parameters()]
    metrics = trainer.iteration()
    assert metrics["target_pixel_loss"] > 0 and "target_loss" not in metrics and metrics["student_skipped"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    assert trainer.describe().endswith(f"losses: true edits in pixels x1 -> {tmp_path}/t")
    bare = _without_targets(tiny_manifest, tmp_path / "no-targets.jsonl")
    with pytest.raises(ValueError, match="lambda_target_pixels > 0"):  # a pixel-only run needs targets too
        Trainer(load_config(None, [f"output_dir={tmp_path}/u", f"data.train={bare}", *common]))


def test_final_share_steps_the_student_lr_down_and_a_resume_stays_there(tmp_path, tiny_zimage, tiny_manifest,
                                                                          capsys):
    """optim.final_share: the last share of max_steps (or of max_minutes) trains the student at lr x
    final_lr_scale; the critic keeps its lr; a run stopped in that phase resumes in it."""
    import time

    from npedit.config import load_config
    from npedit.training.trainer import Trainer

    common = ["stage=npedit", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", "data.batch_size=2",
              "loss.lambda_vlm=0", "critic_steps=1", "log_every=1", "save_every=0", "optim.lr=1e-4",
              "optim.final_share=0.5", "optim.final_lr_scale=0.25", "optim.skip_grad_norm=1e9"]
    trainer = Trainer(load_config(None, [f"output_dir={tmp_path}/r", "max_steps=4", *common]))
    trainer.train()
    assert "losses: DMD x" in capsys.readouterr().out  # the start line (Trainer.describe)
    rows = [json.loads(line) for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1e-4, 1e-4, 2.5e-5, 2.5e-5])  # steps 3 and 4 of 4: the last half
    assert trainer.opt_critic.param_groups[0]["lr"] == pytest.approx(1e-4)
    state = json.loads((tmp_path / "r/checkpoints/step_000004/trainer_state.json").read_text())
    assert state["final_phase"] is True
    # resumed with a later end (step 4 is no longer in the last half of 10): still stepped down
    again = Trainer(load_config(None, [f"output_dir={tmp_path}/r", "max_steps=10", "max_minutes=100", *common]))
    assert again.resume() and again.opt_student.param_groups[0]["lr"] == pytest.approx(2.5e-5)
    # by wall-clock: 60% of a 1-minute limit has passed, so the last half has begun; not so at 40%
    fresh = Trainer(load_config(None, [f"output_dir={tmp_path}/c", "max_steps=10", "max_minutes=1", *common]))
    assert fresh._final_phase_begins(time.monotonic() - 36) and not fresh._final_phase_begins(time.monotonic() - 24)
    with pytest.raises(ValueError, match="final_share"):
        load_config(None, ["optim.final_share=1"])


def test_a_resume_logs_each_step_once_and_a_used_or_mistyped_run_stops_before_training(tmp_path, tiny_zimage,
                                                                                       tiny_manifest, capsys):
    """A run killed after its last checkpoint logs those steps again when resumed: metrics.jsonl keeps each step once.
    A used output_dir without --resume, a data.train that is no manifest, a checkpoint of another architecture and an
    output_dir that cannot be written are one line each, the data and the folder checked before any model loads."""
    import shutil

    from npedit.cli import main

    common = ["stage=warmup", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", "data.batch_size=2",
              "log_every=1", "save_every=2", "sample_every=0", f"output_dir={tmp_path}/r"]
    main(["train", "max_steps=3", *common])
    shutil.rmtree(tmp_path / "r/checkpoints/step_000003")  # killed after logging step 3, before its checkpoint
    with (tmp_path / "r/metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "fm_lo')  # and while writing step 4's line
    capsys.readouterr()
    main(["train", "--resume", "max_steps=4", *common])
    assert "resuming from step 2 with settings changed since: max_steps: 3 -> 4" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    with pytest.raises(SystemExit, match="already holds a run .*add --resume"):
        main(["train", "max_steps=4", *common])
    with pytest.raises(SystemExit, match="does not fit this run's student .*was model.* changed"):
        main(["train", "--resume", "max_steps=5", *common, f"model.base={ROOT}/assets/shapes/teacher"])
    assert [json.loads(line)["step"] for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    no_model = ["stage=warmup", f"model.base={tmp_path}/no-model", f"output_dir={tmp_path}/new"]
    with pytest.raises(SystemExit, match="is a folder; a manifest is a cases.jsonl"):
        main(["train", f"data.train={tmp_path}", *no_model])
    with pytest.raises(SystemExit, match="manifest not found"):
        main(["train", f"data.train={tmp_path}/cases.jsonl", *no_model])
    assert not (tmp_path / "new").exists()  # a run stopped before training leaves no folder
    (tmp_path / "taken").write_text("a file where the run's folder should be")
    with pytest.raises(SystemExit, match="cannot write output_dir .*taken/r .*pick a folder you can write to"):
        main(["train", "max_steps=1", *common[:-1], f"output_dir={tmp_path}/taken/r"])


def test_a_config_file_that_is_the_runs_own_config_yaml_keeps_its_bytes(tmp_path, tiny_zimage, tiny_manifest,
                                                                        capsys):
    """`train --config RUN/config.yaml output_dir=RUN` (a config written by hand into the run's folder) had the file
    rewritten as the resolved config on a fresh start: its comments and layout lost. Its bytes are now kept beside it
    as config.given.yaml, said on stderr, and config.yaml is the resolved config as in every run; a resume from a
    config.yaml the trainer wrote makes no copy."""
    from npedit.cli import main
    from npedit.config import load_config

    run = tmp_path / "r"
    run.mkdir()
    given = (f"# my warm-up: two samples a batch\nstage: warmup\nmodel: {{base: {tiny_zimage}}}\n"
             f"data:\n  train: {tiny_manifest}\n  batch_size: 2  # the most the laptop takes\n"
             "log_every: 1\nsave_every: 1\nsample_every: 0\n")
    (run / "config.yaml").write_text(given)
    capsys.readouterr()
    main(["train", "--config", str(run / "config.yaml"), "max_steps=1", f"output_dir={run}"])
    assert (run / "config.given.yaml").read_text() == given
    assert f"note: --config {run / 'config.yaml'} is the run's own config.yaml" in capsys.readouterr().err
    assert load_config(run / "config.yaml").max_steps == 1  # the resolved config, which readers of runs expect
    main(["train", "--resume", "--config", str(run / "config.yaml"), "max_steps=2", f"output_dir={run}"])
    assert sorted(p.name for p in run.glob("config*")) == ["config.given.yaml", "config.yaml"]
    assert load_config(run / "config.yaml").max_steps == 2


def test_an_export_into_an_earlier_export_is_swapped_in_whole(tmp_path, tiny_zimage, tiny_manifest, capsys,
                                                               monkeypatch):
    """An export into an earlier export folder outside the run wrote into it file by file: stopped midway (Ctrl-C, a
    full disk), the folder held the new weights beside the old training_config.json. It is now written beside it and
    swapped in whole: stopped, the earlier export is as it was; done, files of the earlier one that this export does
    not write are still there (and named, as before)."""
    from npedit import pipeline
    from npedit.cli import main

    run, out = tmp_path / "r", tmp_path / "shared"
    main(["train", "stage=warmup", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", "data.batch_size=2",
          "log_every=1", "save_every=1", "sample_every=0", "max_steps=2", f"output_dir={run}"])
    main(["export", str(run), "--step", "1", "--out", str(out)])
    (out / "notes.txt").write_text("what I saw with this editor")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    save = pipeline.NPEditPipeline.save_pretrained

    def stopped_after_the_weights(self, folder, **kwargs):
        save(self, folder, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.NPEditPipeline, "save_pretrained", stopped_after_the_weights)
    with pytest.raises(SystemExit, match="130"):  # (Ctrl-C's status)
        main(["export", str(run), "--out", str(out)])
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r", "shared"]  # nothing half-written left beside it
    monkeypatch.setattr(pipeline.NPEditPipeline, "save_pretrained", save)
    capsys.readouterr()
    # files that make a folder an adapter export (an earlier one's, here) are never carried into the new export: a
    # stale npedit_lora.json would make it load as adapters, a stale extra file was loaded into a re-export
    (out / "npedit_lora.json").write_text("{}")
    (out / "npedit_student_extra.safetensors").write_bytes(b"stale")
    main(["export", str(run), "--out", str(out)])
    assert not (out / "npedit_lora.json").exists() and not (out / "npedit_student_extra.safetensors").exists()
    assert json.loads((out / "training_config.json").read_text())["step"] == 2
    assert (out / "notes.txt").read_text() == "what I saw with this editor"
    assert "also holds files this export did not write (notes.txt)" in capsys.readouterr().err


def test_a_second_trainer_in_a_run_folder_stops_naming_the_first(tmp_path, tiny_zimage, tiny_manifest):
    """Two `train --resume` in one output_dir (the run thought dead, or typed twice) both trained: each step was logged
    twice and their checkpoints written over each other's. The trainer now holds the folder: a second one stops in
    one line naming the first's pid, before any model loads, and the folder is free again once the first has ended."""
    from npedit import files
    from npedit.cli import main

    run = tmp_path / "r"
    common = ["stage=warmup", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", "data.batch_size=2",
              "log_every=1", "save_every=1", "sample_every=0", f"output_dir={run}"]
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from npedit import files\n"
                               f"with files.run_lock({str(run)!r}):\n print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    try:
        assert holder.stdout.readline() == "held\n"
        for resume in ([], ["--resume"]):
            with pytest.raises(SystemExit, match=rf"^error: output_dir {re.escape(str(run))} is in use by another "
                                                 rf"process \(pid {holder.pid}\), which trains there: wait for it"):
                main(["train", *resume, "max_steps=1", *common])
        assert [p.name for p in run.iterdir()] == [files.RUN_LOCK]  # nothing written by the second
    finally:
        holder.communicate("")
    main(["train", "max_steps=1", *common])
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    with files.run_lock(run), pytest.raises(files.FolderBusy):  # (another open of the lock: another holder)
        with files.run_lock(run):
            pass


def _an_image(path: Path) -> str:
    """A readable 8x8 PNG at `path` (the CLI reads --image before it loads any model)."""
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return str(path)


def test_missing_default_model_is_one_clear_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NPEDIT_ASSETS": str(tmp_path)}
    image = _an_image(tmp_path / "x.png")
    out = subprocess.run([sys.executable, "-m", "npedit", "edit", "--image", image, "--instruction", "a",
                          "--output", "y.png"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "pass --model" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_an_incomplete_or_pickled_editor_is_one_clear_line_and_loads_in_one_dtype(tmp_path, tiny_zimage):
    """An editor folder missing a component, a component's config or tokenizer files, or holding pickle .bin weights
    only (never unpickled), stops with one line naming what is missing; a bfloat16 editor loaded without a dtype is float32 throughout."""
    import shutil

    from safetensors.torch import load_file

    from npedit.backbones import load_backbone
    from npedit.cli import main
    from npedit.folders import CheckpointError
    from npedit.pipeline import NPEditPipeline

    bb = load_backbone(tiny_zimage)
    editor = tmp_path / "editor"
    NPEditPipeline.from_parts(bb.prepare_student(bb.load_transformer(tiny_zimage)), bb).to(torch.bfloat16)\
        .save_pretrained(editor)
    pipe = NPEditPipeline.from_pretrained(editor)
    assert {next(m.parameters()).dtype for m in (pipe.transformer, pipe.vae, pipe.text_encoder)} == {torch.float32}
    shutil.rmtree(shutil.copytree(editor, tmp_path / "no_text") / "text_encoder")
    for file in (shutil.copytree(editor, tmp_path / "no_tokenizer_files") / "tokenizer").iterdir():
        file.unlink()  # the folder is there, its files are not (an interrupted copy)
    (shutil.copytree(editor, tmp_path / "no_vae_config") / "vae/config.json").unlink()
    pickled = shutil.copytree(editor, tmp_path / "pickled")
    for file in pickled.glob("transformer/*.safetensors"):
        torch.save(load_file(file), file.with_name("diffusion_pytorch_model.bin"))
        file.unlink()
    for folder, says in (("no_text", "no text_encoder/ (model_index.json lists Qwen3Model there)"),
                         ("no_tokenizer_files", "no tokenizer_config.json in tokenizer/"),
                         ("no_vae_config", "no config.json in vae/"),
                         ("pickled", "no safetensors weights in transformer/ (a pickle .bin is not read)")):
        with pytest.raises(CheckpointError, match=re.escape(says)):
            NPEditPipeline.from_pretrained(tmp_path / folder)
        with pytest.raises(SystemExit, match=re.escape(says)):
            main(["edit", "--model", str(tmp_path / folder), "--image", _an_image(tmp_path / "x.png"),
                  "--instruction", "x", "--output", str(tmp_path / "y.png")])


def test_two_process_accelerate_run(tmp_path, tiny_zimage, tiny_judge, tiny_manifest):
    # torchrun with ACCELERATE_USE_CPU: `accelerate launch --num_processes 2 --cpu` starts a single process
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "npedit", "train", "stage=npedit",
           f"model.base={tiny_zimage}", f"judge.path={tiny_judge}", f"data.train={tiny_manifest}",
           f"output_dir={tmp_path}/ddp", "max_steps=2", "critic_steps=1", "optim.skip_grad_norm=1e9"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| 2 samples per update |" in out.stdout  # a batch of 1 on each of two processes
    assert [p.name for p in (tmp_path / "ddp/checkpoints").iterdir()] == ["step_000002"]
    assert (tmp_path / "ddp/pipeline/model_index.json").is_file()
    resumed = subprocess.run([*cmd[:-3], "max_steps=3", "--resume", *cmd[-2:]], env=env, capture_output=True,
                             text=True, timeout=400)  # each process picks its own share of the data up
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((tmp_path / "ddp/checkpoints/step_000003/trainer_state.json").read_text())
    assert state["step"] == 3 and state["batches_drawn"] == 6  # (1 critic + 1 student) micro-batch a step


TWO_PROCESS_PROBE = """
import os
import sys
from pathlib import Path

from npedit.config import load_config
from npedit.training.trainer import Trainer

trainer = Trainer(load_config(None, sys.argv[1:]))


def checksum(net):  # order-sensitive sum of the trainable parameters
    return sum(float(p.detach().double().sum()) * (i + 1)
               for i, p in enumerate(p for p in net.parameters() if p.requires_grad))


before = (checksum(trainer.student), checksum(trainer.critic))
trainer.iteration()
values = [trainer.acc.num_processes, *before, checksum(trainer.student), checksum(trainer.critic)]
Path(os.environ["PROBE_DIR"], f"process_{trainer.acc.process_index}.txt").write_text(" ".join(map(repr, values)))
"""


def test_two_processes_start_and_stay_alike_with_random_initialised_parameters(tmp_path, tiny_zimage, tiny_manifest):
    """Two real processes (torchrun; `accelerate launch --cpu` would start one) of a LoRA run, whose adapters start
    at random: each process seeds itself differently, so the trainer must hand every process process 0's initial
    values (as DDP does), or the averaged gradients update replicas that never agree."""
    script = tmp_path / "probe.py"
    script.write_text(TWO_PROCESS_PROBE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true", "PROBE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           "stage=npedit", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", f"output_dir={tmp_path}/run",
           "model.lora_rank=2", "loss.lambda_vlm=0", "critic_steps=1", "optim.lr=1e-3", "optim.skip_grad_norm=1e9"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [[float(v) for v in (tmp_path / f"process_{i}.txt").read_text().split()] for i in range(2)]
    assert [r[0] for r in rows] == [2, 2]  # two processes that know of each other
    first, second = rows[0][1:], rows[1][1:]
    assert first[:2] != first[2:]  # the update changed the adapters
    assert first == pytest.approx(second, rel=1e-9, abs=1e-9)  # student and critic, before and after the update


def test_gradient_accumulation_adds_up_micro_batches(tmp_path, tiny_zimage, tiny_manifest):
    """k micro-batches of b samples give the gradient of one batch of k*b (equal-size means), metrics their mean;
    a non-finite micro-batch loss skips the whole update."""
    from npedit import flow
    from npedit.config import load_config
    from npedit.data import collate
    from npedit.training.datasets import build_dataset
    from npedit.training.trainer import Trainer

    common = ["stage=warmup", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", "data.batch_size=2",
              "optim.lr=0", "optim.grad_clip=1e9", "optim.skip_grad_norm=1e9"]
    cfg = load_config(None, [f"output_dir={tmp_path}/a", "gradient_accumulation_steps=2", *common])
    items = build_dataset(cfg.data, stage="warmup", seed=0)
    batches = {"a": collate([items[0], items[1]]), "b": collate([items[2], items[3]]),
               "ab": collate([items[i] for i in range(4)])}

    def grads(trainer, names):
        trainer.batches = iter([batches[n] for n in names])

        def loss_fn(batch):  # deterministic: the student's velocity at the reference latents, t = 0.5
            _, ref = trainer._reference(batch)
            cond = trainer.backbone.encode_prompt(batch["caption_reference"], with_reference=True)
            v = trainer.velocity(trainer.student, flow.add_noise(ref, torch.zeros_like(ref), torch.full(
                (ref.shape[0],), 0.5)), torch.full((ref.shape[0],), 0.5), cond, reference=ref)
            loss = v.pow(2).mean()
            return loss, {"probe": loss.detach()}

        metrics = trainer._optimise("student", loss_fn)
        return metrics, [p.grad.clone() for p in trainer.student.parameters() if p.grad is not None]

    accumulated = Trainer(cfg)
    m2, g2 = grads(accumulated, ["a", "b"])
    m1, g1 = grads(Trainer(load_config(None, [f"output_dir={tmp_path}/b", *common])), ["ab"])
    assert m2["student_skipped"] == 0 and len(g1) == len(g2) > 0
    assert all(float((x - y).abs().max()) <= 1e-4 * float(y.abs().max()) for x, y in zip(g1, g2))  # float noise
    assert abs(float(m2["probe"]) - float(m1["probe"])) < 1e-5 * max(1.0, float(m1["probe"]))
    assert m2["student_grad_norm"] == pytest.approx(m1["student_grad_norm"], rel=1e-4)

    calls = iter([torch.tensor(1.0, requires_grad=True), torch.tensor(float("nan"))])
    accumulated.batches = iter([batches["a"], batches["b"]])
    skipped = accumulated._optimise("student", lambda batch: (loss := next(calls), {"student_loss": loss.detach()}))
    # the loss that was not finite is logged as inf (it was left out: the run's curves just stopped)
    assert skipped == {"student_loss": math.inf, "student_skipped": 1.0} and accumulated.skipped["student"] == 1
    assert all(p.grad is None for p in accumulated.student.parameters())
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        load_config(None, ["gradient_accumulation_steps=0", *common])


def _probe_trainer(tmp_path, tiny_zimage, tiny_manifest, *extra):
    """A warm-up Trainer, its batches and a deterministic loss (the student's velocity at t = 0.5, squared)."""
    from npedit import flow
    from npedit.config import load_config
    from npedit.data import collate
    from npedit.training.datasets import build_dataset
    from npedit.training.trainer import Trainer

    cfg = load_config(None, [f"output_dir={tmp_path}", "stage=warmup", f"model.base={tiny_zimage}",
                             f"data.train={tiny_manifest}", "data.batch_size=2", "optim.lr=1e-3",
                             "optim.grad_clip=1e9", "optim.skip_grad_norm=1e6", *extra])
    trainer = Trainer(cfg)
    items = build_dataset(cfg.data, stage="warmup", seed=0)
    batches = [collate([items[0], items[1]]), collate([items[2], items[3]])]

    def loss_fn(batch, scale=1.0):
        _, ref = trainer._reference(batch)
        cond = trainer.backbone.encode_prompt(batch["caption_reference"], with_reference=True)
        t = torch.full((ref.shape[0],), 0.5)
        v = trainer.velocity(trainer.student, flow.add_noise(ref, torch.zeros_like(ref), t), t, cond, reference=ref)
        return v.pow(2).mean() * scale, {}

    return trainer, batches, loss_fn


def test_a_network_whose_updates_are_all_skipped_is_warned_about_once(tmp_path, tiny_zimage, tiny_manifest, capsys,
                                                                     monkeypatch):
    """Every update skipped (gradient norm above optim.skip_grad_norm) trains nothing: after SKIPS_TO_WARN in a row
    the run prints one warning naming the key, and metrics.jsonl counts the skips in a row; an update that goes
    through starts the count again."""
    import dataclasses

    from npedit.training import trainer as trainer_module

    monkeypatch.setattr(trainer_module, "SKIPS_TO_WARN", 3)
    trainer, batches, loss_fn = _probe_trainer(tmp_path, tiny_zimage, tiny_manifest, "optim.skip_grad_norm=1e-12",
                                               "max_steps=5", "log_every=1")
    capsys.readouterr()
    trainer.train()
    out = capsys.readouterr().out
    assert out.count("warning:") == 1 and "the last 3 student updates were all skipped" in out
    assert "exceed optim.skip_grad_norm=1e-12; raise it" in out
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_in_a_row_student"] for r in rows] == [1, 2, 3, 4, 5]
    trainer.cfg = dataclasses.replace(trainer.cfg, optim=dataclasses.replace(trainer.cfg.optim, skip_grad_norm=1e6))
    trainer.batches = iter(batches)
    assert trainer._optimise("student", loss_fn)["student_skipped"] == 0
    assert trainer.skipped_in_a_row["student"] == 0 and trainer.skipped["student"] == 5
    message = trainer_module.skip_warning("critic", [float("nan"), 400.0], 300.0, step=7)
    assert "1 had a loss or gradient that was not finite" in message and "lower optim.lr" in message


def test_fp16_loss_scaling_is_undone_before_clipping_and_the_step(tmp_path, tiny_zimage, tiny_manifest):
    """Under fp16 mixed precision accelerate's GradScaler multiplies the loss by 2^16 in `acc.backward`: the update
    (grad norm, skip test, weights) must be the unscaled one, and an overflow skips the step and lowers the scale."""
    runs = {}
    for scaled in (False, True):
        trainer, batches, loss_fn = _probe_trainer(tmp_path / str(scaled), tiny_zimage, tiny_manifest)
        if scaled:  # what Accelerator(mixed_precision="fp16") builds on a GPU
            trainer.acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        before = [p.detach().clone() for p in trainer.student.parameters()]
        trainer.batches = iter(batches[:1])
        m = trainer._optimise("student", loss_fn)
        runs[scaled] = (m, [p.detach() - b for p, b in zip(trainer.student.parameters(), before)], trainer)
    (m0, d0, _), (m1, d1, trainer) = runs[False], runs[True]
    assert m0["student_skipped"] == m1["student_skipped"] == 0
    assert m1["student_grad_norm"] == pytest.approx(m0["student_grad_norm"], rel=1e-4)  # not 65536 times it
    assert max(float(d.abs().max()) for d in d0) > 0
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-7) for a, b in zip(d0, d1))
    trainer.batches = iter(batches[:1])  # a loss whose scaled gradient overflows float32
    m = trainer._optimise("student", lambda batch: loss_fn(batch, scale=1e34))
    assert m["student_skipped"] == 1.0 and trainer.acc.scaler.get_scale() == 2.0 ** 15


def test_a_resumed_fp16_run_keeps_its_loss_scale(tmp_path, tiny_zimage, tiny_manifest):
    """The fp16 GradScaler's state (the scale an overflow lowered, the count of steps since, towards the next growth)
    is saved with a checkpoint and restored by a resume; it started again at 2^16, so a run that had backed off
    overflowed again after its resume and skipped updates the uninterrupted run made."""
    trainer, batches, loss_fn = _probe_trainer(tmp_path, tiny_zimage, tiny_manifest)
    trainer.acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)  # what fp16 on a GPU builds
    trainer.batches = iter(batches[:1])
    trainer._optimise("student", lambda batch: loss_fn(batch, scale=1e34))  # overflows: the scale backs off
    trainer.batches = iter(batches[1:])
    trainer._optimise("student", loss_fn)  # one good step towards the next growth
    trainer.step = 2
    trainer.save_checkpoint()
    saved = trainer.acc.scaler.state_dict()
    assert saved["scale"] == 2.0 ** 15 and saved["_growth_tracker"] == 1
    again, _, _ = _probe_trainer(tmp_path, tiny_zimage, tiny_manifest)
    again.acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    assert again.resume() and again.acc.scaler.state_dict() == saved


def test_a_non_finite_loss_on_one_process_skips_the_update_on_all(tmp_path, tiny_zimage, tiny_manifest, monkeypatch):
    """A process whose loss is not finite still draws its micro-batches and joins the same collectives as the
    others (returning early would leave them waiting in the gradient all-reduce); the update is skipped
    everywhere. Two processes are simulated: the all-reduce adds the peer's contribution."""
    trainer, batches, loss_fn = _probe_trainer(tmp_path, tiny_zimage, tiny_manifest, "gradient_accumulation_steps=2")

    class TwoProcesses:
        num_processes = 2

        def __getattr__(self, attr):
            return getattr(real, attr)

    real, trainer.acc = trainer.acc, TwoProcesses()
    calls = []

    def all_reduce(tensor, peer_failed):
        calls.append(tensor.numel())
        if tensor.numel() == 1:  # the "loss not finite" flag
            tensor += float(peer_failed)
        else:  # gradients: the peer's equal ones
            tensor *= 2

    for mine_fails, peer_fails in ((False, True), (True, False), (False, False)):
        calls.clear()
        monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, peer_failed=peer_fails: all_reduce(t, peer_failed))
        losses = iter([lambda b: loss_fn(b), lambda b: (torch.tensor(float("nan")), {}) if mine_fails else loss_fn(b)])
        trainer.batches = iter(batches)
        drawn = trainer.drawn
        m = trainer._optimise("student", lambda batch: next(losses)(batch))
        assert trainer.drawn == drawn + 2  # both micro-batches drawn, whatever happened
        if mine_fails or peer_fails:
            assert m == {"student_skipped": 1.0} and calls == [1]  # the flag, on both sides; no gradient exchange
            assert all(p.grad is None for p in trainer.student.parameters())
        else:
            assert m["student_skipped"] == 0.0 and calls[0] == 1 and len(calls) == 2


def test_train_step_benchmark_script_runs():
    """The per-component timing script follows the trainer's API (it prints measured figures, not asserted)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts/bench_train_step.py"), "--repeats", "1"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.rsplit(None, 2)[0].strip(): line for line in out.stdout.splitlines() if line.endswith(" ms")}
    assert {"critic update (unroll + critic fit)", "student update (all of the above + step)",
            "one NP-Edit iteration (5 critic + 1 student)"} <= set(lines)


JUDGE_BUILDERS = {"internvl": "build_tiny_internvl", "qwen2_5_vl": "build_tiny_qwen2_5_vl"}


@pytest.mark.parametrize("family", sorted(JUDGE_BUILDERS))
def test_other_judge_families_train_an_editor_and_answer_the_cli(trained, tiny_zimage, tiny_manifest, family,
                                                                 capsys):
    """NP-Edit steps and `npedit judge` run through the same code with another VLM family as the judge."""
    from npedit.judges import tiny

    work, _ = trained
    judge_dir = getattr(tiny, JUDGE_BUILDERS[family])(work / f"judge-{family}")
    out = f"runs/npedit-{family}"
    run_npedit("train", "stage=npedit", f"output_dir={out}", f"judge.path={judge_dir}", "critic_steps=1",
        f"model.student={work}/runs/warmup/pipeline", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}",
        "data.batch_size=2", "log_every=1", "max_steps=2", "sample_every=0", "judge.keep_questions=1",
        *(["judge.max_pixels=1024"] if family == "qwen2_5_vl" else []), cwd=work)
    rows = [json.loads(line) for line in (work / out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["vlm_loss"]) and 0 < r["vlm_p_expected"] < 1 for r in rows), rows
    from npedit.cli import main

    src = tiny_manifest.parent / "images/0.png"
    assert main(["judge", "--judge", str(judge_dir), "--reference", str(src), "--edited",
                 str(tiny_manifest.parent / "images/t0.png"), "--instruction", "make the red circle green"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert 0 < verdict["p_edit"] < 1 and 0 < verdict["p_identity"] < 1


def test_cli_judge_dtype_and_max_pixels(tmp_path, tiny_judge, tiny_manifest, capsys):
    from npedit.cli import main
    from npedit.judges.tiny import build_tiny_qwen2_5_vl

    qwen = build_tiny_qwen2_5_vl(tmp_path / "qwen")
    pair = ["--reference", str(tiny_manifest.parent / "images/0.png"), "--edited",
            str(tiny_manifest.parent / "images/t0.png"), "--instruction", "make the red circle green"]

    def verdict(*flags):
        assert main(["judge", *flags, *pair]) == 0
        return json.loads(capsys.readouterr().out)

    full = verdict("--judge", qwen)
    half = verdict("--judge", qwen, "--dtype", "bfloat16")
    assert abs(full["p_edit"] - half["p_edit"]) < 0.02
    capped = verdict("--judge", qwen, "--max-pixels", "256")
    assert 0 < capped["p_edit"] < 1 and capped["p_edit"] != full["p_edit"]  # 64 px images seen at 16 px
    with pytest.raises(SystemExit, match="llava_onevision judges see each image at one fixed size"):
        main(["judge", "--judge", tiny_judge, "--max-pixels", "256", *pair])


def test_cli_judge_without_its_processor_files_is_one_error_line(tmp_path, tiny_judge, tiny_manifest):
    """A judge folder copied without its processor's files stops `judge` and `edit --candidates` with one line naming
    the folder, not a traceback."""
    import shutil

    from npedit.cli import main

    broken = shutil.copytree(tiny_judge, tmp_path / "no-processor")
    (broken / "processor_config.json").unlink()
    image = str(tiny_manifest.parent / "images/0.png")
    with pytest.raises(SystemExit, match=r"^error: .*no-processor"):
        main(["judge", "--judge", str(broken), "--reference", image, "--edited", image, "--instruction", "x"])
    with pytest.raises(SystemExit, match=r"^error: .*no-processor"):
        main(["edit", "--judge", str(broken), "--candidates", "2", "--image", image, "--instruction", "x",
              "--output", str(tmp_path / "out.png")])


def test_cli_judge_writes_gradient_maps(tmp_path, tiny_judge, tiny_manifest, capsys):
    """`judge --gradients FILE.npz` writes the inspector's gradient maps as plain arrays that load back without
    pickle and equal `answer_gradients` on the same pair; anything but one .npz is refused before the judge loads."""
    from npedit.cli import main
    from npedit.judges import load_judge
    from npedit.verdicts import AnswerGradients, answer_gradients, judge_edit

    ref, edited = str(tiny_manifest.parent / "images/0.png"), str(tiny_manifest.parent / "images/t0.png")
    pair = ["--judge", tiny_judge, "--reference", ref, "--edited", edited, "--instruction", "remove the red circle",
            "--edit-type", "remove", "--object", "red circle", "--keep", "blue square"]
    out = tmp_path / "maps" / "pair.npz"
    assert main(["judge", *pair, "--gradients", str(out)]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["gradients"] == str(out)
    saved = AnswerGradients.load(out)
    assert [q["kind"] for q in saved.questions] == [q["kind"] for q in verdict["questions"]] == \
        ["contains", "identity", "keep"]
    direct = answer_gradients(load_judge(tiny_judge), ref, edited, "remove the red circle", edit_type="remove",
                              object_name="red circle", keep=["blue square"])
    alone = judge_edit(load_judge(tiny_judge), ref, edited, "remove the red circle", edit_type="remove",
                       object_name="red circle", keep=["blue square"])
    for key in ("p_edit", "p_identity", "p_keep"):  # the numbers of the gradients' own pass = the plain verdict's
        assert verdict[key] == pytest.approx(getattr(alone, key), abs=1e-6)
    np.testing.assert_allclose(saved.grads, direct.grads, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(saved.training, direct.training, rtol=1e-4, atol=1e-8)
    assert saved.grads.shape[0] == 3 and np.abs(saved.training).max() > 0
    assert np.array_equal(np.asarray(saved.image), np.asarray(direct.image.convert("RGB")))
    for bad in (["--gradients", str(tmp_path / "maps.png")], ["--gradients", str(out), "--batch", "x.jsonl"]):
        with pytest.raises(SystemExit, match="one .npz file for one pair"):
            main(["judge", *pair, *bad])
    np.savez(tmp_path / "other.npz", grads=np.zeros(1))
    with pytest.raises(ValueError, match="not a gradient-map file"):
        AnswerGradients.load(tmp_path / "other.npz")


def test_cli_judge_with_gradients_of_a_large_image_prints_the_pairs_own_verdict(tmp_path, tiny_judge, capsys):
    """An edited image over 1,024 px is differentiated on a resized copy; `judge --gradients` printed that copy's
    verdict, so the same pair read differently with the flag and without it (1e-4 to 1e-3 on the tiny judges)."""
    from npedit.cli import main
    from npedit.verdicts import AnswerGradients

    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((96, 128, 3)) * 255).astype(np.uint8)).save(tmp_path / "ref.png")
    Image.fromarray((rng.random((900, 1200, 3)) * 255).astype(np.uint8)).save(tmp_path / "big.png")
    pair = ["--judge", tiny_judge, "--reference", str(tmp_path / "ref.png"), "--edited", str(tmp_path / "big.png"),
            "--instruction", "make the circle blue", "--keep", "red square"]
    assert main(["judge", *pair]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["judge", *pair, "--gradients", str(tmp_path / "maps.npz")]) == 0
    mapped = json.loads(capsys.readouterr().out)
    assert AnswerGradients.load(tmp_path / "maps.npz").image.size == (1024, 768)
    for key in ("p_edit", "p_identity", "p_keep"):
        assert mapped[key] == pytest.approx(plain[key], abs=1e-6), key


def test_an_editor_named_like_a_hub_id_and_found_nowhere_is_one_line(tmp_path, monkeypatch):
    """`--model editors/typo` (one slash: the shape of a hub id, as the README's `editors/npedit-zimage`) that is no
    folder here and cannot be fetched stops with one line, as a missing folder does, not diffusers' OSError."""
    from npedit import NPEditPipeline
    from npedit.cli import main
    from npedit.folders import CheckpointError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="cannot find 'editors/typo' locally or on the hub"):
        NPEditPipeline.from_pretrained("editors/typo")
    with pytest.raises(SystemExit, match="error: cannot find 'editors/typo' locally or on the hub"):
        main(["edit", "--model", "editors/typo", "--image", _an_image(tmp_path / "in.png"), "--instruction", "x",
              "--output", "y.png"])


@pytest.fixture
def hub_calls(monkeypatch):
    """Every door to the hub the loaders use, each recording its call (and failing like an offline hub)."""
    import diffusers
    import huggingface_hub
    import transformers

    calls = []

    def refuse(name):
        def call(*args, **kwargs):
            calls.append(name)
            raise OSError(f"{name} was asked")
        return call

    for owner, name in ((huggingface_hub, "hf_hub_download"), (huggingface_hub, "snapshot_download"),
                        (huggingface_hub.file_download, "hf_hub_download"),
                        (diffusers.configuration_utils, "hf_hub_download"),
                        (diffusers.utils.hub_utils, "hf_hub_download"),
                        (diffusers.pipelines.pipeline_utils, "snapshot_download"),
                        (diffusers.pipelines.pipeline_utils, "model_info")):
        monkeypatch.setattr(owner, name, refuse(f"{owner.__name__}.{name}"))
    monkeypatch.setattr(diffusers.DiffusionPipeline, "download", classmethod(refuse("DiffusionPipeline.download")))
    monkeypatch.setattr(transformers.PretrainedConfig, "get_config_dict",
                        classmethod(refuse("PretrainedConfig.get_config_dict")))
    return calls


def test_a_missing_path_under_a_folder_here_is_reported_at_once_without_the_hub(tmp_path, monkeypatch, hub_calls):
    """`--model runs/missing` / `--judge myfolder/x` (one slash, the shape of a hub id) beside a runs/ or myfolder/
    folder is a local path: every loader says it does not exist without asking the hub, whose client retries for
    ~23 s offline. A hub id whose first component happens to be a folder here still goes to the hub when the local
    hub cache holds it."""
    import huggingface_hub

    from npedit import NPEditPipeline
    from npedit.backbones import detect_family, load_backbone
    from npedit.backbones.base import check_transformer
    from npedit.backbones.vae import AnyVAE
    from npedit.cli import main
    from npedit.folders import CheckpointError, looks_local
    from npedit.judges import load_judge
    from workbench.models import ModelError, check_judge
    from workbench.presets import check_train_args

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "myfolder").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    with pytest.raises(CheckpointError, match="^runs/missing does not exist"):
        NPEditPipeline.from_pretrained("runs/missing")
    with pytest.raises(SystemExit, match="error: runs/missing does not exist"):
        main(["edit", "--model", "runs/missing", "--image", "in.png", "--instruction", "x", "--output", "y.png"])
    with pytest.raises(CheckpointError, match=r"'myfolder/x' \(does not exist\)"):
        load_judge("myfolder/x")
    with pytest.raises(SystemExit, match=r"'myfolder/x' \(does not exist\)"):
        main(["judge", "--judge", "myfolder/x", "--reference", "in.png", "--edited", "in.png", "--instruction", "x"])
    for load in (detect_family, load_backbone):
        with pytest.raises(FileNotFoundError, match="checkpoint folder not found: runs/missing"):
            load("runs/missing")
    with pytest.raises(CheckpointError, match="^runs/missing does not exist"):
        check_transformer("runs/missing", "transformer", "sd3")
    with pytest.raises(CheckpointError, match="^runs/missing does not exist"):
        AnyVAE.from_pretrained("runs/missing")
    with pytest.raises(ModelError, match="judge folder not found: myfolder/x"):  # the app
        check_judge("myfolder/x")
    with pytest.raises(ValueError, match=r"the teacher \(base model\) runs/missing does not exist"):  # its Train tab
        check_train_args(["model.base=runs/missing", "data.train=shapes", "judge.path=j"])
    assert hub_calls == []
    # a cached hub repo named like runs/x stays a hub id; without runs/ here, so does an uncached one
    cache = tmp_path / "hub-cache"
    (cache / "models--runs--cached").mkdir(parents=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert not looks_local("runs/cached") and looks_local("runs/missing")
    assert not looks_local("owner/name") and looks_local("./owner/name") and looks_local("runs")


def test_cli_edit_refuses_bad_batches_and_outputs_before_loading(tmp_path):
    """A --batch id names its result's file: one that leaves --output-dir, or comes twice, is refused, as are a line
    that is not an object, an image that is not a path, an instruction or object name that is not text, an unknown
    edit_type, an --output that is not a .png, an
    out-of-range --seed or --max-side; all before any weights are read (the model folder here does not exist)."""
    from npedit.cli import main

    edit = ["edit", "--model", str(tmp_path / "no-model")]
    listing = tmp_path / "cases.jsonl"
    for lines, says in (([{"id": "../x"}], "cases.jsonl:1: id '../x' is not a plain file name"),
                        ([{"id": "a"}, {"id": "/tmp/x"}], "cases.jsonl:2: id '/tmp/x' is not a plain file name"),
                        ([{"id": ""}], "'' is not a plain file name"),
                        ([{"id": "a"}, {"id": "b"}, {"id": "a"}], "ids 'a' appear more than once"),
                        ([{"id": "a", "image": 5}], "cases.jsonl:1: image must be a path"),
                        ([{"id": "a"}, {"id": "b", "instruction": 7}], "cases.jsonl:2: instruction must be text"),
                        ([{"id": "a", "edit_type": "remove", "object_name": ["cat"]}],
                         "cases.jsonl:1: object_name must be text"),
                        ([{"id": "a"}, {"id": "b", "edit_type": "remvoe"}], "cases.jsonl:2: unknown edit_type 'remvoe'"),
                        (["a"], "cases.jsonl:1: not a JSON object")):
        rows = [line if isinstance(line, str) else {"image": "in.png", "instruction": "x", **line} for line in lines]
        listing.write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(SystemExit, match=re.escape(says)):
            main([*edit, "--batch", str(listing), "--output-dir", str(tmp_path / "out")])
    one = [*edit, "--image", "in.png", "--instruction", "x"]
    for flags, says in ((["--output", str(tmp_path / "out.gif")], "--output must end in one of .png, .jpg"),
                        (["--output", str(tmp_path)], "--output must end in one of .png, .jpg"),
                        (["--output", "y.png", "--edit-type", "remvoe"], "2"),  # argparse's exit status
                        (["--output", "y.png", "--seed", str(2**64)], "--seed must be between"),
                        (["--output", "y.png", "--max-side", "0"], "--max-side must be >= 1"),
                        (["--output", "y.png", "--edit-type", "remove", "--candidates", "2"],
                         "--edit-type remove needs --object NAME"),
                        (["--output", "y.png", "--edit-type", "remove", "--trace", "t"],
                         "--edit-type remove needs --object NAME"),
                        (["--output", "y.png", "--trace", "t", "--candidates", "2"],
                         "--trace records one edit's steps"),
                        (["--output", "y.png", "--critic", "c"], "--teacher, --critic and --caption are for the DMD "
                                                                 "maps of --trace")):
        with pytest.raises(SystemExit, match=re.escape(says)):
            main([*one, *flags])
    with pytest.raises(SystemExit, match="--edit-type remove needs --object NAME"):
        main(["judge", "--judge", str(tmp_path / "no-judge"), "--reference", "a.png", "--edited", "b.png",
              "--instruction", "remove it", "--edit-type", "remove"])
    # the one --image, --reference or --edited is read before the models: a 6B editor loads for minutes
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    with pytest.raises(SystemExit, match=f"error: --image: cannot read {re.escape(str(notes))} as an image"):
        main([*edit, "--image", str(notes), "--instruction", "x", "--output", str(tmp_path / "y.png")])
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "taken.zip").write_text("a file where a folder should be")
    with pytest.raises(SystemExit, match=re.escape(f"cannot write --trace {tmp_path / 'taken.zip/t'}")):
        main([*edit, "--image", str(tmp_path / "ok.png"), "--instruction", "x", "--output", str(tmp_path / "y.png"),
              "--trace", str(tmp_path / "taken.zip/t")])
    for pair, says in (([notes, "b.png"], f"--reference: cannot read {notes} as an image"),
                       ([tmp_path / "ok.png", tmp_path], f"--edited: {tmp_path} is a folder, not an image")):
        with pytest.raises(SystemExit, match=re.escape(f"error: {says}")):
            main(["judge", "--judge", str(tmp_path / "no-judge"), "--reference", str(pair[0]), "--edited",
                  str(pair[1]), "--instruction", "x"])
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "out").exists()


@pytest.mark.skipif(not (Path(ROOT, "assets/shapes/editor-unroll-npedit/model_index.json")).is_file(),
                    reason="bundled editor not trained")
def test_cli_edit_takes_a_photo_larger_than_the_editor_and_reports_an_unwritable_output(tmp_path, capsys,
                                                                                        monkeypatch):
    """With the bundled editor (a 16x16-patch position grid, 128 px): a larger photo is edited and comes back at
    its own size; a result that cannot be saved is one error line, not a traceback: before the editor loads where
    the place cannot take it, else (a full disk) that job's line while the others go on."""
    from npedit import cli
    from npedit.cli import main

    Image.new("RGB", (200, 150), (200, 30, 30)).save(tmp_path / "in.png")  # larger than the editor's position grid
    (tmp_path / "taken").write_text("a file where a folder should be")
    with pytest.raises(SystemExit, match=re.escape(f"cannot write --output {tmp_path / 'taken/out.png'} (")):
        main(["edit", "--image", str(tmp_path / "in.png"), "--instruction", "make the circle blue",
              "--output", str(tmp_path / "taken/out.png")])
    full = [f"{tmp_path / 'full'}/a.png"]

    def write(path, data):
        if str(path) in full:
            raise OSError(errno.ENOSPC, "No space left on device")
        Path(path).write_bytes(data)

    monkeypatch.setattr(cli, "write_atomic", write)
    (tmp_path / "ab.jsonl").write_text("".join(json.dumps({"id": i, "image": "in.png", "instruction": "x"}) + "\n"
                                               for i in "ab"))
    capsys.readouterr()
    assert main(["edit", "--batch", str(tmp_path / "ab.jsonl"), "--output-dir", str(tmp_path / "full")]) == 1
    assert "error: a: cannot save" in capsys.readouterr().err and (tmp_path / "full/b.png").is_file()
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="cannot write --verdicts"):
        main(["edit", "--image", str(tmp_path / "in.png"), "--instruction", "make the circle blue",
              "--output", str(tmp_path / "out.png"), "--verdicts", str(tmp_path / "taken/v.jsonl")])
    listing = tmp_path / "cases.jsonl"
    listing.write_text("".join(json.dumps({"id": i, "image": "in.png", "instruction": "make the circle blue"}) + "\n"
                               for i in ("a", "b")))
    assert main(["edit", "--batch", str(listing), "--output-dir", str(tmp_path / "out")]) == 0
    assert [Image.open(tmp_path / f"out/{i}.png").size for i in "ab"] == [(200, 150)] * 2
    for name, fmt in (("out.JPG", "JPEG"), ("out.webp", "WEBP")):  # saved in the format its name says
        assert main(["edit", "--image", str(tmp_path / "in.png"), "--instruction", "make the circle blue",
                     "--output", str(tmp_path / name)]) == 0
        with Image.open(tmp_path / name) as saved:
            assert saved.format == fmt and saved.size == (200, 150)


@pytest.mark.skipif(not (Path(ROOT, "assets/shapes/editor-unroll-npedit/model_index.json")).is_file(),
                    reason="bundled editor not trained")
def test_cli_edit_batch_reads_a_csv_as_its_json_lines(tmp_path):
    """`edit --batch cases.csv` (a spreadsheet's columns, ';' cells, stray spaces) edits what the JSON lines do."""
    from npedit.cli import main

    (tmp_path / "in").mkdir()
    for i, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        Image.new("RGB", (64, 64), colour).save(tmp_path / f"in/{i}.png")
    rows = [{"id": "a", "image": "in/0.png", "instruction": "make the circle blue"},
            {"id": "b", "image": "in/1.png", "instruction": "remove the square", "edit_type": "remove",
             "object_name": "square", "keep": "red circle; blue dot"}]
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "cases.csv").write_text("id; image ;instruction;edit_type;object_name;keep\n"
                                        "a; in/0.png ;make the circle blue\n"
                                        "b;in/1.png;remove the square; remove ;square;red circle; blue dot\n")
    with pytest.raises(SystemExit, match=re.escape("cases.csv:3: 7 cells")):  # ';' in a ';' cell needs quotes
        main(["edit", "--batch", str(tmp_path / "cases.csv"), "--output-dir", str(tmp_path / "csv")])
    (tmp_path / "cases.csv").write_text("id; image ;instruction;edit_type;object_name;keep\n"
                                        "a; in/0.png ;make the circle blue\n"
                                        'b;in/1.png;remove the square; remove ;square;"red circle; blue dot"\n')
    for listing, out in (("cases.jsonl", "json"), ("cases.csv", "csv")):
        assert main(["edit", "--batch", str(tmp_path / listing), "--output-dir", str(tmp_path / out), "--steps", "2",
                     "--verdicts", str(tmp_path / f"{out}.jsonl")]) == 0
    for name in ("a.png", "b.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "csv" / name)),
                              np.asarray(Image.open(tmp_path / "json" / name)))
    verdicts = [[json.loads(line) for line in (tmp_path / f"{out}.jsonl").read_text().splitlines()]
                for out in ("json", "csv")]
    same = ("id", "image", "instruction", "edit_type", "score", "p_edit", "p_identity", "p_keep")
    assert [[{k: row[k] for k in same} for row in rows] for rows in verdicts] == [[{k: row[k] for k in same}
                                                                                 for row in verdicts[0]]] * 2
    assert verdicts[1][1]["object_name"] == "square" and verdicts[1][1]["p_keep"] is not None  # the keep checks


def test_cli_judge_batch_goes_on_past_a_pair_it_cannot_read(tmp_path, tiny_judge, tiny_manifest, capsys):
    """A pair whose image is missing, named too long for the file system (an OSError that ended the batch with a
    traceback) or left empty (read as the list's folder) is one error line naming its id (not written over the
    progress bar) and its row's `error` (it was left out of the file); the other pairs are judged."""
    from npedit.cli import main

    images = tiny_manifest.parent / "images"
    pairs = tmp_path / "pairs.jsonl"
    long = tmp_path / ("x" * 300 + ".png")
    pairs.write_text("".join(json.dumps({"id": i, "reference": str(images / "0.png"), "edited": str(edited),
                                         "instruction": "make the red circle green"}) + "\n"
                             for i, edited in (("a", images / "t0.png"), ("b", tmp_path / "gone.png"), ("d", long),
                                               ("e", ""), ("c", images / "t0.png"))))
    assert main(["judge", "--judge", tiny_judge, "--batch", str(pairs), "--output", str(tmp_path / "v.jsonl")]) == 1
    shown = [line.split("\r")[-1] for line in capsys.readouterr().err.split("\n")]  # as a terminal shows them
    assert [line for line in shown if "error" in line] == [f"error: b: image not found: {tmp_path / 'gone.png'}",
                                                           f"error: d: cannot read {long}: File name too long",
                                                           "error: e: no image given (an empty path)"]
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [(r["id"], r["p_edit"] is None, r["error"]) for r in rows] == [  # the file says it too, not only stderr
        ("a", False, ""), ("b", True, f"image not found: {tmp_path / 'gone.png'}"),
        ("d", True, f"cannot read {long}: File name too long"), ("e", True, "no image given (an empty path)"),
        ("c", False, "")]
    for out in (tmp_path / "v.jsonl/x/y", tmp_path / "v.jsonl/y"):  # a file where its folder should be: before loading
        with pytest.raises(SystemExit, match=re.escape(f"cannot write --output {out} ({tmp_path / 'v.jsonl'} is a file)")):
            main(["judge", "--judge", str(tmp_path / "no-judge"), "--batch", str(pairs), "--output", str(out)])
    with pytest.raises(SystemExit, match="cannot write --gradients"):
        main(["judge", "--judge", str(tmp_path / "no-judge"), "--reference", str(images / "0.png"), "--edited",
              str(images / "t0.png"), "--instruction", "x", "--gradients", str(tmp_path / "v.jsonl/g.npz")])


def test_cli_judge_batch_reads_object_name_as_the_manifest_and_the_app_call_it(tmp_path, tiny_judge, tiny_manifest):
    """A removal's object given as `object_name` (the manifest's, `edit --batch`'s and the app's Batch key) is asked
    about, as `object` is: not refused as a removal without one."""
    from npedit.cli import main

    images = tiny_manifest.parent / "images"
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"id": key, "reference": str(images / "0.png"), "edited": str(images / "t0.png"),
                                         "instruction": "remove the red circle", "edit_type": "remove",
                                         key: "red circle"}) + "\n" for key in ("object", "object_name")))
    assert main(["judge", "--judge", tiny_judge, "--batch", str(pairs), "--output", str(tmp_path / "v.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["object", "object_name"] and rows[0]["p_edit"] == rows[1]["p_edit"]


def test_cli_judge_refuses_a_batch_line_whose_instruction_is_not_text_before_loading(tmp_path):
    """A pairs line whose instruction or object is not a string is refused with its line number, before the judge
    loads (the judge folder here does not exist), as a non-string image path is."""
    from npedit.cli import main

    pairs = tmp_path / "pairs.jsonl"
    for line, says in (({"instruction": 7}, "pairs.jsonl:2: instruction must be text (a string), got 7"),
                       ({"edit_type": "remove", "object": ["cat"]}, "pairs.jsonl:2: object must be text")):
        rows = [{"id": i, "reference": "a.png", "edited": "b.png", "instruction": "x"} for i in "ab"]
        rows[1].update(line)
        pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
        with pytest.raises(SystemExit, match=re.escape(says)):
            main(["judge", "--judge", str(tmp_path / "no-judge"), "--batch", str(pairs), "--output",
                  str(tmp_path / "v.jsonl")])
    assert not (tmp_path / "v.jsonl").exists()


def test_a_resumed_run_trains_on_the_data_the_uninterrupted_run_would(tmp_path, tiny_zimage, tiny_manifest):
    """Stopped after 3 steps (mid-epoch: 2 batches per epoch) and resumed to 5, a run ends with the weights of the
    same run trained 5 steps straight: the data order, RNG and optimiser all pick up where they were."""
    from safetensors.torch import load_file

    from npedit.cli import main

    common = ["stage=warmup", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", "data.batch_size=2",
              "log_every=1", "save_every=3", "sample_every=0", "optim.lr=1e-3", "optim.skip_grad_norm=1e9"]
    main(["train", "max_steps=5", *common, f"output_dir={tmp_path}/straight"])
    main(["train", "max_steps=3", *common, f"output_dir={tmp_path}/stopped"])
    main(["train", "max_steps=5", "--resume", *common, f"output_dir={tmp_path}/stopped"])  # overrides either side
    weights = "checkpoints/step_000005/student/diffusion_pytorch_model.safetensors"
    straight, resumed = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "stopped" / weights)
    three = load_file(tmp_path / "stopped/checkpoints/step_000003/student/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(three[k], resumed[k]) for k in three)  # the resumed steps trained
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    state = json.loads((tmp_path / "stopped/checkpoints/step_000005/trainer_state.json").read_text())
    assert state["batches_drawn"] == 5


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    from npedit.training.datasets import EpochSampler

    s = EpochSampler(10, seed=3)
    first, second = list(s), (s.set_epoch(1), list(s))[1]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    again = EpochSampler(10, seed=3)
    again.start(1, 4)
    assert len(again) == 6 and list(again) == second[4:]
    assert len(again) == 10 and list(again) == second  # the skip holds for one epoch
    assert list(EpochSampler(10, seed=4)) != first


def test_a_damaged_newest_checkpoint_is_passed_over_by_resume_and_named_by_export(tmp_path, tiny_zimage,
                                                                                  tiny_manifest, capsys):
    """The newest checkpoint cut short after it was published (a crash before the disk had it): `--resume` says so
    and goes on from the one before, `export` names it and the step to export instead. A save killed halfway at
    step 4 left `.tmp_step_000004`: none of it ends up in the step 4 the resumed run saves."""
    from npedit.cli import main

    common = ["stage=warmup", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", "data.batch_size=2",
              "log_every=1", "save_every=1", "sample_every=0", f"output_dir={tmp_path}/r"]
    main(["train", "max_steps=3", *common])
    root = tmp_path / "r/checkpoints"
    weights = root / "step_000003/student/diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (root / ".tmp_step_000004/critic").mkdir(parents=True)  # a save killed halfway, by a run that had a critic
    (root / ".tmp_step_000004/critic/config.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"step_000003 is damaged \(student/diffusion_pytorch_model.safetensors.*"
                                         r"export step 2 with --step 2"):
        main(["export", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match=r"step_000003 is damaged .*--step 2"):
        main(["export", str(tmp_path / "r"), "--average", "2"])
    capsys.readouterr()
    main(["train", "--resume", "max_steps=4", *common])
    out = capsys.readouterr().out
    assert "step_000003 is damaged" in out and "resuming from step_000002" in out
    assert [json.loads(line)["step"] for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(p.name for p in root.iterdir()) == ["step_000003", "step_000004"]
    assert not (root / "step_000004/critic").exists()
    from npedit.training import checkpoint as ckpt

    assert ckpt.damage(root / "step_000003") is None  # written again by the resumed run
    (root / "step_000003/optimizer_student.json").write_text("")
    with pytest.raises(SystemExit, match=r"cannot average 2 checkpoints up to step 4: step_000003 is damaged "
                                         r"\(optimizer_student.json is empty\); average fewer"):
        main(["export", str(tmp_path / "r"), "--average", "2"])


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_the_last_checkpoint(tmp_path, tiny_zimage, tiny_manifest,
                                                                               monkeypatch):
    """A checkpoint that cannot be written (a full disk) stops the run with one line naming the newest complete
    checkpoint and what to do; the half-written folder is removed (it would hold the space a retry needs). An editor
    that cannot be written at the end says that the checkpoint holds it and how to export it."""
    import errno

    from npedit.cli import main
    from npedit.pipeline import NPEditPipeline
    from npedit.training import checkpoint as ckpt

    real_save, calls = ckpt.save_file, []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > 2:  # the optimiser and RNG files of step 1; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    common = ["stage=warmup", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", "data.batch_size=2",
              "log_every=1", "save_every=1", "sample_every=0", f"output_dir={tmp_path}/r"]
    with pytest.raises(SystemExit, match=r"could not write checkpoint step_000002 .*No space left on device.*"
                                         r"step_000001, is untouched.*--resume"):
        main(["train", "max_steps=3", *common])
    assert sorted(p.name for p in (tmp_path / "r/checkpoints").iterdir()) == ["step_000001"]
    assert ckpt.damage(tmp_path / "r/checkpoints/step_000001") is None
    monkeypatch.setattr(ckpt, "save_file", real_save)

    def no_space(self, out, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out))

    monkeypatch.setattr(NPEditPipeline, "save_pretrained", no_space)  # room for the checkpoint, not for the editor
    with pytest.raises(SystemExit, match=r"could not write .*pipeline .*No space left on device.*checkpoint at step 2 "
                                         r"is complete: .*npedit export"):
        main(["train", "--resume", "max_steps=2", *common])
    assert ckpt.latest_readable(tmp_path / "r/checkpoints")[0].name == "step_000002"


def test_a_resume_names_its_checkpoint_and_the_save_cut_short_and_drops_later_grids(tmp_path, tiny_zimage,
                                                                                    tiny_manifest, capsys):
    """Killed while saving step 3 (its folder still `.tmp_step_000003`), a run resumes from step 2 and says so, naming
    the save it passes over; the sample grid of step 3, drawn by the stopped run, goes with its metrics rows (the app
    showed it as the newest grid of a run that had not reached it)."""
    from npedit.cli import main

    common = ["stage=warmup", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", "data.batch_size=2",
              "log_every=1", "save_every=2", f"output_dir={tmp_path}/r"]
    main(["train", "max_steps=3", "sample_every=1", *common])
    root = tmp_path / "r/checkpoints"
    (root / "step_000003").rename(root / ".tmp_step_000003")
    (root / ".tmp_step_000003/trainer_state.json").unlink()  # (written last)
    capsys.readouterr()
    main(["train", "--resume", "max_steps=3", "sample_every=0", *common])
    out = capsys.readouterr().out
    assert "step_000003 was still being written when the run stopped: incomplete, passed over" in out
    assert "resuming from step_000002 (step 2), the newest complete checkpoint" in out
    assert sorted(p.name for p in (tmp_path / "r/samples").iterdir()) == ["step_000001.png", "step_000002.png"]
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003"]


def test_a_sample_grid_is_written_whole_or_not_at_all(tmp_path, tiny_zimage, tiny_manifest, full_disk):
    """A disk that fills up (or a kill) while a sample grid is written leaves no cut PNG for the app to show as the
    run's newest grid (it does not open); the run stops with one line naming the checkpoint to resume from."""
    from npedit.config import load_config
    from npedit.training.checkpoint import WriteError
    from npedit.training.trainer import Trainer

    trainer = Trainer(load_config(None, ["stage=warmup", f"output_dir={tmp_path}/r", f"model.base={tiny_zimage}",
                                         f"data.train={tiny_manifest}", "data.batch_size=2"]))
    trainer.step = 2
    trainer.save_samples()
    samples = tmp_path / "r/samples"
    size = (samples / "step_000002.png").stat().st_size
    trainer.step = 4
    with pytest.raises(WriteError, match=r"sample grid .*step_000004.png .*no checkpoint was saved: free space .*"
                                         r"--resume"), full_disk(size // 2):
        trainer.save_samples()
    assert [p.name for p in samples.iterdir()] == ["step_000002.png"]
    Image.open(samples / "step_000002.png").load()


def test_weights_that_do_not_fit_on_the_disk_stop_the_run_with_one_line(tmp_path, tiny_zimage, tiny_manifest,
                                                                        full_disk):
    """safetensors reports a disk that fills up as a SafetensorError ("I/O error"), not an OSError: a checkpoint or an
    editor whose weights do not fit still stops the run with the one-line WriteError (the CLI prints it without a
    traceback), and the partial folder, which holds the space a retry needs, is removed."""
    from npedit.config import load_config
    from npedit.training.checkpoint import WriteError
    from npedit.training.trainer import Trainer

    run = tmp_path / "r"
    trainer = Trainer(load_config(None, ["stage=warmup", f"output_dir={run}", f"model.base={tiny_zimage}",
                                         f"data.train={tiny_manifest}", "data.batch_size=2"]))
    trainer.step = 1
    trainer.save_checkpoint()
    size = (run / "checkpoints/step_000001/student/diffusion_pytorch_model.safetensors").stat().st_size
    trainer.step = 2
    with pytest.raises(WriteError, match=r"could not write checkpoint step_000002 .*I/O error.*the newest complete "
                                         r"checkpoint, step_000001, is untouched"), full_disk(size // 2):
        trainer.save_checkpoint()
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000001"]
    trainer.step = 1
    with pytest.raises(WriteError, match=r"could not write .*pipeline .*I/O error.*the checkpoint at step 1 is "
                                         r"complete"), full_disk(size // 2):
        trainer.export()
    assert not [p.name for p in run.iterdir() if "pipeline" in p.name]


KILLED_MID_SAVE = """
import os
import signal
import sys

from npedit.cli import main
from npedit.training import checkpoint as ckpt

write_rng = ckpt.rng_state_to_files


def killed_on_the_second_process(stem, generators):  # (after process 0 wrote the networks of step 2)
    if stem.parent.name == ".tmp_step_000002" and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    write_rng(stem, generators)


ckpt.rng_state_to_files = killed_on_the_second_process
sys.exit(main(sys.argv[1:]))
"""


def test_a_two_process_run_killed_mid_save_resumes_from_its_last_complete_checkpoint(tmp_path, tiny_zimage,
                                                                                     tiny_manifest, capsys):
    """torchrun, two processes: the second is killed (SIGKILL) while the checkpoint of step 2 is being written; torchrun
    stops the first (no process waits forever at the next barrier), step 1 stays the newest complete checkpoint, and a
    resume starts there, names the save cut short and logs each step once."""
    from npedit.cli import main
    from npedit.training import checkpoint as ckpt

    script = tmp_path / "killed.py"
    script.write_text(KILLED_MID_SAVE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "ACCELERATE_USE_CPU": "true"}
    common = ["stage=warmup", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}", f"output_dir={tmp_path}/r",
              "data.batch_size=1", "save_every=1", "log_every=1", "sample_every=0", "max_steps=3"]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), "train", *common], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "SIGKILL" in out.stderr, out.stderr[-3000:]
    root = tmp_path / "r/checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp_step_000002", "step_000001"]
    assert ckpt.latest_readable(root) == (root / "step_000001", [])
    assert {p.name for p in (root / "step_000001").glob("rng_*.json")} == {"rng_0.json", "rng_1.json"}
    capsys.readouterr()
    main(["train", "--resume", *common])  # (one process here: the checkpoint is what any launch resumes from)
    said = capsys.readouterr().out
    assert "step_000002 was still being written when the run stopped" in said and "resuming from step_000001" in said
    assert [json.loads(line)["step"] for line in (tmp_path / "r/metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003"]


def test_the_private_path_check_matches_whole_path_components(tmp_path, monkeypatch):
    """Before a push the folder is searched for this machine's home folder: a plain substring test took a home of
    /root for a private path in any text naming /rootfs, refusing a clean upload; a path is now matched whole."""
    from npedit.sharing import private_traces

    monkeypatch.setattr(Path, "home", classmethod(lambda cls: Path("/root")))
    folder = tmp_path / "editor"
    folder.mkdir()
    (folder / "config.json").write_text('{"from": "/rootfs/models/base"}', encoding="utf-8")
    assert private_traces(folder) == []
    for text in ('{"from": "/root/models/base"}', '{"from": "/root"}', "trained in /root, on a laptop"):
        (folder / "config.json").write_text(text, encoding="utf-8")
        assert private_traces(folder) == ["config.json: the home folder (/root)"], text
