"""The Gradio app: builds without launching, serves /edit and /judge to gradio_client, starts with no models."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from npedit.domain import DOMAIN_FILE
from workbench import presets

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import app as npedit_app  # noqa: E402  (app.py lives at the repository root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warned(shown) -> list[str]:
    """The messages of the UserWarnings (gr.Warning) `pytest.warns` recorded: not a ResourceWarning that the garbage
    collector raised meanwhile for an earlier test's event loop (seen once, in place of the first warning)."""
    return [str(w.message) for w in shown if issubclass(w.category, UserWarning)]


def tiny_flags(tiny_set, runs):
    return ["--model", tiny_set["model"], "--judge", tiny_set["judge"], "--teacher", tiny_set["teacher"],
            "--critic", tiny_set["critic"], "--runs", str(runs)]


@pytest.fixture
def shapes_png(tmp_path):
    from workbench.datasets import random_shapes_case

    path = tmp_path / "scene.png"
    Image.fromarray(random_shapes_case(0)[0]).save(path)
    return path


def test_ui_builds_without_launching(tiny_set, tmp_path):
    args = npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs"))
    demo = npedit_app.build_demo(npedit_app.make_app(args))
    api = demo.get_api_info()["named_endpoints"]
    assert {"/edit", "/judge", "/judge_batch"} <= set(api)
    edit = api["/edit"]["parameters"]
    assert [p["parameter_name"] for p in edit[:2]] == ["image", "instruction"]
    assert all(p["parameter_has_default"] for p in edit[2:])
    from npedit.refine import DEFAULT_REFINE_ANCHOR, DEFAULT_REFINE_LR

    refine = {p["parameter_name"]: p["parameter_default"] for p in edit if p["parameter_name"].startswith("refine")}
    assert refine == {"refine_steps": 0, "refine_lr": DEFAULT_REFINE_LR, "refine_anchor": DEFAULT_REFINE_ANCHOR}
    judge = api["/judge"]["parameters"]
    assert [p["parameter_name"] for p in judge[:3]] == ["reference", "edited", "instruction"]
    assert all(p["parameter_has_default"] for p in judge[3:])
    assert not any(name.startswith("/on_") or name == "/lambda" for name in api)  # UI helpers stay private
    table = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "step-table")
    assert table.value["headers"][:3] == ["step", "t", "P(edit done)"]  # named before the first edit, not 1, 2, 3


def test_editor_choices_offer_the_other_bundled_editors(tiny_set, tmp_path):
    from npedit import assets

    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    choices = app.editor_choices()
    assert choices[0][1] == tiny_set["model"]
    for folder in (assets.PAIR_FREE_MODEL, assets.SFT_NPEDIT_MODEL, assets.UNROLL_NPEDIT_MODEL):
        offered = [c for c in choices if c[1] == str(folder)]
        assert bool(offered) == (folder / "model_index.json").is_file()
        says = "trained without pairs" if folder == assets.PAIR_FREE_MODEL else "trained with pairs"
        assert all(says in label for label, _ in offered)
    started = npedit_app.make_app(npedit_app.parse_args(["--model", str(assets.DEFAULT_MODEL), "--runs",
                                                         str(tmp_path / "runs")]))
    assert started.editor_choices()[0][0].startswith("bundled, most accurate")  # the default says what it is


def test_the_apps_dtype_and_device_take_auto_as_the_cli_does(tmp_path):
    """`python app.py --dtype auto` was refused though every npedit command takes it, and `--device auto` broke at the
    first model load: auto is the default's rule for both."""
    app = npedit_app.make_app(npedit_app.parse_args(["--dtype", "auto", "--device", "cpu", "--runs", str(tmp_path)]))
    assert app.models.dtype == "float32"
    app = npedit_app.make_app(npedit_app.parse_args(["--dtype", "bfloat16", "--device", "cpu", "--runs",
                                                     str(tmp_path)]))
    assert app.models.dtype == "bfloat16"
    app = npedit_app.make_app(npedit_app.parse_args(["--device", "auto", "--runs", str(tmp_path)]))  # as bench takes it
    assert app.models.device == ("cuda" if torch.cuda.is_available() else "cpu") and app.models._torch_dtype()


def test_judge_pixel_cap_from_flag_or_space_variable(tiny_set, tmp_path, monkeypatch):
    flags = tiny_flags(tiny_set, tmp_path / "runs")
    monkeypatch.delenv("NPEDIT_JUDGE_MAX_PIXELS", raising=False)
    assert npedit_app.make_app(npedit_app.parse_args(flags)).models.judge_max_pixels is None
    monkeypatch.setenv("NPEDIT_JUDGE_MAX_PIXELS", "200704")
    assert npedit_app.make_app(npedit_app.parse_args(flags)).models.judge_max_pixels == 200704
    assert npedit_app.parse_args([*flags, "--judge-max-pixels", "50176"]).judge_max_pixels == 50176  # flag wins
    monkeypatch.setenv("NPEDIT_JUDGE_MAX_PIXELS", "448x448")
    with pytest.raises(SystemExit, match="NPEDIT_JUDGE_MAX_PIXELS must be a whole number"):
        npedit_app.parse_args(flags)


@pytest.mark.parametrize("flags, says", [
    (["--port", "99999"], "error: --port must be between 1 and 65535, got 99999"),  # was bind()'s OverflowError
    (["--port", "0"], "error: --port must be between 1 and 65535, got 0"),  # was httpx's ConnectError traceback
    (["--runs", "afile"], "error: --runs afile is a file; give the folder training runs go in"),  # FileExistsError
    (["--device", "tpu"], "error: --device: unknown device 'tpu': use auto, cpu, cuda or cuda:N"),
])
def test_a_mistaken_flag_stops_the_app_before_it_builds(flags, says, tmp_path, monkeypatch, capsys):
    """argparse's line and status 2, before the UI is built (these were tracebacks at launch, or a torch error in the
    page on the first edit)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as exit_:
        npedit_app.parse_args(flags)
    assert exit_.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(says)


def test_missing_models_build_and_explain(tmp_path, monkeypatch, shapes_png):
    from npedit import assets

    for kind in ("DEFAULT_MODEL", "DEFAULT_JUDGE", "DEFAULT_TEACHER", "DEFAULT_CRITIC"):
        monkeypatch.setattr(assets, kind, tmp_path / "no-assets" / kind)
    for var in ("NPEDIT_MODEL", "NPEDIT_JUDGE", "NPEDIT_TEACHER", "NPEDIT_CRITIC"):
        monkeypatch.delenv(var, raising=False)
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    demo = npedit_app.build_demo(app)
    assert "No editor" in app.models.status() and "--model" in app.models.status()
    with pytest.raises(gr.Error, match="--model"):
        npedit_app.edit_handler(app)(str(shapes_png), "remove the circle")
    with pytest.raises(gr.Error, match="No editor"):  # a blank editor box means the default one
        npedit_app.edit_handler(app)(str(shapes_png), "remove the circle", editor="   ", progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="instruction"):
        npedit_app.edit_handler(app)(str(shapes_png), "  ")
    with pytest.raises(gr.Error, match="name it in \"Removed object\""):  # before any model is needed
        npedit_app.edit_handler(app)(str(shapes_png), "remove the circle", edit_type="remove")
    # the Judge tab's verdict and gradient maps say it in the same words (they named `object_name` and printed None)
    judge = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "judge")
    for ask in (judge, npedit_app.gradients_handler(app)):
        for spelt in ("remove", " Remove"):  # (an API caller's spelling too)
            with pytest.raises(gr.Error, match="A removal is judged by asking whether the removed object is still "
                                               "there: name it in \"Removed object\", or pick"):
                ask(str(shapes_png), str(shapes_png), "remove the circle", spelt, "  ")


def test_train_start_never_deletes_a_folder_it_did_not_create(tmp_path, shapes_png):
    """A run name that is an existing folder of runs (runs/shapes holding runs/shapes/npedit, as the CLI lays them
    out) is refused; a failed start used to remove that folder with everything in it."""
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    demo = npedit_app.build_demo(app)
    start = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_start")
    kept = tmp_path / "runs" / "shapes" / "npedit" / "config.yaml"
    kept.parent.mkdir(parents=True)
    kept.write_text("stage: npedit\n")
    table = pd.DataFrame([{"image": str(shapes_png), "instruction": "make it blue"}])
    with pytest.raises(gr.Error, match="a folder named 'shapes' exists already"):  # the preset's knobs by default
        start(table, {}, False, next(iter(presets.PRESETS)), "shapes", str(tmp_path / "no-teacher"), "", 0, "")
    assert kept.is_file()


def test_a_public_app_loads_and_reads_only_what_it_offers(tiny_set, tmp_path, monkeypatch, shapes_png):
    """In a Space (or with --public) strangers cannot make the server load a model path or hub id of their choosing,
    nor read its files through a batch list or a training table: only listed editors, uploads and the app's own
    generated examples."""
    from workbench import datasets, judging

    flags = tiny_flags(tiny_set, tmp_path / "runs")
    for var in ("SPACE_ID", "NPEDIT_PUBLIC"):
        monkeypatch.delenv(var, raising=False)
    assert not npedit_app.parse_args(flags).public
    monkeypatch.setenv("SPACE_ID", "someone/npedit")
    assert npedit_app.parse_args(flags).public and not npedit_app.parse_args([*flags, "--no-public"]).public
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")  # e.g. the owner's private Space
    assert not npedit_app.parse_args(flags).public
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    app = npedit_app.make_app(npedit_app.parse_args(flags))
    assert app.public
    with pytest.raises(gr.Error, match="This app is public: pick an editor from the list"):
        npedit_app.edit_handler(app)(str(shapes_png), "make the circle blue", inspect_steps=False,
                                     editor=str(tmp_path / "elsewhere"))
    with pytest.raises(gr.Error, match=r"at most 400 steps per edit over all candidates .*5 x 100 asked"):
        npedit_app.edit_handler(app)(str(shapes_png), "make the circle blue", inspect_steps=False, candidates=5,
                                     refine_steps=100)  # a stranger's one request holds the models that long

    class Loading(Exception):
        pass

    def loading(*a, **k):
        raise Loading

    for public, candidates in ((True, 4), (False, 5)):  # 400 is allowed; a local app has no such cap
        monkeypatch.setenv("NPEDIT_PUBLIC", "1" if public else "0")
        asked = npedit_app.make_app(npedit_app.parse_args(flags))
        monkeypatch.setattr(asked.models, "editor", loading)
        with pytest.raises(Loading):  # past the check: the editor loads
            npedit_app.edit_handler(asked)(str(shapes_png), "make the circle blue", inspect_steps=False,
                                           candidates=candidates, refine_steps=100,
                                           editor=asked.editor_choices()[0][1])
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    app = npedit_app.make_app(npedit_app.parse_args(flags))
    secret = tmp_path / "server" / "secret.png"
    secret.parent.mkdir()
    Image.new("RGB", (8, 8)).save(secret)
    listing = tmp_path / "up" / "pairs.jsonl"
    listing.parent.mkdir()
    listing.write_text(f'{{"reference": "{secret}", "edited": "scene.png", "instruction": "x"}}\n')
    with pytest.raises(ValueError, match="pairs.jsonl:1: .*secret.png is not among the uploaded files"):
        judging.read_pairs([listing, shapes_png], uploads_only=True)
    assert len(judging.read_pairs([listing, shapes_png])) == 1  # a local app reads what its user points at
    table = pd.DataFrame([{"image": str(secret), "instruction": "make it blue"}])
    with pytest.raises(ValueError, match="row 1: .*not among the uploaded files"):
        datasets.write_manifest(table, tmp_path / "m", within=[app.examples_dir])
    assert datasets.write_manifest(table, tmp_path / "m2").is_file()
    preset = next(iter(presets.PRESETS))
    for token, says in ((None, "training is off: its owner can set the Space secret NPEDIT_TRAIN_TOKEN"),
                        ("s3cret", "training needs its owner's training token")):
        if token:
            monkeypatch.setenv("NPEDIT_TRAIN_TOKEN", token)
        app = npedit_app.make_app(npedit_app.parse_args(flags))
        fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
        for call in (lambda: fns["on_start"](table, {}, False, preset, "run", tiny_set["teacher"], tiny_set["judge"],
                                             0, "", "wrong"),
                     lambda: fns["on_resume"]("run", "wrong"), lambda: fns["on_export"]("run", "wrong"),
                     lambda: fns["on_cancel"](str(tmp_path / "runs" / "run"), "wrong")):
            with pytest.raises(gr.Error, match=says):  # no stranger starts, resumes, exports or cancels a run
                call()
    with pytest.raises(gr.Error, match="This app is public: it trains from its own teacher and judge"):
        fns["on_start"](table, {}, False, preset, "run", str(tmp_path / "other-teacher"), tiny_set["judge"], 0, "",
                        "s3cret")  # the owner, with the token
    assert not (tmp_path / "runs" / "run").exists()


def test_an_upload_that_is_no_image_says_why(tmp_path, monkeypatch, shapes_png):
    """gradio opens an uploaded image before any handler runs: a file that is no image, or one too large for Pillow to
    open, showed a bare "Error" in the Edit and Judge tabs; now a message names the file and the reason (a file the
    server has removed since the page showed it: to upload it again)."""
    from gradio.data_classes import ImageData
    from PIL import Image as PILImage

    demo = npedit_app.build_demo(npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")])))
    uploads = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Image) and b.interactive is not False}
    assert {"Input image", "Reference", "Edited"} <= set(uploads)
    assert not (ROOT / "app.pyi").exists()  # (gradio writes one next to a module that subclasses a component)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    for image in uploads.values():
        assert image.preprocess(ImageData(path=str(shapes_png), orig_name="scene.png")) == str(shapes_png)
        with pytest.raises(gr.Error, match="cannot read notes.png as an image"):
            image.preprocess(ImageData(path=str(text), orig_name="notes.png"))
        # a page left open past the cache's cleanup: it said "cannot read ... as an image: upload a PNG, ..."
        with pytest.raises(gr.Error, match="photo.png is no longer on the server: .* Upload it again"):
            image.preprocess(ImageData(path=str(tmp_path / "gone" / "photo.png"), orig_name="photo.png"))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10)  # the 64x64 scene becomes a "decompression bomb"
    with pytest.raises(gr.Error, match="scene.png is too large: 4,096 pixels, more than the 20 an image may have"):
        uploads["Input image"].preprocess(ImageData(path=str(shapes_png), orig_name="scene.png"))


def test_an_uploaded_file_is_named_as_the_user_named_it(tiny_set, tmp_path, monkeypatch, shapes_png):
    """A message about an uploaded file names it by its own name, not by the server's copy in gradio's folder."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    copy = tmp_path / "uploads" / ("ab" * 32) / "trunc.png"
    copy.parent.mkdir(parents=True)
    copy.write_bytes(shapes_png.read_bytes()[:100])
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    with pytest.raises(gr.Error) as err:
        npedit_app.edit_handler(app)(str(copy), "make the circle blue", inspect_steps=False,
                                     progress=lambda *a, **k: None)
    assert "trunc.png" in err.value.message and str(tmp_path) not in err.value.message


def test_the_train_upload_names_each_file_it_left_out(tmp_path, monkeypatch):
    """Uploaded training images that cannot be read are left out of the table with a warning naming each (as the
    user named it) and why; every readable one gets its row, whatever its extension."""
    from workbench import datasets

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    folder = tmp_path / "uploads" / ("ab" * 32)
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 6), (200, 30, 30)).save(folder / "cat.jfif", "JPEG")
    (folder / "notes.png").write_text("not an image")
    (folder / "empty.jpg").write_bytes(b"")
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    paths = [str(folder / n) for n in ("cat.jfif", "notes.png", "empty.jpg")]
    with pytest.warns(UserWarning) as shown:
        table, uploads = fns["on_upload"](paths, datasets.empty_table())
    assert warned(shown)[0] == ("2 files left out of the table: notes.png: cannot read notes.png as an image: "
                                "cannot identify image file 'notes.png'; empty.jpg: empty.jpg is an empty file "
                                "(0 bytes)")
    assert list(table["image"]) == ["cat.jfif"] and set(uploads) == {"cat.jfif", "notes.png", "empty.jpg"}


