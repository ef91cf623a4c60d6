"""Installed as a package: `assets/...` and `configs/...` paths are read from the bundle when the working folder has
none, a missing bundle is one line saying how to get it, and a real offline install into a fresh venv runs from
another folder (editable: the checkout's bundle; non-editable: $NPEDIT_ASSETS, else that one line)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from npedit import assets
from npedit.cli import main
from npedit.config import load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "assets/examples/recolor-0001.png"


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """The working folder is an empty one outside the checkout."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def no_bundle(tmp_path, monkeypatch):
    """A package installed without its bundle: assets/ and configs/ point at folders that do not exist."""
    monkeypatch.setattr(assets, "ASSETS_DIR", tmp_path / "site-packages" / "assets")
    monkeypatch.setattr(assets, "DEFAULT_MODEL", tmp_path / "site-packages" / "assets" / "shapes" / "editor")
    monkeypatch.setattr(assets, "CONFIGS_DIR", tmp_path / "site-packages" / "configs")


def test_repository_paths_are_read_from_the_bundle_only_when_missing_here(elsewhere):
    assert assets.in_bundle(EXAMPLE) == str(assets.ASSETS_DIR / "examples" / "recolor-0001.png")
    assert assets.in_bundle("configs/shapes/npedit.yaml") == str(assets.CONFIGS_DIR / "shapes" / "npedit.yaml")
    for other in ("runs/x", "/abs/assets/x", "Org/model", "assets/no-such-file.png", "bundled"):
        assert assets.in_bundle(other) == other  # not the bundle's, or not in it: its reader reports it
    (elsewhere / "assets" / "examples").mkdir(parents=True)
    (elsewhere / EXAMPLE).write_bytes(b"mine")  # a file of the user's own wins over the bundle's
    assert assets.in_bundle(EXAMPLE) == EXAMPLE
    assert assets.bundle_missing(EXAMPLE) is None


def test_a_recipe_read_from_another_folder_names_the_bundled_models(elsewhere):
    cfg = load_config(assets.in_bundle("configs/shapes/npedit.yaml"), ["model.base=assets/shapes/teacher",
                                                                    "data.train=assets/examples/examples.jsonl",
                                                                    "output_dir=assets/mine"])
    assert Path(cfg.judge.path) == assets.DEFAULT_JUDGE and Path(cfg.model.base) == assets.DEFAULT_TEACHER
    assert Path(cfg.data.train).is_file()
    assert cfg.output_dir == "assets/mine"  # an output is written where it is named, never into the bundle


def test_only_model_and_data_paths_are_read_from_the_bundle_and_each_redirect_is_said(elsewhere, caplog):
    """The fallback rewrote any text field whose name did not start with `out`, and silently: a path of the user's own
    that was missing became the bundle's with no word said, and a negative prompt that looked like a path changed."""
    with caplog.at_level("WARNING", logger="npedit.assets"):
        cfg = load_config(None, ["model.base=assets/shapes/teacher", "data.train=shapes", "loss.lambda_vlm=0",
                                 "loss.negative_prompt=assets/shapes/teacher"])
    assert Path(cfg.model.base) == assets.DEFAULT_TEACHER
    assert cfg.loss.negative_prompt == "assets/shapes/teacher"  # a prompt, not a path: never the bundle's
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("model.base: assets/shapes/teacher is not in ")
    assert str(assets.DEFAULT_TEACHER) in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="npedit.assets"):
        assert assets.in_bundle(EXAMPLE) != EXAMPLE
    assert [r.getMessage() for r in caplog.records] == [
        f"{EXAMPLE} is not in {elsewhere}: reading the bundle's {assets.ASSETS_DIR / 'examples' / 'recolor-0001.png'}"]


def test_the_shapes_stages_read_their_model_paths_from_the_bundle(elsewhere):
    """`shapes fast-vae` (its `source` a bundled VAE) and `ref-encoder` (its `editor` a bundled editor) run from any
    folder, and so do a stage's `init`, a teacher's `vae` and the judge's `init` named by a bundled path."""
    from npedit.shapes import judge_training, recipes

    assert Path(recipes.make_config("fast-vae", []).source) == assets.SHAPES_DIR / "editor" / "vae"
    assert Path(recipes.make_config("ref-encoder", []).editor) == assets.SHAPES_DIR / "editor-sft-npedit"
    bundled = "init=assets/shapes/fast-vae"
    assert Path(recipes.make_config("fast-vae", [bundled]).init) == assets.SHAPES_DIR / "fast-vae"
    vae = assets.SHAPES_DIR / "editor" / "vae"
    assert Path(recipes.make_config("vae", ["init=assets/shapes/editor/vae"]).init) == vae
    teacher = recipes.make_config("teacher", ["vae=assets/shapes/editor/vae", "init=assets/shapes/teacher"])
    assert Path(teacher.vae) == vae and Path(teacher.init) == assets.DEFAULT_TEACHER
    assert Path(judge_training.build_config(["init=assets/shapes/judge"]).init) == assets.DEFAULT_JUDGE


