"""The bundled Shapes-world models: safetensors only, within the size budget, each editor a loadable pipeline with
a model card, and the editor the app calls the most accurate really edits better than the second one."""

import json
import sys
from pathlib import Path

import pytest

from npedit import assets
from script_modules import load_script

BUDGET_MB = 80  # issue: the final models in the NPEditPipeline layout, plus the judge, under 80 MB in all
PICKLES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}
EDITORS = [assets.DEFAULT_MODEL, *(folder for folder, _ in assets.EXTRA_EDITORS)]

bundled = pytest.mark.skipif(not (assets.DEFAULT_MODEL / "model_index.json").is_file(),
                             reason="bundled assets not present")


@bundled
def test_bundled_weights_are_safetensors_within_the_budget():
    files = [p for p in assets.SHAPES_DIR.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in PICKLES]
    assert any(p.suffix == ".safetensors" for p in files)
    # the bundle names other files by repo-relative paths, never by where the machine that trained it kept them
    texts = {p: p.read_text() for p in files if p.suffix in (".json", ".md", ".yaml")}
    assert not [p for p, text in texts.items() if any(root in text for root in ('"/work/', '"/tmp/', '"/home/'))]
    total = sum(p.stat().st_size for p in assets.ASSETS_DIR.rglob("*") if p.is_file()) / 2**20
    assert total < BUDGET_MB, f"assets/ holds {total:.1f} MB"


@bundled
@pytest.mark.parametrize("folder", EDITORS, ids=lambda p: Path(p).name)
def test_each_bundled_editor_is_a_pipeline_with_a_card(folder):
    if not (folder / "model_index.json").is_file():
        pytest.skip(f"{folder.name} not bundled")
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "npedit_domain.json").is_file()  # the CLI and the app know it edits Shapes scenes
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers")
    if folder == assets.PAIR_FREE_MODEL:  # trained without pairs, and its card says so
        assert "no before/after pairs" in card and "paired" not in card.lower()
    else:  # the others have seen pairs, and their cards say so
        assert "pairs" in card and "paired" in card.lower()
    critic = folder / "critic"  # an editor's own critic, for the app's DMD maps, lives inside it
    assert (critic / "diffusion_pytorch_model.safetensors").is_file()
    record = critic / "npedit_critic.json"  # a stage=critic run's record names the editor it was fitted to
    if record.is_file():
        assert Path(json.loads(record.read_text())["editor"]).name == folder.name


@bundled
def test_the_most_accurate_bundled_editor_beats_the_second_on_held_out_cases():
    import torch

    from npedit import NPEditPipeline
    from npedit.shapes import held_out_cases
    from npedit.shapes.evaluate import evaluate, pipeline_editor

    if not (assets.UNROLL_NPEDIT_MODEL / "model_index.json").is_file():
        pytest.skip("the third editor is not bundled")
    torch.set_num_threads(1)
    cases = held_out_cases(60, seed=11)
    exact = {}
    for folder in (assets.SFT_NPEDIT_MODEL, assets.UNROLL_NPEDIT_MODEL):
        pipe = NPEditPipeline.from_pretrained(str(folder))
        _, summary = evaluate(pipeline_editor(pipe, seed=0), cases, progress=False)
        exact[folder.name] = summary["overall"]["exact"]
    assert exact["editor-unroll-npedit"] > exact["editor-sft-npedit"], exact


