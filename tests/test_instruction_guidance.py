"""scripts/instruction_guidance.py: scale 1 is the pipeline itself; other scales change the edit."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
EDITOR = ROOT / "assets" / "shapes" / "editor-sft-npedit"


@pytest.fixture(scope="module")
def guidance():
    spec = importlib.util.spec_from_file_location("instruction_guidance", ROOT / "scripts" / "instruction_guidance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # the same samples (rounding aside)
    pushed = guidance.guided_editor(pipe, 2.0, seed=3)(refs, cases)
    assert any(np.abs(a.astype(int) - b.astype(int)).mean() > 1 for a, b in zip(plain, pushed))
