"""The app in a real browser (Debian's Chromium through Playwright): edit with the per-step panel, train a tiny job.

Screenshots go to the test's tmp dir; docs/screenshots/ gets a copy when it has none yet or when
NPEDIT_UPDATE_SCREENSHOTS=1.
"""

import contextlib
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not CHROMIUM.exists():
    pytest.skip("browser tests need Debian's Chromium at /usr/bin/chromium (apt-get install -y chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package (pip)")

sys.path.insert(0, str(ROOT))
import app as npedit_app  # noqa: E402


@pytest.fixture(scope="module")
def served_runs(tmp_path_factory):
    """A folder named `runs`, as a user's is (the app, started beside it, names it so)."""
    runs = tmp_path_factory.mktemp("browser") / "runs"
    runs.mkdir()
    return runs


@pytest.fixture(scope="module")
def served(tiny_set, served_runs):
    """The app on a free localhost port, in this process, with the tiny models."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = served_runs
    args = npedit_app.parse_args(["--model", tiny_set["model"], "--judge", tiny_set["judge"], "--teacher",
                                  tiny_set["teacher"], "--critic", tiny_set["critic"], "--runs", str(runs),
                                  "--port", str(port)])
    with contextlib.chdir(runs.parent):  # started where its runs folder is, as `python app.py` in a checkout
        app = npedit_app.make_app(args)
        demo = npedit_app.build_demo(app)
    _, url, _ = npedit_app.launch(demo, app, args, prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def page(served):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(served)
        yield page
        browser.close()


def keep(shot: Path, name: str) -> None:
    target = ROOT / "docs" / "screenshots" / name
    if not target.exists() or os.environ.get("NPEDIT_UPDATE_SCREENSHOTS") == "1":
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)


def test_upload_edit_and_see_every_step(page, tmp_path):
    from workbench.datasets import random_shapes_case

    scene, instruction, *_ = random_shapes_case(7)
    Image.fromarray(scene).save(tmp_path / "scene.png")
    page.locator("input[type=file]").first.set_input_files(str(tmp_path / "scene.png"))
    page.get_by_label("Instruction").first.fill(instruction)
    page.get_by_role("button", name="Run", exact=True).click()
    panel = page.locator("#step-panel img")
    panel.wait_for(state="visible")
    assert panel.bounding_box()["width"] > 300
    table = page.locator("#step-table")
    table.get_by_text("0.6667").filter(visible=True).first.wait_for()  # t of the 4th step (uniform grid, shift 6)
    assert table.get_by_text("P(edit done)").first.is_visible()
    assert page.get_by_text("Seed").first.is_visible()
    page.wait_for_timeout(500)
    shot = tmp_path / "app-edit.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] >= 1400
    keep(shot, "app-edit.png")


def test_refine_with_the_judge_shows_the_loss_plot_and_both_edits(page, tmp_path):
    """Refine with the judge set to 3 steps: the loss plot appears under the gallery of the editor's edit and the
    refined one, its caption in the info; back at 0 the next edit hides the plot again."""
    from workbench.datasets import random_shapes_case

    scene, instruction, *_ = random_shapes_case(8)
    Image.fromarray(scene).save(tmp_path / "scene.png")
    page.locator("input[type=file]").first.set_input_files(str(tmp_path / "scene.png"))
    page.get_by_label("Instruction").first.fill(instruction)
    steps = page.locator("#refine-steps input[type=number]")
    steps.fill("3")
    steps.press("Enter")
    page.get_by_role("button", name="Run", exact=True).click()
    plot = page.locator("#refine-plot img")
    plot.wait_for(state="visible")
    assert plot.bounding_box()["width"] > 200
    assert page.get_by_text("over 3 steps").first.is_visible()
    assert page.locator("#candidates").get_by_text("the editor's edit").first.is_visible()
    steps.fill("0")
    steps.press("Enter")
    page.get_by_role("button", name="Run", exact=True).click()
    page.locator("#refine-plot").wait_for(state="hidden")


def test_train_tab_runs_a_tiny_job(page, tmp_path, served_runs):
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("button", name="Generate", exact=True).click()
    page.locator("#train-table").get_by_text("shapes-0-00000.png").filter(visible=True).first.wait_for()
    for name, value in (("max_steps", "2"), ("sample_every", "2"), ("critic_steps", "1")):
        box = page.get_by_label(name, exact=True)
        box.fill(value)
        box.press("Tab")
    page.get_by_label("Run name (empty: a timestamp)").fill("tiny-job")
    page.get_by_role("button", name="Start", exact=True).click()
    status = page.locator("#train-status")
    status.get_by_text("tiny-job").first.wait_for()
    status.get_by_text("finished 2 steps").wait_for(timeout=180_000)
    page.wait_for_timeout(2500)  # the last poll draws the curves and the sample grid
    # no label drawn over a figure or the grid (they hid a y-tick and the grid's first row): each is named above
    for figure in ("#train-curves", "#train-sample"):
        assert not page.locator(f"{figure} [data-testid='block-label']").filter(visible=True).count(), figure
    shot = tmp_path / "app-train.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot, "app-train.png")
    # Runs tab: the finished job's newest checkpoint becomes an editor
    page.get_by_role("tab", name="Runs").click()
    page.get_by_role("button", name="↻ Refresh").click()
    page.get_by_text("tiny-job").filter(visible=True).first.wait_for()
    # the whole sample grid, at its own aspect ratio (a gallery's 320 px tiles showed only its top case)
    grid = page.locator("#run-sample img")
    grid.wait_for(state="visible")
    page.wait_for_timeout(500)
    box, block = grid.bounding_box(), page.locator("#run-sample").bounding_box()
    natural = grid.evaluate("im => [im.naturalWidth, im.naturalHeight]")
    assert abs(box["width"] / box["height"] - natural[0] / natural[1]) < 0.02, (box, natural)
    assert block["y"] <= box["y"] and box["y"] + box["height"] <= block["y"] + block["height"] + 1
    for figure in ("#runs-curves", "#runs-bars", "#run-sample"):  # (as in the Train tab)
        assert not page.locator(f"{figure} [data-testid='block-label']").filter(visible=True).count(), figure
    # the runs table's headers on one line each (wrapped, they broke letter by letter) and its metrics in view
    runs_table = page.locator("#runs-table")
    heights = [runs_table.locator(f"[data-testid='header-{c}']").bounding_box()["height"] for c in range(6)]
    assert max(heights) < 60, heights
    loss = runs_table.locator("th", has_text="student_loss").first.bounding_box()
    assert loss["x"] + loss["width"] <= runs_table.bounding_box()["x"] + runs_table.bounding_box()["width"]
    page.get_by_role("button", name="Export its newest checkpoint").click()
    page.get_by_text("newest checkpoint to").filter(visible=True).first.wait_for()
    assert list((served_runs / "tiny-job/exports").iterdir())[0].name == "step_000002"


def test_train_table_keeps_its_columns_once_an_instruction_is_typed(page, tmp_path):
    """The training table sized its columns by their content: uploads filled the image column with server paths
    (/tmp/gradio/<64 hex digits>/...), and once an instruction was typed the other columns shrank to a letter each,
    their headers grew taller than the table and hid its rows. Now each column keeps its share and uploads show the
    names the user gave."""
    for k in (1, 2):
        Image.new("RGB", (16, 16), (40 * k, 0, 0)).save(tmp_path / f"up{k}.png")
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("tab", name="Upload my images").click()
    page.locator("input[type=file][multiple]").last.set_input_files([str(tmp_path / "up1.png"),
                                                                     str(tmp_path / "up2.png")])
    table = page.locator("#train-table")
    table.locator("[data-testid='cell-1-0']").get_by_text("up2.png", exact=True).wait_for()
    table.locator("[data-testid='cell-0-1']").dblclick()
    page.keyboard.type("replace the green triangle with a yellow circle at the top left")
    page.keyboard.press("Enter")
    page.get_by_text("One row per training image").click()
    table.get_by_text("with a yellow circle").filter(visible=True).first.wait_for()
    widths = [table.locator(f"[data-testid='header-{c}']").bounding_box()["width"] for c in range(10)]
    assert min(widths) > 50, widths
    header = table.locator("[data-testid='header-1']").bounding_box()
    row = table.locator("[data-testid='cell-1-1']").bounding_box()
    assert header["height"] < 80 and row["y"] + row["height"] < header["y"] + 280  # the second row stays in view


def _upload_afresh(page, paths: list[Path]) -> None:
    """Upload `paths` to the Train tab as the only files (an earlier test's files are cleared first: files dropped on
    the upload are added to those there)."""
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("tab", name="Upload my images").click()
    clear = page.locator("#train-upload").get_by_role("button", name="Clear")
    if clear.count() and clear.first.is_visible():
        clear.first.click()
        page.locator("#train-table [data-testid='cell-0-0']").wait_for(state="detached")
    page.locator("input[type=file][multiple]").last.set_input_files([str(p) for p in paths])


def _type_in(cell, text: str) -> None:
    """Open a table cell for typing and type `text` once its editor has the focus (keys typed before were lost)."""
    cell.dblclick()
    editor = cell.locator("textarea, input").first
    editor.wait_for()
    sync_api.expect(editor).to_be_focused()
    editor.page.keyboard.type(text)


def test_the_rows_of_target_images_go_on_a_click_and_what_was_typed_stays(page, tmp_path):
    """A target image uploaded without a manifest kept a row of its own until more files were added or Start ran.
    The button takes it out; the instruction and target typed a moment before, the last cell left without Enter,
    stay as typed (a change event that did this lost keys)."""
    for name, k in (("pair-a.png", 1), ("pair-a-done.png", 2)):
        Image.new("RGB", (16, 16), (0, 0, 40 * k)).save(tmp_path / name)
    _upload_afresh(page, [tmp_path / "pair-a.png", tmp_path / "pair-a-done.png"])
    table = page.locator("#train-table")
    table.locator("[data-testid='cell-1-0']").get_by_text("pair-a-done.png", exact=True).wait_for()
    _type_in(table.locator("[data-testid='cell-0-1']"), "make the square blue")
    page.keyboard.press("Enter")
    _type_in(table.locator("[data-testid='cell-0-9']"), "pair-a-done.png")
    page.get_by_role("button", name="Remove the target images' rows").click()
    table.locator("[data-testid='cell-1-0']").wait_for(state="detached")
    assert table.locator("[data-testid='cell-0-1']").inner_text().strip() == "make the square blue"
    assert table.locator("[data-testid='cell-0-9']").inner_text().strip() == "pair-a-done.png"


def test_a_file_taken_off_the_upload_takes_its_row_with_it(page, tmp_path):
    """Removing an uploaded image (its x in the file list) left its row in the table, and Start trained on it. Its
    row now goes, the other rows stay as typed; clearing the upload empties the table."""
    for name, k in (("keep-me.png", 1), ("wrong-one.png", 2)):
        Image.new("RGB", (16, 16), (0, 30 * k, 0)).save(tmp_path / name)
    _upload_afresh(page, [tmp_path / "keep-me.png", tmp_path / "wrong-one.png"])
    table = page.locator("#train-table")
    table.locator("[data-testid='cell-1-0']").get_by_text("wrong-one.png", exact=True).wait_for()
    _type_in(table.locator("[data-testid='cell-0-1']"), "make the square red")
    page.keyboard.press("Enter")
    page.get_by_text("One row per training image").click()
    upload = page.locator("#train-upload")
    upload.locator("tr", has=page.locator("td[aria-label='wrong-one.png']")).get_by_role(
        "button", name="Remove this file").click()
    table.locator("[data-testid='cell-1-0']").wait_for(state="detached")
    assert table.locator("[data-testid='cell-0-0']").inner_text().strip() == "keep-me.png"
    assert table.locator("[data-testid='cell-0-1']").inner_text().strip() == "make the square red"
    upload.get_by_role("button", name="Clear").click()
    table.locator("[data-testid='cell-0-0']").wait_for(state="detached")


def test_a_manifest_uploaded_with_its_images_fills_the_train_table_and_downloads(page, tmp_path):
    """cases.csv and its images, uploaded together in the browser, fill the table; the table downloads as cases.csv."""
    for k in (1, 2):
        Image.new("RGB", (16, 16), (0, 40 * k, 0)).save(tmp_path / f"m{k}.png")
    (tmp_path / "cases.csv").write_text("image,instruction,edit_type,object_name\n"
                                        "images/m1.png,make the square green,recolor,\n"
                                        "images/m2.png,remove the circle,remove,circle\n")
    page.get_by_role("tab", name="Train").click()
    page.get_by_role("tab", name="Upload my images").click()
    page.locator("input[type=file][multiple]").last.set_input_files([str(tmp_path / n)
                                                                     for n in ("cases.csv", "m1.png", "m2.png")])
    table = page.locator("#train-table")
    table.locator("[data-testid='cell-1-0']").get_by_text("m2.png", exact=True).wait_for()
    table.get_by_text("remove the circle").filter(visible=True).first.wait_for()
    with page.expect_download() as download:
        page.get_by_role("button", name="Download the table as cases.csv").click()
        page.locator("#train-table-csv a[download]").first.click()
    saved = tmp_path / "saved.csv"
    download.value.save_as(saved)
    assert download.value.suggested_filename == "cases.csv"
    assert saved.read_text().splitlines()[1:] == ["m1.png,make the square green,,,recolor,,,,,",
                                                  "m2.png,remove the circle,,,remove,circle,,,,"]


def _editor_sample_grid(path: Path, n: int = 4) -> None:
    """A sample grid as the trainer writes it (its `sample_grid`, a run's four rows), of the bundled default editor's
    real seeded 4-step edits of Shapes cases (the cases' true edits made a picture no model had made)."""
    import torch

    from npedit import NPEditPipeline
    from npedit.assets import DEFAULT_MODEL
    from npedit.shapes import render
    from npedit.training.logging import sample_grid
    from workbench.datasets import shapes_cases

    cases = shapes_cases(n, seed=4)
    scenes = [render(c.reference) for c in cases]  # (64, 64, 3) uint8
    pipe = NPEditPipeline.from_pretrained(DEFAULT_MODEL)
    pipe.set_progress_bar_config(disable=True)
    edits = pipe(image=scenes, prompt=[c.instruction for c in cases], num_inference_steps=4, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images  # (n, 3, 64, 64) in [0, 1]
    references = torch.stack([torch.from_numpy(s).permute(2, 0, 1) for s in scenes]).float() / 127.5 - 1
    path.parent.mkdir(parents=True)
    sample_grid(references, edits * 2 - 1, [c.instruction for c in cases]).save(path)


def test_runs_tab_compares_seven_runs_side_by_side(page, tmp_path, served_runs):
    """The config differences gave each compared run a fixed 26% of the width: from the fourth run on, columns ran
    off the right edge. Seven runs of mixed kinds (recipes, an ablation with a long student path, a run without
    metrics) now sit side by side within the table, and the curves and bars draw for them. A run without a sample
    grid says why in place of an empty box; one with a grid shows it (a real editor's edits, as a run writes them)."""
    names = [f"cmp-{k}" for k in range(7)]
    for k, name in enumerate(names):
        run = served_runs / name
        run.mkdir()
        student = "/home/researcher/experiments/npedit/runs/shapes/warmup/pipeline" if k == 2 else "runs/warmup"
        (run / "config.yaml").write_text(f"stage: {'warmup' if k == 1 else 'npedit'}\nmax_steps: {100 * (k + 1)}\n"
                                         f"optim:\n  lr: {k + 1}.0e-05\nmodel:\n  student: {student}\n"
                                         f"sample_every: 5\n")
        if k < 6:  # the last has logged nothing yet
            (run / "metrics.jsonl").write_text("".join(f'{{"step": {s}, "student_loss": {1 / (s + k)}}}\n'
                                                       for s in range(1, 6)))
        if k == 5:  # (before cmp-6 exists: a folder written into later would list as the newest run)
            _editor_sample_grid(run / "samples" / "step_000005.png")
    page.get_by_role("tab", name="Runs").click()
    page.get_by_role("button", name="↻ Refresh").click()
    page.locator("#runs-table").get_by_text("cmp-6").filter(visible=True).first.wait_for()
    picker = page.get_by_label("Compare runs")
    block = page.locator("div.block", has=picker).first
    # exactly these seven: a run an earlier test left selected (tiny-job, a full config) added dozens of differing
    # keys, and the long path's row scrolled out of the table
    while strays := [k for k, t in enumerate(block.locator(".token span").all_inner_texts()) if t not in names]:
        block.locator(".token").nth(strays[0]).locator(".token-remove").click()
    for name in names:
        if name not in block.locator(".token span").all_inner_texts():
            picker.click()
            page.get_by_role("option", name=name, exact=True).first.click()
    page.keyboard.press("Escape")
    comparison = page.locator("#runs-comparison")
    comparison.locator("th", has_text="cmp-6").filter(visible=True).first.wait_for()
    page.wait_for_timeout(1500)
    edge = comparison.bounding_box()
    for name in names:
        header = comparison.locator("th", has_text=name).filter(visible=True).first.bounding_box()
        assert header["x"] + header["width"] <= edge["x"] + edge["width"] + 1, (name, header, edge)
    # a long path wraps and stays whole
    assert comparison.get_by_text("/home/researcher/experiments").filter(visible=True).count()
    # the folder named as the user knows it; the newest run (picked) has no grid yet and says why, without a box
    assert page.locator("#runs-notice").inner_text().startswith("Runs under runs:")
    note = page.locator("#run-sample-note")
    note.get_by_text("the first at step 5; the run is at step 0").wait_for()
    assert not page.locator("#run-sample").is_visible()
    page.get_by_label("Run", exact=True).click()
    page.get_by_role("option", name="cmp-5", exact=True).first.click()
    page.locator("#run-sample img").wait_for(state="visible")
    note.get_by_text("reference | edit").wait_for()
    page.mouse.move(0, 0)  # no row lit up by the pointer in the screenshot
    page.wait_for_timeout(1000)
    shot = tmp_path / "app-runs.png"
    page.screenshot(path=str(shot), full_page=True)
    keep(shot, "app-runs.png")