def test_two_uploads_of_one_name_each_train_on_their_own_image(tmp_path, monkeypatch):
    """The Train tab's table showed each upload as the server's copy (/tmp/gradio/<64 hex digits>/photo.png), the
    widest column, and looked uploads up by base name: of two files named photo.png (from two folders, or added in
    two goes), both rows trained on the second. The table now shows the names the user gave, a second photo.png as
    "photo (2).png", and each row's image is its own."""
    from workbench import datasets

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    paths = []
    for k, colour in enumerate([(200, 0, 0), (0, 0, 200)]):
        folder = tmp_path / "uploads" / (f"{k}" * 64)
        folder.mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(folder / "photo.png")
        paths.append(str(folder / "photo.png"))
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    table, uploads = fns["on_upload"](paths, datasets.empty_table())
    assert list(table["image"]) == ["photo.png", "photo (2).png"]
    table["instruction"] = ["make it blue", "make it red"]
    manifest = datasets.write_manifest(table, tmp_path / "data", uploads)
    copied = sorted((manifest.parent / "images").iterdir())
    assert [Image.open(p).getpixel((0, 0)) for p in copied] == [(200, 0, 0), (0, 0, 200)]


def _local_train_tab(tiny_set, tmp_path, monkeypatch):
    """(uploads folder, the app's handlers by name) of a local app on the tiny models, its uploads under tmp_path."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    uploads = tmp_path / "uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    return uploads, {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}


def _uploaded(root: Path, name: str, content=None) -> str:
    """A file as gradio keeps an upload: in a folder of its own under the upload folder (named by a hash)."""
    folder = root / f"{abs(hash((name, str(content)))):064x}"[-64:]
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(content, tuple):
        Image.new("RGB", (8, 8), content).save(folder / name)
    else:
        (folder / name).write_text(content)
    return str(folder / name)


def test_a_manifest_uploaded_with_its_images_fills_the_train_table(tiny_set, tmp_path, monkeypatch):
    """A user with a cases.csv and its images had to type every row again. Uploaded together, the manifest fills the
    table, each image matched to an upload by its file name; rows whose image was not uploaded (a server file's path
    among them: a public app reads none) are left out, named with their lines; rows with something to fix are shown
    and named; Start trains on the uploads. Typed fixes survive adding the missing images; a new manifest wins."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    monkeypatch.setenv("NPEDIT_TRAIN_TOKEN", "s3cret")
    uploads = tmp_path / "uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "secret.png")  # the server's, beside no upload
    rows = ["image,instruction,edit_type,object_name,keep",
            'images/cat.png,"make the cat blue, all of it",recolor,,tree; house',
            r"images\dog.png,remove the dog,remove,,",  # written on Windows; object_name forgotten
            "images/cat.png,give the cat a hat,add,,",
            f"{tmp_path / 'secret.png'},make it red,,,",
            "images/bird.png,make the bird red,,,"]
    manifest = _uploaded(uploads, "cases.csv", "\n".join(rows) + "\n")
    images = [_uploaded(uploads, n, c) for n, c in (("cat.png", (200, 0, 0)), ("dog.png", (0, 0, 200)),
                                                     ("notes.png", (0, 200, 0)))]
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    with pytest.warns(UserWarning) as shown:
        table, names = fns["on_upload"]([manifest, *images], pd.DataFrame(), {})
    assert list(table["image"]) == ["cat.png", "dog.png", "cat.png"]
    assert list(table["instruction"]) == ["make the cat blue, all of it", "remove the dog", "give the cat a hat"]
    assert (table.loc[0, "edit_type"], table.loc[0, "keep"], table.loc[2, "edit_type"]) == ("recolor", "tree; house",
                                                                                          "add")
    messages = warned(shown)
    assert messages[0] == ("2 rows of cases.csv left out of the table, 2 images not uploaded: secret.png (line 5), "
                           "bird.png (line 6). Upload them too (with cases.csv).")
    assert messages[1] == "1 uploaded file not named in cases.csv, left out of the table: notes.png."
    assert messages[2] == ("cases.csv: 1 row to fix in the table before Start: line 3: edit_type 'remove' needs "
                           "object_name (what is removed)")
    assert not any(str(uploads) in m or str(tmp_path) in m for m in messages)  # names as the user knows them
    with pytest.raises(gr.Error, match="row 2: .*needs object_name"):
        fns["on_start"](table, names, False, next(iter(presets.PRESETS)), "run", tiny_set["teacher"],
                        tiny_set["judge"], 0, "", "s3cret")
    table.loc[1, "object_name"] = "dog"  # fixed in the table, then the bird's photo added to the upload
    bird = _uploaded(uploads, "bird.png", (200, 200, 0))
    with pytest.warns(UserWarning):
        again, names = fns["on_upload"]([manifest, *images, bird], table, names)
    assert list(again["image"]) == ["cat.png", "dog.png", "cat.png", "bird.png"]
    assert again.loc[1, "object_name"] == "dog"  # what was typed kept: the manifest is the same file
    launched = []
    monkeypatch.setattr(npedit_app.jobs, "start_job", lambda run_dir, args, **kw: launched.append(run_dir))
    fns["on_start"](again, names, False, next(iter(presets.PRESETS)), "run", tiny_set["teacher"], tiny_set["judge"],
                    0, "", "s3cret")
    data = launched[0] / "data"
    lines = [json.loads(x) for x in (data / "cases.jsonl").read_text().splitlines()]
    assert [x["instruction"] for x in lines][1:] == ["remove the dog", "give the cat a hat", "make the bird red"]
    colours = [Image.open(data / x["image"]).getpixel((0, 0)) for x in lines]
    assert colours == [(200, 0, 0), (0, 0, 200), (200, 0, 0), (200, 200, 0)]  # the uploads, never the server's file
    fixed = _uploaded(uploads, "cases.csv", rows[0] + "\nimages/cat.png,make the cat green,recolor,,\n")
    refilled = fns["on_upload"]([fixed, *images[:1]], again, names)[0]  # another manifest: its rows win
    assert list(refilled["image"]) == ["cat.png"] and list(refilled["instruction"]) == ["make the cat green"]