def test_a_missing_bundle_is_one_line_saying_how_to_get_it(elsewhere, no_bundle, capsys):
    with pytest.raises(ValueError, match="judge.path: assets/shapes/judge is neither here nor in .*NPEDIT_ASSETS"):
        load_config(None, ["judge.path=assets/shapes/judge"])
    with pytest.raises(SystemExit):
        main(["train", "--config", "configs/shapes/npedit.yaml"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --config: configs/shapes/npedit.yaml is neither here nor in" in error
    assert "pip install -e" in error and "NPEDIT_ASSETS" in error
    with pytest.raises(SystemExit, match="pass --model .*NPEDIT_ASSETS"):
        assets.default_path("model", None)


def test_the_train_tab_presets_follow_the_bundle(monkeypatch, tmp_path):
    import importlib

    import workbench.presets as presets

    monkeypatch.setenv("NPEDIT_ASSETS", str(tmp_path / "clone" / "assets"))
    (tmp_path / "clone" / "configs" / "shapes").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "shapes" / "npedit.yaml", tmp_path / "clone" / "configs" / "shapes")
    try:
        importlib.reload(assets)
        assert importlib.reload(presets).RECIPES == tmp_path / "clone" / "configs" / "shapes"
        assert presets.build_presets()["Shapes NP-Edit"].config_file == str(presets.RECIPES / "npedit.yaml")
    finally:
        monkeypatch.delenv("NPEDIT_ASSETS")
        importlib.reload(assets)
        importlib.reload(presets)


def _venv(folder: Path) -> Path:
    """A venv that sees this interpreter's packages (torch & co. are not downloaded) and uses its pip and setuptools
    (a venv's own seeded setuptools 65 cannot build with wheel >= 0.46)."""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    probe = subprocess.run([str(python), "-c", "import setuptools, pip; print(setuptools.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode != 0 or int(probe.stdout.split(".")[0]) < 68:
        pytest.skip(f"no pip, or setuptools < 68, to install with offline: {probe.stdout or probe.stderr}")
    return python


def _install(python: Path, *target: str) -> None:
    out = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "-q", *target], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("NPEDIT_ASSETS", "PYTHONPATH")}
    return subprocess.run(args, cwd=cwd, env={**clean, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                          timeout=180)


def test_an_offline_install_runs_from_another_folder(tmp_path):
    """`pip install -e CLONE`: the console script edits a bundled example from an empty folder, and pip knows the
    dependencies; `pip install CLONE` (no bundle in it) says how to get the bundle, and edits with $NPEDIT_ASSETS."""
    work = tmp_path / "work"
    work.mkdir()
    editable = _venv(tmp_path / "editable")
    _install(editable, "-e", str(ROOT))
    out = _run([str(editable.parent / "npedit"), "edit", "--image", EXAMPLE, "--instruction",
                "make the blue circle red", "--output", "out.png"], work)
    assert out.returncode == 0 and (work / "out.png").is_file(), out.stderr
    shown = _run([str(editable), "-m", "pip", "show", "npedit"], work).stdout
    wanted = [line.split("==")[0].split(">=")[0] for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    requires = next(line for line in shown.splitlines() if line.startswith("Requires:"))
    assert {w.lower().replace("_", "-") for w in wanted} <= {r.strip().lower() for r in requires[9:].split(",")}

    # a wheel of the code alone, built from a copy so the clone gets no build/ folder
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns("assets", "runs", "build", "*.egg-info", ".git",
                                                                "__pycache__", "outputs", ".cache"))
    plain = _venv(tmp_path / "plain")
    _install(plain, str(source))
    out = _run([str(plain.parent / "npedit"), "eval", "shapes", "--n", "1"], work)
    assert out.returncode != 0 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "pip install -e" in out.stderr and "NPEDIT_ASSETS" in out.stderr
    out = _run([str(plain.parent / "npedit"), "edit", "--image", EXAMPLE, "--instruction", "make the blue circle red",
                "--output", "plain.png"], work, NPEDIT_ASSETS=str(ROOT / "assets"))
    assert out.returncode == 0 and (work / "plain.png").is_file(), out.stderr
