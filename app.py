"""NP-Edit app: edit images, look inside each sampling step, question the judge, train and compare runs.

    python app.py [--model DIR_OR_ID] [--judge DIR_OR_ID] [--judge-max-pixels N] [--teacher DIR] [--critic DIR]
                  [--port N] [--runs DIR]

Thin UI wiring over `workbench` (loading, inspection, jobs, runs, plots) and `npedit`. Models load on
first use, so the app starts (and says what to pass) even when no model is there. The same file runs
as a Hugging Face Space; models can also be chosen with NPEDIT_MODEL / NPEDIT_JUDGE / NPEDIT_TEACHER /
NPEDIT_CRITIC (and the judge's pixel cap with NPEDIT_JUDGE_MAX_PIXELS; a public app's upload limits with
NPEDIT_UPLOAD_MB_PER_HOUR and NPEDIT_UPLOAD_MIN_FREE_MB).
"""

from __future__ import annotations

import argparse
import errno
import hmac
import json
import os
import random
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import pandas as pd
from gradio.utils import get_upload_folder
from PIL import Image
from starlette.middleware import Middleware

from npedit import assets
from npedit.data import object_names
from npedit.edit_types import EDIT_TYPES, edit_type_name
from npedit.files import PARTIAL_SUFFIX, WINDOWS_DEVICE_NAMES, write_atomic, remove as remove_file
from npedit.images import ImageError, bomb_message, load_image
from npedit.refine import DEFAULT_REFINE_ANCHOR, DEFAULT_REFINE_LR, check_refine_settings
from npedit.verdicts import Verdict, answer_gradients, edit_questions, judge_candidates, judge_edit
from workbench import datasets, jobs, judging, models, origins, plots, presets, runs, uploads
from workbench.inspect import (STEP_COLUMNS, edit_best_of, edit_once, edit_refined, edit_refined_best_of,
                               refine_trace, save_trace, trace_edit)

try:  # on a ZeroGPU Space, GPU work runs inside functions decorated with spaces.GPU
    import spaces

    GPU = spaces.GPU(duration=120)
except ImportError:
    spaces = None

    def GPU(fn):
        return fn

APP_DIR = Path(__file__).resolve().parent  # a public app shows paths relative to it
MAX_SEED = 2**31 - 1
MAX_STEPS = 8
MAX_CANDIDATES = 16
MAX_REFINE_STEPS = 100  # the Edit tab's cap on judge-guided refinement steps (npedit.refine takes up to 500)
# a public app's cap on refinement steps over all candidates (candidates x steps): one request of 16 x 100 would hold
# the models (and on ZeroGPU its one GPU call) about 16 times as long as the longest single refinement
MAX_PUBLIC_REFINE_WORK = 400
REFINE_HELP = ("After the edit, this many Adam steps on its latents lower the judge's Yes/No loss (the questions "
               "NP-Edit trains with: edit type, removed object and objects to keep from Advanced settings), through "
               "the VAE decoder, anchored to the editor's own latents. The refined edit is shown, the editor's own "
               "beside it with the loss per step. Name every object that should stay (objects to keep): the judge "
               "then guards them too. With Candidates > 1, every candidate is refined and the lowest final judge loss "
               "is kept (that many times the work). With the per-step analysis on, the step panel shows the "
               "sampling steps the refinement started from, and the trace's zip holds the refined image too. "
               "About 0.06 s a step for a 64-px Shapes edit (2-core CPU, one thread).")
MAX_BATCH_PAIRS = 100  # pairs per batch list in a public app (one list holds the judge for all of them)
# browser sessions whose state the server keeps (least recently used go first): gradio's default, 10,000, let a
# Space's memory grow ~0.3 MB per page view for weeks (each view's copy of this UI's config stays, closed or not)
SESSIONS_KEPT = 500
ON_ZEROGPU = os.environ.get("SPACES_ZERO_GPU") == "true"
NO_TRAINING_ON_ZEROGPU = ("This Space runs on ZeroGPU, where a GPU exists only inside a short call: training is off. "
                          "Duplicate it on dedicated GPU hardware, or run `python app.py` locally.")
CSS = """
.pixelated img, .pixelated canvas { image-rendering: pixelated; }
.fill-image img { width: 100%; height: 100%; object-fit: contain; }
/* a table wider than the page scrolls sideways: a scrollbar that shows (gradio's is thin or hidden) says so */
.scroll-x .virtual-table-viewport { scrollbar-width: auto; scrollbar-color: #9ca3af #f3f4f6; }
#title { margin-bottom: 0; }
"""
INTRO = """# NP-Edit
Instruction-based image editing trained **without before/after pairs**: a few-step *student* edits; a frozen
vision-language *judge* answers Yes/No questions about each edit; distribution matching (DMD) against a frozen
text-to-image *teacher*, with a learned *critic*, keeps the results realistic."""
CAPTION_HELP = ("Target caption c^x (optional): what the edited image should show. It conditions the teacher and the "
                "critic for the DMD maps. Left empty, the instruction itself is used (the library's fallback).")
TABLE_HELP = ("One row per training image. **instruction** is required. **caption_target** (c^x) conditions the "
              "teacher and critic for DMD; empty means the instruction is used. **caption_reference** (c^y) is the "
              "warm-up prompt; empty means an empty prompt (and \"do nothing\" samples then use c^x). "
              "**edit_type** `remove` needs **object_name** (what is removed). **keep** (optional): objects the edit "
              "must leave in place, separated by `;` (or `,` in a cell without `;`); with **keep_questions** > 0 "
              "the judge is also asked whether each is still there; **new** / **gone** (optional, the same): "
              "objects the edit creates / must make disappear, asked with **change_questions** > 0 (\"does the "
              "edited image contain ...?\", expected Yes / No). Both are extensions of the method; Shapes cases "
              "fill them in. **target** (only for stage "
              "`sft`, paired SFT; other stages ignore it): the file name of an uploaded image of the true edit (its "
              "own row, if untouched, goes on **Remove the target images' rows**, more files or Start); generated "
              "Shapes cases name theirs.")

TABLE_WIDTHS = ["13%", "18%", "12%", "12%", "8%", "8%", "8%", "6%", "6%", "9%"]  # the training table's columns
# the Judge inspector's table (kind, P(Yes), margin, P(Yes or No), expected, images, question): the question gets
# the most
VERDICT_WIDTHS = ["8%", "8%", "11%", "10%", "8%", "13%", "42%"]
COMPARE_FIT = 8  # config differences: runs side by side before the table scrolls sideways (their values wrap)


def shown_table(df):
    """A runs table for the page: an infinite value (a loss that was not finite: a diverged run) as the text "not
    finite" (the page's JSON has no infinity: it showed an empty cell, like a metric never logged)."""
    import math

    return df.map(lambda v: "not finite" if isinstance(v, float) and math.isinf(v) else v) if not df.empty else df


def compare_widths(n_runs: int) -> list[str]:
    """Column widths of the config differences for `n_runs` runs: the key, then equal shares of the rest of the width
    (at most 26% each, at least what `COMPARE_FIT` runs get), so that up to eight runs fit without scrolling."""
    share = max(min(26.0, 78.0 / max(n_runs, 1)), 78.0 / COMPARE_FIT)
    return ["22%"] + [f"{share:.2f}%"] * n_runs