def test_a_train_upload_with_an_unreadable_or_second_manifest_says_why(tmp_path, monkeypatch):
    """A manifest that cannot be read is refused with its line; two manifests in one upload are refused by name."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    bad = _uploaded(tmp_path / "uploads", "cases.jsonl", '{"image": "a.png", "instruction": "x"}\n{"image": \n')
    other = _uploaded(tmp_path / "uploads", "more.csv", "image,instruction\na.png,y\n")
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    with pytest.raises(gr.Error) as err:
        fns["on_upload"]([bad], pd.DataFrame(), {})
    assert err.value.message.startswith("cases.jsonl:2: not valid JSON") and str(tmp_path) not in err.value.message
    with pytest.raises(gr.Error, match=r"upload one manifest with its images, not 2 \(cases.jsonl, more.csv\)"):
        fns["on_upload"]([bad, other], pd.DataFrame(), {})


def test_the_train_table_downloads_as_a_cases_csv_that_trains_and_fills_it_again(tmp_path, monkeypatch):
    """The table typed in the app can be reused: downloaded as cases.csv, it is a manifest the CLI reads from the
    folder holding its images, and uploaded again with them it fills the same table."""
    from npedit.data import load_manifest

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    images = [_uploaded(tmp_path / "uploads", n, c) for n, c in (("a.png", (200, 0, 0)), ("b.png", (0, 0, 200)))]
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    with pytest.raises(gr.Error, match="the training table is empty"):
        fns["on_download"](pd.DataFrame())
    table, _ = fns["on_upload"](images, pd.DataFrame(), {})
    table["instruction"] = ['paint the "big" square, then the circle', "remove the café sign"]
    table["edit_type"] = ["recolor", "remove"]
    table["object_name"] = ["", "café sign"]
    table["keep"] = ["circle; tree", ""]
    saved = Path(fns["on_download"](table))
    assert saved.name == "cases.csv" and saved.is_relative_to(tmp_path / "uploads")  # (a public app deletes it)
    mine = tmp_path / "mine"
    mine.mkdir()
    for image in images:
        shutil.copyfile(image, mine / Path(image).name)
    shutil.copyfile(saved, mine / "cases.csv")
    records = load_manifest(mine / "cases.csv", allow_outside_paths=False)
    assert [(r.image, r.instruction, r.edit_type, r.object_name, r.keep_names) for r in records] == [
        (str(mine / "a.png"), 'paint the "big" square, then the circle', "recolor", "", ["circle", "tree"]),
        (str(mine / "b.png"), "remove the café sign", "remove", "café sign", [])]
    again, _ = fns["on_upload"]([str(saved), *images], pd.DataFrame(), {})
    pd.testing.assert_frame_equal(again, table.astype(str))


def test_a_public_app_trains_on_its_generated_shapes_cases(tiny_set, tmp_path, monkeypatch):
    """The Train tab's generated Shapes cases are the app's own files, which a public app may train on (with its
    owner's token); they were refused as "not among the uploaded files"."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    monkeypatch.setenv("NPEDIT_TRAIN_TOKEN", "s3cret")
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    launched = []

    def start_job(run_dir, args, **kwargs):
        launched.append(args)
        raise npedit_app.jobs.JobBusy("the test launches nothing")

    monkeypatch.setattr(npedit_app.jobs, "start_job", start_job)
    table, names = fns["on_generate"](6, 0, "s3cret")
    with pytest.raises(gr.Error, match="the test launches nothing"):
        fns["on_start"](table, names, False, next(iter(presets.PRESETS)), "run", tiny_set["teacher"],
                        tiny_set["judge"], 0, "", "s3cret")
    assert len(launched) == 1


def test_generated_shapes_cases_show_their_names_and_train(tiny_set, tmp_path, monkeypatch):
    """The Train tab's table named each generated Shapes case by its file in the runs folder's staging area
    (/.../runs/.staging/shapes-0-6/images/shapes-0-00000.png), a path the user has no use for that filled the column.
    It shows the file name, as for uploads; Start maps it back, so the job still trains on those images, as Shapes
    cases."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    launched = []
    monkeypatch.setattr(npedit_app.jobs, "start_job", lambda run_dir, args, **kw: launched.append((run_dir, args)))
    table, names = fns["on_generate"](6, 0)
    assert list(table["image"]) == [f"shapes-0-{i:05d}.png" for i in range(6)]
    assert not any(str(tmp_path) in str(cell) for cell in table.to_numpy().ravel())
    fns["on_start"](table, names, False, next(iter(presets.PRESETS)), "run", tiny_set["teacher"], tiny_set["judge"],
                    0, "")
    (run_dir, args), = launched
    data = run_dir / "data"
    assert f"data.train={data / 'cases.jsonl'}" in args and len((data / "cases.jsonl").read_text().splitlines()) == 6
    assert sorted(p.name for p in (data / "images").iterdir())[0] == "00001_shapes-0-00000.png"
    assert (data / DOMAIN_FILE).is_file()  # its editor is recognised as a Shapes-world one


def test_two_starts_of_one_run_name_at_once_never_share_its_folder(tiny_set, tmp_path, monkeypatch):
    """Two visitors pressing Start with one run name at the same moment both passed the "exists already" check, and
    the second wrote its table into the first's data/ (the first's run then trained on the other's cases, or had its
    folder deleted by the other's failed start). The run folder is now taken in one step: the second start is told
    the name is taken, and the first run's data/ holds its own cases only."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    launched, pressed, second = [], [], []
    monkeypatch.setattr(npedit_app.jobs, "start_job", lambda run_dir, args, **kw: launched.append(run_dir))
    mine, my_names = fns["on_generate"](6, 0)
    theirs, their_names = fns["on_generate"](2, 1)
    start = (next(iter(presets.PRESETS)), "run", tiny_set["teacher"], tiny_set["judge"], 0, "")
    write_manifest = npedit_app.datasets.write_manifest

    def the_other_visitor_starts_meanwhile(*args, **kwargs):
        if not pressed:  # the first start is between its checks and its job: the second visitor presses Start
            pressed.append(True)
            try:
                second.append(fns["on_start"](theirs, their_names, False, *start)[0])
            except gr.Error as exc:
                second.append(exc.message)
        return write_manifest(*args, **kwargs)

    monkeypatch.setattr(npedit_app.datasets, "write_manifest", the_other_visitor_starts_meanwhile)
    fns["on_start"](mine, my_names, False, *start)
    run_dir = tmp_path / "runs" / "run"
    assert second == [f"a folder named 'run' exists already in {app.runs_folder()}: pick another name."], second
    assert launched == [run_dir]
    assert len((run_dir / "data" / "cases.jsonl").read_text().splitlines()) == 6


def test_generated_shapes_cases_of_a_day_ago_are_removed(tmp_path, monkeypatch):
    """Each Generate with a new seed or count wrote a folder of cases (up to 2,000 PNGs) under runs/.staging and kept
    it for good, though Start copies the cases into its run. Generating now removes the folders of a day ago."""
    import os

    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    generate = next(f.fn for f in npedit_app.build_demo(app).fns.values()
                    if getattr(f.fn, "__name__", "") == "on_generate")
    generate(6, 1)
    generate(6, 2)
    staging = tmp_path / "runs" / ".staging"
    day_ago = time.time() - npedit_app.LOCAL_CACHE_KEEP_S - 5
    os.utime(staging / "shapes-1-6", (day_ago, day_ago))
    table, names = generate(6, 3)
    assert sorted(p.name for p in staging.iterdir()) == ["shapes-2-6", "shapes-3-6"]
    assert all(Path(path).is_file() for path in names.values())


def test_start_on_a_page_that_outlived_its_files_says_to_upload_them_again(tiny_set, tmp_path, monkeypatch):
    """A local page left open over a day: the app's cleanup has removed its uploads (or its generated Shapes cases),
    or the server no longer holds the page's state (the names of its uploads). Start said "image not found:
    photo.png", or looked the name up in the server's working folder; it now refuses, naming the row and the file,
    and says to upload it again (or Generate again). No run folder is left and no job starts."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    uploads = tmp_path / "uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    monkeypatch.chdir(tmp_path)
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    launched = []
    monkeypatch.setattr(npedit_app.jobs, "start_job", lambda run_dir, args, **kw: launched.append(run_dir))
    start = [next(iter(presets.PRESETS)), "run", tiny_set["teacher"], tiny_set["judge"], 0, ""]
    files = [_uploaded(uploads, name, colour) for name, colour in (("cat.png", (200, 0, 0)), ("dog.png", (0, 0, 200)))]
    table, names = fns["on_upload"](files, pd.DataFrame(), {})
    table["instruction"] = ["make it blue", "make it red"]
    shutil.rmtree(Path(files[1]).parent)  # gradio's cache cleanup, a day after the upload
    with pytest.raises(gr.Error, match=r"row 2: dog\.png is no longer on the server: .* Upload the file again"):
        fns["on_start"](table, names, False, *start)
    with pytest.raises(gr.Error, match=r"row 1: cat\.png is not among the uploaded files: if you uploaded it, "
                                       r"upload it again \(a page left open for long can lose its uploads"):
        fns["on_start"](table, {}, False, *start)  # the page's state forgotten: gradio's fresh one
    generated, cases = fns["on_generate"](6, 0)
    shutil.rmtree(tmp_path / "runs" / ".staging")  # removed by another Generate a day later
    with pytest.raises(gr.Error, match=r"row 1: shapes-0-00000\.png is no longer on the server: .*press Generate"):
        fns["on_start"](generated, cases, False, *start)
    assert launched == [] and not (tmp_path / "runs" / "run").exists()


def test_no_training_starts_on_zerogpu(tmp_path, monkeypatch):
    """On ZeroGPU training is off: neither Start nor the Runs tab's Resume launches a job there."""
    monkeypatch.setattr(npedit_app, "ON_ZEROGPU", True)
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    demo = npedit_app.build_demo(app)
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    with pytest.raises(gr.Error, match="ZeroGPU"):
        fns["on_resume"]("some-run")
    with pytest.raises(gr.Error, match="ZeroGPU"):
        fns["on_start"](pd.DataFrame(), {}, True, next(iter(presets.PRESETS)), "run", "", "", 0, "")
    assert not (tmp_path / "runs" / "run").exists()


def test_a_port_in_use_is_one_line(tiny_set, tmp_path):
    """A second app on a port another one serves: gradio's OSError traceback ("Cannot find empty port ... passing the
    server_port parameter to launch()", code the user never calls); one line naming --port and --host now."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = npedit_app.parse_args([*tiny_flags(tiny_set, tmp_path / "runs"), "--port", str(port)])
        app = npedit_app.make_app(args)
        with pytest.raises(SystemExit, match=f"error: cannot serve on --host 127.0.0.1 --port {port}: the port is "
                                             "taken"):
            npedit_app.launch(npedit_app.build_demo(app), app, args, prevent_thread_lock=True, quiet=True)


def test_gradio_client_edit_and_judge(tiny_set, tmp_path, shapes_png):
    from gradio_client import Client, handle_file

    args = npedit_app.parse_args([*tiny_flags(tiny_set, tmp_path / "runs"), "--port", str(free_port())])
    app = npedit_app.make_app(args)
    demo = npedit_app.build_demo(app)
    _, url, _ = npedit_app.launch(demo, app, args, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(url, verbose=False)
        # the seven values /edit has always returned (the trace's zip comes after, in the page only)
        edited, before_after, seed, info, panel, table, gallery = client.predict(
            handle_file(str(shapes_png)), "remove the circle", api_name="/edit")
        out = Image.open(edited)
        assert out.format == "PNG" and out.size == (64, 64) and seed == 0
        assert "c^x" in info and len(table["data"]) == 4 and panel is not None
        again = client.predict(handle_file(str(shapes_png)), "remove the circle", api_name="/edit")
        assert np.array_equal(np.asarray(Image.open(again[0])), np.asarray(out))  # same default seed, same edit
        plain = client.predict(handle_file(str(shapes_png)), "remove the circle", 4, 0, False, "", "edit", "", False,
                               api_name="/edit")  # per-step analysis off: a plain pipeline call, same sampler and seed
        assert np.array_equal(np.asarray(Image.open(plain[0])), np.asarray(out)) and "off" in plain[3]
        assert gallery == []
        refined = client.predict(handle_file(str(shapes_png)), "remove the circle", 4, 0, False, "", "remove",
                                 "red circle", False, None, 1, "", 3, api_name="/edit")  # refined by the judge
        assert len(refined) == 7 and "over 3 steps" in refined[3] and len(refined[6]) == 2  # the seven values
        assert np.array_equal(np.asarray(Image.open(refined[6][0]["image"])), np.asarray(out))  # the editor's own
        assert np.array_equal(np.asarray(Image.open(refined[6][1]["image"])), np.asarray(Image.open(refined[0])))
        best = client.predict(handle_file(str(shapes_png)), "remove the circle", 4, 0, False, "", "remove",
                              "red circle", True, None, 3, "blue square", api_name="/edit")  # best of 3, a keep check
        shown = [np.asarray(Image.open(item["image"])) for item in best[6]]
        kept = [item for item in best[6] if "✓" in item["caption"]]
        assert len(shown) == 3 and len(kept) == 1 and "best of 3" in best[3] and best[4] is None
        assert np.array_equal(np.asarray(Image.open(kept[0]["image"])), np.asarray(Image.open(best[0])))
        assert any(not np.array_equal(shown[0], other) for other in shown[1:])  # different noise per candidate
        chosen = int(kept[0]["caption"].split("seed ")[1].split(" ")[0])  # candidate k: seed 0 + k
        assert [item["caption"].split(" · ")[1] for item in best[6]] == ["seed 0", "seed 1", "seed 2"]
        again = client.predict(handle_file(str(shapes_png)), "remove the circle", 4, chosen, False, "", "remove",
                               "red circle", False, None, 1, api_name="/edit")  # the kept one, as a single edit
        assert np.abs(np.asarray(Image.open(again[0]), dtype=int) - np.asarray(Image.open(best[0]), dtype=int)).max() <= 1
        randomized = client.predict(handle_file(str(shapes_png)), "remove the circle", 2, 0, True, api_name="/edit")
        assert isinstance(randomized[2], (int, float)) and len(randomized[5]["data"]) == 2
        verdict, questions = client.predict(handle_file(str(shapes_png)), handle_file(edited), "remove the circle",
                                            api_name="/judge")
        assert 0 < verdict["p_edit"] < 1 and 0 < verdict["p_identity"] < 1
        assert [row[0] for row in questions["data"]] == ["edit", "identity"]
        removal = client.predict(handle_file(str(shapes_png)), handle_file(edited), "remove the circle", "remove",
                                 "red circle", "Is the second image sharp? Answer with Yes or No.", api_name="/judge")
        assert [row[0] for row in removal[1]["data"]] == ["contains", "identity", "extra"]
        kept = client.predict(handle_file(str(shapes_png)), handle_file(edited), "remove the circle", "remove",
                              "red circle", "", "blue square", "", "green triangle", api_name="/judge")
        assert [row[0] for row in kept[1]["data"]] == ["contains", "identity", "keep", "change"]
        assert 0 < kept[0]["p_keep"] < 1 and 0 < kept[0]["p_change"] < 1
        listing = tmp_path / "pairs.csv"
        listing.write_text(f"reference,edited,instruction\n{shapes_png.name},{Path(edited).name},remove the circle\n")
        table, csv = client.predict([handle_file(str(listing)), handle_file(str(shapes_png)), handle_file(edited)],
                                    api_name="/judge_batch")  # the two values it has always returned
        assert len(table["data"]) == 1 and table["data"][0][-1] == "" and "p_edit" in Path(csv).read_text()
        saved = pd.read_csv(csv).loc[0]  # every digit, as /judge and the CLI give it; the table shows 6 decimals
        assert saved["p_edit"] == pytest.approx(verdict["p_edit"], abs=1e-7)
        assert table["data"][0][table["headers"].index("p_edit")] == round(saved["p_edit"], 6)
    finally:
        demo.close()


def test_judge_gradient_maps(tiny_set, tmp_path, shapes_png):
    """The inspector's gradient maps: a figure with the training signal and one column per question; a missing
    image or an unreadable file is a clear error."""
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    gradients = npedit_app.gradients_handler(app)
    other = tmp_path / "other.png"
    Image.open(shapes_png).rotate(90).save(other)
    fig = gradients(str(shapes_png), str(other), "remove the circle", "remove", "red circle",
                    "Is the second image sharp? Answer with Yes or No.", "blue square")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["training signal", "contains", "identity", "keep", "extra"]
    assert any("nudged" in ax.get_xlabel() for ax in fig.axes)
    with pytest.raises(gr.Error, match="both"):
        gradients(str(shapes_png), None, "remove the circle")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(gr.Error, match="cannot read"):
        gradients(str(shapes_png), str(broken), "remove the circle")


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> float:
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"app exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.time() - start
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer within {timeout} s")


def test_app_script_starts_offline_within_60s(tiny_set, tmp_path, shapes_png):
    """`python app.py` with no models at all answers and explains; with tiny models by flag it edits."""
    from gradio_client import Client, handle_file

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NPEDIT_ASSETS": str(tmp_path / "no-assets"),
           "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    for var in ("NPEDIT_MODEL", "NPEDIT_JUDGE", "NPEDIT_TEACHER", "NPEDIT_CRITIC"):
        env.pop(var, None)
    ports = free_port(), free_port()
    cmds = [[sys.executable, "app.py", "--port", str(ports[0]), "--runs", str(tmp_path / "runs0")],
            [sys.executable, "app.py", "--port", str(ports[1]), *tiny_flags(tiny_set, tmp_path / "runs1")]]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    try:
        for port, proc in zip(ports, procs):
            assert _wait_http(f"http://127.0.0.1:{port}/", proc, timeout=60) < 60
        with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/config", timeout=10) as r:
            config = r.read().decode()
        assert "No editor" in config and "--model" in config
        out = Client(f"http://127.0.0.1:{ports[1]}/", verbose=False).predict(
            handle_file(str(shapes_png)), "make the circle blue", api_name="/edit")
        assert Image.open(out[0]).size == (64, 64)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=20)


def test_the_edit_tabs_trace_download_holds_what_the_cli_traces(tiny_set, tmp_path, shapes_png, capsys):
    """The Edit tab's per-step trace downloads as a zip in gradio's cache (removed by its cleanup) and holds the files
    and numbers `python -m npedit edit --trace DIR` writes for the same edit: each step's x0, DMD map (.npy, .png),
    P(Yes) values, with the seed, steps, instruction and models (to 1e-5)."""
    import csv

    from gradio.utils import get_upload_folder

    from npedit.cli import main

    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    quiet = lambda *a, **k: None  # noqa: E731  (gr.Progress outside a request)
    out = npedit_app.edit_handler(app)(str(shapes_png), "make the circle blue", 3, 7, False, "a blue circle", "edit",
                                       "", True, None, 1, "", progress=quiet)
    download, table = Path(npedit_app.trace_download(out[8], None)[0]), out[5]
    assert download.suffix == ".zip" and download.resolve().is_relative_to(Path(get_upload_folder()).resolve())
    with zipfile.ZipFile(download) as z:
        z.extractall(tmp_path / "app")
    assert main(["edit", "--model", tiny_set["model"], "--judge", tiny_set["judge"], "--teacher", tiny_set["teacher"],
                 "--critic", tiny_set["critic"], "--image", str(shapes_png), "--instruction", "make the circle blue",
                 "--caption", "a blue circle", "--steps", "3", "--seed", "7", "--output", str(tmp_path / "cli.png"),
                 "--trace", str(tmp_path / "cli")]) == 0
    names = ["edited.png", "reference.png", "steps.csv", "trace.json",
             *[f"step-{n}-{kind}" for n in (1, 2, 3) for kind in ("dmd.npy", "dmd.png", "x0.png")]]
    assert sorted(os.listdir(tmp_path / "app")) == sorted(os.listdir(tmp_path / "cli")) == sorted(names)
    app_rec, cli_rec = (json.loads((tmp_path / d / "trace.json").read_text()) for d in ("app", "cli"))
    settings = ("instruction", "caption_target", "caption_from", "edit_type", "seed", "steps", "image_size",
                "cfg_scale", "dmd_t", "models")
    assert {k: app_rec[k] for k in settings} == {k: cli_rec[k] for k in settings}
    assert (app_rec["seed"], app_rec["steps"], app_rec["caption_target"]) == (7, 3, "a blue circle")
    assert app_rec["models"] == {k: tiny_set[k if k != "editor" else "model"]
                                 for k in ("editor", "judge", "teacher", "critic")}
    numbers = ("t", "p_edit", "p_identity", "dmd_mean", "dmd_max")
    for a, c, shown in zip(app_rec["steps_table"], cli_rec["steps_table"], table.to_dict("records")):
        assert all(a[k] is not None and a[k] == pytest.approx(c[k], abs=1e-5) for k in numbers), (a, c)
        assert shown["P(edit done)"] == pytest.approx(a["p_edit"], abs=1e-6)  # the table on the page, rounded
    with open(tmp_path / "app" / "steps.csv", newline="") as f:  # the CSV holds the JSON's numbers
        assert [float(r["p_edit"]) for r in csv.DictReader(f)] == [r["p_edit"] for r in app_rec["steps_table"]]
    for n in (1, 2, 3):
        maps = [np.load(tmp_path / d / f"step-{n}-dmd.npy") for d in ("app", "cli")]
        assert maps[0].shape == (8, 8) and np.allclose(*maps, atol=1e-5)
        x0s = [np.asarray(Image.open(tmp_path / d / f"step-{n}-x0.png")) for d in ("app", "cli")]
        assert x0s[0].shape == (64, 64, 3) and np.array_equal(*x0s)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cli.png")),
                          np.asarray(Image.open(tmp_path / "app" / "edited.png")))
    # without a critic (the tiny editor names none of its own) the CLI's trace says so and has no maps
    capsys.readouterr()
    assert main(["edit", "--model", tiny_set["model"], "--judge", tiny_set["judge"], "--teacher", tiny_set["teacher"],
                 "--image", str(shapes_png), "--instruction", "make the circle blue", "--steps", "1",
                 "--output", str(tmp_path / "one.png"), "--trace", str(tmp_path / "one.zip")]) == 0
    assert "no DMD maps: no critic" in capsys.readouterr().err
    with zipfile.ZipFile(tmp_path / "one.zip") as z:
        record = json.loads(z.read("trace.json"))
        assert "step-1-dmd.npy" not in z.namelist() and "step-1-x0.png" in z.namelist()
    assert record["dmd_note"].startswith("no critic") and record["models"]["critic"] is None
    assert 0 < record["steps_table"][0]["p_edit"] < 1
    # an earlier trace's zip is written over (a zip of other files is refused: tests/test_cli.py)
    assert main(["edit", "--model", tiny_set["model"], "--judge", tiny_set["judge"], "--teacher", tiny_set["teacher"],
                 "--image", str(shapes_png), "--instruction", "make the circle red", "--steps", "2",
                 "--output", str(tmp_path / "one.png"), "--trace", str(tmp_path / "one.zip")]) == 0
    with zipfile.ZipFile(tmp_path / "one.zip") as z:
        assert json.loads(z.read("trace.json"))["instruction"] == "make the circle red" and "step-2-x0.png" in z.namelist()



def test_the_trace_zip_is_written_after_the_edit_and_the_apis_keep_their_values(tiny_set, tmp_path, monkeypatch,
                                                                                shapes_png):
    """The trace's zip was written inside the edit (a GPU function: ~1.1-1.3 s of PNG encoding for a 1024-px trace,
    billed as GPU time on ZeroGPU, before the result showed) and returned as an eighth /edit value, as /judge_batch a
    third: a client unpacking the values it got before failed. The edit now returns the trace, a step after it zips
    it (deleting the session's previous zip: a local app's cache is never cleaned), and the APIs return what they
    did."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    returns = {name: [r["label"] for r in api["returns"]]
               for name, api in npedit_app.build_demo(app).get_api_info()["named_endpoints"].items()}
    assert len(returns["/edit"]) == 7 and returns["/edit"][-1].startswith("Candidates")
    assert returns["/judge_batch"] == ["Verdicts", "Download: a row per pair (CSV)"]
    quiet = lambda *a, **k: None  # noqa: E731  (gr.Progress outside a request)
    edit = npedit_app.edit_handler(app)
    out = edit(str(shapes_png), "make the circle blue", 2, 0, progress=quiet)
    assert not npedit_app.downloads_folder().exists()  # nothing written by the GPU function
    first, given, traced = npedit_app.trace_download(out[8], None)
    assert given == first and traced is None and zipfile.is_zipfile(first)
    second, given, _ = npedit_app.trace_download(edit(str(shapes_png), "make it blue", 2, 1, progress=quiet)[8], first)
    assert not Path(first).exists() and zipfile.is_zipfile(second)
    with zipfile.ZipFile(second) as z:
        assert json.loads(z.read("trace.json"))["seed"] == 1
    plain = edit(str(shapes_png), "make it blue", 2, 1, False, "", "edit", "", False, progress=quiet)
    assert plain[8] is None and npedit_app.trace_download(plain[8], given) == (None, None, None)
    assert list(npedit_app.downloads_folder().iterdir()) == []
    outside = tmp_path / "mine.zip"  # only the app's own downloads are deleted, whatever the state holds
    outside.write_bytes(b"x")
    npedit_app.trace_download(None, str(outside))
    assert outside.exists()

@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_edit_panel_and_candidates_with_other_judge_families(tiny_set, tmp_path, shapes_png, family):
    """The per-step panel and best-of-N run with a Qwen2.5-VL or InternVL3 judge as they do with LLaVA-OneVision."""
    from npedit.judges import JUDGES
    from npedit.judges import tiny

    judge_dir = {"internvl": tiny.build_tiny_internvl, "qwen2_5_vl": tiny.build_tiny_qwen2_5_vl}[family](tmp_path / family)
    flags = [*tiny_flags(tiny_set, tmp_path / "runs")]
    flags[flags.index("--judge") + 1] = judge_dir
    app = npedit_app.make_app(npedit_app.parse_args(flags))
    edit = npedit_app.edit_handler(app)
    quiet = lambda *a, **k: None  # noqa: E731  (gr.Progress outside a request)
    _, _, _, info, panel, table, *_ = edit(str(shapes_png), "remove the circle", progress=quiet)
    assert isinstance(app.models.judge(), JUDGES[family]) and panel is not None
    p_yes = [v for col, vals in table.items() if "P(" in col for v in vals]
    assert p_yes and all(0 < v < 1 for v in p_yes), table
    best = edit(str(shapes_png), "remove the circle", 4, 0, False, "", "remove", "red circle", True, None, 2,
                progress=quiet)
    assert len(best[6]) == 2 and "best of 2" in best[3]


