"""Where the bundled Shapes-world models and recipes live, and the defaults that point at them.

The bundle is the repository's `assets/` (models, example images) and `configs/` (training recipes). It is not in
the package: an editable install (`pip install -e .`) finds it in the checkout; any other install (`pip install .`, a
wheel) finds it through `NPEDIT_ASSETS`, the `assets/` folder of a checkout, with `configs/` beside it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKOUT = Path(__file__).resolve().parent.parent  # the repository when installed editable; site-packages otherwise
ASSETS_DIR = Path(os.environ.get("NPEDIT_ASSETS", CHECKOUT / "assets")).expanduser()
CONFIGS_DIR = ASSETS_DIR.parent / "configs"
# How to get the bundle, for every message about a bundled file that is not there.
BUNDLE_HINT = ("the bundled models and recipes are the repository's assets/ and configs/, not part of the installed "
               "package: install a clone editable (pip install -e CLONE), or set "
               "NPEDIT_ASSETS=CLONE/assets")
SHAPES_DIR = ASSETS_DIR / "shapes"
# The three bundled editors, each an NPEditPipeline folder; an editor's own critic (for the app's DMD maps) is the
# `critic/` folder inside it.
# Trained without pairs (identity warm-up, then NP-Edit): keeps scenes clean and intact, but does not edit yet.
PAIR_FREE_MODEL = SHAPES_DIR / "editor"
# Paired SFT then NP-Edit (it has seen before/after pairs).
SFT_NPEDIT_MODEL = SHAPES_DIR / "editor-sft-npedit"
# The most accurate, the default: the second one fine-tuned on its own 4-step output towards the true edits
# ("unrolled regression", pairs), then NP-Edit again (judge + DMD, no pairs), then both in one run (pairs).
UNROLL_NPEDIT_MODEL = SHAPES_DIR / "editor-unroll-npedit"
DEFAULT_MODEL = UNROLL_NPEDIT_MODEL
DEFAULT_MODEL_NOTE = "bundled, most accurate: paired SFT, unrolled regression and NP-Edit (trained with pairs)"
DEFAULT_JUDGE = SHAPES_DIR / "judge"
DEFAULT_TEACHER = SHAPES_DIR / "teacher"  # text-to-image base: teacher transformer, VAE, text encoder
DEFAULT_CRITIC = DEFAULT_MODEL / "critic"  # the critic (fake score) fitted to the default editor's outputs
# The editors the app offers beside the default, with how they were trained.
EXTRA_EDITORS = (
    (PAIR_FREE_MODEL, "bundled, trained without pairs (NP-Edit): keeps scenes intact, does not edit yet"),
    (SFT_NPEDIT_MODEL, "bundled, paired SFT then NP-Edit (trained with pairs)"),
)
EXAMPLES_DIR = ASSETS_DIR / "examples"


def _bundled(path: str) -> tuple[Path, Path] | None:
    """(bundle folder, the file there) for a repository-relative `assets/...` or `configs/...` path missing here."""
    parts = Path(path).parts
    roots = {"assets": ASSETS_DIR, "configs": CONFIGS_DIR}
    if not parts or parts[0] not in roots or Path(path).exists():
        return None
    return roots[parts[0]], roots[parts[0]].joinpath(*parts[1:])


def in_bundle(path: str, name: str = "", quiet: bool = False) -> str:
    """`path`, or for a repository-relative `assets/...` or `configs/...` path missing here, the bundle's file (said
    on the log, under `name` when given: a missing path of the user's own must not become the bundle's unseen; not
    with `quiet`, for a path only looked at, as a training config's student is by `domain.run_domain`)."""
    found = _bundled(path)
    if not (found and found[1].exists()):
        return path
    if quiet:
        return str(found[1])
    logger.warning("%s%s is not in %s: reading the bundle's %s", f"{name}: " if name else "", path, Path.cwd(),
                   found[1])
    return str(found[1])


def bundle_missing(path: str) -> str | None:
    """For an `assets/...` or `configs/...` path missing here because the bundle itself is not there, one line saying
    how to get it; else None (a path that is there, or one the bundle lacks: a typo, reported by its reader)."""
    found = _bundled(path)
    if found is None or found[0].is_dir():
        return None
    return f"{path} is neither here nor in {found[0]}: {BUNDLE_HINT}"


def default_path(kind: str, given: str | None) -> str:
    """`given` (an `assets/...` path read from the bundle when missing here), else the bundled default of `kind`
    ("model", "judge" or "teacher"), else a one-line error saying what to pass."""
    if given:
        return in_bundle(given)
    path = {"model": DEFAULT_MODEL, "judge": DEFAULT_JUDGE, "teacher": DEFAULT_TEACHER}[kind]
    marker = {"model": "model_index.json", "judge": "config.json", "teacher": "transformer/config.json"}[kind]
    if (path / marker).is_file():
        return str(path)
    flag = f"--{kind}"
    raise SystemExit(
        f"error: no {kind} given and the bundled Shapes-world {kind} is not in {path}; "
        f"pass {flag} DIR_OR_ID (a folder saved by save_pretrained, e.g. "
        f"{'runs/<name>/base' if kind == 'teacher' else 'runs/<name>/pipeline'})"
        + ("" if ASSETS_DIR.is_dir() else f"; {BUNDLE_HINT}")
    )
