"""Where the bundled Shapes-world models live, and the defaults that point at them."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS_DIR = Path(os.environ.get("NPEDIT_ASSETS", Path(__file__).resolve().parent.parent / "assets"))
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


def default_path(kind: str, given: str | None) -> str:
    """`given`, else the bundled default of `kind` ("model", "judge" or "teacher"), else a one-line error saying
    what to pass."""
    if given:
        return given
    path = {"model": DEFAULT_MODEL, "judge": DEFAULT_JUDGE, "teacher": DEFAULT_TEACHER}[kind]
    marker = {"model": "model_index.json", "judge": "config.json", "teacher": "transformer/config.json"}[kind]
    if (path / marker).is_file():
        return str(path)
    flag = f"--{kind}"
    raise SystemExit(
        f"error: no {kind} given and the bundled Shapes-world {kind} is not in {path}; "
        f"pass {flag} DIR_OR_ID (a folder saved by save_pretrained, e.g. "
        f"{'runs/<name>/base' if kind == 'teacher' else 'runs/<name>/pipeline'})"
    )