@pytest.mark.parametrize("family", ["internvl", "llava_onevision", "qwen2_5_vl"])
def test_the_judge_inspector_saves_what_the_cli_prints(tiny_set, tmp_path, family, capsys):
    """With a judge folder of each family, the inspector's verdict downloads as JSON (it could only be read off the
    screen) holding the numbers and question texts `python -m npedit judge` prints for the same pair, the odd pair of
    an RGBA reference and a grayscale edit of another size included, and the free-form extra question (`--extra`)."""
    import json

    from npedit.cli import main
    from npedit.judges import load_judge, tiny
    from npedit.verdicts import judge_edit

    build = {"internvl": tiny.build_tiny_internvl, "llava_onevision": tiny.build_tiny_llava_onevision,
             "qwen2_5_vl": tiny.build_tiny_qwen2_5_vl}[family]
    judge_dir = build(tmp_path / family)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((40, 56, 4)) * 255).astype(np.uint8), "RGBA").save(tmp_path / "ref.png")
    Image.fromarray((rng.random((72, 48)) * 255).astype(np.uint8), "L").save(tmp_path / "edited.png")
    ref, edited = str(tmp_path / "ref.png"), str(tmp_path / "edited.png")
    flags = tiny_flags(tiny_set, tmp_path / "runs")
    flags[flags.index("--judge") + 1] = judge_dir
    demo = npedit_app.build_demo(npedit_app.make_app(npedit_app.parse_args(flags)))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    asked = ("make the circle blue", "edit", "", "Is it sharp? Answer with Yes or No.", "red square", "blue circle",
             "red circle")
    headline, table, report = fns["judge"](ref, edited, *asked)
    saved = json.loads(Path(fns["save_report"](report)[0]).read_text())
    assert main(["judge", "--judge", judge_dir, "--reference", ref, "--edited", edited, "--instruction", asked[0],
                 "--keep", "red square", "--new", "blue circle", "--gone", "red circle", "--extra", asked[3]]) == 0
    printed = json.loads(capsys.readouterr().out)
    direct = judge_edit(load_judge(judge_dir), ref, edited, asked[0], keep="red square", new="blue circle",
                        gone="red circle", extra=[asked[3]])
    assert [q["kind"] for q in saved["questions"]] == ["edit", "identity", "keep", "change", "change", "extra"]
    assert saved["questions"][0]["text"].count('"make the circle blue"') == 1
    assert saved["questions"][-1]["text"] == asked[3]  # a free-form question is asked as typed
    assert [q["text"] for q in saved["questions"]] == [q["text"] for q in printed["questions"]]  # --extra too
    for mine, cli in zip(saved["questions"], printed["questions"]):
        assert mine["p_yes"] == pytest.approx(cli["p_yes"], abs=1e-5) and mine["kind"] == cli["kind"]
    for key in ("p_edit", "p_identity", "p_keep", "p_change"):
        assert saved[key] == headline[key] and saved[key] == pytest.approx(printed[key], abs=1e-5), key
        assert saved[key] == pytest.approx(getattr(direct, key), abs=1e-5), key
    assert list(table["P(Yes)"]) == [round(q["p_yes"], 6) for q in saved["questions"]]
    assert fns["save_report"](None) == (None, None)


def test_taking_the_last_edit_into_the_judge_inspector_keeps_its_questions(tiny_set, tmp_path, shapes_png):
    """"Take the pair from the last edit" fills the inspector with the questions the candidates were judged with,
    the keep checks included (they were dropped: the inspector's verdict then lacked p_keep and differed from the
    candidate's score the Edit tab showed)."""
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    quiet = lambda *a, **k: None  # noqa: E731  (gr.Progress outside a request)
    best = npedit_app.edit_handler(app)(str(shapes_png), "remove the circle", 4, 0, False, "", "remove", "red circle",
                                        False, None, 2, "blue square; green triangle", progress=quiet)
    taken = fns["take_last"](best[7])
    assert taken[2:] == ("remove the circle", "remove", "red circle", "blue square; green triangle")
    headline, table, _ = fns["judge"](*taken[:5], "", taken[5])
    assert list(table["kind"]) == ["contains", "identity", "keep", "keep"] and 0 < headline["p_keep"] < 1
    score = next(label for _, label in best[6] if label.endswith("✓")).split(" · ")[-1].split()[0]
    from npedit.verdicts import judge_edit

    again = judge_edit(app.models.judge(), *taken[:3], edit_type="remove", object_name="red circle",
                       keep=taken[5])
    assert f"{again.score:.2f}" == score and again.p_keep == pytest.approx(headline["p_keep"], abs=1e-6)


def test_refine_with_the_judge_shows_the_refined_edit_beside_the_editors_own(tiny_set, tmp_path, shapes_png):
    """The Edit tab's "Refine with the judge": at 0 steps the edit is the plain one and nothing else shows; at K > 0
    the judge (loaded for it, as for verdicts) refines the edit: the result, the before/after slider and the pair the
    Judge inspector takes are the refined image, the editor's own edit is beside it in the gallery, the info says
    "judge loss a -> b over K steps" with the judge's verdict on both images, the progress bar moves through every
    refinement step, and the follow-up step draws the loss per step."""
    from npedit.verdicts import judge_edit
    from workbench import plots

    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    edit = npedit_app.edit_handler(app)
    seen = []
    progress = lambda fraction=None, desc=None: seen.append((fraction, desc))  # noqa: E731  (gr.Progress's call)
    asked = ("make the circle blue", 4, 3, False, "", "edit", "", False, None, 1, "")
    plain = edit(str(shapes_png), *asked, 0, progress=progress)
    assert plain[6] == [] and plain[9] is None and "Refined" not in plain[3]
    assert not any("refin" in d for _, d in seen) and npedit_app.refine_view(plain[9]).visible is False
    assert "judge" not in [kind for kind, _ in app.models._cache]  # a plain edit without analysis loads no judge
    seen.clear()
    out = edit(str(shapes_png), *asked, 5, progress=progress)
    assert "judge" in [kind for kind, _ in app.models._cache]
    (start, start_label), (shown, shown_label) = out[6]
    assert np.array_equal(np.asarray(start), np.asarray(plain[0]))  # beside it: the editor's own edit, same seed
    assert np.array_equal(np.asarray(shown), np.asarray(out[0])) and shown_label.endswith("✓")
    assert not np.array_equal(np.asarray(out[0]), np.asarray(plain[0]))  # the result shown is the refined one
    assert out[1][1] is out[0] and out[7]["edited"] is out[0]  # before/after and the Judge inspector's pair
    losses = out[9]
    assert len(losses) == 6 and all(np.isfinite(losses))
    caption = f"judge loss {losses[0]:.3f} -> {losses[-1]:.3f} over 5 steps"
    assert caption in out[3] and f"judge loss {losses[0]:.3f}" in start_label
    refined_verdict = judge_edit(app.models.judge(), str(shapes_png), out[0], "make the circle blue")
    assert f"| **refined ✓** (shown) | {refined_verdict.score:.2f} | {refined_verdict.p_edit:.3f} |" in out[3]
    steps_seen = [d.split(",")[0] for _, d in seen if d.startswith("refining")]
    assert steps_seen == [f"refining with the judge: step {k}/5" for k in range(6)]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0  # one bar: the edit's half, then the refinement's
    view = npedit_app.refine_view(losses)
    assert view.visible is True and view.value is not None
    figure = plots.refine_figure(losses)
    (line,) = figure.axes[0].get_lines()
    assert list(line.get_ydata()) == losses and list(line.get_xdata()) == list(range(6))
    assert figure.axes[0].get_title() == caption == plots.refine_caption(losses)
    traced = edit(str(shapes_png), *asked[:7], True, None, 1, "", 2, progress=progress)  # with per-step analysis
    assert traced[4] is not None and len(traced[5]) == 4 and traced[6][0][1].startswith("the editor's edit")
    assert np.array_equal(np.asarray(traced[6][0][0]), np.asarray(plain[0])) and "over 2 steps" in traced[3]
    assert "the step panel above shows the sampling steps it started from" in traced[3]
    assert "sampling steps it started from" not in out[3]  # (no per-step analysis there)
    # refined from the traced sampling itself (not sampled a second time): what the same refinement gives alone
    untraced = edit(str(shapes_png), *asked, 2, progress=progress)
    assert np.array_equal(np.asarray(traced[0]), np.asarray(untraced[0])) and traced[9] == untraced[9]
    trace, _ = traced[8]
    assert trace.refinement.image is traced[0] and trace.refinement.losses == traced[9]
    with zipfile.ZipFile(npedit_app.trace_download(traced[8], None)[0]) as z:  # the download holds the refinement
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(z.read("refined.png")))), np.asarray(traced[0]))
        assert json.loads(z.read("trace.json"))["refinement"]["losses"] == traced[9]
    # the advanced boxes reach the refinement: another learning rate or anchor, another result, said in the info
    for lr, anchor in ((0.2, 1.0), (0.05, 50.0)):
        other = edit(str(shapes_png), *asked, 5, lr, anchor, progress=progress)
        assert f"(lr {lr:g}, anchor {anchor:g})" in other[3] and other[9] != losses
        assert np.array_equal(np.asarray(other[6][0][0]), np.asarray(plain[0]))  # the same edit to start from


def test_refine_with_the_judge_refuses_in_words_what_it_cannot_do(tiny_set, tmp_path, shapes_png):
    """A refinement asked with bad settings (a cleared box, a learning rate of 0, a negative anchor,
    more steps than the slider's cap) or a judge the app cannot load is refused with a message saying what to do;
    an empty instruction or a removal with no object keep their own messages."""
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    edit = npedit_app.edit_handler(app)
    quiet = lambda *a, **k: None  # noqa: E731  (gr.Progress outside a request)
    image = str(shapes_png)
    for args, says in (((image, "make it blue", 4, 0, False, "", "edit", "", False, None, 1, "", 3, 0.0),
                        "learning rate must be in"),
                       ((image, "make it blue", 4, 0, False, "", "edit", "", False, None, 1, "", 3, None),
                        "Give the refinement learning rate"),
                       ((image, "make it blue", 4, 0, False, "", "edit", "", False, None, 1, "", 3, 0.05, -1.0),
                        "anchor must be"),
                       ((image, "make it blue", 4, 0, False, "", "edit", "", False, None, 1, "", 101),
                        "from 0 to 100, got 101"),
                       ((image, "make it blue", 4, 0, False, "", "edit", "", False, None, 2, "", -3),
                        "from 0 to 100, got -3"),  # the count named, not a clash with Candidates
                       ((image, "make it blue", 4, 0, False, "", "edit", "", False, None, 1, "", 2.7),
                        "whole number"),
                       ((image, "  ", 4, 0, False, "", "edit", "", False, None, 1, "", 3), "Type an instruction"),
                       ((image, "remove it", 4, 0, False, "", "remove", "", False, None, 1, "", 3), "name it in")):
        with pytest.raises(gr.Error, match=says):
            edit(*args, progress=quiet)
    off = edit(image, "make it blue", 4, 0, False, "", "edit", "", False, None, 1, "", 0, None, None, progress=quiet)
    assert off[9] is None  # refinement off: its cleared boxes are not read
    flags = tiny_flags(tiny_set, tmp_path / "runs")
    flags[flags.index("--judge") + 1] = str(tmp_path / "no-judge")
    judgeless = npedit_app.edit_handler(npedit_app.make_app(npedit_app.parse_args(flags)))
    assert judgeless(image, "make it blue", 4, 0, False, "", "edit", "", False, None, 1, "", 0,
                     progress=quiet)[9] is None  # no refinement: no judge needed
    with pytest.raises(gr.Error, match="no-judge"):
        judgeless(image, "make it blue", 4, 0, False, "", "edit", "", False, None, 1, "", 3, progress=quiet)


def test_the_space_installs_what_the_app_needs_and_nothing_for_tests():
    """A Space builds from the README's front matter and requirements.txt: its Gradio version is the pinned one, its
    app file exists, and the test-only packages live in requirements-dev.txt (which CI installs) instead."""
    import re

    front = (ROOT / "README.md").read_text().split("---")[1]
    meta = dict(re.findall(r"^(\w+):\s*\"?([^\"\n]*)\"?$", front, re.M))
    runtime = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    pins = dict(line.split("==") for line in runtime if "==" in line)
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == pins["gradio"] == gr.__version__
    assert (ROOT / meta["app_file"]).is_file()
    names = {re.split(r"[=<>\[ ]", line)[0].lower() for line in runtime}
    assert not names & {"pytest", "playwright"}, "test-only packages belong in requirements-dev.txt"
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev and {"pytest", "playwright"} <= {re.split(r"[=<>]", d)[0] for d in dev}
    assert "requirements-dev.txt" in (ROOT / ".ci/run").read_text()


