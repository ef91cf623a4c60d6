"""Soak the app's handlers as a long-lived app (a Space up for weeks, a lab server) runs them, and print what grows.

Drives app.py's own functions in this process (no browser, no HTTP) with the bundled Shapes models: traced edits
and their trace zips, judge inspections with verdict downloads and gradient maps, training jobs started and
cancelled, runs listed and plotted. Every value a handler returns for a component goes through that component's
postprocess and gradio's cache as the server sends it. After each phase it prints this process's resident memory,
open file descriptors, threads, files in the app's downloads folder and in gradio's cache, matplotlib figures
(pyplot's and all alive), tensors alive, training jobs held in memory, zombie children, and the browser sessions the
server's state holder keeps after as many page views:

    python scripts/app_soak.py --edits 200 --inspections 100 --jobs 4 --visitors 2000 --json soak.json

Everything it writes goes to a fresh temporary folder (its TMPDIR and GRADIO_TEMP_DIR), removed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing; app.py lives at its root

from npedit.files import write_atomic  # noqa: E402


def _files(folder: Path) -> int:
    """Number of files below `folder` (0 when it does not exist)."""
    return sum(len(names) for _, _, names in os.walk(folder)) if folder.is_dir() else 0


def _zombies() -> int:
    """This process's children that exited and were never waited for."""
    me, count = os.getpid(), 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text(encoding="utf-8")
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "(comm) ": state, ppid, ...
        count += fields[0] == "Z" and int(fields[1]) == me
    return count


app_sessions = None  # the visitors phase's gradio StateHolder


def measure(app) -> dict:
    """What a long-lived app process holds now (figures on a Linux /proc)."""
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.figure import Figure

    import app as npedit_app
    from workbench import jobs

    gc.collect()
    with warnings.catch_warnings():  # (isinstance on every object touches deprecated module attributes)
        warnings.simplefilter("ignore")
        alive = [type(o) for o in gc.get_objects()]
    lines = Path("/proc/self/status").read_text(encoding="utf-8").splitlines()
    status = dict(line.split(":", 1) for line in lines if ":" in line)
    cache = Path(os.environ["GRADIO_TEMP_DIR"])
    return {"rss_mb": round(int(status["VmRSS"].split()[0]) / 1024, 1),
            "fds": len(os.listdir("/proc/self/fd")),
            "threads": int(status["Threads"]),
            "downloads": _files(npedit_app.downloads_folder()),
            "gradio_cache": _files(cache) - _files(npedit_app.downloads_folder()),
            "cache_mb": round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 2**20, 2)
            if cache.is_dir() else 0.0,
            "tmp_files": _files(Path(os.environ["TMPDIR"])),
            "pyplot_figures": len(plt.get_fignums()),
            "figures_alive": sum(issubclass(t, Figure) for t in alive),
            "tensors_alive": sum(issubclass(t, torch.Tensor) for t in alive),
            "jobs_held": len(jobs._CHILDREN),
            "zombies": _zombies(),
            "sessions_held": len(app_sessions.session_data) if app_sessions else 0}


class Soak:
    """The app, its UI's functions by name, and a record of the figures after each phase."""

    def __init__(self, runs: Path):
        import app as npedit_app

        self.npedit_app = npedit_app
        self.app = npedit_app.make_app(npedit_app.parse_args(["--runs", str(runs), "--no-public"]))
        self.demo = npedit_app.build_demo(self.app)
        self.events = {getattr(f.fn, "__name__", ""): f for f in self.demo.fns.values()}
        self.rows: list[dict] = []
        self.zips: dict[int, str | None] = {}  # each editing session's gr.State of its last trace zip
        self.verdicts: str | None = None  # the inspecting session's state of its last verdict file (where kept)
        self.visitors = 0  # page views so far

    def call(self, name: str, *args, **kwargs):
        """Call the UI function `name` and send what it returns through its outputs, as the server does."""
        event = self.events[name]
        return self.serve(event.outputs, event.fn(*args, **kwargs))

    def serve(self, outputs, values):
        """Postprocess `values` for the components `outputs` and move their files into gradio's cache."""
        import gradio as gr
        from gradio.processing_utils import move_files_to_cache

        single = len(outputs) == 1
        for block, value in zip(outputs, [values] if single else values):
            if value is None or isinstance(value, (dict, gr.components.Component)) or isinstance(block, gr.State):
                continue  # (an update, or a value kept in the session's state)
            move_files_to_cache(block.postprocess(value), block, postprocess=True)
        return values

    def record(self, phase: str, seconds: float) -> None:
        """Measure and print one row."""
        row = {"phase": phase, "seconds": round(seconds, 1), **measure(self.app)}
        self.rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)


def edits(soak: Soak, scenes: Path, n: int, sessions: int) -> None:
    """`n` traced edits of new Shapes scenes from `sessions` sessions taking turns, each zipping its trace as the Edit
    tab does."""
    from PIL import Image

    from workbench.datasets import random_shapes_case

    quiet = lambda *a, **k: None  # noqa: E731  (gr.Progress outside a request)
    edit_event = soak.events["edit"]
    scenes.mkdir(exist_ok=True)
    for _ in range(n):
        i = len(list(scenes.iterdir()))
        image = scenes / f"{i}.png"  # (as an upload: each edit of another picture)
        Image.fromarray(random_shapes_case(i)[0]).save(image)
        out = soak.npedit_app.edit_handler(soak.app)(str(image), "make the red circle blue", 4, i, progress=quiet)
        soak.serve(edit_event.outputs, out)
        session = i % sessions
        _, soak.zips[session], _ = soak.npedit_app.trace_download(out[8], soak.zips.get(session))


