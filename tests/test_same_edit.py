"""One edit, three entry points: the app's /edit, `python -m npedit edit` and `NPEditPipeline.__call__` give the same
PNG, byte for byte, for the same image, instruction, seed and steps (bundled Shapes editor, CPU)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio.data_classes import ImageData
from PIL import Image

from npedit.assets import DEFAULT_MODEL, EXAMPLES_DIR
from npedit.cli import main

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import app as npedit_app  # noqa: E402  (app.py lives at the repository root)

PROMPT = "make the circle blue"
QUIET = lambda *a, **k: None  # noqa: E731  (gr.Progress outside a request)


def odd_inputs(folder: Path) -> dict[str, Path]:
    """A 200x150 RGBA PNG (half see-through), an 80x60 grayscale JPEG whose EXIF turns it upright to 60x80, and a
    64x64 PNG: each a Shapes scene as a user might hand it over."""
    scene = Image.open(EXAMPLES_DIR / "recolor-0000.png").convert("RGB")
    rgba = scene.resize((200, 150)).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((200, 150)))
    rgba.save(folder / "wide-rgba.png")
    grey = scene.resize((80, 60)).convert("L")
    exif = grey.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show it
    grey.save(folder / "grey-exif.jpg", exif=exif.tobytes(), quality=90)
    scene.save(folder / "scene-64.png")
    return {p.stem: p for p in folder.iterdir()}


@pytest.fixture(scope="module")
def app_parts(tmp_path_factory):
    """The app on the bundled editor, its /edit function, and its Edit tab's input and result components."""
    runs = tmp_path_factory.mktemp("runs")
    app = npedit_app.make_app(npedit_app.parse_args(["--model", str(DEFAULT_MODEL), "--runs", str(runs)]))
    demo = npedit_app.build_demo(app)
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    return app, npedit_app.edit_handler(app), blocks["edit-input"], blocks["edit-result"]


def app_png(app_parts, path: Path, seed: int, steps: int, **kwargs) -> tuple[bytes, str]:
    """The PNG the app serves for an upload of `path` (through its components, as gradio runs them) and its info."""
    _, edit, image, result = app_parts
    given = image.preprocess(ImageData(path=str(path), orig_name=path.name))
    out = edit(given, PROMPT, steps, seed, False, "", "edit", "", False, None, progress=QUIET, **kwargs)
    return Path(result.postprocess(out[0]).path).read_bytes(), out[3]


@pytest.mark.parametrize("name", ["wide-rgba", "grey-exif", "scene-64"])
def test_the_app_the_cli_and_the_pipeline_give_the_same_png(app_parts, tmp_path, capsys, name):
    from npedit import NPEditPipeline

    path = odd_inputs(tmp_path)[name]
    seed, steps = 3, 2
    served, info = app_png(app_parts, path, seed, steps)
    assert main(["edit", "--image", str(path), "--instruction", PROMPT, "--seed", str(seed), "--steps", str(steps),
                 "--output", str(tmp_path / "cli.png")]) == 0
    note = capsys.readouterr().err
    pipe = NPEditPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    pipe(image=str(path), prompt=PROMPT, num_inference_steps=steps,
         generator=torch.Generator().manual_seed(seed)).images[0].save(tmp_path / "api.png")
    cli, api = (tmp_path / "cli.png").read_bytes(), (tmp_path / "api.png").read_bytes()
    assert served == cli == api
    upright = {"wide-rgba": (200, 150), "grey-exif": (60, 80), "scene-64": (64, 64)}[name]
    assert Image.open(tmp_path / "cli.png").size == upright  # the input's size, EXIF applied: nothing cropped
    work = {"wide-rgba": "64x48", "grey-exif": "48x64", "scene-64": None}[name]
    if work is None:  # already at the editor's resolution: nothing to say
        assert "note:" not in note and "⚠️" not in info
    else:  # the one sentence the pipeline words, on the CLI's stderr and on the app's page
        said = pipe.working_note(upright)
        assert f"edited at {work} and the result resized back to {upright[0]}x{upright[1]}" in said
        assert f"note: {said}" in note and f"⚠️ {said}" in info


def test_best_of_candidates_agree_between_the_app_and_the_cli(app_parts, tmp_path):
    """Best of 2 by the bundled judge: the app and `edit --candidates 2` keep the same PNG (the judge sees the same
    reference: the input as loaded, not a crop of it)."""
    path = odd_inputs(tmp_path)["wide-rgba"]
    served, info = app_png(app_parts, path, 5, 2, candidates=2)
    assert main(["edit", "--image", str(path), "--instruction", PROMPT, "--seed", "5", "--steps", "2",
                 "--candidates", "2", "--output", str(tmp_path / "cli.png")]) == 0
    assert served == (tmp_path / "cli.png").read_bytes() and "best of 2" in info


def test_the_app_keeps_its_inputs_pixels(app_parts):
    """An input the app sets itself (a random Shapes scene, "use the result as the next input") is saved as PNG, as
    the CLI reads a file: lossy WebP, gradio's default, changed the pixels the editor saw."""
    image = app_parts[2]
    scene = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    saved = image.postprocess(scene).path
    assert Path(saved).suffix == ".png" and np.array_equal(np.asarray(Image.open(saved).convert("RGB")), scene)