def test_a_public_app_generates_training_cases_only_with_the_token(tmp_path, monkeypatch):
    """Generate writes up to 1,000 PNGs into runs/.staging/shapes-SEED-N, a new folder for every seed: a stranger
    calling it (the event is reachable over HTTP even with the Start button off) filled the disk. In a public app
    it needs the training token, as the training it prepares does."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    monkeypatch.delenv("NPEDIT_TRAIN_TOKEN", raising=False)
    for token, says in ((None, "training is off"), ("s3cret", "training needs its owner's training token")):
        if token:
            monkeypatch.setenv("NPEDIT_TRAIN_TOKEN", token)
        app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
        fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
        for given in (None, "wrong"):
            with pytest.raises(gr.Error, match=says):
                fns["on_generate"](6, 1234, given)
    assert not (tmp_path / "runs" / ".staging").exists()
    assert len(fns["on_generate"](6, 1234, "s3cret")[0]) == 6  # the owner
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")  # a local app generates as before, no token asked
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "local")]))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    assert len(fns["on_generate"](6, 0)[0]) == 6
    with pytest.raises(gr.Error, match="The seed is a whole number from 0 to"):
        fns["on_generate"](6, -1)


def test_a_public_app_judges_a_bounded_batch(tmp_path, monkeypatch, shapes_png):
    """A batch list is a few bytes a row: a 20 MB CSV naming two uploaded images half a million times held the judge
    (shared with /edit and /judge, one call at a time) for hours. A public app judges at most MAX_BATCH_PAIRS pairs
    per list; a local one any number."""
    monkeypatch.setattr(npedit_app, "MAX_BATCH_PAIRS", 2)
    listing = tmp_path / "pairs.csv"
    listing.write_text("reference,edited,instruction\n" + f"{shapes_png.name},{shapes_png.name},make it blue\n" * 3)
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    app.models.judge = lambda: pytest.fail("the judge was asked about a list over the limit")
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    with pytest.raises(gr.Error, match="pairs.csv lists 3 pairs: this public app judges at most 2 per list"):
        fns["judge_batch"]([str(listing), str(shapes_png)], progress=lambda *a, **k: None)
    from workbench import judging

    assert len(judging.read_pairs([listing, shapes_png], uploads_only=True)) == 3  # no limit unless asked


def test_an_upload_is_named_as_the_user_named_it_on_windows_too(monkeypatch):
    """A message names an upload by its own name, not by gradio's copy of it; on Windows that copy's path is written
    with backslashes (C:\\...\\gradio\\<hash>\\photo.png), which only a '/' was looked for between."""
    import gradio.utils

    folder = r"C:\Users\me\AppData\Local\Temp\gradio"
    monkeypatch.setattr(gradio.utils, "get_upload_folder", lambda: folder)
    text = rf"cannot read {folder}\{'ab' * 32}\photo.png as an image"
    assert npedit_app._for_user(text) == "cannot read photo.png as an image"
    assert npedit_app._for_user(f"{folder}/{'ab' * 32}/photo.png") == "photo.png"


def test_a_run_name_becomes_a_folder_name_every_os_accepts():
    """The Train tab's run name is its folder's name: a time with ':' or a '/' is turned into '-', and Windows'
    device names (con, aux, nul, com1, lpt1..., with any extension), which no folder can have there, get '-run'
    before the first dot ('Aux.v2-run' was still the device AUX there: Windows reads the name up to its first dot)."""
    from npedit.files import windows_name_problem

    assert npedit_app._slug("my run: 12/05 ") == "my-run-12-05"
    names = ("con", "Aux.v2", "nul", "COM1", "lpt9", "nul.tar.gz")
    assert [npedit_app._slug(n) for n in names] == [
        "con-run", "Aux-run.v2", "nul-run", "COM1-run", "lpt9-run", "nul-run.tar.gz"]
    assert [windows_name_problem(npedit_app._slug(n)) for n in names] == [None] * len(names)
    assert [npedit_app._slug(n) for n in ("console", "com10", "aux-2", "...")] == ["console", "com10", "aux-2", ""]


def test_the_app_names_batch_images_as_uploaded_not_by_server_path(tiny_set, tmp_path, monkeypatch, shapes_png):
    """An image of a batch list that cannot be read was named in the verdicts table and CSV by gradio's copy of it
    (/tmp/gradio/<hash>/trunc.png), a path the user never chose: the app, public or local, names it as the list
    does."""
    uploads = tmp_path / "gradio" / ("ab" * 32)
    uploads.mkdir(parents=True)
    (uploads / "scene.png").write_bytes(shapes_png.read_bytes())
    (uploads / "trunc.png").write_bytes(shapes_png.read_bytes()[:100])
    (uploads / "notes.png").write_text("not an image")
    listing = uploads / "pairs.csv"
    listing.write_text("reference,edited,instruction\nscene.png,trunc.png,make it blue\n"
                       "notes.png,scene.png,make it blue\nscene.png,scene.png,make it blue\n")
    files = [str(listing), *(str(uploads / n) for n in ("scene.png", "trunc.png", "notes.png"))]
    for public in ("1", "0"):
        monkeypatch.setenv("NPEDIT_PUBLIC", public)
        app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
        fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
        table, csv, _ = fns["judge_batch"](files, progress=lambda *a, **k: None)
        errors = list(table["error"])
        assert "trunc.png" in errors[0] and "notes.png" in errors[1] and errors[2] == "", errors
        assert not [e for e in errors if str(tmp_path) in e] and str(tmp_path) not in Path(csv).read_text()
        assert errors[0].startswith("cannot read trunc.png as an image"), errors[0]


def _pair_list(path: Path, pairs: list[dict]) -> Path:
    """A pair list as the CLI and the app's Batch list read it: CSV (a list becomes its text) or JSON lines."""
    if path.suffix == ".csv":
        pd.DataFrame(pairs).to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return path


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_the_app_and_the_cli_judge_a_batch_list_into_the_same_rows(tiny_set, tmp_path, monkeypatch, shapes_png, kind):
    """`npedit judge --batch` read JSON lines only, needed an id, wrote p_* only and left a failing pair out of its
    file (stderr only); the app's batch read CSV too, numbered pairs itself and had no question rows. One builder
    (npedit.pairs) serves both now: the same list gives the same two files, byte for byte, but for an error, which the
    app words naming the image as the list does (a local app named gradio's copy of the upload)."""
    from npedit.cli import main

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    Image.open(shapes_png).rotate(90).save(tmp_path / "edited.png")
    (tmp_path / "trunc.png").write_bytes(shapes_png.read_bytes()[:100])
    pairs = [{"reference": "scene.png", "edited": "edited.png", "instruction": "make the circle blue"},
             {"id": "r", "reference": "scene.png", "edited": "edited.png", "instruction": "remove the circle",
              "edit_type": "remove", "object_name": "red circle", "keep": "blue square"},
             {"reference": "scene.png", "edited": "trunc.png", "instruction": "make it blue"}]
    listing = _pair_list(tmp_path / f"pairs.{kind}", pairs)
    cli = [tmp_path / "cli" / "verdicts.csv", tmp_path / "cli" / "questions.csv"]
    assert main(["judge", "--judge", tiny_set["judge"], "--batch", str(listing), "--output", str(cli[0]),
                 "--questions", str(cli[1])]) == 1  # the unreadable pair
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    files = [str(listing), *(str(tmp_path / n) for n in ("scene.png", "edited.png", "trunc.png"))]
    table, *shown = fns["judge_batch"](files, progress=lambda *a, **k: None)
    for ours, theirs in zip(cli, shown):  # the same rows, an error naming the image as the list does (the CLI: its path)
        assert str(tmp_path / "trunc.png") in ours.read_text() and str(tmp_path) not in Path(theirs).read_text()
        assert Path(theirs).read_text() == ours.read_text().replace(str(tmp_path / "trunc.png"), "trunc.png")
    verdicts, asked = (pd.read_csv(path, dtype=str, keep_default_na=False) for path in cli)
    assert list(verdicts["id"]) == (["2", "r", "4"] if kind == "csv" else ["1", "r", "3"])  # default: the line
    assert list(verdicts["edited"]) == ["edited.png", "edited.png", "trunc.png"] == list(table["edited"])
    assert verdicts.loc[2, "p_edit"] == "" and "trunc.png" in verdicts.loc[2, "error"]
    assert list(asked["kind"]) == ["edit", "identity", "contains", "identity", "keep", ""]
    assert set(asked["reference"]) == {"scene.png"} and asked["error"].iloc[-1] == verdicts.loc[2, "error"]
    main(["judge", "--judge", tiny_set["judge"], "--batch", str(listing), "--output", str(tmp_path / "v.jsonl")])
    lines = [json.loads(line) for line in (tmp_path / "v.jsonl").read_text().splitlines()]
    assert [line["p_edit"] for line in lines] == [float(verdicts.loc[0, "p_edit"]), float(verdicts.loc[1, "p_edit"]),
                                                    None]  # every digit, as in the CSV


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_a_batch_lists_extra_column_asks_each_pair_its_own_questions(tiny_set, tmp_path, monkeypatch, shapes_png,
                                                                    kind):
    """`judge --extra` was refused with --batch and a list had no column for them: a pair list's `extra` (a JSON list,
    or questions separated by ';', their own commas kept) is asked of its pair, in the CLI and the app's Batch list
    alike, and --extra with --batch is asked of every pair after its own."""
    from npedit.cli import main

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    Image.open(shapes_png).rotate(90).save(tmp_path / "edited.png")
    sharp, blue = "Is the second image sharp, without artifacts? Answer with Yes or No.", "Is the circle blue?"
    pairs = [{"id": "a", "reference": "scene.png", "edited": "edited.png", "instruction": "make the circle blue",
              "extra": [sharp, blue] if kind == "jsonl" else f"{sharp}; {blue}"},
             {"id": "b", "reference": "scene.png", "edited": "edited.png", "instruction": "make the circle blue"}]
    listing = _pair_list(tmp_path / f"pairs.{kind}", pairs)
    cli = [tmp_path / "cli" / "verdicts.csv", tmp_path / "cli" / "questions.csv"]
    assert main(["judge", "--judge", tiny_set["judge"], "--batch", str(listing), "--output", str(cli[0]),
                 "--questions", str(cli[1])]) == 0
    asked = pd.read_csv(cli[1], dtype=str, keep_default_na=False)
    assert list(asked["kind"]) == ["edit", "identity", "extra", "extra", "edit", "identity"]
    assert list(asked.loc[asked["kind"] == "extra", "question"]) == [sharp, blue]
    assert set(asked.loc[asked["kind"] == "extra", "id"]) == {"a"}
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    _, *shown = fns["judge_batch"]([str(listing), str(tmp_path / "scene.png"), str(tmp_path / "edited.png")],
                                   progress=lambda *a, **k: None)
    assert Path(shown[1]).read_text() == cli[1].read_text()  # the app's Batch list asks the same questions
    assert main(["judge", "--judge", tiny_set["judge"], "--batch", str(listing), "--output", str(cli[0]),
                 "--questions", str(cli[1]), "--extra", "Is it square?"]) == 0
    asked = pd.read_csv(cli[1], dtype=str, keep_default_na=False)
    assert list(asked.loc[asked["kind"] == "extra", "question"]) == [sharp, blue, "Is it square?", "Is it square?"]


def test_downloads_are_written_where_a_public_apps_cleanup_removes_them(tiny_set, tmp_path, monkeypatch,
                                                                         shapes_png):
    """The verdict JSON and the batch CSVs were written to /tmp/npedit-verdict(s)-*: gradio served a copy from its
    cache, which delete_cache removed an hour on, and the originals stayed until the disk was full. They are written
    into gradio's cache now, served as they are, and removed with the app's other results."""
    from gradio.processing_utils import move_files_to_cache
    from gradio.route_utils import delete_files_created_by_app

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    demo = npedit_app.build_demo(app)
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    files = [b for b in demo.blocks.values() if isinstance(b, gr.File) and (b.label or "").startswith("Download")]

    def download(label):
        return next(b for b in files if b.label.startswith(label))

    listing = tmp_path / "pairs.csv"
    listing.write_text(f"reference,edited,instruction\n{shapes_png.name},{shapes_png.name},make it blue\n")
    _, verdicts, questions = fns["judge_batch"]([str(listing), str(shapes_png)], progress=lambda *a, **k: None)
    written = {download("Download (JSON"): fns["save_report"]({"instruction": "make it blue", "p_edit": 0.5})[0],
               download("Download: a row per pair"): verdicts, download("Download: a row per question"): questions}
    for block, path in written.items():
        served = move_files_to_cache(block.postprocess(path), block, postprocess=True)
        assert served["path"] == path  # not a copy: the file gradio's cleanup removes is the one written
    delete_files_created_by_app(demo, age=None)
    assert not [path for path in written.values() if Path(path).exists()]


def test_a_local_apps_downloads_older_than_an_hour_are_removed(tmp_path, monkeypatch):
    """Only a public app has gradio clean its cache, so a local app kept every verdict, batch CSV and cases.csv it
    ever wrote. Making a download now removes the downloads (and exact-name folders) older than an hour first."""
    import os

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    old_file, recent = npedit_app.download_path("verdict.json"), npedit_app.download_path("verdicts.csv")
    old_folder = npedit_app.download_path("cases.csv", exact=True)
    hour_ago = time.time() - npedit_app.DOWNLOADS_KEEP_S - 5
    for path in (old_file, old_folder, old_folder.parent):
        os.utime(path, (hour_ago, hour_ago))
    new = npedit_app.download_path("trace.zip")
    assert not old_file.exists() and not old_folder.parent.exists()
    assert recent.exists() and new.exists()


def test_a_session_keeps_one_verdict_file_however_often_it_asks(tmp_path, monkeypatch):
    """Every answer of the Judge inspector wrote a new verdict JSON and kept the older ones for an hour: a session
    asking 100 times left 100 files in the downloads folder. Like the trace zip, each answer now deletes the session's
    previous verdict file (held in a state); another session's stays."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    demo = npedit_app.build_demo(npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")])))
    event = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "save_report")
    assert isinstance(event.inputs[1], gr.State) and event.outputs[1] is event.inputs[1]  # the state it rewrites
    mine = other = None
    other, other = event.fn({"instruction": "theirs"}, other)
    for k in range(30):
        shown, mine = event.fn({"instruction": "make it blue", "p_edit": k / 30}, mine)
    assert sorted(p.name for p in npedit_app.downloads_folder().iterdir()) == sorted([Path(mine).name,
                                                                                       Path(other).name])
    assert json.loads(Path(shown).read_text())["p_edit"] == 29 / 30 and shown == mine
    assert event.fn(None, mine) == (None, None) and not Path(mine).exists() and Path(other).exists()


def test_an_app_deletes_old_uploads_and_results(tmp_path, monkeypatch):
    """Anyone can POST files (up to 20 MB each) to /gradio_api/upload without calling any event, and every result
    is cached: without gradio's delete_cache they stayed in its folder until the disk was full. A public app deletes
    its uploads and results an hour after they were written. A local app kept them for good: a lab server's cache
    grew with every edit (its input, its result); it deletes them a day after they were written."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    frequency, age = npedit_app.build_demo(app).delete_cache
    assert 0 < frequency <= age <= 3600
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    frequency, age = npedit_app.build_demo(app).delete_cache
    assert 0 < frequency <= 3600 < age <= 86400


def test_the_server_keeps_the_state_of_a_bounded_number_of_sessions(tmp_path, monkeypatch):
    """Every page view is a session whose copy of the UI's config (~0.3 MB for this one) gradio keeps, closed or not,
    up to its default of 10,000: a Space's memory grew with its visitors for weeks. The app serves with a capacity of
    SESSIONS_KEPT; the least recently used go first."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    args = npedit_app.parse_args(["--runs", str(tmp_path / "runs"), "--port", str(free_port())])
    app = npedit_app.make_app(args)
    demo = npedit_app.build_demo(app)
    npedit_app.launch(demo, app, args, prevent_thread_lock=True, quiet=True)
    try:
        holder = demo.server_app.state_holder
        for k in range(npedit_app.SESSIONS_KEPT + 20):
            holder[f"visitor-{k}"]  # (what any event of a new page view does first)
        assert len(holder.session_data) == npedit_app.SESSIONS_KEPT <= 1000
        assert "visitor-0" not in holder and f"visitor-{npedit_app.SESSIONS_KEPT + 19}" in holder
    finally:
        demo.close()


def test_the_soak_script_reports_what_a_long_lived_app_holds(tmp_path, monkeypatch):
    """scripts/app_soak.py drives the handlers with the bundled models and measures the process after each part: what
    the README's figures come from. A short run: two sessions' edits keep two trace zips, one inspecting session one
    verdict, and the server at most SESSIONS_KEPT sessions."""
    import tempfile

    from script_modules import load_script

    for name in ("TMPDIR", "GRADIO_TEMP_DIR", "NPEDIT_PUBLIC"):  # (the script sets them; restored after)
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setattr(npedit_app, "SESSIONS_KEPT", 4)
    out = tmp_path / "soak.json"
    assert load_script("app_soak").main(["--edits", "4", "--sessions", "2", "--inspections", "3", "--jobs", "0",
                                         "--views", "1", "--visitors", "9", "--rounds", "1", "--json", str(out)]) == 0
    rows = {r["phase"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["warm", "edits 4/4", "inspections 3/3", "runs 1/1", "visitors 9/9"]
    assert rows["edits 4/4"]["downloads"] == 2 and rows["inspections 3/3"]["downloads"] == 3
    assert rows["visitors 9/9"]["sessions_held"] == 4 and rows["runs 1/1"]["pyplot_figures"] == 0
    assert all(r["fds"] > 0 and r["threads"] > 0 and r["rss_mb"] > 0 for r in rows.values())


def test_a_public_app_serves_no_file_of_its_runs_folder(tmp_path, monkeypatch, shapes_png):
    """A run folder holds the owner's training images, manifest and checkpoints: a public app does not hand its files
    out by URL (a stranger could guess runs/<name>/data/cases.jsonl); it sends a run's sample images themselves."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    assert str(app.runs_root) not in npedit_app.served_paths(app)
    shown = npedit_app._shown(app, [str(shapes_png)])
    assert isinstance(shown, Image.Image) and shown.size == Image.open(shapes_png).size
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    assert str(app.runs_root) in npedit_app.served_paths(app) and npedit_app._shown(app, [str(shapes_png)]) == str(
        shapes_png)