@dataclass
class App:
    """What the UI works on: the models, the runs folder and where generated examples go."""

    models: models.ModelSet
    runs_root: Path
    examples_dir: Path
    public: bool = False  # serving strangers (a Space): no typed model paths or ids, no server files but uploads
    train_token: str | None = None  # $NPEDIT_TRAIN_TOKEN: in a public app, training actions need it

    def editor_path(self, value: str | None) -> str | None:
        """The path of the editor a choice's value names (empty: the app's own). A local app takes any path or hub id;
        a public one only an editor it lists, named by its choice's value, its path or that path as the page shows it
        (the Train tab's student), else None: it loads no other folder or hub id."""
        value = (value or "").strip() or self.models.paths.model
        if not self.public:
            return value
        return next((path for label, path in self._editors() if value in (label, path, self.shown(path))), None)

    def shown(self, path: str | os.PathLike | None) -> str:
        """A path as the page shows it: as it is in a local app; in a public app, relative to the app's folder or to
        the runs folder's parent, else its name alone (strangers learn no other path of the server)."""
        if not self.public or not path or not Path(path).is_absolute():
            return str(path or "")  # a relative path or a hub id says nothing about the server's folders
        for root in (APP_DIR, self.runs_root.parent):
            if Path(path).is_relative_to(root):
                return str(Path(path).relative_to(root))
        return Path(path).name

    def runs_folder(self) -> str:
        """The runs folder as the page names it: relative to the working directory when below it (`runs`, as the
        default `--runs` reads), else whole."""
        try:
            cwd = Path.cwd()
        except FileNotFoundError:  # the folder the app started in was deleted
            return str(self.runs_root)
        return str(self.runs_root.relative_to(cwd)) if self.runs_root.is_relative_to(cwd) else str(self.runs_root)

    def training_off(self) -> str | None:
        """Why training cannot start here at all (None: it can, given the token when one is set)."""
        if ON_ZEROGPU:
            return NO_TRAINING_ON_ZEROGPU
        if self.public and not self.train_token:
            return ("This app is public, so training is off: its owner can set the Space secret NPEDIT_TRAIN_TOKEN "
                    "(then type it under Training token) or NPEDIT_PUBLIC=0 for a private Space.")
        return None

    def check_training(self, token: str | None) -> None:
        """gr.Error unless this visitor may start, cancel, resume or export training runs."""
        off = self.training_off()
        if off:
            raise _refusal(off)
        if self.public and not self._owns(token):
            raise _refusal("This app is public: training needs its owner's training token (NPEDIT_TRAIN_TOKEN).")

    def runs_hidden(self, token: str | None) -> str | None:
        """Why this visitor sees nothing of the runs folder (a public app shows it only with the training token: its
        samples can show the owner's training images, its configs their paths), or None when they may see it."""
        if not self.public or self._owns(token):
            return None
        if not self.train_token:
            return ("This app is public, so its runs (table, curves, configs, samples, training progress) are hidden: "
                    "its owner can set the Space secret NPEDIT_TRAIN_TOKEN (then type it under Training token in the "
                    "Train tab) or NPEDIT_PUBLIC=0 for a private Space.")
        if token:
            return "That is not this app's training token: its runs stay hidden."
        return ("This app is public: its runs (table, curves, configs, samples, training progress) are shown only to "
                "its owner: type the training token (NPEDIT_TRAIN_TOKEN) under Training token in the Train tab.")

    def _owns(self, token: str | None) -> bool:
        """Whether `token` is the owner's training token (compared in constant time)."""
        return bool(self.train_token) and hmac.compare_digest((token or "").encode(), self.train_token.encode())

    def editor_choices(self) -> list[tuple[str, str]]:
        """(label, value) of the app's editor and of every finished run's editor: the value is its path, in a public
        app its label (`editor_path` maps it back), so that the page holds no path of the server."""
        return [(label, label if self.public else path) for label, path in self._editors()]

    def _editors(self) -> list[tuple[str, str]]:
        """(label, path) of the editors the app offers, each label naming its path as `shown` does."""
        out = []
        if self.models.paths.model:
            bundled = Path(self.models.paths.model) == assets.DEFAULT_MODEL
            label = assets.DEFAULT_MODEL_NOTE if bundled else "started with"
            out.append((f"{label}: {self.shown(self.models.paths.model)}", self.models.paths.model))
        for folder, how in ((assets.DEFAULT_MODEL, assets.DEFAULT_MODEL_NOTE), *assets.EXTRA_EDITORS):
            if (folder / "model_index.json").is_file() and str(folder) != self.models.paths.model:
                out.append((f"{how}: {self.shown(folder)}", str(folder)))
        return out + [c for c in runs.finished_editors(self.runs_root) if c[1] != self.models.paths.model]


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (flags override the NPEDIT_* environment variables)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="NPEditPipeline folder or hub id (default: $NPEDIT_MODEL, else the bundled editor)")
    p.add_argument("--revision", default=os.environ.get("NPEDIT_REVISION") or None,
                   help="with a hub id as --model: its branch, tag or commit (default: $NPEDIT_REVISION, else main)")
    p.add_argument("--judge", help="judge (LLaVA-OneVision, Qwen2.5-VL or InternVL3-hf) folder or hub id (default: "
                                    "$NPEDIT_JUDGE, else bundled)")
    p.add_argument("--teacher", help="text-to-image base folder, for DMD maps and training (default: $NPEDIT_TEACHER, "
                                      "else the editor's own base, model.base of its training config, else the "
                                      "bundled teacher)")
    p.add_argument("--critic", help="critic transformer folder, for DMD maps (default: $NPEDIT_CRITIC, else the "
                                     "editor's own: critic/ inside its folder or beside a run's pipeline/; never "
                                     "another editor's)")
    p.add_argument("--runs", default=os.environ.get("NPEDIT_RUNS", "runs"),
                   help="folder of training runs (default: $NPEDIT_RUNS, else runs)")
    p.add_argument("--public", action=argparse.BooleanOptionalAction, default=_env_public(),
                   help="serve strangers: editors only from the list (no folder or hub id typed in, which would make "
                        "the server load or download it), images of batch lists and training tables only from "
                        "uploads (default: on in a Hugging Face Space, i.e. when $SPACE_ID is set; $NPEDIT_PUBLIC=0 "
                        "or 1 overrides)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                   help="default: $GRADIO_SERVER_PORT, else 7860")
    p.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                   help="default: $GRADIO_SERVER_NAME, else 127.0.0.1 (this machine only; 0.0.0.0: every network, "
                        "see --public)")
    p.add_argument("--device", help="auto (the default: cuda when available, else cpu), cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (the default): bfloat16 on a GPU, else float32")
    p.add_argument("--judge-max-pixels", type=int, default=_env_number("NPEDIT_JUDGE_MAX_PIXELS"),
                   help="a Qwen2.5-VL judge sees at most this many pixels per image, here and in the runs the app "
                        "starts (e.g. 200704 = 448x448; default: $NPEDIT_JUDGE_MAX_PIXELS, else its own cap)")
    p.add_argument("--upload-mb-per-hour", type=float,
                   default=_env_number("NPEDIT_UPLOAD_MB_PER_HOUR", float, "a number of MB", 200.0),
                   help="a public app takes at most this many MB of uploads (every request body) from one client per "
                        "hour, the client being its address as the Space's proxy forwards it; 0 = no limit (default: "
                        "$NPEDIT_UPLOAD_MB_PER_HOUR, else 200)")
    p.add_argument("--upload-min-free-mb", type=float,
                   default=_env_number("NPEDIT_UPLOAD_MIN_FREE_MB", float, "a number of MB", 1024.0),
                   help="a public app refuses an upload that would leave less than this many MB free on the disk of "
                        "gradio's upload folder; 0 = no floor (default: $NPEDIT_UPLOAD_MIN_FREE_MB, else 1024)")
    p.add_argument("--allow-host", action="append",
                   default=[h.strip() for h in os.environ.get("NPEDIT_ALLOW_HOSTS", "").split(",") if h.strip()],
                   help="a local app (on 127.0.0.1) answers requests for loopback names only (no other site's page "
                        "may reach it); also answer for this host name, e.g. a trusted port-forwarding proxy's "
                        "(repeat for more; default: $NPEDIT_ALLOW_HOSTS, comma-separated)")
    p.add_argument("--preload", action="store_true", default=spaces is not None,
                   help="load the editor and judge before serving (default on a Space)")
    args = p.parse_args(argv)
    if args.judge_max_pixels is not None and args.judge_max_pixels < 0:
        p.error(f"--judge-max-pixels must be >= 0 (0: the judge's own cap), got {args.judge_max_pixels}")
    for flag in ("upload_mb_per_hour", "upload_min_free_mb"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0 (0: no limit), got {getattr(args, flag):g}")
    if not 1 <= args.port <= 65535:  # (else the socket's OverflowError traceback once the UI is built; 0 an httpx one)
        p.error(f"--port must be between 1 and 65535, got {args.port}")
    if Path(args.runs).exists() and not Path(args.runs).is_dir():  # (else FileExistsError's traceback at launch)
        p.error(f"--runs {args.runs} is a file; give the folder training runs go in")
    if args.device:  # (else a CUDA or torch error from the first model that loads, in the page)
        from npedit.devices import resolve_device

        try:
            resolve_device(args.device)
        except ValueError as exc:
            p.error(f"--device: {exc}")
    return args


def _env_public() -> bool:
    """--public's default: $NPEDIT_PUBLIC when set (0 or 1), else whether this runs in a Hugging Face Space."""
    value = os.environ.get("NPEDIT_PUBLIC", "").strip().lower()
    if value:
        if value not in ("0", "1", "false", "true"):
            raise SystemExit(f"error: NPEDIT_PUBLIC must be 0 or 1, got {value!r}")
        return value in ("1", "true")
    return bool(os.environ.get("SPACE_ID"))


def _env_number(name: str, cast=int, what: str = "a whole number of pixels", default=None):
    """A numeric environment variable (a Space variable), `default` when unset; a clear exit when it is no number."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return cast(value)
    except ValueError:
        raise SystemExit(f"error: {name} must be {what}, got {value!r}") from None


def make_app(args: argparse.Namespace) -> App:
    """The models (not loaded yet), runs folder and examples folder the UI works on."""
    paths = models.resolve_paths(args.model, args.judge, args.teacher, args.critic)
    examples_dir = Path(tempfile.gettempdir()) / "npedit-app-examples"
    model_set = models.ModelSet(paths, device=args.device, dtype=args.dtype,
                                judge_max_pixels=args.judge_max_pixels, revision=getattr(args, "revision", None))
    return App(model_set, Path(args.runs).resolve(), examples_dir, public=bool(getattr(args, "public", False)),
               train_token=os.environ.get("NPEDIT_TRAIN_TOKEN") or None)


def _for_user(text: str) -> str:
    """`text` for the browser, with an uploaded file named as the user knows it (its own name, not the server's copy
    under gradio's upload folder)."""
    from gradio.utils import get_upload_folder

    folder = get_upload_folder()
    names = {str(folder), str(Path(folder).resolve())}
    uploads = "(?:" + "|".join(map(re.escape, names)) + r")[\\/][0-9a-f]{16,}[\\/]"  # (Windows: either slash)
    return re.sub(uploads, "", text)


DOWNLOADS_KEEP_S = 3600  # as long as a public app's cache cleanup keeps its files
# a local app's results and uploads in gradio's cache (each edit's images, the Train tab's uploads) go after a day, an
# hourly check removing them: kept for good, a lab server's cache grew with every edit until the disk was full
LOCAL_CACHE_KEEP_S = 86400


def _prune_downloads(folder: Path, before: float) -> None:
    """Remove the downloads in `folder` last written before `before` (and the folders `exact` ones came in)."""
    for entry in folder.iterdir():
        try:
            if entry.stat().st_mtime >= before:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
        except OSError:  # gone meanwhile (another session's prune, gradio's own cleanup)
            pass


def download_path(name: str, exact: bool = False) -> Path:
    """A new empty file named like `name` (verdicts-k3x9.csv), or, `exact`, named `name` in a new folder, for a
    download, in gradio's cache folder: gradio serves it from there as it is, and a public app's delete_cache removes
    it an hour on (a file written elsewhere was copied into that folder, and the copy removed, the original never).
    Downloads older than DOWNLOADS_KEEP_S go first, so a local app (whose cache gradio cleans after a day) keeps only
    recent ones."""
    folder = downloads_folder()
    folder.mkdir(parents=True, exist_ok=True)
    _prune_downloads(folder, time.time() - DOWNLOADS_KEEP_S)
    if exact:  # the browser saves it under this name (a manifest the CLI is told to read as cases.csv)
        path = Path(tempfile.mkdtemp(dir=folder)) / name
        try:
            path.touch()
        except OSError:  # (a full disk: no empty folder left behind)
            path.parent.rmdir()
            raise
        return path
    fd, path = tempfile.mkstemp(prefix=f"{Path(name).stem}-", suffix=Path(name).suffix, dir=folder)
    os.close(fd)
    return Path(path)


def drop_download(previous: str | None) -> None:
    """Delete `previous`, the download a session was given last, when it is one of the app's own (a state can hold
    anything): each session keeps one file of a kind, not one per click, until the hour's prune."""
    if previous and Path(previous).parent == downloads_folder() and Path(previous).is_file():
        remove_file(previous)  # (Windows, the file still held open past the wait: the hour's prune takes it)


def downloads_folder() -> Path:
    """Where `download_path` writes: a folder of gradio's cache (GRADIO_TEMP_DIR's, read now)."""
    return Path(get_upload_folder()) / "npedit-downloads"


@contextmanager
def writing_download(what: str, written: list[Path], warn: bool = False):
    """Write a download (`what`, e.g. "trace zip") into the files `written` collects. A write that fails (a full disk,
    a rename refused) removes the half-written files, their `.partial` and an exact name's folder, and is said in
    words with no server path (a public app shows it to strangers): a gr.Error, or with `warn` a gr.Warning, the
    error swallowed and `written` emptied, so that the caller returns its results with no download."""
    try:
        yield
    except OSError as exc:
        _remove_downloads(written)
        why = os.strerror(exc.errno) if exc.errno in errno.errorcode else type(exc).__name__
        message = (f"The {what} could not be written for download ({why}). If the server's disk is full, try again "
                   "once space is free.")
        if not warn:
            raise _refusal(message) from None
        gr.Warning(message + " The results shown are kept.")
        written.clear()


def _remove_downloads(written: list[Path]) -> None:
    """Delete downloads written in part (and their `.partial`), and an exact name's own folder once it is empty."""
    for path in map(Path, written):
        for leftover in (path, Path(f"{path}{PARTIAL_SUFFIX}")):
            try:
                leftover.unlink(missing_ok=True)
            except OSError:  # (still held open on Windows: the hour's prune takes it; the message stays the one above)
                pass
        if path.parent != downloads_folder():  # `download_path(exact=True)`'s own folder
            try:
                path.parent.rmdir()
            except OSError:  # not empty, or gone
                pass


REMOVAL_NEEDS_OBJECT = ("A removal is judged by asking whether the removed object is still there: name it in "
                        "\"Removed object\"{where}, or pick another edit type.")


def _is_removal(edit_type) -> bool:
    """Whether an edit type, as an API caller may spell it ("Remove", " remove"), is a removal."""
    try:
        return edit_type_name(edit_type or "edit") == "remove"
    except ValueError:  # (an unknown type: said by the judge's own check)
        return False


def _refusal(message: str) -> gr.Error:
    """A user's mistake or a limit of this app, for the browser: its words alone (no traceback in the server log)."""
    return gr.Error(message, print_exception=False)


def _error(exc: Exception) -> gr.Error:
    """The message of `exc` for the browser (uploads named as the user named them)."""
    return gr.Error(_for_user(str(exc)), print_exception=False)


def image_input(**kwargs) -> gr.Image:
    """A gr.Image upload that says why a file is unusable: gradio opens it before any handler runs, so a file that is
    no image (or too large for Pillow to open) otherwise shows a bare "Error". (Wrapped, not subclassed: gradio
    writes a .pyi stub next to the module of every component class.) An image the app puts there itself (a random
    scene, the last result, the last edit's pair) is saved as PNG: gradio's default, lossy WebP, changed the pixels
    the editor or judge then saw, which `python -m npedit` reads from the file as it is."""
    image = gr.Image(**{"format": "png", **kwargs})
    preprocess = image.preprocess

    def explained(payload):
        try:
            return preprocess(payload)
        except Image.DecompressionBombError as exc:
            raise _refusal(bomb_message(payload.orig_name or "the file", exc)) from None
        except FileNotFoundError:  # a page left open past the cache's cleanup: its upload (or last result) is gone
            raise _refusal(f"{payload.orig_name or 'this image'} is no longer on the server: the app removes uploads "
                           "and results a while after they arrive (a day in a local app, an hour in a public "
                           "one), and this page kept it longer. Upload it again") from None
        except (OSError, SyntaxError):  # Pillow's UnidentifiedImageError is an OSError
            raise _refusal(f"cannot read {payload.orig_name or 'the file'} as an image: upload a PNG, JPEG, WebP, "
                           "... file") from None

    image.preprocess = explained
    return image


# ---- Edit tab --------------------------------------------------------------------------------

def edit_handler(app: App):
    """The /edit function of `app` (also callable directly, e.g. in tests)."""
    @GPU
    def edit(image, instruction, steps=4, seed=0, randomize_seed=False, caption_target="", edit_type="edit",
             object_name="", inspect_steps=True, editor=None, candidates=1, keep="", refine_steps=0,
             refine_lr=DEFAULT_REFINE_LR, refine_anchor=DEFAULT_REFINE_ANCHOR, progress=gr.Progress()):
        """Edit `image` following `instruction`: the edited PNG, before/after, the seed used, the step panel and the
        trace it shows (with its models' names; `trace_download` zips it); with `candidates` > 1, that many edits,
        the judge's verdict on each, and the one it rates highest; with `refine_steps` > 0, the edit refined by the
        judge (`npedit.refine`) shown, the editor's own beside it, and the judge's loss per step (`refine_view`)."""
        if image is None:
            raise _refusal("Upload an image first (or load an example / a random Shapes scene).")
        if not (instruction or "").strip():
            raise _refusal("Type an instruction, e.g. \"make the red circle blue\".")
        try:
            edit_type = edit_type_name(edit_type)
        except ValueError as exc:
            raise _refusal(str(exc)) from None
        refine_steps = _refine_steps(refine_steps)
        asks_judge = int(candidates or 1) > 1 or inspect_steps or refine_steps > 0
        if asks_judge and edit_type == "remove" and not (object_name or "").strip():
            raise _refusal(REMOVAL_NEEDS_OBJECT.format(where=" (Advanced settings)"))
        refine_lr, refine_anchor = _refine_settings(refine_steps, refine_lr, refine_anchor)
        if app.public and refine_steps * int(candidates or 1) > MAX_PUBLIC_REFINE_WORK:
            raise _refusal(f"This public app refines at most {MAX_PUBLIC_REFINE_WORK} steps per edit over all "
                           f"candidates (candidates x refinement steps; {int(candidates)} x {refine_steps} asked): "
                           "e.g. 4 candidates at 100 steps, or 16 at 25.")
        questions = {"edit_type": edit_type, "object_name": (object_name or "").strip() or None,
                     "keep": object_names(keep)}
        seed = random.randint(0, MAX_SEED) if randomize_seed else int(seed or 0)
        editor = app.editor_path(editor)
        if editor is None and app.public:  # (a local app without an editor says so when it loads one)
            raise _refusal("This app is public: pick an editor from the list (it loads no other folder or hub id).")
        share = 0.5 if refine_steps else 1.0  # of the progress bar: the refinement takes the second half

        def part(fraction, desc):
            progress(share * fraction, desc=desc)

        try:
            part(0.0, desc="loading the editor")
            pipe = app.models.editor(editor)
            # as `python -m npedit edit` reads it; the pipeline then sizes it (no crop, its trained resolution for a
            # Shapes editor) and says in words when it scales it
            picture = load_image(image)
            notice = pipe.working_note(picture.size)
            gallery, traced, refined = [], None, None
            if refine_steps:  # loaded and asked before the edit runs: a missing judge or a refused question stops here
                part(0.02, desc="loading the judge")
                refine_judge = app.models.judge()
                edit_questions(instruction, **questions)
            if refine_steps and int(candidates or 1) > 1:
                n = int(candidates)

                def on_candidate_step(first, k, losses):  # the whole bar: the refinement is nearly all the work
                    done = (first + len(losses) * k / refine_steps) / n
                    progress(0.1 + 0.9 * done, desc=f"refining candidates {first}-{first + len(losses) - 1} of {n} "
                                                     f"with the judge: step {k}/{refine_steps}")

                progress(0.1, desc=f"sampling and refining {n} candidates")
                picked, seconds = edit_refined_best_of(pipe, refine_judge, picture, instruction, n, refine_steps,
                                                       int(steps), seed, lr=refine_lr, anchor=refine_anchor,
                                                       callback=on_candidate_step, **questions)
                kept = picked.refinements[picked.best]
                edited, panel, table, refined = picked.image, None, None, kept.losses
                verdicts = judge_candidates(refine_judge, picture, [r.image for r in picked.refinements], instruction,
                                            **questions)
                gallery = [(r.image, f"#{k} · seed {s} · judge loss {r.losses[0]:.3f} → {r.losses[-1]:.3f}"
                            + (" ✓" if k == picked.best else ""))
                           for k, (r, s) in enumerate(zip(picked.refinements, picked.seeds))]
                info = [f"Seeds **{seed}-{seed + n - 1}** · best of {n}, each refined with the judge: candidate "
                        f"#{picked.best}, seed **{picked.seeds[picked.best]}**, the lowest final judge loss (that "
                        f"seed with 1 candidate redoes it closely: a few 8-bit levels) · {int(steps)} steps · "
                        f"{seconds:.2f} s"
                        + (" · per-step analysis: with 1 candidate" if inspect_steps else ""),
                        f"Refined with the judge, the kept candidate: {plots.refine_caption(kept.losses)} (lr "
                        f"{refine_lr:g}, anchor {refine_anchor:g})",
                        refined_candidates_markdown(picked, verdicts)]
            elif int(candidates or 1) > 1:
                part(0.05, desc="loading the judge")
                judge = app.models.judge()
                part(0.1, desc=f"sampling {int(candidates)} candidates and asking the judge")
                picked, seconds = edit_best_of(pipe, judge, picture, instruction, int(candidates), int(steps), seed,
                                               **questions)
                edited, panel, table = picked.image, None, None
                gallery = [(im, f"#{k} · seed {s} · {v.score:.2f}" + (" ✓" if k == picked.best else ""))
                           for k, (im, v, s) in enumerate(zip(picked.images, picked.verdicts, picked.seeds))]
                info = [f"Seeds **{seed}-{seed + len(picked.images) - 1}** · best of {len(picked.images)} by the "
                        f"judge: candidate #{picked.best}, seed **{picked.seeds[picked.best]}** (that seed with 1 "
                        f"candidate redoes it, to one 8-bit level in a few pixels, with the per-step analysis) · "
                        f"{int(steps)} steps · {seconds:.2f} s",
                        candidates_markdown(picked)]
            elif inspect_steps:
                part(0.05, desc="loading the judge, teacher and critic")
                judge, teacher, critic, loss, judge_note, dmd_note = app.models.inspectors(editor, pipe)
                trace = trace_edit(pipe, judge, teacher, critic, picture, instruction, caption_target,
                                   steps=int(steps), seed=seed, edit_type=edit_type,
                                   object_name=questions["object_name"], loss=loss, judge_note=judge_note,
                                   dmd_note=dmd_note, progress=lambda f, d: part(0.1 + 0.9 * f, desc=d))
                edited, panel, table = trace.image, plots.steps_figure(trace), pd.DataFrame(trace.table())
                traced = trace, trace_models(app, editor, trace)
                source = "given" if trace.caption_from == "given" else "none given, so the instruction is used"
                info = [f"Seed **{seed}** · {len(trace.steps)} steps · sampling {trace.timings['sample_s']:.2f} s, "
                        f"total {trace.timings['total_s']:.2f} s · target caption c^x: “{trace.caption_target}” "
                        f"({source})"]
            elif refine_steps:  # the refinement's own edit is the plain one (`edit_refined`): not sampled twice
                panel, table = None, None
                info = [f"Seed **{seed}** · {int(steps)} steps · per-step analysis off"]
            else:
                edited, seconds = edit_once(pipe, picture, instruction, int(steps), seed)
                panel, table = None, None
                info = [f"Seed **{seed}** · {int(steps)} steps · {seconds:.2f} s · per-step analysis off"]
            if refine_steps and int(candidates or 1) == 1:
                def on_step(k, losses):
                    progress(0.5 + 0.5 * k / refine_steps,
                             desc=f"refining with the judge: step {k}/{refine_steps}, loss {float(losses[0]):.3f}")

                if traced:  # from the traced sampling's own latents: the steps shown are the refined edit's start
                    done = refine_trace(trace, pipe, refine_judge, refine_steps=refine_steps, lr=refine_lr,
                                        anchor=refine_anchor, callback=on_step, keep=questions["keep"])
                    seconds = trace.timings["sample_s"] + trace.timings["refine_s"]
                else:
                    done, seconds = edit_refined(pipe, refine_judge, picture, instruction, refine_steps, int(steps),
                                                 seed, lr=refine_lr, anchor=refine_anchor, callback=on_step,
                                                 **questions)
                verdicts = judge_candidates(refine_judge, picture, [done.start, done.image], instruction, **questions)
                edited, refined = done.image, done.losses
                gallery = [(done.start, f"the editor's edit · judge loss {done.losses[0]:.3f}"),
                           (done.image, f"refined, {refine_steps} steps · judge loss {done.losses[-1]:.3f} ✓")]
                info += [f"Refined with the judge: {plots.refine_caption(done.losses)} (lr {refine_lr:g}, anchor "
                         f"{refine_anchor:g}) · {seconds:.2f} s, the edit included"
                         + (" · the step panel above shows the sampling steps it started from; the trace's zip holds "
                            "the refined image and its losses too" if traced else ""),
                         refinement_markdown(verdicts)]
        except (models.ModelError, ImageError, ValueError) as exc:
            raise _error(exc) from None
        if notice:
            gr.Warning(notice)
            info.insert(0, f"⚠️ {notice}")
        last = {"reference": picture, "edited": edited, "instruction": instruction, "edit_type": edit_type,
                "object_name": object_name or "", "keep": keep or ""}
        return edited, (picture, edited), seed, "\n\n".join(info), panel, table, gallery, last, traced, refined

    return edit


def _refine_steps(steps) -> int:
    """The refinement steps as a whole number from 0 to the app's cap, or gr.Error (checked before anything else about
    the refinement: a bad count is named as such, not as a clash with Candidates)."""
    value = float(steps or 0)
    if value != int(value) or not 0 <= value <= MAX_REFINE_STEPS:
        raise _refusal(f"Refine with the judge takes a whole number of steps from 0 to {MAX_REFINE_STEPS}, got {steps}.")
    return int(value)


def _refine_settings(steps: int, lr, anchor) -> tuple[float, float]:
    """The refinement's learning rate and anchor as numbers, or gr.Error saying what is wrong (a cleared box: None)."""
    if steps == 0:  # off: what the advanced boxes hold is not used, so a cleared one blocks no edit
        return DEFAULT_REFINE_LR, DEFAULT_REFINE_ANCHOR
    for name, value in (("learning rate", lr), ("anchor", anchor)):
        if value is None:
            raise _refusal(f"Give the refinement {name} (Refine with the judge: advanced).")
    try:
        check_refine_settings(steps, float(lr), float(anchor))
    except ValueError as exc:
        raise _refusal(str(exc)) from None
    return float(lr), float(anchor)


def refine_view(losses: list[float] | None):
    """The judge's loss per refinement step of the last edit as a plot, hidden when it was not refined (drawn after
    the edit shows, outside its GPU function)."""
    if not losses:
        return gr.Plot(value=None, visible=False)
    return gr.Plot(value=plots.refine_figure(losses), visible=True)


def trace_download(traced, previous: str | None) -> tuple[str | None, str | None, None]:
    """The per-step trace of the last edit as a zip to download (`save_trace`: the files `python -m npedit edit
    --trace` writes), written after the edit's results show and outside its GPU function (a 1024-px trace takes ~1.1 s
    to encode on a 2-core CPU, which ZeroGPU would bill as GPU time); the session's `previous` zip is deleted, so a
    local app (a daily cache cleanup) keeps one per session. Returns (download, the zip to delete next, trace state)."""
    drop_download(previous)
    if traced is None:
        return None, None, None
    trace, names = traced
    written = []
    with writing_download("trace zip", written, warn=True):  # the edit shows: no zip, and the trace state cleared
        written.append(download_path("trace.zip"))
        save_trace(trace, written[0], names)
    path = str(written[0]) if written else None
    return path, path, None  # (the trace's images leave the session's state)


def trace_models(app: App, editor: str | None, trace) -> dict[str, str | None]:
    """The models of a traced edit by role, named as the page names them (a public app: no server folder); the
    teacher and critic only where the trace has DMD maps, the judge only where it has P(Yes)."""
    comp = models.companions(editor or app.models.paths.model, app.models.paths)
    dmd = trace.dmd_t is not None
    return {"editor": app.shown(editor or app.models.paths.model),
            "judge": None if trace.judge_note else app.shown(app.models.paths.judge),
            "teacher": app.shown(comp.teacher) if dmd else None, "critic": app.shown(comp.critic) if dmd else None}


def verdicts_markdown(heads: list[str], rows: list[tuple[list[str], Verdict]]) -> str:
    """A Markdown table of verdicts: each row's leading cells (under `heads`), then its score (sum of log
    P(expected)), P(edit) and P(identity)."""
    lines = ["| " + " | ".join([*heads, "score", "P(edit)", "P(identity)"]) + " |", "|---" * (len(heads) + 3) + "|"]
    lines += ["| " + " | ".join([*cells, f"{v.score:.2f}", f"{v.p_edit:.3f}", f"{v.p_identity:.3f}"]) + " |"
              for cells, v in rows]
    return "Score: the sum over the judge's questions of log P(the expected answer).\n\n" + "\n".join(lines)


def candidates_markdown(picked) -> str:
    """The judge's numbers for each best-of-N candidate as a Markdown table."""
    seeds = picked.seeds or [None] * len(picked.verdicts)
    return verdicts_markdown(["candidate", "seed"], [([f"**#{k} ✓**" if k == picked.best else f"#{k}",
                                                       "" if s is None else str(s)], v)
                                                     for k, (v, s) in enumerate(zip(picked.verdicts, seeds))])


def refined_candidates_markdown(picked, verdicts: list[Verdict]) -> str:
    """The judge's loss before and after refinement and its verdict on each refined candidate
    (`npedit.refine.RefinedCandidates`) as a Markdown table, the kept one (lowest final loss) marked."""
    return verdicts_markdown(["candidate", "seed", "judge loss before", "after"], [
        ([f"**#{k} ✓**" if k == picked.best else f"#{k}", str(s), f"{r.losses[0]:.3f}", f"{r.losses[-1]:.3f}"], v)
        for k, (r, s, v) in enumerate(zip(picked.refinements, picked.seeds, verdicts))])


def refinement_markdown(verdicts: list[Verdict]) -> str:
    """The judge's verdicts on the editor's own edit and on its refinement (shown) as a Markdown table."""
    return verdicts_markdown(["image"], [(["the editor's edit"], verdicts[0]),
                                         (["**refined ✓** (shown)"], verdicts[1])])


def build_edit_tab(app: App, last_edit: gr.State):
    """Edit tab: input, instruction, settings, result, before/after, per-step panel, examples."""
    choices = app.editor_choices()
    with gr.Row():
        editor = gr.Dropdown(choices=choices, value=choices[0][1] if choices else None, label="Editor",
                             allow_custom_value=not app.public, scale=4)
        refresh = gr.Button("↻ Refresh list", size="sm", scale=0, min_width=120)
    status = gr.Markdown(app.models.status(app.editor_path(choices[0][1] if choices else None), shown=app.shown))
    with gr.Row():
        with gr.Column():
            image = image_input(type="filepath", image_mode=None, label="Input image", height=320,
                                elem_classes=["pixelated", "fill-image"], sources=["upload", "clipboard"],
                                elem_id="edit-input")
            with gr.Row():
                instruction = gr.Textbox(label="Instruction", placeholder="make the red circle blue", scale=4)
                run = gr.Button("Run", variant="primary", scale=0, min_width=90)
            random_scene = gr.Button("Random Shapes scene (for the Shapes-world editor)", size="sm")
            refine = gr.Slider(0, MAX_REFINE_STEPS, value=0, step=1, label="Refine with the judge (steps; 0: off)",
                               info=REFINE_HELP + (f" This public app refines at most {MAX_PUBLIC_REFINE_WORK} steps "
                                                   "per edit over all candidates (candidates x steps)."
                                                   if app.public else ""), elem_id="refine-steps")
            with gr.Accordion("Refine with the judge: advanced", open=False):
                with gr.Row():
                    refine_lr = gr.Number(value=DEFAULT_REFINE_LR, label="Learning rate (Adam, on the latents)",
                                          info="In (0, 10]: how far one step moves each latent value, at most")
                    refine_anchor = gr.Number(value=DEFAULT_REFINE_ANCHOR, minimum=0,
                                              label="Anchor (pull back to the editor's own latents)",
                                              info="0: none; larger: the result stays nearer the editor's edit")
            with gr.Accordion("Advanced settings", open=False):
                steps = gr.Slider(1, MAX_STEPS, value=4, step=1, label="Sampling steps")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", minimum=0, maximum=MAX_SEED)
                    randomize = gr.Checkbox(value=False, label="Randomise seed")
                caption = gr.Textbox(value="", label="Target caption c^x (optional)", info=CAPTION_HELP)
                with gr.Row():
                    edit_type = gr.Dropdown(list(EDIT_TYPES), value="edit",
                                            label="Edit type (judge questions)")
                    object_name = gr.Textbox(value="", label="Removed object (for edit type 'remove')")
                inspect = gr.Checkbox(value=True, label="Per-step analysis (judge P(Yes) and DMD map for every step)")
                candidates = gr.Slider(1, MAX_CANDIDATES, value=1, step=1, label="Candidates (best of N)",
                                       info="Sample this many edits; the judge asks its training questions about "
                                            "each (edit type and removed object above, a keep check per object "
                                            "below) and keeps the best (with refinement: each is refined and the "
                                            "lowest final judge loss kept). The per-step analysis needs 1")
                keep = gr.Textbox(value="", label="Objects to keep (separated by ';' or ','; for Candidates and "
                                  "refinement)",
                                  placeholder="red square; blue triangle")
        with gr.Column():
            result = gr.Image(type="pil", format="png", label="Edited (PNG)", height=320, interactive=False,
                              buttons=["download", "fullscreen"], elem_classes=["pixelated", "fill-image"],
                              elem_id="edit-result")
            reuse = gr.Button("↺ Use the result as the next input", size="sm")
            slider = gr.ImageSlider(type="pil", format="png", label="Before / after", max_height=320,
                                    elem_classes="pixelated")
            info = gr.Markdown(label="Edit info", show_label=False)  # (the /edit API names its output so)
            gallery = gr.Gallery(label="Candidates (best of N): #, the judge's score, ✓ kept; or, refined with the "
                                       "judge, the editor's edit and the refined one, or each refined candidate "
                                       "with its loss", columns=4,
                                 height="auto", format="png", object_fit="contain", elem_classes="pixelated",
                                 elem_id="candidates")
            # the judge's loss per refinement step, its one-line caption as title; shown after a refined edit only
            refine_plot = gr.Plot(label="Judge loss per refinement step", format="png", show_label=False,
                                  visible=False, elem_id="refine-plot")
    gr.Markdown("### Inside the sampler: one column per step\nPredicted clean image x0 of each step, the judge's "
                "P(edit done) (for a removal, P(No) to \"does it contain the object?\") and identity P(Yes) on that "
                "x0, and its DMD map: where the teacher's (with CFG, as in training) and the critic's x0-predictions "
                "disagree on that x0 noised to the colour bar's t (one noise, drawn from the seed, for every step).")
    step_plot = gr.Plot(label="Per-step panel", format="png", show_label=False, elem_id="step-panel")
    step_table = gr.Dataframe(label="Per-step numbers", headers=list(STEP_COLUMNS), interactive=False,
                              elem_id="step-table")
    trace_file = gr.File(label="Per-step trace (.zip: each step's x0 and DMD map as PNG and .npy, trace.json and "
                               "steps.csv with every digit, the seed, steps, instruction and models; `python -m "
                               "npedit edit --trace DIR` writes the same)", interactive=False, elem_id="trace-file")
    examples = datasets.bundled_examples(assets.EXAMPLES_DIR) + datasets.shapes_examples(app.examples_dir)
    gr.Examples(examples, inputs=[image, instruction, caption, edit_type, object_name, keep],
                label="Examples (assets/examples, then generated Shapes-world cases)", examples_per_page=12)

    inputs = [image, instruction, steps, seed, randomize, caption, edit_type, object_name, inspect, editor, candidates,
              keep, refine, refine_lr, refine_anchor]
    # the trace to zip, the zip last given and the refinement's losses to draw (States: the /edit API returns the
    # seven values it always did)
    traced, given, refined = gr.State(), gr.State(), gr.State()
    outputs = [result, slider, seed, info, step_plot, step_table, gallery, last_edit, traced, refined]
    edited = gr.on([run.click, instruction.submit], edit_handler(app), inputs, outputs, api_name="edit",
                   concurrency_id="models", concurrency_limit=1)
    edited.then(trace_download, [traced, given], [trace_file, given, traced], api_visibility="private")
    edited.success(refine_view, refined, refine_plot, api_visibility="private")  # (a failed edit keeps the last plot)
    reuse.click(lambda im: im, result, image, api_visibility="private")
    random_scene.click(lambda: datasets.random_shapes_case(random.randint(0, MAX_SEED)), None,
                       [image, instruction, caption, edit_type, object_name, keep], api_visibility="private")
    def describe(value):
        """The status of the editor picked; in a public app only of a listed one (anyone can send this event with any
        path, and the status says whether a folder exists and what its training config names)."""
        path = app.editor_path(value)
        if path is None and app.public:
            return ("This app is public: pick an editor from the list (it describes and loads no other folder or hub "
                    "id).")
        return app.models.status(path, shown=app.shown)

    editor.change(describe, editor, status, api_visibility="private")

    def refresh_list(current):
        choices = app.editor_choices()
        return gr.Dropdown(choices=choices, value=current or (choices[0][1] if choices else None))

    refresh.click(refresh_list, editor, editor, api_visibility="private")
    return editor, refresh_list


# ---- Judge tab -------------------------------------------------------------------------------

def gradients_handler(app: App):
    """The Judge inspector's gradient maps of `app`'s judge (also callable directly, e.g. in tests)."""
    @GPU
    def gradients(reference, edited, instruction, edit_type="edit", object_name="", extra="", keep="", new="",
                  gone=""):
        """A figure: for each question, where in the edited image its answer comes from (`answer_gradients`)."""
        if reference is None or edited is None:
            raise _refusal("Give both a reference and an edited image.")
        if _is_removal(edit_type) and not (object_name or "").strip():
            raise _refusal(REMOVAL_NEEDS_OBJECT.format(where=""))
        try:
            grads = answer_gradients(app.models.judge(), reference, edited, instruction or "",
                                     edit_type=edit_type or "edit", object_name=(object_name or "").strip() or None,
                                     extra=judging.extra_questions(extra), keep=object_names(keep),
                                     new=object_names(new), gone=object_names(gone))
        except (models.ModelError, ImageError, ValueError) as exc:
            raise _error(exc) from None
        return plots.answer_gradients_figure(grads)

    return gradients


def build_judge_tab(app: App, last_edit: gr.State):
    """Judge inspector tab: one pair question by question, or many pairs from a list."""
    gr.Markdown("Ask the judge about any (reference, edited) pair: the edit check and the identity check it answers "
                "in training, plus your own Yes/No questions.")
    with gr.Row():
        reference = image_input(type="filepath", image_mode=None, label="Reference", height=256,
                             elem_classes=["pixelated", "fill-image"])
        edited = image_input(type="filepath", image_mode=None, label="Edited", height=256,
                          elem_classes=["pixelated", "fill-image"])
    take = gr.Button("Take the pair from the last edit", size="sm")
    instruction = gr.Textbox(label="Instruction")
    with gr.Row():
        edit_type = gr.Dropdown(list(EDIT_TYPES), value="edit", label="Edit type")
        object_name = gr.Textbox(value="", label="Removed object (for 'remove')")
    keep = gr.Textbox(value="", label="Objects to keep (separated by ; or ,): one keep check each, \"does the edited "
                      "image contain ...?\" (asked in training with judge.keep_questions)")
    with gr.Row():
        new = gr.Textbox(value="", label="Objects the edit creates (separated by ; or ,): a change check each, "
                         "expected Yes")
        gone = gr.Textbox(value="", label="Objects the edit must make disappear (separated by ; or ,): expected No "
                          "(both asked in training with judge.change_questions)")
    extra = gr.Textbox(value="", label="Extra questions (one per line; asked about both images)", lines=2,
                       placeholder="Is the second image sharp and free of artifacts? Answer with Yes or No.")
    with gr.Row():
        ask = gr.Button("Ask the judge", variant="primary")
        explain = gr.Button("Where do the answers come from? (gradient maps)")
    summary = gr.JSON(label="Verdict")
    report = gr.State()  # the whole verdict, saved for download after each answer (the /judge API returns two values)
    download = gr.File(label="Download (JSON: the instruction, the verdict and every question with P(Yes) and margin, "
                       "as python -m npedit judge prints it)", interactive=False)
    # fixed widths: sized by their content, the question ran off the right edge and "expected" split in two
    table = gr.Dataframe(label="Every question: P(Yes) between the two answers (sigmoid of the logit margin, as "
                         "training reads it) and the share of the judge's next-token probability Yes and No hold",
                         interactive=False, wrap=True,
                         column_widths=VERDICT_WIDTHS, elem_id="verdict-table")
    # gradio draws a plot's label over the figure's top left: a long one hid the column titles, so it is said above
    gr.Markdown("**Gradient maps**: the gradient of each answer's log P(expected) with respect to the edited image's "
                "pixels (top: its size; bottom: the edited image nudged along it). The first column is what trains "
                "an editor: the mean over the questions NP-Edit asks.")
    gradient_plot = gr.Plot(label="Gradient maps", format="png", show_label=False)

    @GPU
    def judge(reference, edited, instruction, edit_type="edit", object_name="", extra="", keep="", new="", gone=""):
        """P(Yes) and logit margin of every question about (reference, edited) for `instruction`."""
        if reference is None or edited is None:
            raise _refusal("Give both a reference and an edited image.")
        if _is_removal(edit_type) and not (object_name or "").strip():
            raise _refusal(REMOVAL_NEEDS_OBJECT.format(where=""))
        try:
            v = judge_edit(app.models.judge(), reference, edited, instruction or "", edit_type=edit_type or "edit",
                           object_name=(object_name or "").strip() or None, extra=judging.extra_questions(extra),
                           keep=object_names(keep), new=object_names(new), gone=object_names(gone))
        except (models.ModelError, ImageError, ValueError) as exc:
            raise _error(exc) from None
        headline = {"p_edit": v.p_edit, "p_identity": v.p_identity}
        if v.p_keep is not None:
            headline["p_keep"] = v.p_keep
        if v.p_change is not None:
            headline["p_change"] = v.p_change
        return headline, judging.verdict_table(v), v.report(instruction or "")

    def save_report(record, previous=None):
        """The last verdict as a JSON file to download, twice: for the page and for the session's state, whose
        `previous` verdict file goes (a local app kept one per click for an hour: 100 inspections, 100 files)."""
        drop_download(previous)
        if not record:
            return None, None
        written = []
        with writing_download("verdict file", written, warn=True):  # the verdict shows: no file to download
            written.append(download_path("verdict.json"))
            write_atomic(written[0], json.dumps(record, indent=1))
        path = str(written[0]) if written else None
        return path, path

    saved = gr.State()  # the verdict file last given, deleted when the next one is written
    ask.click(judge, [reference, edited, instruction, edit_type, object_name, extra, keep, new, gone],
              [summary, table, report], api_name="judge", concurrency_id="models", concurrency_limit=1).then(
        save_report, [report, saved], [download, saved], api_visibility="private")
    explain.click(gradients_handler(app), [reference, edited, instruction, edit_type, object_name, extra, keep, new,
                                           gone], gradient_plot, api_visibility="private", concurrency_id="models",
                  concurrency_limit=1)

    def take_last(last):
        """The last edit's pair and the questions its candidates were judged with (their keep checks included)."""
        if not last:
            raise _refusal("No edit yet: run one in the Edit tab first.")
        return (last["reference"], last["edited"], last["instruction"], last["edit_type"], last["object_name"],
                last["keep"])

    take.click(take_last, last_edit, [reference, edited, instruction, edit_type, object_name, keep],
               api_visibility="private")

    with gr.Accordion("Batch: many pairs at once", open=False):
        gr.Markdown("Upload one **.csv** or **.jsonl** list with columns `reference`, `edited`, `instruction` "
                    "(optional `id`, by default the line number; `edit_type`, `object_name`, and `keep`, `new`, "
                    "`gone`: object names separated by `;` or `,`, adding `p_keep` and `p_change`; `extra`: free-form "
                    "Yes/No questions about both images, separated by `;`, in the questions table) **and the images "
                    "it names** (matched by file name): the list `python -m npedit judge --batch` reads, the rows it "
                    "writes.")
        files = gr.File(file_count="multiple", file_types=[".csv", ".jsonl", "image"], label="List + images")
        run_batch = gr.Button("Judge all pairs", variant="primary")
        batch_table = gr.Dataframe(label="Verdicts", interactive=False)
        with gr.Row():
            batch_csv = gr.File(label="Download: a row per pair (CSV)", interactive=False)
            questions_csv = gr.File(label="Download: a row per question (CSV)", interactive=False)
        asked_csv = gr.State()  # shown after the answer: the /judge_batch API returns the two values it always did

        @GPU
        def judge_batch(files, progress=gr.Progress()):
            try:
                pairs = judging.read_pairs(files or [], uploads_only=app.public,
                                           max_pairs=MAX_BATCH_PAIRS if app.public else None)
                out, asked = judging.judge_pairs(app.models.judge(), pairs, lambda f, d: progress(f, desc=d),
                                                 named=True)  # as the list names them: no upload folder's copy
            except (models.ModelError, ValueError) as exc:
                raise _error(exc) from None
            paths = []
            with writing_download("verdict tables", paths, warn=True):  # the table still shows, with no files
                paths.append(download_path("verdicts.csv"))  # one at a time: a failed second leaves no first
                paths.append(download_path("questions.csv"))
                for path, table in zip(paths, (out, asked)):
                    judging.write_rows(path, table)
            shown = [str(p) for p in paths] or [None, None]
            return out.round(judging.SHOWN_DECIMALS), shown[0], shown[1]

        run_batch.click(judge_batch, files, [batch_table, batch_csv, asked_csv], api_name="judge_batch",
                        concurrency_id="models", concurrency_limit=1).then(
            lambda path: path, asked_csv, questions_csv, api_visibility="private")


# ---- Train tab -------------------------------------------------------------------------------

def _status_markdown(st: jobs.JobStatus | None, device: str) -> str:
    if st is None:
        return f"No job yet. Jobs train on **{device}**, one at a time, in a separate process (closing this tab " \
               "does not stop them)."
    eta = f" · ETA {st.eta_s:.0f} s" if st.eta_s is not None else ""
    elapsed = f" · elapsed {st.elapsed_s:.0f} s" if st.elapsed_s is not None else ""
    progress = f" · step {st.step}/{st.max_steps}" if st.max_steps else ""
    lines = [f"**{Path(st.run_dir).name}**: **{st.state}**{progress}{eta}{elapsed}", st.message]
    if st.pipeline and st.state == "finished":
        lines.append(f"The editor is in the Edit tab's list: `{st.pipeline}`")
    return "\n\n".join(lines)


def _slug(text: str) -> str:
    """A run name as a folder name that every OS accepts ('my run: 12/05' -> 'my-run-12-05', 'con' -> 'con-run')."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", (text or "").strip()).strip("-.")
    stem, dot, rest = slug.partition(".")  # Windows reads a device name up to the first dot ('aux.v2' is AUX)
    return f"{stem}-run{dot}{rest}" if stem.upper() in WINDOWS_DEVICE_NAMES else slug  # (nor copied there)


def build_train_tab(app: App, editor_dropdown, refresh_list):
    """Train tab: data table, models, preset knobs, Start/Cancel and live status (polled)."""
    device = jobs.device_name()
    paths = app.models.paths
    gr.Markdown(f"Train an editor in the background on **{device}**"
                f"{' (no GPU found: expect minutes for the quick preset only)' if device == 'cpu' else ''}. "
                f"{presets.LORA_NOTE}")
    off = app.training_off()
    if off:
        gr.Markdown(f"⚠️ {off}")
    token = gr.Textbox(label="Training token (this public app's NPEDIT_TRAIN_TOKEN: training, and seeing its runs)",
                       type="password", visible=app.public and bool(app.train_token))
    uploads = gr.State({})  # {name the table shows: file} of the uploaded images, or of the generated cases
    staging = app.runs_root / ".staging"  # generated Shapes cases: the app's own files, which a public app trains on
    with gr.Tab("Generate Shapes cases"):
        with gr.Row():
            n_cases = gr.Slider(6, 1000, value=60, step=6, label="Number of cases (all six edit categories)")
            data_seed = gr.Number(value=0, precision=0, label="Seed")
            generate = gr.Button("Generate", scale=0, min_width=120)
        stream = gr.Checkbox(False, label="Train on the Shapes stream instead of the table (data.train=shapes: "
                                          "50,000 generated cases with paraphrases and target images; the table is "
                                          "then only a preview)")
    with gr.Tab("Upload my images"):
        files = gr.File(file_count="multiple", file_types=["image", *datasets.MANIFEST_SUFFIXES],
                        elem_id="train-upload",
                        label="Images (then type an instruction per row), or a manifest (cases.jsonl / cases.csv) "
                              "with the images it names: it fills the table")
    gr.Markdown(TABLE_HELP)
    # fixed widths: sized by their content, the columns shrank to a letter each once an instruction was typed
    table = gr.Dataframe(value=datasets.empty_table(), headers=datasets.TABLE_COLUMNS, interactive=True,
                         label="Training data", max_height=280, wrap=True, elem_id="train-table",
                         column_widths=TABLE_WIDTHS)
    with gr.Row():
        drop_targets = gr.Button("Remove the target images' rows", scale=0, min_width=260)
        download = gr.Button("Download the table as cases.csv", scale=0, min_width=260)
        table_csv = gr.File(label="cases.csv: put it in the folder holding its images, then python -m npedit train "
                                  "data.train=FOLDER/cases.csv (or upload both here again)", interactive=False,
                            height=80, elem_id="train-table-csv")
    with gr.Row():
        own_base, own_judge = paths.teacher or str(assets.DEFAULT_TEACHER), paths.judge or str(assets.DEFAULT_JUDGE)
        # a public app trains from its own teacher and judge only, shown without the server's folders
        base = gr.Textbox(value=app.shown(own_base), label="Teacher (base model: model.base)",
                          interactive=not app.public)
        judge = gr.Textbox(value=app.shown(own_judge), label="Judge (judge.path)", interactive=not app.public)
        judge_pixels = gr.Number(value=app.models.judge_max_pixels or 0, precision=0, minimum=0,
                                 label="Judge pixels per image (judge.max_pixels; Qwen2.5-VL only; 0 = its own cap)")
        student = gr.Textbox(value=app.shown(paths.model or str(assets.DEFAULT_MODEL)),
                             label="Start the student from (model.student; empty = the teacher)")
    first = next(iter(presets.PRESETS))
    preset = gr.Dropdown(list(presets.PRESETS), value=first, label="Preset")
    preset_note = gr.Markdown(presets.PRESETS[first].note)
    knobs = {}
    p0 = presets.PRESETS[first]
    with gr.Row():
        knobs["stage"] = gr.Dropdown(["npedit", "warmup", "sft"], value=p0.stage, label="stage")
        for name in ("max_steps", "critic_steps", "batch_size", "resolution"):
            knobs[name] = gr.Number(value=getattr(p0, name), precision=0, label=name)
        knobs["grad_accum"] = gr.Number(value=p0.grad_accum, precision=0, minimum=1,
                                        label="grad_accum (micro-batches of batch_size per update)")
        knobs["max_minutes"] = gr.Number(value=p0.max_minutes, minimum=0, label="max_minutes (0 = no time limit)")
        knobs["lora_rank"] = gr.Number(value=p0.lora_rank, precision=0, minimum=0,
                                       label="lora_rank (0 = full fine-tuning; > 0 = adapters, for large models)")
    with gr.Row():
        for name in ("lr", "lambda_dmd", "lambda_vlm"):
            knobs[name] = gr.Number(value=getattr(p0, name), label=name)
        knobs["keep_questions"] = gr.Number(value=p0.keep_questions, precision=0, minimum=0,
                                            label="keep_questions (0 = the paper's questions only)")
        knobs["change_questions"] = gr.Number(value=p0.change_questions, precision=0, minimum=0,
                                              label="change_questions (checks of new / gone; 0 = off)")
    with gr.Row():
        for name in ("log_every", "sample_every", "save_every"):
            knobs[name] = gr.Number(value=getattr(p0, name), precision=0, label=name)
    knobs["negative_prompt"] = gr.Textbox(value=p0.negative_prompt, label="negative_prompt (the teacher's CFG "
                                          "negative; the Shapes teacher learnt \"\" as its unconditional prompt)")
    with gr.Row():
        run_name = gr.Textbox(label="Run name (empty: a timestamp)", scale=3)
        start = gr.Button("Start", variant="primary", interactive=not off, scale=1)
        cancel = gr.Button("Cancel", variant="stop", scale=1)
    current = gr.State(None)
    status = gr.Markdown(_status_markdown(None, device), elem_id="train-status")
    # no labels drawn over the figure (they hid its top y-tick and the sample grid's first rows): named above instead
    with gr.Row():
        with gr.Column():
            gr.Markdown("**Loss curves** (the main losses, per logged step)")
            curves = gr.Plot(label="Loss curves", format="png", show_label=False, elem_id="train-curves")
        with gr.Column():
            gr.Markdown("**Latest samples**: reference | edit, one row per fixed training case, its instruction below")
            sample = gr.Image(label="Latest samples (reference | edit)", interactive=False, show_label=False,
                              elem_classes="pixelated", elem_id="train-sample")
    log = gr.Textbox(label="Log (tail)", lines=6, max_lines=12, autoscroll=True)
    timer = gr.Timer(2.0, active=False)

    def on_preset(name):
        p = presets.PRESETS[name]
        return [p.note] + [getattr(p, k) for k in knobs]

    preset.change(on_preset, preset, [preset_note, *knobs.values()], api_visibility="private")

    def on_generate(n, seed, token_value=None):
        if app.public:  # up to 1,000 PNGs in a new folder per seed: a stranger's calls would fill the disk
            app.check_training(token_value)
        seed = int(seed or 0)
        if not 0 <= seed < 2**32:
            raise _refusal(f"The seed is a whole number from 0 to {2**32 - 1}, got {seed}.")
        # each seed and count has a folder of up to 2,000 PNGs there, kept only until Start copies them into a run:
        # those of a day ago go, as the cache's uploads do (kept, every new seed tried added one for good)
        if staging.is_dir():
            _prune_downloads(staging, time.time() - LOCAL_CACHE_KEEP_S)
        # the table names each case's image by its file name (the staging folder is the server's business) and the
        # state maps the names back to the files, as for uploads
        return datasets.named_images(datasets.shapes_table(int(n), staging / f"shapes-{seed}-{int(n)}", seed=seed))

    generate.click(on_generate, [n_cases, data_seed, token], [table, uploads], api_visibility="private")
    def on_upload(paths, rows, uploaded=None):
        """The table of the uploaded files: a manifest's rows matched to its images by name, else a row per image
        (what was typed kept); a warning per kind of file or row left out (or to fix), and why."""
        try:
            table, notes = datasets.table_for_uploads(paths or [], rows, before=list((uploaded or {}).values()))
        except ValueError as exc:  # a manifest that cannot be read (its line named), or two of them
            raise _error(exc) from None
        for note in notes:
            gr.Warning(_for_user(note))
        return table, datasets.upload_names(paths or [])

    files.upload(on_upload, [files, table, uploads], [table, uploads], api_visibility="private")

    def on_remove(paths, rows, uploaded=None):
        """The table once files are taken off the upload (one, or all): the rows of the files left, as typed, and none
        for those removed (Start trained on them: the table kept their rows). A table of generated cases stays."""
        uploaded = {k: str(v) for k, v in (uploaded or {}).items()}
        left = [str(p) for p in paths or []]
        ours = uploaded and not any(Path(p).resolve().is_relative_to(staging.resolve()) for p in uploaded.values())
        if not ours or not set(left) <= set(uploaded.values()):
            return gr.skip(), gr.skip()
        # a second photo.png was "photo (2).png": the first removed, it is photo.png, and keeps its own row's text
        renamed = {old: new for old, path in uploaded.items()
                   for new, now in datasets.upload_names(left).items() if path == now}
        rows = rows.reindex(columns=datasets.TABLE_COLUMNS)
        rows = rows[rows["image"].isin(renamed)].copy()
        # a target that was a removed file is blanked, not left to name whichever file takes its name after renaming
        rows["target"] = rows["target"].map(lambda t: renamed.get(t, "" if t in uploaded else t))
        rows = rows.replace({"image": renamed})
        return on_upload(left, rows, {k: v for k, v in uploaded.items() if k in renamed})

    files.delete(on_remove, [files, table, uploads], [table, uploads], api_visibility="private")
    files.clear(on_remove, [files, table, uploads], [table, uploads], api_visibility="private")

    # No change event takes a target's row out as the user types: its answer replaced the table while the next cell
    # was being typed in, losing keys (seen in Chromium). A button does, as adding files and Start do.
    def on_drop_targets(rows):
        """The table without the rows that are only another row's target (an uploaded target image, untouched)."""
        rows = rows.reindex(columns=datasets.TABLE_COLUMNS)
        only = datasets.target_rows(rows)
        if not only:
            gr.Info("No row to remove: a row goes once another row names its image in its target cell and nothing "
                    "is typed in it.")
        return rows.drop(index=rows.index[only]).reset_index(drop=True)

    drop_targets.click(on_drop_targets, table, table, api_visibility="private")

    def on_download(rows):
        """The table as a cases.csv manifest (its images named as the table names them)."""
        written = []
        with writing_download("cases.csv", written):  # (outside: a gr.Error is a ValueError too)
            written.append(download_path("cases.csv", exact=True))
            try:
                return str(datasets.write_table_csv(rows, written[0]))
            except ValueError as exc:  # nothing to download: its empty file and folder go too
                _remove_downloads(written)
                raise _error(exc) from None

    download.click(on_download, table, table_csv, api_visibility="private")

    def on_start(table, uploads, use_stream, preset_name, name, base, judge, judge_pixels, student, token_value=None,
                 *values):
        app.check_training(token_value)  # (the Start button may be off, but its event can still be sent)
        values = dict(zip(knobs, values))
        if app.public:
            if (base.strip() not in (own_base, app.shown(own_base)) or judge.strip() not in (own_judge,
                    app.shown(own_judge)) or (student.strip() and app.editor_path(student.strip()) is None)):
                raise _refusal("This app is public: it trains from its own teacher and judge, and from a listed "
                               "editor (it loads no other folder or hub id).")
            # the boxes show names without the server's folders (and the student may be a list label): the paths
            base, judge, student = own_base, own_judge, student.strip() and app.editor_path(student.strip())
        if presets.start_problem(presets.PRESETS[preset_name]):
            raise _refusal(presets.start_problem(presets.PRESETS[preset_name]))
        run_dir = app.runs_root / (_slug(name) or time.strftime("run-%Y%m%d-%H%M%S"))
        busy = jobs.active_job(app.runs_root, device)
        if busy is not None:
            raise _refusal(f"{device} is busy with run '{busy.name}': one job per device. Wait for it or cancel it.")
        if runs.is_run(run_dir):
            raise _refusal(f"a run named '{run_dir.name}' exists already: pick another name.")
        try:  # made in one step, refused when there: of two visitors starting one name at once, one gets it (the
            # other wrote its table into the first one's data/); a folder of runs (runs/shapes/npedit) is refused too,
            # as a failed start below deletes the folder
            run_dir.mkdir(parents=True)
        except FileExistsError:
            raise _refusal(f"a folder named '{run_dir.name}' exists already in {app.runs_folder()}: pick another "
                           "name.") from None
        try:
            data = presets.SHAPES_STREAM if use_stream else os.path.abspath(run_dir / "data" / "cases.jsonl")
            args = presets.train_args(values, base=base.strip(), judge=judge.strip(), student=student.strip(),
                                      data=data, config_file=presets.PRESETS[preset_name].config_file,
                                      judge_max_pixels=int(judge_pixels or 0))
            cfg = presets.check_train_args(args)
            if not use_stream:  # the run's stage (or recipe file) says whether the table's targets are read
                datasets.write_manifest(table, Path(data).parent, uploads, domain=datasets.table_domain(table, uploads),
                                        within=[app.examples_dir, staging] if app.public else None,
                                        targets_for=presets.targets_for(cfg))
            st = jobs.start_job(run_dir, args, runs_root=app.runs_root, device=device)
        except BaseException as exc:  # the folder made above goes with any failed start, or its name stays taken
            if not (run_dir / "job.json").exists():
                shutil.rmtree(run_dir, ignore_errors=True)
            if isinstance(exc, (ValueError, jobs.JobBusy)):
                raise _error(exc) from None
            raise
        return str(run_dir), _status_markdown(st, device), gr.Timer(active=True)

    start.click(on_start, [table, uploads, stream, preset, run_name, base, judge, judge_pixels, student, token,
                           *knobs.values()],
                [current, status, timer], api_visibility="private")

    def job_view(run_dir):
        """(status, loss curves, latest sample, log tail, timer) of the job in `run_dir` (None: no job yet)."""
        if not run_dir:
            return _status_markdown(None, device), None, None, "", gr.Timer(active=False)
        st = jobs.job_status(run_dir)
        metrics = runs.read_metrics(run_dir)
        keys = [k for k in runs.metric_keys({"run": metrics}) if k.endswith("loss")][:4]  # main losses first
        figure = plots.loss_curves({Path(run_dir).name: metrics}, keys) if not metrics.empty else None
        grids = [p for p, _ in runs.samples(run_dir)]
        return (_status_markdown(st, device), figure, _shown(app, grids), jobs.log_tail(run_dir),
                gr.Timer(active=st.active))

    def on_tick(run_dir, editor_value, token_value=None):
        hidden = app.runs_hidden(token_value)  # (the timer's event can be sent by anyone, like every other)
        if hidden:
            return hidden, None, None, "", gr.Timer(active=False), gr.Dropdown()
        view = job_view(run_dir)
        finished = run_dir and not view[-1].active  # its editor, if any, joins the Edit tab's list
        return (*view, refresh_list(editor_value) if finished else gr.Dropdown())

    timer.tick(on_tick, [current, editor_dropdown, token], [status, curves, sample, log, timer, editor_dropdown],
               api_visibility="private", show_progress="hidden", concurrency_limit=None)

    def on_cancel(run_dir, token_value):
        if not run_dir:
            raise _refusal("No job to cancel.")
        if app.public:
            app.check_training(token_value)
        return _status_markdown(jobs.cancel_job(run_dir), device)

    cancel.click(on_cancel, [current, token], status, api_visibility="private")

    def on_load(token_value=None):
        """Reattach to the job running on this device (e.g. after the tab was closed), else show the last one: its
        status, curves, latest sample and log (a finished job's too, which no timer tick draws)."""
        hidden = app.runs_hidden(token_value)
        if hidden:
            return None, hidden, None, None, "", gr.Timer(active=False)
        active = jobs.active_job(app.runs_root, device)
        listed = jobs.list_jobs(app.runs_root) if active is None else []
        run_dir = str(active) if active else (listed[0].run_dir if listed else None)
        return (run_dir, *job_view(run_dir))

    return on_load, (current, status, curves, sample, log, timer, token)


# ---- Runs tab --------------------------------------------------------------------------------

def build_runs_tab(app: App, train_run: gr.State, train_timer: gr.Timer, token: gr.Textbox):
    """Runs tab: the runs table, overlaid curves, config differences, a run's samples, resume, export."""
    shown = f"Runs under `{app.runs_folder()}`: the trainer's config.yaml, metrics.jsonl and samples/."
    notice = gr.Markdown(app.runs_hidden(None) or shown, elem_id="runs-notice")
    refresh = gr.Button("↻ Refresh", size="sm")
    # empty tables keep named columns: with none, gradio draws its placeholder headers "1 2 3", which read as data
    no_runs, no_comparison = pd.DataFrame(columns=["run", "status", "step"]), pd.DataFrame(columns=["key"])
    # cells on one line (wrapped, the headers broke letter by letter: "ma x_ st ep s"); the run's name stays in view
    # while the rest scrolls sideways
    table = gr.Dataframe(no_runs, label="Runs", interactive=False, max_height=300, pinned_columns=1,
                         elem_id="runs-table", elem_classes="scroll-x")
    with gr.Row():
        selected = gr.Dropdown([], multiselect=True, label="Compare runs")
        keys = gr.Dropdown([], multiselect=True, label="Metrics")
    # no labels drawn over the figures (they hid a top y-tick): each is named above
    with gr.Row():
        with gr.Column(scale=2):
            gr.Markdown("**Curves** of the metrics picked, one panel each")
            curves = gr.Plot(label="Curves", format="png", show_label=False, elem_id="runs-curves")
        with gr.Column(scale=1):
            gr.Markdown("**Last value** of the first metric")
            bars = gr.Plot(label="Last value of the first metric", format="png", show_label=False,
                           elem_id="runs-bars")
    # one row per key, one column per run (as a diff reads), each run an equal share of the width (`compare_widths`):
    # sized by their content, a long path pushed the second run's column off; at a fixed 26%, a fourth run did
    comparison = gr.Dataframe(no_comparison, label="Config differences and last metrics", interactive=False,
                              wrap=True, column_widths=compare_widths(3), elem_id="runs-comparison",
                              elem_classes="scroll-x")
    with gr.Row():
        one = gr.Dropdown([], label="Run", scale=2)
        step = gr.Dropdown([], label="Sample grid (newest first)", scale=1)
        resume = gr.Button("Resume this run", size="sm", scale=0, interactive=not app.training_off())
        export = gr.Button("Export its newest checkpoint", size="sm", scale=0)
    resume_msg = gr.Markdown()
    # one grid at its own aspect ratio: a gallery's fixed-height tiles showed only each grid's top case
    grid_heading = "**Sample grid**: reference | edit, one row per fixed training case, its instruction below"
    grid_note = gr.Markdown(grid_heading, elem_id="run-sample-note")
    grid = gr.Image(label="Sample grid", interactive=False, show_label=False, elem_classes="pixelated",
                    elem_id="run-sample", buttons=["download", "fullscreen"])

    def on_refresh(selected_now, token_value=None):
        hidden = app.runs_hidden(token_value)
        if hidden:
            return (hidden, no_runs, gr.Dropdown(choices=[], value=[]), gr.Dropdown(choices=[], value=[]),
                    gr.Dropdown(choices=[], value=None))
        df = runs.runs_table(app.runs_root)
        names = list(df["run"]) if not df.empty else []
        frames = {n: runs.read_metrics(app.runs_root / n) for n in names}
        metric_names = runs.metric_keys(frames)
        keep = [s for s in (selected_now or []) if s in names] or names[:3]
        return (shown, shown_table(df), gr.Dropdown(choices=names, value=keep),
                gr.Dropdown(choices=metric_names, value=metric_names[:2]),
                gr.Dropdown(choices=names, value=names[0] if names else None))

    def on_compare(names, metric_names, token_value=None):
        hidden = app.runs_hidden(token_value)
        if hidden:
            return plots.message_figure(hidden), None, no_comparison
        if not names:
            return plots.message_figure("Pick runs to compare."), None, no_comparison
        frames = {n: runs.read_metrics(app.runs_root / n) for n in names}
        metric_names = metric_names or runs.metric_keys(frames)[:2]
        last = {n: (df[metric_names[0]].dropna().iloc[-1] if metric_names and metric_names[0] in df
                    and df[metric_names[0]].notna().any() else None) for n, df in frames.items()}
        return (plots.loss_curves(frames, metric_names),
                plots.bar_chart(last, f"last {metric_names[0]}" if metric_names else "no metric"),
                gr.Dataframe(shown_table(runs.compare([app.runs_root / n for n in names], app.runs_root)),
                             column_widths=compare_widths(len(names))))

    def on_samples(name, token_value=None):
        """The run's sample grids to pick from (newest first), the newest that opens whole shown, and above it what it
        is; for a run without any, why instead, in place of an empty image box."""
        hidden = app.runs_hidden(token_value)
        grids = runs.samples(app.runs_root / name) if name and not hidden else []
        whole = runs.whole_grid(p for p, _ in grids)  # the newest that opens (one cut short is passed over)
        newest = next((c for p, c in grids if p == whole), grids[0][1] if grids else None)
        none_yet = bool(name) and not hidden and not grids
        note = f"**Sample grid**: {runs.no_samples_reason(app.runs_root / name)}" if none_yet else grid_heading
        return (gr.Dropdown(choices=[c for _, c in grids], value=newest),
                gr.update(value=on_sample(name, newest, token_value), visible=not none_yet), note)

    def on_sample(name, caption, token_value=None):
        """The run's sample grid named `caption` ("step N"), looked up among its own (the event can carry anything)."""
        if not name or not caption or app.runs_hidden(token_value):
            return None
        path = next((p for p, c in runs.samples(app.runs_root / name) if c == caption), None)
        shown = _shown(app, [path]) if path else None
        if path and shown is None:
            gr.Warning(f"The grid of {caption} ({Path(path).name}) is cut short or unreadable (its run was stopped "
                       "while writing it?): pick another step.")
        return shown

    def on_resume(name, token_value=None):
        if not name:
            raise _refusal("Pick a run.")
        app.check_training(token_value)  # (the Train tab's token box)
        try:
            st = jobs.start_job(app.runs_root / name, resume=True, runs_root=app.runs_root)
        except (ValueError, jobs.JobBusy) as exc:
            raise _error(exc) from None
        return (f"Resumed **{name}**: {st.state}. Its progress shows in the Train tab.", st.run_dir,
                gr.Timer(active=True))

    def on_export(name, token_value=None):
        """The run's newest checkpoint as an editor (RUN/exports/step_N), e.g. of a run killed halfway."""
        if not name:
            raise _refusal("Pick a run.")
        if app.public:
            app.check_training(token_value)
        try:
            return runs.export_newest(app.runs_root / name, name)
        except (ValueError, FileNotFoundError, OSError) as exc:
            raise _error(exc) from None

    refresh.click(on_refresh, [selected, token], [notice, table, selected, keys, one], api_visibility="private")
    export.click(on_export, [one, token], resume_msg, api_visibility="private")
    gr.on([selected.change, keys.change], on_compare, [selected, keys, token], [curves, bars, comparison],
          api_visibility="private")
    one.change(on_samples, [one, token], [step, grid, grid_note], api_visibility="private")
    step.change(on_sample, [one, step, token], grid, api_visibility="private")
    resume.click(on_resume, [one, token], [resume_msg, train_run, train_timer], api_visibility="private")
    return on_refresh, [selected, token], [notice, table, selected, keys, one]


def build_demo(app: App) -> gr.Blocks:
    """The whole UI (nothing is loaded or launched here)."""
    # a public app: strangers' uploads (anyone can POST them) and results are deleted an hour after they were written;
    # a local one's a day after
    cleanup = (600, 3600) if app.public else (3600, LOCAL_CACHE_KEEP_S)
    with gr.Blocks(title="NP-Edit", delete_cache=cleanup) as demo:
        gr.Markdown(INTRO, elem_id="title")
        last_edit = gr.State(None)
        with gr.Tab("Edit"):
            editor, refresh_list = build_edit_tab(app, last_edit)
        with gr.Tab("Judge inspector"):
            build_judge_tab(app, last_edit)
        with gr.Tab("Train"):
            train_load, (train_run, *train_view, train_timer, train_token) = build_train_tab(app, editor, refresh_list)
        with gr.Tab("Runs"):
            runs_refresh, runs_inputs, runs_outputs = build_runs_tab(app, train_run, train_timer, train_token)
        # a public app shows run contents only once the owner's token is typed: on load, then on each entry of it
        for triggers in ([demo.load], [train_token.submit, train_token.blur]):
            gr.on(triggers, train_load, train_token, [train_run, *train_view, train_timer], api_visibility="private")
            gr.on(triggers, runs_refresh, runs_inputs, runs_outputs, api_visibility="private")
    return demo


def served_paths(app: App) -> list[str]:
    """The folders whose files the server hands out by URL: the examples and the assets, and the runs folder only in
    a local app (a public one sends a run's sample images themselves: its folders hold the owner's training images,
    manifests and checkpoints, which strangers could otherwise fetch by guessing paths)."""
    return [str(app.examples_dir), str(assets.ASSETS_DIR), *([] if app.public else [str(app.runs_root)])]


def _shown(app: App, paths: list[str]):
    """The newest image of `paths` (a run's sample grids, newest first) that opens whole, for the browser: its path in
    a local app (served from the runs folder), else the image; None when none opens. A grid cut short (an older run
    killed mid-write) is passed over: it showed as a broken image, and in a public app failed the whole tab."""
    path = runs.whole_grid(paths)
    if path is None or not app.public:
        return path
    try:
        return load_image(path)
    except ImageError:  # rewritten since it was checked, by a trainer that writes in place
        return None


def launch(demo: gr.Blocks, app: App, args: argparse.Namespace, **kwargs):
    """Queue and serve `demo`, a public one behind the upload limits, one on a loopback address answering its own
    pages only (`workbench.origins`); returns what gr.Blocks.launch returns."""
    app.runs_root.mkdir(parents=True, exist_ok=True)
    limits = {}
    if app.public:  # max_file_size caps one file, not a request (up to 1,000 files) nor how often a client sends one
        from gradio.utils import get_upload_folder

        limit = Middleware(uploads.UploadLimit, mb_per_hour=args.upload_mb_per_hour,
                           min_free_mb=args.upload_min_free_mb, folder=get_upload_folder())
        # num_workers=0: no static-file worker processes, which would take uploads past this process's middleware
        limits = {"app_kwargs": {"middleware": [limit]}, "num_workers": 0}
    elif origins.is_loopback(args.host):  # a local app: no other site's page may call it or read it (DNS rebinding)
        limit = Middleware(origins.LoopbackOnly, allowed_hosts=args.allow_host)
        limits = {"app_kwargs": {"middleware": [limit]}, "num_workers": 0}
    try:
        return demo.queue(max_size=32).launch(
            server_name=args.host, server_port=args.port, max_file_size="20mb", css=CSS,
            allowed_paths=served_paths(app), state_session_capacity=SESSIONS_KEPT, **limits, **kwargs)
    except OSError as exc:  # (gradio's traceback said "Cannot find empty port ... server_port parameter to launch()")
        if "port" not in str(exc).lower():
            raise
        raise SystemExit(f"error: cannot serve on --host {args.host} --port {args.port}: the port is taken (another "
                         "app there?) or the host is not an address of this machine; give another --port or --host")


def main(argv=None):
    """Parse flags, build the UI and serve it."""
    args = parse_args(argv)
    app = make_app(args)
    if args.preload:
        for load in (app.models.editor, app.models.judge):
            try:
                load()
            except models.ModelError as exc:
                print(f"warning: {exc}")
    launch(build_demo(app), app, args)


if __name__ == "__main__":
    main()
