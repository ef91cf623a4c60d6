"""scripts/oracle_best_of.py: its table's columns, and that its judge's pick is what `eval shapes --candidates` scores."""

from pathlib import Path

import pytest

from script_modules import load_script  # tests/script_modules.py

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def oracle():
    return load_script("oracle_best_of")


def test_table_separates_one_sample_first_judge_and_oracle(oracle):
    rows = [{"edit_type": "add", "exact": [False, True, False, False], "judge_pick": 1},
            {"edit_type": "add", "exact": [True, False, False, False], "judge_pick": 2},
            {"edit_type": "remove", "exact": [False, False, False, False], "judge_pick": 0}]
    t = oracle.summarize(rows)
    assert t["add"] == {"n": 2, "sample_mean": 0.25, "first": 0.5, "judge_pick": 0.5, "oracle": 1.0}
    assert t["remove"]["oracle"] == 0.0
    assert t["overall"]["n"] == 3 and t["overall"]["oracle"] == pytest.approx(2 / 3)
    assert t["overall"]["judge_pick"] == pytest.approx(1 / 3)


def test_judge_pick_matches_the_benchmark_best_of(oracle):
    from npedit.judges import load_judge
    from npedit.pipeline import NPEditPipeline
    from npedit.shapes.edits import held_out_cases
    from npedit.shapes.evaluate import best_of_editor, evaluate

    pipe = NPEditPipeline.from_pretrained(ROOT / "assets/shapes/editor-unroll-npedit")
    pipe.set_progress_bar_config(disable=True)
    judge = load_judge(ROOT / "assets/shapes/judge")
    cases = held_out_cases(3, seed=5)
    rows, _ = evaluate(best_of_editor(pipe, judge, candidates=3, seed=5), cases, progress=False)
    mine = [oracle.case_scores(pipe, judge, c, candidates=3, seed=5) for c in cases]
    assert [m["exact"][m["judge_pick"]] for m in mine] == [bool(r["exact"]) for r in rows]
    assert all(len(m["exact"]) == 3 for m in mine)