def _a_run(root: Path) -> Path:
    """A finished run folder as the trainer leaves it: config, metrics, a sample grid, a log and the job record."""
    import json

    run = root / "mine"
    (run / "samples").mkdir(parents=True)
    (run / "config.yaml").write_text("stage: npedit\nmax_steps: 2\ndata:\n  train: /home/owner/private/cases.jsonl\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "student_loss": 1.0}\n{"step": 2, "student_loss": 0.5}\n')
    Image.new("RGB", (16, 8), (200, 10, 10)).save(run / "samples" / "step_000002.png")
    (run / "train.log").write_text("reading /home/owner/private/cases.jsonl\n")
    (run / "job.json").write_text(json.dumps({"pid": 2**22 + 7, "device": "cpu", "started": time.time() - 5}))
    (run / "exit_code").write_text("1\n")
    return run


def test_a_public_app_shows_runs_only_to_the_owner(tmp_path, monkeypatch):
    """Every visitor of a public app saw the Runs tab (table, curves, config differences, sample grids) and the Train
    tab's status, log and latest sample: samples can show the owner's training images, configs and logs their paths.
    Now every handler that reads the runs folder (page load, the timer, refresh, compare, samples) shows them only to
    whoever typed the training token, and says so otherwise; those events take the token box, since anyone can send
    them over HTTP. A local app shows them as before."""
    run = _a_run(tmp_path / "runs")
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    monkeypatch.setenv("NPEDIT_TRAIN_TOKEN", "s3cret")
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    demo = npedit_app.build_demo(app)
    token = next(b for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.type == "password")
    assert token.visible
    readers = {"on_load", "on_tick", "on_refresh", "on_compare", "on_samples", "on_sample"}
    wired = [f for f in demo.fns.values() if getattr(f.fn, "__name__", "") in readers]
    assert {f.fn.__name__ for f in wired} == readers and all(token in f.inputs for f in wired)
    assert all(f.api_visibility == "private" for f in wired)
    fns = {f.fn.__name__: f.fn for f in wired}
    notice = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "runs-notice")
    assert "Training token" in notice.value and str(app.runs_root) not in notice.value  # no server path either
    for given, says in ((None, "shown only to its owner: type the training token"), ("wrong", "not this app's")):
        run_dir, status, curves, sample, log, timer = fns["on_load"](given)
        assert run_dir is None and says in status and (curves, sample, log) == (None, None, "") and not timer.active
        status, curves, sample, log, timer, _ = fns["on_tick"](str(run), None, given)
        assert says in status and (curves, sample, log) == (None, None, "") and not timer.active
        shown, table, selected, keys, one = fns["on_refresh"](["mine"], given)
        assert says in shown and table.empty and selected.choices == [] and one.choices == []
        figure, bars, comparison = fns["on_compare"](["mine"], ["student_loss"], given)
        assert bars is None and comparison.empty
        step, grid, note = fns["on_samples"]("mine", given)
        assert step.choices == [] and grid["value"] is None and fns["on_sample"]("mine", "step 2", given) is None
        assert "sample_every" not in note  # (nothing said of the run either)
    run_dir, status, curves, sample, log, _ = fns["on_load"]("s3cret")  # the owner
    assert run_dir == str(run.resolve()) and "mine" in status
    # the last job is finished, so no timer tick draws it: typing the token (or loading the page) does
    assert isinstance(sample, Image.Image) and "private/cases.jsonl" in log and curves is not None
    load = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_load")
    shown_by_load = [getattr(b, "label", None) for b in load.outputs[2:5]]
    assert shown_by_load == ["Loss curves", "Latest samples (reference | edit)", "Log (tail)"]
    status, curves, sample, log, _, _ = fns["on_tick"](run_dir, None, "s3cret")
    assert isinstance(sample, Image.Image) and "private/cases.jsonl" in log and curves is not None
    shown, table, selected, _, _ = fns["on_refresh"](None, "s3cret")
    assert list(table["run"]) == ["mine"] and selected.value == ["mine"] and str(app.runs_root) in shown
    assert "mine" in fns["on_compare"](["mine"], ["student_loss"], "s3cret")[2].value["headers"]
    step, grid, _ = fns["on_samples"]("mine", "s3cret")
    assert step.value == "step 2" and len(step.choices) == 1 and isinstance(grid["value"], Image.Image)
    monkeypatch.delenv("NPEDIT_TRAIN_TOKEN")  # no token set: nobody sees them, and the message says how
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    assert "can set the Space secret NPEDIT_TRAIN_TOKEN" in app.runs_hidden("anything")
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")  # a local app: no token asked, the box hidden
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    demo = npedit_app.build_demo(app)
    assert not next(b for b in demo.blocks.values() if isinstance(b, gr.Textbox) and b.type == "password").visible
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    assert fns["on_load"]("")[0] == str(run.resolve())
    assert fns["on_samples"]("mine", "")[1]["value"] == str(run / "samples" / "step_000002.png")
    assert fns["on_sample"]("mine", "step 2", "") == str(run / "samples" / "step_000002.png")
    assert fns["on_sample"]("mine", "/etc/passwd", "") is None  # only the run's own grids, whatever the event says