def test_bundle_script_adds_one_editor_with_its_history(tmp_path, monkeypatch, capsys):
    src = tmp_path / "export"
    (src / "transformer").mkdir(parents=True)
    (src / "model_index.json").write_text("{}")
    (src / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    (src / "transformer" / "stray.bin").write_bytes(b"a pickle")  # never bundled
    (src / "README.md").write_text("---\nlibrary_name: diffusers\n---\n# NP-Edit editor (sd3)\n\nLast stage.\n")
    (src / "training_config.json").write_text(json.dumps({"model": {"base": "runs/teacher/base"}}))
    bundle = load_script("bundle_shapes_assets")
    out = tmp_path / "assets"
    for bad in ([], ["--name", "editor"], ["--name", "a/b"]):
        monkeypatch.setattr(sys, "argv", ["bundle", "--out", str(out), "--add-editor", str(src), *bad])
        with pytest.raises(SystemExit, match="--add-editor needs --name"):
            bundle.main()
    monkeypatch.setattr(sys, "argv", ["bundle", "--out", str(out)])
    with pytest.raises(SystemExit, match="pass --editor and --teacher"):
        bundle.main()
    critic = tmp_path / "critic-run" / "critic"
    critic.mkdir(parents=True)
    (critic / "config.json").write_text("{}")
    (critic / "diffusion_pytorch_model.safetensors").write_bytes(b"critic")
    monkeypatch.setattr(sys, "argv", ["bundle", "--out", str(out), "--add-editor", str(src), "--name", "editor-x",
                                      "--history", "Paired SFT first, then NP-Edit.", "--critic", str(critic)])
    bundle.main()
    dst = out / "shapes" / "editor-x"
    assert (dst / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes() == b"weights"
    assert (dst / "critic" / "diffusion_pytorch_model.safetensors").read_bytes() == b"critic"  # inside the editor
    assert not (dst / "transformer" / "stray.bin").exists()
    (critic / "diffusion_pytorch_model.safetensors").write_bytes(b"refitted")  # a critic alone, for a bundled editor
    monkeypatch.setattr(sys, "argv", ["bundle", "--out", str(out), "--critic", str(critic), "--critic-for", "editor-x"])
    bundle.main()
    assert (dst / "critic" / "diffusion_pytorch_model.safetensors").read_bytes() == b"refitted"
    monkeypatch.setattr(sys, "argv", ["bundle", "--out", str(out), "--critic", str(critic), "--critic-for", "nope"])
    with pytest.raises(SystemExit, match="--critic-for needs --critic and a bundled editor"):
        bundle.main()
    assert json.loads((dst / "npedit_domain.json").read_text()) == {"domain": "shapes", "resolution": 64}
    model = json.loads((dst / "training_config.json").read_text())["model"]
    assert model == {"base": "assets/shapes/teacher", "trained_from": "runs/teacher/base"}
    card = (dst / "README.md").read_text()
    assert card.startswith("---\nlibrary_name") and card.endswith("## Training history\n\nPaired SFT first, then NP-Edit.\n")
    assert "editor-x" in capsys.readouterr().out and sorted(p.name for p in (out / "shapes").iterdir()) == ["editor-x"]


def test_bundling_again_keeps_the_bundled_model_until_its_copy_is_whole(tmp_path, monkeypatch):
    """The bundle script deleted a destination before copying into it: bundling `assets/shapes/editor-x` again as
    editor-x, or the bundled editor's own critic/ as its critic, deleted the source first (an empty folder was
    "bundled"), and a Ctrl-C or full disk midway left half a model where the bundled one was. A source that is, or
    shares a folder with, a destination is refused before anything is copied; a copy cut short keeps the model."""
    bundle = load_script("bundle_shapes_assets")
    out = tmp_path / "assets"
    dst = out / "shapes" / "editor-x"
    (dst / "critic").mkdir(parents=True)
    (dst / "model_index.json").write_text("{}")
    (dst / "weights.safetensors").write_bytes(b"bundled")
    (dst / "critic" / "critic.safetensors").write_bytes(b"its critic")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for argv in (["--add-editor", str(dst), "--name", "editor-x"],
                 ["--critic", str(dst / "critic"), "--critic-for", "editor-x"]):
        monkeypatch.setattr(sys, "argv", ["bundle", "--out", str(out), *argv])
        with pytest.raises(SystemExit, match="which bundling replaces: copy it elsewhere first"):
            bundle.main()
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    src = tmp_path / "export"
    src.mkdir()
    for name in ("model_index.json", "a.safetensors", "b.safetensors"):
        (src / name).write_bytes(b"new")
    copied = []

    def cut_short(a, b):
        copied.append(a)
        if len(copied) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(bundle.shutil, "copy2", cut_short)
    monkeypatch.setattr(sys, "argv", ["bundle", "--out", str(out), "--add-editor", str(src), "--name", "editor-x"])
    with pytest.raises(KeyboardInterrupt):
        bundle.main()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (out / "shapes").iterdir()) == ["editor-x"]  # (no half copy left beside it)
