"""scripts/instruction_guidance.py: scale 1 is the pipeline itself; other scales change the edit."""

from pathlib import Path

import numpy as np
import pytest

from script_modules import load_script  # tests/script_modules.py

ROOT = Path(__file__).resolve().parents[1]
EDITOR = ROOT / "assets" / "shapes" / "editor-sft-npedit"


@pytest.fixture(scope="module")
def guidance():
    return load_script("instruction_guidance")


@pytest.mark.skipif(not EDITOR.exists(), reason="bundled editor not present")
def test_scale_one_matches_the_pipeline_and_guidance_changes_the_edit(guidance):
    from npedit import NPEditPipeline
    from npedit.shapes import render
    from npedit.shapes.edits import held_out_cases
    from npedit.shapes.evaluate import pipeline_editor

    pipe = NPEditPipeline.from_pretrained(EDITOR)
    cases = held_out_cases(12, seed=3)[:4]
    refs = [render(c.reference) for c in cases]
    plain = pipeline_editor(pipe, seed=3)(refs, cases)
    same = guidance.guided_editor(pipe, 1.0, seed=3)(refs, cases)
    for a, b in zip(plain, same):
        assert a.shape == (64, 64, 3) and a.dtype == np.uint8
        assert np.array_equal(a, b)  # the same noise, steps and conversion as the pipeline
    pushed = guidance.guided_editor(pipe, 2.0, seed=3)(refs, cases)
    assert any(np.abs(a.astype(int) - b.astype(int)).mean() > 1 for a, b in zip(plain, pushed))
