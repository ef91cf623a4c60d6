"""Several people using one running app at once: gradio runs event handlers in worker threads, so two visitors'
edits, verdicts and training-status polls can run side by side in one process. Each must get what it gets alone."""

import io
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import app as npedit_app  # noqa: E402  (app.py lives at the repository root)

quiet = lambda *a, **k: None  # noqa: E731  (gr.Progress outside a request)


def at_once(calls: dict) -> dict:
    """Run each of `calls` (name -> no-argument function) in its own thread, all released together; their results
    by name (a call's exception is raised here)."""
    start = threading.Barrier(len(calls))
    results, errors = {}, {}

    def run(name, call):
        start.wait()
        try:
            results[name] = call()
        except BaseException as exc:  # noqa: BLE001  (re-raised below, in the test's thread)
            errors[name] = exc

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise next(iter(errors.values()))
    return results


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def scenes(tmp_path):
    from workbench.datasets import random_shapes_case

    paths = []
    for seed in (0, 1):
        paths.append(tmp_path / f"scene-{seed}.png")
        Image.fromarray(random_shapes_case(seed)[0]).save(paths[-1])
    return [str(p) for p in paths]


def _app(tiny_set, tmp_path):
    """A fresh app on the tiny models: nothing loaded yet, so calls at once also load at once."""
    flags = ["--model", tiny_set["model"], "--judge", tiny_set["judge"], "--teacher", tiny_set["teacher"],
             "--critic", tiny_set["critic"], "--runs", str(tmp_path / "runs")]
    app = npedit_app.make_app(npedit_app.parse_args(flags))
    fns = {getattr(f.fn, "__name__", ""): f.fn for f in npedit_app.build_demo(app).fns.values()}
    return app, fns


def _visitors(app, fns, scenes) -> dict:
    """Four visitors' model calls: a traced edit, a best-of-3 edit, a verdict and gradient maps, each reduced to what
    the page shows (PNG bytes, the step table's numbers, the verdict, the maps' pixels) and whose edit a trace is."""
    edit = npedit_app.edit_handler(app)

    def traced():
        out = edit(scenes[0], "make the circle blue", 3, 5, False, "a blue circle", "edit", "", True, None, 1, "",
                   progress=quiet)
        trace = out[8][0]
        return (png(out[0]), out[5].iloc[:, :5].to_csv(), [png(s.x0) for s in trace.steps],
                [s.dmd_map.tobytes() for s in trace.steps], (trace.instruction, trace.seed, len(trace.steps)))

    def best():
        out = edit(scenes[1], "remove the red circle", 2, 9, False, "", "remove", "red circle", False, None, 3,
                   "blue square", progress=quiet)
        return png(out[0]), [png(im) for im, _ in out[6]], [label for _, label in out[6]]

    def verdict():
        return fns["judge"](scenes[0], scenes[1], "make the circle blue", "edit", "", "Is it sharp? Answer with Yes "
                            "or No.", "red square", "blue circle", "red circle")[:2]

    def gradients():
        fig = npedit_app.gradients_handler(app)(scenes[1], scenes[0], "remove the square", "remove", "square")
        return [np.asarray(im.get_array()).tobytes() for ax in fig.axes for im in ax.images]

    def plain(seed):
        return lambda: png(edit(scenes[0], "make the circle blue", 4, seed, False, "", "edit", "", False, None, 1, "",
                                progress=quiet)[0])

    return {"traced": traced, "best": best, "verdict": verdict, "gradients": gradients, "seed 3": plain(3),
            "seed 4": plain(4)}


def _same(got, alone) -> bool:
    if isinstance(got, tuple) and got and hasattr(got[1], "equals"):  # (headline dict, verdict DataFrame)
        return got[0] == alone[0] and got[1].equals(alone[1])
    return got == alone


def test_visitors_editing_and_judging_at_once_each_get_what_they_get_alone(tiny_set, tmp_path, scenes):
    """Six calls at once on one app, before any model is loaded (so they also load the editor, judge, teacher and
    critic at once), then again with everything loaded: each traced edit, best-of-N, verdict, gradient map and plain
    edit (two seeds) is byte for byte what it is alone, and a trace holds its own edit's steps."""
    app, fns = _app(tiny_set, tmp_path)
    alone = {name: call() for name, call in _visitors(app, fns, scenes).items()}
    assert alone["seed 3"] != alone["seed 4"]  # (the seeds give different edits, so a mix-up would show)
    assert alone["traced"][4] == ("make the circle blue", 5, 3)
    for fresh in (True, False):
        if fresh:
            app, fns = _app(tiny_set, tmp_path)
        together = at_once(_visitors(app, fns, scenes))
        for name in alone:
            assert _same(together[name], alone[name]), (name, "fresh" if fresh else "loaded")


@pytest.fixture(scope="module")
def second_editor(tiny_set, tmp_path_factory):
    """Another editor folder: the tiny editor with its transformer's weights scaled, so its edits differ."""
    import torch

    from npedit.pipeline import NPEditPipeline

    pipe = NPEditPipeline.from_pretrained(tiny_set["model"])
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.mul_(1.5)
    out = tmp_path_factory.mktemp("second-editor") / "editor"
    pipe.save_pretrained(out)
    return str(out)


def test_a_visitor_switching_editors_does_not_change_anothers_edit(tiny_set, tmp_path, scenes, second_editor):
    """One visitor edits with the app's editor while others pick another editor and load it, with a model cache of
    one editor (so the loads push out the editor in use): every edit is the one its own editor makes alone."""
    app, _ = _app(tiny_set, tmp_path)
    edit = npedit_app.edit_handler(app)

    def with_editor(editor, seed):
        return lambda: png(edit(scenes[0], "make the circle blue", 4, seed, False, "", "edit", "", False, editor, 1,
                                "", progress=quiet)[0])

    calls = {"app's": with_editor(None, 3), "other": with_editor(second_editor, 3),
             "app's again": with_editor(tiny_set["model"], 4), "other again": with_editor(second_editor, 4)}
    alone = {name: call() for name, call in calls.items()}
    assert alone["app's"] != alone["other"]  # (the editors differ, so a swap would show)
    for keep in (2, 1):
        app.models = type(app.models)(app.models.paths, device="cpu", keep=keep)  # nothing loaded, at most `keep`
        assert at_once(calls) == alone, keep


def test_model_calls_queue_one_at_a_time_and_status_polls_do_not(tiny_set, tmp_path):
    """The gradio settings README's app section states: the calls that run models (edit, judge, gradient maps, batch
    verdicts) share one concurrency group of one call, so two visitors' edits queue rather than share the CPU or GPU
    memory; the Train tab's status poll has no limit (it only reads files), so no visitor waits on another's."""
    app, _ = _app(tiny_set, tmp_path)
    demo = npedit_app.build_demo(app)
    by_name = {getattr(f.fn, "__name__", ""): f for f in demo.fns.values()}
    for name in ("edit", "judge", "gradients", "judge_batch"):
        assert (by_name[name].concurrency_id, by_name[name].concurrency_limit) == ("models", 1), name
    assert by_name["on_tick"].concurrency_limit is None
    assert by_name["trace_download"].concurrency_id != "models"  # zipping a trace does not hold up the next edit