def test_a_grid_cut_short_does_not_break_the_train_or_runs_tab(tmp_path, monkeypatch):
    """A run of a version that wrote grids in place, killed mid-write, left a cut samples/step_N.png: a public app's
    Train tab failed on every tick (status, curves and log with it) and its Runs tab on picking the run; a local one
    showed a broken image. Both show the newest grid that opens whole; a cut one picked by hand is a short warning."""
    run = _a_run(tmp_path / "runs")
    whole = run / "samples" / "step_000002.png"
    (run / "samples" / "step_000003.png").write_bytes(whole.read_bytes()[:len(whole.read_bytes()) // 2])
    (run / "samples" / "step_000004.png").write_bytes(b"not a png")
    monkeypatch.setenv("NPEDIT_TRAIN_TOKEN", "s3cret")
    for public in ("1", "0"):
        monkeypatch.setenv("NPEDIT_PUBLIC", public)
        app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
        fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
        _, status, curves, sample, log, _ = fns["on_load"]("s3cret")
        step, grid, _ = fns["on_samples"]("mine", "s3cret")
        assert step.value == "step 2" and [c for c, _ in step.choices] == ["step 4", "step 3", "step 2"]
        assert grid["visible"]
        for shown in (sample, grid["value"]):
            if public == "1":
                assert isinstance(shown, Image.Image) and shown.getpixel((0, 0)) == (200, 10, 10)
            else:
                assert shown == str(whole)
        assert "mine" in status and curves is not None and "private/cases.jsonl" in log
        with pytest.warns(UserWarning, match="step 3 .*cut short or unreadable"):
            assert fns["on_sample"]("mine", "step 3", "s3cret") is None


def _call_event(url: str, fn_index: int, data: list) -> str:
    """Call a UI event over HTTP the way the browser does (queue/join, then its event stream); the raw output."""
    import json

    import httpx

    httpx.post(f"{url}gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": "probe",
                                                    "event_data": None, "trigger_id": None}, timeout=30)
    with httpx.stream("GET", f"{url}gradio_api/queue/data", params={"session_hash": "probe"}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and json.loads(line[5:]).get("msg") == "process_completed":
                return line
    raise AssertionError("the event stream ended without a result")


def test_a_public_app_limits_what_each_client_uploads(tmp_path, monkeypatch, capsys):
    """Anyone could POST 20 MB files to /gradio_api/upload (up to 1,000 per request) over and over and fill the disk
    within the hour before they are deleted. A public app takes at most --upload-mb-per-hour from one client (its
    address as the proxy forwards it; an address it writes itself to the left does not make it another client):
    over it, 429 with a message and Retry-After; one body over it alone, 413; a body of unknown length, 411; an
    upload that would leave under --upload-min-free-mb free, 507. Events stay open to anyone and say nothing of the
    runs. A local app has no limit."""
    import httpx

    from workbench import uploads

    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    monkeypatch.setenv("NPEDIT_TRAIN_TOKEN", "s3cret")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    assert npedit_app.parse_args([]).upload_mb_per_hour == 200 and npedit_app.parse_args([]).upload_min_free_mb == 1024
    monkeypatch.setenv("NPEDIT_UPLOAD_MB_PER_HOUR", "50")  # a Space variable; the flag wins over it
    assert npedit_app.parse_args([]).upload_mb_per_hour == 50
    assert npedit_app.parse_args(["--upload-mb-per-hour", "0"]).upload_mb_per_hour == 0
    monkeypatch.setenv("NPEDIT_UPLOAD_MB_PER_HOUR", "lots")
    with pytest.raises(SystemExit, match="NPEDIT_UPLOAD_MB_PER_HOUR must be a number of MB"):
        npedit_app.parse_args([])
    monkeypatch.delenv("NPEDIT_UPLOAD_MB_PER_HOUR")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        npedit_app.parse_args(["--upload-min-free-mb", "-1"])
    assert "error: --upload-min-free-mb must be >= 0 (0: no limit), got -1" in capsys.readouterr().err
    _a_run(tmp_path / "runs")
    args = npedit_app.parse_args(["--runs", str(tmp_path / "runs"), "--port", str(free_port()),
                                  "--upload-mb-per-hour", "0.1", "--upload-min-free-mb", "1"])
    app = npedit_app.make_app(args)
    demo = npedit_app.build_demo(app)
    _, url, _ = npedit_app.launch(demo, app, args, prevent_thread_lock=True, quiet=True)
    blob = b"x" * 60_000  # 0.1 MB = 104,857 bytes: one such upload passes, a second does not

    def upload(client: str, data: bytes = blob):
        return httpx.post(f"{url}gradio_api/upload", files={"files": ("blob.bin", data)},
                          headers={"X-Forwarded-For": client}, timeout=30)

    try:
        first = upload("8.8.8.8")
        assert first.status_code == 200 and Path(first.json()[0]).read_bytes() == blob
        second = upload("8.8.8.8")
        assert second.status_code == 429 and "0.1 MB per client per hour" in second.text
        assert 0 < int(second.headers["retry-after"]) <= 3601
        assert upload("9.9.9.9, 8.8.8.8").status_code == 429  # the proxy appends the address it saw
        assert upload("1.1.1.1").status_code == 200  # another client has its own budget
        assert upload("1.0.0.1", b"x" * 120_000).status_code == 413
        twice = [("X-Forwarded-For", "8.8.8.8"), ("X-Forwarded-For", "8.8.4.4")]  # one list: 8.8.4.4 is the client
        assert httpx.post(f"{url}gradio_api/upload", files={"files": ("b", blob)}, headers=twice).status_code == 200
        chunked = httpx.post(f"{url}gradio_api/upload", content=iter([b"--x\r\n"]), timeout=30,
                             headers={"content-type": "multipart/form-data; boundary=x"})
        assert chunked.status_code == 411
        monkeypatch.setattr(uploads, "_free_bytes", lambda folder: uploads.MB)  # 1 MB free, the floor asked for
        full = httpx.post(f"{url}gradio_api/upload", files={"files": ("a.bin", b"x")}, timeout=30)
        assert full.status_code == 507 and "disk is nearly full" in full.text
        monkeypatch.undo()  # (the environment too: the app has read it)
        refresh = next(k for k, f in demo.fns.items() if getattr(f.fn, "__name__", "") == "on_refresh")
        assert "shown only to its owner" in _call_event(url, refresh, [None, ""])  # as a browser sends it
    finally:
        demo.close()
    args = npedit_app.parse_args(["--runs", str(tmp_path / "runs"), "--port", str(free_port()), "--no-public",
                                  "--upload-mb-per-hour", "0.1"])
    app = npedit_app.make_app(args)
    demo = npedit_app.build_demo(app)
    _, url, _ = npedit_app.launch(demo, app, args, prevent_thread_lock=True, quiet=True)
    try:
        assert [upload("8.8.8.8").status_code for _ in range(3)] == [200] * 3
    finally:
        demo.close()


def test_no_plot_label_hides_its_figure():
    """gradio draws a plot's label over the top left of its figure: the Judge inspector's gradient maps had a
    two-line explanation as label, which covered the column titles (training signal, edit, identity) and the colour
    bar's caption. No plot shows its label: each has a heading above it instead."""
    demo = npedit_app.build_demo(npedit_app.make_app(npedit_app.parse_args([])))
    plots = [b for b in demo.blocks.values() if isinstance(b, gr.Plot)]
    assert "Gradient maps" in [b.label for b in plots]
    assert [b.label for b in plots if b.show_label] == []


def test_a_run_without_sample_grids_says_why_in_place_of_an_empty_box(tmp_path, monkeypatch):
    """A run with no sample grid showed an empty image box under an empty "Sample grid" menu, and nothing said why.
    Now the box is hidden and the line above it says how often the trainer writes one (sample_every) and where the run
    stands, or that it writes none; a run with grids shows its newest under the usual heading."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    root = tmp_path / "runs"
    _a_run(root)  # a grid at step 2
    for name, every in (("fresh", 500), ("silent", 0)):
        (root / name).mkdir()
        (root / name / "config.yaml").write_text(f"stage: npedit\nmax_steps: 2000\nsample_every: {every}\n")
    (root / "fresh" / "metrics.jsonl").write_text('{"step": 120, "student_loss": 1.0}\n')
    (root / "starting").mkdir()
    (root / "starting" / "job.json").write_text("{}")  # the trainer has written no config.yaml yet
    demo = npedit_app.build_demo(npedit_app.make_app(npedit_app.parse_args(["--runs", str(root)])))
    samples = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_samples")
    assert [getattr(b, "elem_id", None) for b in samples.outputs[1:]] == ["run-sample", "run-sample-note"]
    heading = samples.outputs[2].value
    step, grid, note = samples.fn("fresh", "")
    assert step.choices == [] and grid == {"__type__": "update", "value": None, "visible": False}
    assert note == ("**Sample grid**: this run has written no sample grid yet: the trainer writes one every 500 steps "
                    "(`sample_every`), the first at step 500; the run is at step 120.")
    assert "writes no sample grids: it was started with `sample_every=0`" in samples.fn("silent", "")[2]
    assert samples.fn("starting", "")[2] == "**Sample grid**: this run has written no sample grid yet."
    (root / "fresh" / "pipeline").mkdir()  # it ended at step 120 with its editor saved: no grid will come ("yet")
    (root / "fresh" / "pipeline" / "model_index.json").write_text("{}")
    assert samples.fn("fresh", "")[2] == ("**Sample grid**: this run wrote no sample grid: it ended at step 120, "
                                          "before the first (the trainer writes one every 500 steps, `sample_every`).")
    step, grid, note = samples.fn("mine", "")
    assert step.value == "step 2" and grid["visible"] and grid["value"].endswith("step_000002.png")
    assert note == heading and "reference | edit" in heading
    assert samples.fn(None, "")[1]["visible"] and samples.fn(None, "")[2] == heading  # no run picked: as before


def test_the_runs_folder_is_named_from_the_working_directory(tmp_path, monkeypatch):
    """The Runs tab named its folder by its whole path (`Runs under /home/me/src/npedit/runs`, in the screenshot
    `/tmp/pytest-of-root/...`). A folder below the working directory is named as the user typed it (`runs`); one
    elsewhere keeps its whole path."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    monkeypatch.chdir(tmp_path)

    def notice(runs_arg):
        demo = npedit_app.build_demo(npedit_app.make_app(npedit_app.parse_args(["--runs", runs_arg])))
        return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "runs-notice").value

    assert notice("runs").startswith("Runs under `runs`:")
    assert notice(str(tmp_path / "group" / "shapes")).startswith(f"Runs under `{Path('group') / 'shapes'}`:")
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")  # the runs folder beside, not below, the working directory
    assert notice("../runs").startswith(f"Runs under `{tmp_path / 'runs'}`:")


def test_hidden_runs_show_no_placeholder_columns(tmp_path, monkeypatch):
    """A visitor of a public app without the token saw the Runs tab's two tables headed "1 | 2 | 3", gradio's
    placeholder for a table without columns, which read like data. They keep named, empty columns."""
    _a_run(tmp_path / "runs")
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    monkeypatch.setenv("NPEDIT_TRAIN_TOKEN", "s3cret")
    demo = npedit_app.build_demo(npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")])))
    fns = {getattr(f.fn, "__name__", ""): f for f in demo.fns.values()}
    refresh, compare = fns["on_refresh"], fns["on_compare"]
    runs_table, comparison = refresh.outputs[1], compare.outputs[2]
    placeholder = gr.Dataframe().postprocess(None).headers
    for component, value in ((runs_table, refresh.fn(None, "")[1]), (comparison, compare.fn(["mine"], [], "")[2]),
                             (comparison, compare.fn([], [], "s3cret")[2])):
        assert component.postprocess(value).headers not in (placeholder, [])
        assert component.value["headers"] != placeholder and value.empty


def test_a_local_app_answers_only_its_own_pages(tmp_path, monkeypatch):
    """A web page open in the same browser could send requests to the local app, and by DNS rebinding (its own name
    resolving to 127.0.0.1) read the answers too: gradio answered any Host and let such a page read them, so it could
    fetch the runs folder's files and call every event. An app on a loopback address now refuses a request for
    another name (403) and one sent by another site's page; its own pages, the gradio client and a public app (a
    Space, served under its own domain) are unaffected."""
    import httpx

    from workbench.origins import is_loopback, refusal

    run = _a_run(tmp_path / "runs")
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    args = npedit_app.parse_args(["--runs", str(tmp_path / "runs"), "--port", str(free_port())])
    app = npedit_app.make_app(args)
    demo = npedit_app.build_demo(app)
    _, url, _ = npedit_app.launch(demo, app, args, prevent_thread_lock=True, quiet=True)
    port = url.rstrip("/").rsplit(":", 1)[1]
    config = f"{url}gradio_api/file={run / 'config.yaml'}"
    on_load = next(k for k, f in demo.fns.items() if getattr(f.fn, "__name__", "") == "on_load")
    join = {"data": [""], "fn_index": on_load, "session_hash": "probe", "event_data": None, "trigger_id": None}
    try:
        rebound = httpx.get(config, headers={"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"})
        assert rebound.status_code == 403 and "loopback" in rebound.text
        cross = httpx.post(f"{url}gradio_api/queue/join", json=join, headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403
        assert httpx.post(f"{url}gradio_api/upload", files={"files": ("a.png", b"x")},
                          headers={"Origin": "null"}).status_code == 403  # a sandboxed frame's form
        own = {"Origin": url.rstrip("/")}
        assert httpx.get(config, headers=own).text.startswith("stage: npedit")
        assert httpx.get(config, headers={"Host": f"localhost:{port}"}).status_code == 200
        assert httpx.post(f"{url}gradio_api/queue/join", json=join, headers=own).status_code == 200
        assert "**mine**" in _call_event(url, on_load, [""])  # no Origin: the gradio client
    finally:
        demo.close()
    args = npedit_app.parse_args(["--runs", str(tmp_path / "runs"), "--port", str(free_port()),
                                  "--allow-host", "Me-7860.IDE.example"])
    app = npedit_app.make_app(args)
    demo = npedit_app.build_demo(app)
    _, url, _ = npedit_app.launch(demo, app, args, prevent_thread_lock=True, quiet=True)
    try:
        via_proxy = {"Host": "me-7860.ide.example", "Origin": "https://me-7860.ide.example"}
        assert httpx.get(f"{url}gradio_api/info", headers=via_proxy).status_code == 200
        assert httpx.get(f"{url}gradio_api/info", headers={"Host": "evil.example"}).status_code == 403
    finally:
        demo.close()
    assert all(map(is_loopback, ["localhost", "app.localhost", "127.0.0.2", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["evil.example", "127.0.0.1.evil.example", "0.0.0.0", "10.0.0.1", ""]))
    assert refusal({"host": "[::1]:7860", "origin": "http://localhost:7860"}) is None
    assert refusal({"host": "127.0.0.1:7860", "origin": "http://127.0.0.1.nip.io:7860"}) is not None
    # a proxy the user vouched for (--allow-host: a notebook's or a cloud IDE's port forwarding), and no other
    forwarded = {"host": "me-7860.ide.example", "origin": "https://me-7860.ide.example"}
    assert "--allow-host me-7860.ide.example" in refusal(forwarded)
    assert refusal(forwarded, frozenset({"me-7860.ide.example"})) is None
    assert refusal({**forwarded, "origin": "http://evil.example"}, frozenset({"me-7860.ide.example"})) is not None
    monkeypatch.setenv("NPEDIT_ALLOW_HOSTS", "a.example, b.example")
    assert npedit_app.parse_args(["--allow-host", "c.example"]).allow_host == ["a.example", "b.example", "c.example"]
    monkeypatch.delenv("NPEDIT_ALLOW_HOSTS")
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")  # a Space: its proxy's Host is its domain
    args = npedit_app.parse_args(["--runs", str(tmp_path / "runs"), "--port", str(free_port())])
    app = npedit_app.make_app(args)
    demo = npedit_app.build_demo(app)
    _, url, _ = npedit_app.launch(demo, app, args, prevent_thread_lock=True, quiet=True)
    try:
        assert httpx.get(f"{url}gradio_api/info", headers={"Host": "someone-npedit.hf.space"}).status_code == 200
    finally:
        demo.close()


def _editor_status(demo):
    """The Edit tab's status event: what the page shows of the editor its Editor box names."""
    editor = next(b for b in demo.blocks.values() if isinstance(b, gr.Dropdown) and b.label == "Editor")
    return next(f.fn for f in demo.fns.values() if editor in f.inputs and f.api_visibility == "private"
                and getattr(f.fn, "__name__", "") != "refresh_list")


def test_a_public_app_describes_only_the_editors_it_lists(tmp_path, monkeypatch):
    """The Edit tab's editor box sends its value to a status event whenever it changes, and anyone can send that event
    with any text: a public app described whatever path it was given, so a stranger learnt which folders exist on
    the server ("does not exist" or not) and read an editor folder's training config (its data path). A public app
    now describes only the editors it lists; a local one describes any path, as before."""
    secret = tmp_path / "owner" / "private-editor"
    secret.mkdir(parents=True)
    (secret / "config.yaml").write_text("data: {train: /home/owner/photos/cases.jsonl}\n")
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    demo = npedit_app.build_demo(app)
    status = _editor_status(demo)
    said = {status(str(p)) for p in (secret, tmp_path / "nothing-here", "/etc")}
    assert len(said) == 1 and "pick an editor from the list" in said.pop()
    assert "**Editor:**" in status(app.editor_choices()[0][1])  # the bundled editor, listed
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")]))
    demo = npedit_app.build_demo(app)
    status = _editor_status(demo)
    assert "training run folder" in status(str(secret))


def test_wide_tables_keep_their_columns_readable(tmp_path):
    """The Judge inspector's table and the Runs tab's config differences sized their columns by their content: the
    question ran off the right edge (its header "expected" split in two) and a long path pushed the second run's
    column off. Both now give every column a fixed share; the runs table (many columns) scrolls sideways instead of
    wrapping its headers letter by letter ("ma x_ st ep s"), its metrics first, so they show without scrolling."""
    from npedit.verdicts import Verdict
    from workbench import judging, runs

    demo = npedit_app.build_demo(npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")])))
    tables = {b.elem_id: b for b in demo.blocks.values() if isinstance(b, gr.Dataframe)}
    question = {"kind": "edit", "p_yes": 0.5, "margin": 0.0, "p_yes_or_no": 0.9, "expected": "Yes",
                "images": ["edited"], "text": "?"}
    columns = judging.verdict_table(Verdict(p_edit=0.5, p_identity=0.5, questions=[question])).columns
    assert len(tables["verdict-table"].column_widths) == len(columns)
    assert len(tables["runs-comparison"].column_widths) == 4  # the key and the three runs picked by default
    assert not tables["runs-table"].wrap and tables["runs-table"].pinned_columns == 1
    _a_run(tmp_path / "runs")
    header = list(runs.runs_table(tmp_path / "runs").columns)
    assert header[:4] == ["run", "status", "step", "student_loss"] and "path" not in header


def test_config_differences_of_up_to_eight_runs_fit_the_width(tmp_path, monkeypatch):
    """The Runs tab's config differences gave each compared run a fixed 26% of the width: a fourth run ran off the
    right edge and the table scrolled sideways. Runs now share what the key column leaves, so up to eight fit side
    by side (their values wrap); more keep eight runs' share and scroll."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    for k in range(10):
        run = tmp_path / "runs" / f"ablation-{k}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"stage: npedit\noptim:\n  lr: {k + 1}.0e-05\n")
    demo = npedit_app.build_demo(npedit_app.make_app(npedit_app.parse_args(["--runs", str(tmp_path / "runs")])))
    compare = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_compare")
    table = compare.outputs[2]

    def widths(n):
        shown = compare.fn([f"ablation-{k}" for k in range(n)], ["student_loss"], None)[2]
        columns = shown.value["headers"] if isinstance(shown, gr.Dataframe) else list(shown.columns)
        given = (shown.column_widths if isinstance(shown, gr.Dataframe) else None) or table.column_widths
        assert len(columns) == n + 1 and len(given) >= n + 1
        return [float(w.rstrip("%")) for w in given[:n + 1]]

    for n in range(1, 9):
        assert sum(widths(n)) <= 100.01, n
    assert widths(8)[1] > 9.5 and widths(10)[1:] == widths(8)[1:2] * 10  # beyond eight: the same share, scrolling
    assert widths(2)[1] == 26.0  # two runs are not stretched over the whole width


def test_a_public_app_names_no_server_path_in_the_editor_list_or_status(tiny_set, tmp_path, monkeypatch, shapes_png):
    """The Edit tab's editor list and status line showed server paths ("bundled editor: /home/user/app/assets/...",
    the judge's, teacher's and critic's folders). A public app shows paths relative to its folder (or to the runs
    folder's parent), else names alone, and its choices' values are their labels, mapped back to paths on the
    server; a local app shows and sends full paths, as before."""

    from npedit import assets

    shutil.copytree(tiny_set["model"], _a_run(tmp_path / "runs") / "pipeline")
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    demo = npedit_app.build_demo(app)
    status = _editor_status(demo)
    first_status = next(b for b in demo.blocks.values() if isinstance(b, gr.Markdown)
                        and "**Editor:**" in str(b.value))
    choices = app.editor_choices()
    assert [c[1] for c in choices] == [c[0] for c in choices]  # values are labels, not paths
    assert choices[0][0] == f"started with: {Path(tiny_set['model']).name}"
    assert any(label.endswith(": assets/shapes/editor") for label, _ in choices) == \
        (assets.PAIR_FREE_MODEL / "model_index.json").is_file()  # bundled: relative to the app's folder
    assert ("run: mine", "run: mine") in choices
    said = [first_status.value, *(status(value) for _, value in choices)]
    server = (str(tmp_path), str(npedit_app.APP_DIR), "/home/owner")
    assert not [text for text in said + [str(choices)] if any(root in text for root in server)], said
    assert "**Editor:** `runs/mine/pipeline`" in status("run: mine")
    assert app.editor_path("run: mine") == str(tmp_path / "runs" / "mine" / "pipeline")
    assert app.editor_path(tiny_set["model"]) == tiny_set["model"]  # a listed path (the Train tab's student)
    assert app.editor_path(str(tmp_path / "elsewhere")) is None
    edited, *_ = npedit_app.edit_handler(app)(str(shapes_png), "make the circle blue", inspect_steps=False,
                                              editor="run: mine", progress=lambda *a, **k: None)
    assert edited.size == Image.open(shapes_png).size
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    assert app.editor_choices()[0] == (f"started with: {tiny_set['model']}", tiny_set["model"])
    assert f"**Editor:** `{tiny_set['model']}`" in app.models.status(tiny_set["model"], shown=app.shown)


def test_a_public_apps_train_tab_shows_no_server_path_and_trains_from_its_own_models(tiny_set, tmp_path,
                                                                                   monkeypatch):
    """The Train tab's Teacher, Judge and Student boxes showed a public app's server paths to every visitor. They
    show them as the Edit tab does (relative to the app's folder or the runs folder's parent, else names alone), and
    Start maps what they show (or an editor's list label) back to the app's own paths."""
    from workbench import jobs

    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    monkeypatch.setenv("NPEDIT_TRAIN_TOKEN", "s3cret")
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    demo = npedit_app.build_demo(app)
    boxes = {b.label.split(" (")[0]: b.value for b in demo.blocks.values() if isinstance(b, gr.Textbox)
             and b.label.startswith(("Teacher", "Judge (", "Start the student"))}
    assert set(boxes) == {"Teacher", "Judge", "Start the student from"}
    assert not [v for v in boxes.values() if str(tmp_path) in v or "/" in v], boxes  # names alone here
    started = {}

    def start_job(run_dir, args, **kwargs):
        started.update(arg.split("=", 1) for arg in args if "=" in arg)
        raise jobs.JobBusy("stop here")  # (what start_job raises is shown as the error; nothing is launched)

    monkeypatch.setattr(jobs, "start_job", start_job)
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    table = pd.DataFrame([{"image": str(sorted(app.examples_dir.rglob("*.png"))[0]), "instruction": "make it blue"}])
    for student in (boxes["Start the student from"], app.editor_choices()[0][0]):  # as shown, or a list label
        started.clear()
        with pytest.raises(gr.Error, match="stop here"):
            fns["on_start"](table, {}, False, next(iter(presets.PRESETS)), "run", boxes["Teacher"], boxes["Judge"], 0,
                            student, "s3cret")
        assert (started["model.base"], started["judge.path"], started["model.student"]) == (
            tiny_set["teacher"], tiny_set["judge"], tiny_set["model"])


def _sft_knobs(demo, **changes) -> list:
    """The Train tab's knob values, in the order its Start event takes them, for a paired-SFT run of two steps."""
    quick = presets.Preset("", stage="sft", max_steps=2, critic_steps=0, batch_size=2, lambda_dmd=0.0,
                           lambda_vlm=0.0, log_every=1, sample_every=0, save_every=2).values() | changes
    start = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "on_start")
    return [quick[b.label.split()[0]] for b in start.inputs[10:]]  # (after the table ... the token)


def test_a_paired_sft_run_starts_from_generated_shapes_cases_with_their_true_edits(tiny_set, tmp_path, monkeypatch):
    """The Train tab offered stage sft, but its table had no target images: Start refused every sft run on the
    table ("tick the Shapes stream"). Generated Shapes cases now carry their true edits as targets, named in the
    table's target column; an sft job started on them runs to its end on a manifest with those targets."""
    from workbench import jobs

    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    demo = npedit_app.build_demo(app)
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    table, names = fns["on_generate"](6, 0)
    assert list(table["target"]) == [f"shapes-0-{i:05d}-target.png" for i in range(6)]
    assert not any(str(tmp_path) in str(cell) for cell in table.to_numpy().ravel())
    run_dir, *_ = fns["on_start"](table, names, False, next(iter(presets.PRESETS)), "sft", tiny_set["teacher"],
                                  tiny_set["judge"], 0, "", None, *_sft_knobs(demo))
    data = Path(run_dir) / "data"
    lines = [json.loads(x) for x in (data / "cases.jsonl").read_text().splitlines()]
    assert [x["target"] for x in lines] == [f"targets/{i:05d}_shapes-0-{i - 1:05d}-target.png" for i in range(1, 7)]
    first = Image.open(data / lines[0]["target"])
    assert first.size == (64, 64) and first.tobytes() != Image.open(data / lines[0]["image"]).tobytes()
    st = jobs.job_status(run_dir)
    deadline = time.time() + 180
    while st.active and time.time() < deadline:
        time.sleep(0.5)
        st = jobs.job_status(run_dir)
    assert st.state == "finished", jobs.log_tail(run_dir, 30)


def test_uploaded_target_images_train_a_paired_sft_run_and_download_with_the_table(tiny_set, tmp_path, monkeypatch):
    """A manifest's target column was dropped on upload (with a warning) and the table had none: the app could not
    train paired SFT on a user's pairs. Targets are now matched to uploads by file name like the images, kept in the
    table and its cases.csv download; Start refuses an sft run naming every row without one, copies the uploaded
    targets (never a server file) beside the manifest for one, and leaves them out for the other stages."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "1")
    monkeypatch.setenv("NPEDIT_TRAIN_TOKEN", "s3cret")
    uploads = tmp_path / "uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    Image.new("RGB", (8, 8), (9, 9, 9)).save(tmp_path / "secret.png")  # the server's, named by no upload
    manifest = _uploaded(uploads, "cases.csv", "image,instruction,target\n"
                                               "images/cat.png,make the cat blue,targets/cat-blue.png\n"
                                               f"images/dog.png,make the dog red,{tmp_path / 'secret.png'}\n"
                                               "images/cow.png,make the cow green,\n")
    files = [_uploaded(uploads, n, c) for n, c in (("cat.png", (200, 0, 0)), ("dog.png", (0, 0, 200)),
                                                    ("cow.png", (0, 0, 0)), ("cat-blue.png", (0, 0, 250)))]
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    demo = npedit_app.build_demo(app)
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    with pytest.warns(UserWarning) as shown:
        table, names = fns["on_upload"]([manifest, *files], pd.DataFrame(), {})
    assert list(table["target"]) == ["cat-blue.png", "secret.png", ""]
    assert warned(shown) == [
        "1 target image of cases.csv not uploaded: secret.png. Only a run that trains on pairs (stage sft) reads "
        "them: upload them too (with cases.csv) for one."]  # cat-blue.png is no "file not named in cases.csv"
    launched = []
    monkeypatch.setattr(npedit_app.jobs, "start_job", lambda run_dir, args, **kw: launched.append(run_dir))
    start = [next(iter(presets.PRESETS)), "run", tiny_set["teacher"], tiny_set["judge"], 0, "", "s3cret"]
    with pytest.raises(gr.Error, match=r"stage sft \(paired SFT\) needs a target image \(the true edit\) in every "
                                       r"row: row 3 has none\. "):
        fns["on_start"](table, names, False, *start, *_sft_knobs(demo))
    sft = table.assign(target=["cat-blue.png", "secret.png", "cat-blue.png"])
    with pytest.raises(gr.Error, match="row 2: target secret.png is not among the uploaded files"):
        fns["on_start"](sft, names, False, *start, *_sft_knobs(demo))
    sft.loc[1, "target"] = "cat-blue.png"
    fns["on_start"](sft, names, False, *start, *_sft_knobs(demo))
    data = launched.pop() / "data"
    lines = [json.loads(x) for x in (data / "cases.jsonl").read_text().splitlines()]
    assert [Image.open(data / x["target"]).getpixel((0, 0)) for x in lines] == [(0, 0, 250)] * 3
    fns["on_start"](table, names, False, *start[:1], "npedit", *start[2:], *_sft_knobs(demo, stage="npedit"))
    data = launched.pop() / "data"
    assert not any("target" in json.loads(x) for x in (data / "cases.jsonl").read_text().splitlines())
    saved = Path(fns["on_download"](table))
    assert "target" in saved.read_text().splitlines()[0].split(",")
    with pytest.warns(UserWarning, match="secret.png"):
        again = fns["on_upload"]([str(saved), *files], pd.DataFrame(), {})[0]
    pd.testing.assert_frame_equal(again, table.astype(str))  # uploaded again with its images, the same table


def test_target_images_uploaded_without_a_manifest_are_targets_not_rows(tiny_set, tmp_path, monkeypatch):
    """Images uploaded alone each became a row, the targets too: Start then failed on their rows (no instruction)
    until the user deleted them. Once an image is named in a target cell, adding files leaves its untouched row out
    and Start leaves it out. No change event drops it while the user types: its answer replaced the table as the next
    cell was typed in, and keys were lost in a real browser."""
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    uploads = tmp_path / "uploads"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    files = [_uploaded(uploads, n, c) for n, c in (("cat.png", (200, 0, 0)), ("cat-blue.png", (0, 0, 250)))]
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    demo = npedit_app.build_demo(app)
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    table, names = fns["on_upload"](files, pd.DataFrame(), {})
    assert list(table["image"]) == ["cat.png", "cat-blue.png"]
    table.loc[0, ["instruction", "target"]] = ["make the cat blue", "cat-blue.png"]
    assert "on_table_edit" not in fns  # nothing rewrites the table while it is typed in
    dog = _uploaded(uploads, "dog.png", (0, 200, 0))
    added, names = fns["on_upload"]([*files, dog], table, names)
    assert list(added["image"]) == ["cat.png", "dog.png"]
    launched = []
    monkeypatch.setattr(npedit_app.jobs, "start_job", lambda run_dir, args, **kw: launched.append(run_dir))
    start = [next(iter(presets.PRESETS)), "", tiny_set["teacher"], tiny_set["judge"], 0, "", None]
    for stage in ("sft", "npedit"):  # the table as typed
        fns["on_start"](table, names, False, *start[:1], stage, *start[2:], *_sft_knobs(demo, stage=stage))
        data = launched.pop() / "data"
        lines = [json.loads(x) for x in (data / "cases.jsonl").read_text().splitlines()]
        assert [x["instruction"] for x in lines] == ["make the cat blue"]
    assert Image.open(data.parent.parent / "sft" / "data" / "targets" / "00001_cat-blue.png").getpixel((0, 0)) == (
        0, 0, 250)


def test_a_button_removes_the_rows_of_target_images_uploaded_without_a_manifest(tiny_set, tmp_path, monkeypatch,
                                                                                 capsys):
    """A target image uploaded alone kept a row of its own, with no instruction, until more files were added or Start
    ran; "Download the table as cases.csv" wrote it, so training on that file stopped at its line (no instruction).
    A button now takes such rows out (a click, not a change event: no answer lands while a cell is typed in), and the
    download leaves them out."""
    from npedit.data import load_manifest

    uploads, fns = _local_train_tab(tiny_set, tmp_path, monkeypatch)
    files = [_uploaded(uploads, n, c) for n, c in (("cat.png", (200, 0, 0)), ("cat-blue.png", (0, 0, 250)),
                                                    ("dog.png", (0, 200, 0)))]
    table, names = fns["on_upload"](files, pd.DataFrame(), {})
    table.loc[0, ["instruction", "target"]] = ["make the cat blue", "cat-blue.png"]
    table.loc[2, "instruction"] = "make the dog red"
    tidy = fns["on_drop_targets"](table)
    assert list(tidy["image"]) == ["cat.png", "dog.png"]
    assert list(tidy["instruction"]) == ["make the cat blue", "make the dog red"]
    capsys.readouterr()
    assert fns["on_drop_targets"](tidy).equals(tidy)
    assert capsys.readouterr().out.startswith("No row to remove")  # (gr.Info, printed outside a request)
    saved = Path(fns["on_download"](table))
    for name, path in names.items():
        shutil.copyfile(path, saved.parent / name)
    assert [(Path(r.image).name, r.instruction) for r in load_manifest(saved)] == [("cat.png", "make the cat blue"),
                                                                              ("dog.png", "make the dog red")]


def test_taking_the_manifest_off_the_upload_keeps_every_row_of_its_images(tiny_set, tmp_path, monkeypatch):
    """A manifest may give one image several rows (several edits of one photo). Taking the manifest itself off the
    upload (or clearing the upload of it) kept only the first row of such an image: the others' instructions went
    without a word. Every row stays, as typed, and a file taken off afterwards still takes all of its rows."""
    uploads, fns = _local_train_tab(tiny_set, tmp_path, monkeypatch)
    images = [_uploaded(uploads, n, c) for n, c in (("cat.png", (200, 0, 0)), ("dog.png", (0, 200, 0)))]
    manifest = _uploaded(uploads, "cases.jsonl", "".join(json.dumps(r) + "\n" for r in [
        {"image": "cat.png", "instruction": "make the cat blue"}, {"image": "dog.png", "instruction": "make it red"},
        {"image": "cat.png", "instruction": "remove the cat", "edit_type": "remove", "object_name": "cat"}]))
    table, names = fns["on_upload"]([manifest, *images], pd.DataFrame(), {})
    table.loc[1, "caption_target"] = "a red dog"  # typed after the upload
    rows = [["cat.png", "make the cat blue", ""], ["dog.png", "make it red", "a red dog"],
            ["cat.png", "remove the cat", ""]]
    assert table[["image", "instruction", "caption_target"]].values.tolist() == rows
    left, names = fns["on_remove"](images, table, names)  # (rows by image, in the upload's order, as without one)
    assert left[["image", "instruction", "caption_target"]].values.tolist() == [rows[0], rows[2], rows[1]]
    assert list(left["edit_type"]) == ["edit", "remove", "edit"] and names == {"cat.png": images[0],
                                                                               "dog.png": images[1]}
    dogless, names = fns["on_remove"](images[:1], left, names)
    assert dogless[["image", "instruction"]].values.tolist() == [["cat.png", "make the cat blue"],
                                                                  ["cat.png", "remove the cat"]]


def test_a_file_taken_off_the_upload_leaves_the_table_and_a_generated_table_stays(tiny_set, tmp_path, monkeypatch):
    """Taking an image off the upload (its x) kept its row, and Start trained on it (its file still in the state).
    Now its row goes and the others stay as typed; clearing the upload empties the table; a table of generated Shapes
    cases, which the upload did not fill, is left as it is."""
    uploads, fns = _local_train_tab(tiny_set, tmp_path, monkeypatch)
    files = [_uploaded(uploads, n, c) for n, c in (("cat.png", (200, 0, 0)), ("dog.png", (0, 200, 0)))]
    table, names = fns["on_upload"](files, pd.DataFrame(), {})
    table.loc[:, "instruction"] = ["make the cat blue", "make the dog red"]
    left, names = fns["on_remove"](files[:1], table, names)
    assert list(left["instruction"]) == ["make the cat blue"] and names == {"cat.png": files[0]}
    twins = [_uploaded(uploads / "a", "dog.png", (0, 0, 1)), _uploaded(uploads / "b", "dog.png", (0, 0, 2))]
    table, names = fns["on_upload"]([files[0], *twins], left, names)
    assert list(table["image"]) == ["cat.png", "dog.png", "dog (2).png"]
    table.loc[1:, "instruction"] = ["make the first dog red", "make the second dog red"]
    table.loc[0, "target"] = "dog (2).png"
    kept, names = fns["on_remove"]([files[0], twins[1]], table, names)  # the second dog.png is dog.png now
    assert kept[["image", "instruction", "target"]].values.tolist() == [
        ["cat.png", "make the cat blue", "dog.png"], ["dog.png", "make the second dog red", ""]]
    assert names == {"cat.png": files[0], "dog.png": twins[1]}
    table, names = fns["on_upload"]([files[0], *twins], left, {"cat.png": files[0]})
    table.loc[0, "target"] = "dog.png"  # the first dog, about to go: its name then belongs to the second one
    gone, _ = fns["on_remove"]([files[0], twins[1]], table, names)
    assert gone.loc[gone["image"] == "cat.png", "target"].tolist() == [""]
    cleared, names = fns["on_remove"]([], left, names)
    assert cleared.empty and names == {}
    generated, names = fns["on_generate"](6, 0)
    assert fns["on_remove"]([], generated, names) == (gr.skip(), gr.skip())


@pytest.mark.parametrize("together", [256, 0])
def test_refine_with_candidates_refines_each_and_keeps_the_lowest_judge_loss(tiny_set, tmp_path, shapes_png,
                                                                            monkeypatch, together):
    """Refine with the judge and Candidates > 1: every candidate (seed + k) is refined, the one with the lowest final
    judge loss is shown and marked in the gallery and the table, its losses are plotted, and it is the single refined
    edit of its seed; the progress bar moves forward through every candidate, refined together (small images) or
    one at a time (`together` 0: as above 256 px)."""
    from npedit import refine

    monkeypatch.setattr(refine, "REFINE_TOGETHER_MAX_SIDE", together)
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    edit = npedit_app.edit_handler(app)
    seen = []
    progress = lambda fraction=None, desc=None: seen.append((fraction, desc))  # noqa: E731  (gr.Progress's call)
    asked = ("make the circle blue", 4, 3, False, "", "edit", "", False, None)
    out = edit(str(shapes_png), *asked, 3, "", 2, progress=progress)
    labels = [label for _, label in out[6]]
    assert [label.split(" · ")[:2] for label in labels] == [["#0", "seed 3"], ["#1", "seed 4"], ["#2", "seed 5"]]
    finals = [float(label.split(" → ")[1].split()[0]) for label in labels]
    [kept] = [k for k, label in enumerate(labels) if label.endswith("✓")]
    assert kept == int(np.argmin(finals)) and f"candidate #{kept}, seed **{3 + kept}**" in out[3]
    assert np.array_equal(np.asarray(out[0]), np.asarray(out[6][kept][0])) and out[7]["edited"] is out[0]
    assert len(out[9]) == 3 and round(out[9][-1], 3) == finals[kept] and f"| **#{kept} ✓** | {3 + kept} |" in out[3]
    alone = edit(str(shapes_png), "make the circle blue", 4, 3 + kept, False, "", "edit", "", False, None, 1, "", 2,
                 progress=lambda *a, **k: None)
    assert np.abs(np.asarray(alone[0], int) - np.asarray(out[0], int)).max() <= 1
    refining = [(f, d) for f, d in seen if d and d.startswith("refining candidates")]
    fractions = [f for f, _ in refining]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0)
    chunks = sorted({d.split(" of ")[0] for _, d in refining})
    assert chunks == (["refining candidates 0-2"] if together else [f"refining candidates {k}-{k}" for k in range(3)])
    assert len(fractions) == 3 * len(chunks)  # each chunk's 3 measurements (2 steps and the last)


def test_a_download_that_cannot_be_written_says_so_in_words_and_leaves_no_file(tiny_set, tmp_path, monkeypatch,
                                                                                shapes_png):
    """A full disk or a refused rename while writing a download was an uncaught OSError: a bare "Error" in the page,
    naming nothing, a half-written file (or its .partial) left in the downloads folder, and for the batch judge the
    verdicts it had computed lost. Now each says which download failed and why, with no server path, and leaves no
    file: the trace zip, the verdict file and the verdict tables warn and return their results with no download
    (the trace state cleared); cases.csv, whose table stays in the page, is refused with the same words."""
    import errno

    from npedit import files

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setenv("NPEDIT_PUBLIC", "0")
    app = npedit_app.make_app(npedit_app.parse_args(tiny_flags(tiny_set, tmp_path / "runs")))
    demo = npedit_app.build_demo(app)
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in demo.fns.values()}
    quiet = lambda *a, **k: None  # noqa: E731  (gr.Progress outside a request)
    traced = npedit_app.edit_handler(app)(str(shapes_png), "make it blue", 2, 1, progress=quiet)[8]
    listing = tmp_path / "pairs.csv"
    listing.write_text(f"reference,edited,instruction\n{shapes_png.name},{shapes_png.name},make it blue\n")
    table = pd.DataFrame([{"image": str(shapes_png), "instruction": "make it blue"}])
    previous = fns["save_report"]({"instruction": "an earlier verdict"})[1]  # written before the disk filled

    def full(*a, **k):
        raise OSError(errno.ENOSPC, f"No space left on device: {tmp_path}")

    def said_so(what, said, kept=()):
        assert said.startswith(f"The {what} could not be written for download (No space left on device)"), said
        assert str(tmp_path) not in said
        left = list(npedit_app.downloads_folder().rglob("*"))
        assert left == [Path(k) for k in kept], left

    warned = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: warned.append(message))
    monkeypatch.setattr(files, "rename_over", full)
    assert npedit_app.trace_download(traced, None) == (None, None, None)
    said_so("trace zip", warned.pop(), kept=[previous])
    assert fns["save_report"]({"instruction": "make it blue"}, previous) == (None, None)
    said_so("verdict file", warned.pop())  # (the session's previous verdict file went too: another verdict shows)
    shown, verdicts, questions = fns["judge_batch"]([str(listing), str(shapes_png)], progress=quiet)
    assert len(shown) == 1 and 0 <= shown["p_edit"][0] <= 1 and verdicts is questions is None  # the verdicts show
    said_so("verdict tables", warned.pop())
    with pytest.raises(gr.Error) as error:
        fns["on_download"](table)
    said_so("cases.csv", str(error.value.message))
    assert warned == []
    monkeypatch.undo()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    with pytest.raises(gr.Error, match="empty"):  # nothing to download: no empty file or folder left either
        fns["on_download"](pd.DataFrame([{"image": "", "instruction": ""}]))
    assert list(npedit_app.downloads_folder().rglob("*")) == []


def test_a_refined_trace_refines_at_the_size_it_was_sampled_at(tiny_set, tmp_path):
    """`refine_trace` starts from the traced edit's latents at the `max_side` the trace was sampled at (a general
    editor works at the image's own size up to it): its refinement's start is the plain edit at that size, and the
    refined image comes back at the input's size."""
    from npedit import NPEditPipeline
    from npedit.judges import load_judge
    from npedit.refine import refine_edit
    from workbench.inspect import edit_once, refine_trace, trace_edit

    pipe = NPEditPipeline.from_pretrained(tiny_set["model"])
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(tiny_set["judge"])
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 80, 3), dtype=np.uint8))
    assert pipe.working_size(image.size, 32) != pipe.working_size(image.size, 1024)  # the size matters here
    trace = trace_edit(pipe, judge, None, None, image, "make it blue", steps=2, seed=5, max_side=32)
    assert trace.latents.device.type == "cpu" and trace.max_side == 32
    refined = refine_trace(trace, pipe, judge, refine_steps=2, lr=0.05, anchor=1.0)
    plain, _ = edit_once(pipe, image, "make it blue", steps=2, seed=5, max_side=32)
    assert np.array_equal(np.asarray(refined.start), np.asarray(plain)) and refined.image.size == image.size
    alone = refine_edit(pipe, judge, image, "make it blue", steps=2, refine_steps=2,
                        generator=torch.Generator().manual_seed(5), max_side=32)  # the judge saw the same reference
    assert refined.losses == pytest.approx(alone.losses, abs=1e-5)


def test_the_runs_tables_say_not_finite_where_a_loss_diverged():
    """Gradio sends an infinite value as null: a diverged run's loss (logged as inf) showed as an empty cell in the
    Runs and Compare tables, like a metric never logged."""
    import math

    import pandas as pd

    df = pd.DataFrame({"run": ["ok", "bad"], "student_loss": [0.5, math.inf], "step": [3, 3]})
    shown = npedit_app.shown_table(df)
    assert list(shown["student_loss"]) == [0.5, "not finite"] and list(shown["step"]) == [3, 3]
    assert npedit_app.shown_table(pd.DataFrame()).empty
