"""Where the bundled Shapes-world models live, and the defaults that point at them."""

from __future__ import annotations

import os
from pathlib import Path

ASSETS_DIR = Path(os.environ.get("NPEDIT_ASSETS", Path(__file__).resolve().parent.parent / "assets"))
SHAPES_DIR = ASSETS_DIR / "shapes"
DEFAULT_MODEL = SHAPES_DIR / "editor"  # NPEditPipeline layout
DEFAULT_JUDGE = SHAPES_DIR / "judge"
DEFAULT_TEACHER = SHAPES_DIR / "teacher"  # text-to-image base: teacher transformer, VAE, text encoder
DEFAULT_CRITIC = SHAPES_DIR / "critic"  # the critic (fake score) transformer trained with the editor
# A second, opt-in editor: paired SFT then NP-Edit (it has seen before/after pairs; the default has not).
SFT_NPEDIT_MODEL = SHAPES_DIR / "editor-sft-npedit"
# A third, opt-in editor, the most accurate: the second one fine-tuned on its own 4-step output towards the true
# edits ("unrolled regression", pairs), then NP-Edit again (judge + DMD, no pairs), then both in one run (pairs).
UNROLL_NPEDIT_MODEL = SHAPES_DIR / "editor-unroll-npedit"
# The opt-in editors the app offers beside the default, with how they were trained.
EXTRA_EDITORS = (
    (SFT_NPEDIT_MODEL, "bundled, paired SFT then NP-Edit (trained with pairs)"),
    (UNROLL_NPEDIT_MODEL, "bundled, most accurate: paired SFT, unrolled regression and NP-Edit (trained with pairs)"),
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