def inspections(soak: Soak, image: str, edited: str, n: int) -> None:
    """`n` judge inspections: the verdict, its JSON download and the gradient maps."""
    for _ in range(n):
        _, _, report = soak.call("judge", image, edited, "make the red circle blue")
        if len(soak.events["save_report"].inputs) == 2:  # a session state of its last verdict file
            _, soak.verdicts = soak.call("save_report", report, soak.verdicts)
        else:
            soak.call("save_report", report)
        soak.call("gradients", image, edited, "make the red circle blue")


def training(soak: Soak, n: int, wait_s: float) -> None:
    """`n` short training jobs on generated Shapes cases, each cancelled after `wait_s` s (the last one finishes
    unwatched: no tick polls it), the Train tab's ticks drawing each meanwhile."""
    from workbench import presets

    start = soak.events["on_start"]
    knobs = {b.label.split()[0]: b.value for b in start.inputs[10:]}
    table, names = soak.call("on_generate", 6, 0)
    paths = soak.app.models.paths
    for i in range(n):
        last = i == n - 1
        values = {**knobs, "max_steps": 1 if last else 200, "critic_steps": 1, "batch_size": 2, "sample_every": 0,
                  "save_every": 0, "log_every": 1}
        run_dir, _, _ = soak.call("on_start", table, names, False, next(iter(presets.PRESETS)), f"soak-{i}",
                                  str(paths.teacher), str(paths.judge), 0, "", None,
                                  *[values[b.label.split()[0]] for b in start.inputs[10:]])
        deadline = time.time() + (120 if last else wait_s)
        while time.time() < deadline and not (last and (Path(run_dir) / "exit_code").exists()):
            if not last:
                soak.call("on_tick", run_dir, None, None)
            time.sleep(0.5)
        if not last:
            soak.call("on_cancel", run_dir, None)
    time.sleep(1.0)  # the unwatched job's process has exited; nothing has waited for it yet


def runs_views(soak: Soak, n: int) -> None:
    """`n` rounds of the Runs tab: refresh, compare (curves, bars, config differences), each run's samples, and the
    Train tab's page load."""
    for _ in range(n):
        _, _, selected, keys, one = soak.call("on_refresh", None, None)
        soak.call("on_compare", selected.value, keys.value, None)
        for name in selected.choices:
            soak.call("on_samples", name[0] if isinstance(name, tuple) else name, None)
        soak.call("on_load", None)


def visitors(soak: Soak, n: int) -> None:
    """`n` page views, each a session of the server's state holder (what any event of a new page does first), with
    the capacity the app serves with, each closed once seen."""
    global app_sessions
    from gradio.state_holder import StateHolder

    if app_sessions is None:
        soak.demo.state_session_capacity = getattr(soak.npedit_app, "SESSIONS_KEPT", soak.demo.state_session_capacity)
        app_sessions = StateHolder()
        app_sessions.set_blocks(soak.demo)
    for k in range(soak.visitors, soak.visitors + n):  # (new names: the holder forgets the evicted ones)
        app_sessions[f"visitor-{k}"].is_closed = True
    soak.visitors += n


def main(argv=None) -> int:
    """Run the phases and print (and optionally save) the figures after each."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=200)
    p.add_argument("--sessions", type=int, default=4, help="browser sessions taking turns at editing")
    p.add_argument("--inspections", type=int, default=100)
    p.add_argument("--jobs", type=int, default=4, help="training jobs: all but the last cancelled")
    p.add_argument("--job-seconds", type=float, default=3.0, help="how long each cancelled job runs")
    p.add_argument("--views", type=int, default=20, help="rounds of listing and plotting the runs")
    p.add_argument("--visitors", type=int, default=2000, help="page views (browser sessions) of the server")
    p.add_argument("--rounds", type=int, default=4, help="measure the edits and inspections this many times")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="npedit-soak-"))
    os.environ.update(TMPDIR=str(work / "tmp"), GRADIO_TEMP_DIR=str(work / "gradio"), NPEDIT_PUBLIC="0",
                      HF_HUB_OFFLINE="1")
    (work / "tmp").mkdir()
    tempfile.tempdir = None  # read TMPDIR again
    try:
        from PIL import Image

        from workbench.datasets import random_shapes_case

        image = str(work / "scene.png")
        Image.fromarray(random_shapes_case(0)[0]).save(image)
        soak = Soak(work / "runs")
        t = time.time()
        edits(soak, work / "scenes", 2, args.sessions)  # load the models
        soak.record("warm", time.time() - t)
        edited = str(work / "edited.png")
        soak.npedit_app.edit_handler(soak.app)(image, "make the red circle blue", 4, 0, inspect_steps=False,
                                               progress=lambda *a, **k: None)[0].save(edited)
        for phase, run, n, rounds in (
                ("edits", lambda k: edits(soak, work / "scenes", k, args.sessions), args.edits, args.rounds),
                ("inspections", lambda k: inspections(soak, image, edited, k), args.inspections, args.rounds),
                ("jobs", lambda k: training(soak, k, args.job_seconds), args.jobs, 1),
                ("runs", lambda k: runs_views(soak, k), args.views, 1),
                ("visitors", lambda k: visitors(soak, k), args.visitors, args.rounds)):
            done = 0
            for r in range(rounds):  # the phase in `rounds` parts, measured after each: growth shows as a trend
                k = (n * (r + 1)) // rounds - done
                if k:
                    t = time.time()
                    run(k)
                    done += k
                    soak.record(f"{phase} {done}/{n}", time.time() - t)
        if args.json:
            write_atomic(args.json, json.dumps(soak.rows, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
