"""scripts/critic_fit.py: a critic compared with the teacher on an editor's held-out outputs."""

import json

import pytest

from npedit import assets
from script_modules import load_script  # tests/script_modules.py

bundled = pytest.mark.skipif(not (assets.PAIR_FREE_MODEL / "critic" / "config.json").is_file(),
                             reason="bundled assets not present")


@bundled
def test_critics_are_measured_against_the_teacher_on_the_editors_outputs(tmp_path, capsys):
    import torch

    torch.set_num_threads(1)
    fit = load_script("critic_fit")
    critic = str(assets.PAIR_FREE_MODEL / "critic")
    same = str(assets.DEFAULT_TEACHER / "transformer")  # the teacher itself, passed as a critic
    out = tmp_path / "fit.json"
    result = fit.main(["--editor", str(assets.PAIR_FREE_MODEL), "--base", str(assets.DEFAULT_TEACHER), "--critic",
                       critic, same, "--n", "8", "--batch-size", "4", "--out", str(out)])
    teacher = result["teacher"]
    assert teacher["x0_gap_to_teacher"] == 0 and result[same]["fm_loss"] == pytest.approx(teacher["fm_loss"])
    assert result[critic]["x0_gap_to_teacher"] > 0 and result[critic]["fm_loss"] != teacher["fm_loss"]
    assert all(v > 0 for r in result.values() for v in r["fm_loss_by_t"].values())
    assert json.loads(out.read_text())["result"][critic]["fm_loss"] == pytest.approx(result[critic]["fm_loss"])
    assert "| teacher |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not found"):
        fit.main(["--editor", str(assets.PAIR_FREE_MODEL), "--critic", str(tmp_path / "none")])
