"""scripts/same_run.py: two runs are the same when their logged values (wall-clock aside) and their newest shared
checkpoint's weights are equal bit for bit; it names the first differences otherwise."""

import json

import pytest
import torch
from safetensors.torch import save_file
from script_modules import load_script  # tests/script_modules.py


def fake_run(root, losses, weight, clock=0.0):
    """A run folder as the trainer writes it: metrics.jsonl and checkpoints/step_000002 with a student."""
    root.mkdir()
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "student_loss": loss, "time": clock + i,
                                                            "elapsed_s": clock}) + "\n"
                                                for i, loss in enumerate(losses)))
    (root / "checkpoints/step_000002/student").mkdir(parents=True)
    (root / "checkpoints/step_000002/optimizer_student").mkdir()
    save_file({"w": weight}, root / "checkpoints/step_000002/student/diffusion_pytorch_model.safetensors")
    save_file({"m": torch.ones(3)}, root / "checkpoints/step_000002/optimizer_student/state.safetensors")
    return root


def test_same_run_compares_losses_and_weights_but_not_the_clock(tmp_path, capsys):
    same_run = load_script("same_run")
    w = torch.arange(6.0)
    a = fake_run(tmp_path / "a", [0.5, 0.25], w)
    b = fake_run(tmp_path / "b", [0.5, 0.25], w.clone(), clock=100.0)  # later, slower: the same run
    assert same_run.main([str(a), str(b)]) == 0
    assert capsys.readouterr().out.startswith("same: 2 logged steps, 2 tensors of step_000002")
    loss = fake_run(tmp_path / "loss", [0.5, 0.2500001], w)
    weight = fake_run(tmp_path / "weight", [0.5, 0.25], w + torch.tensor([0, 0, 0, 0, 0, 1e-6]))
    diff, _ = same_run.differences(a, loss)
    assert diff == ["step 2 student_loss: 0.25 vs 0.2500001"]
    diff, _ = same_run.differences(a, weight)
    assert len(diff) == 1 and diff[0].startswith("step_000002 student/diffusion_pytorch_model.safetensors:w: max")
    assert same_run.main([str(a), str(weight)]) == 1


def test_same_run_says_nan_equal_and_names_a_shape_that_differs(tmp_path):
    """A run that logged a NaN (or holds a NaN weight) was 'not the same' as its own repeat (NaN != NaN), and
    checkpoints whose tensors differ in shape (another lora rank) stopped the script with torch's broadcast error;
    now a NaN is the same NaN, bit for bit, and a shape is named."""
    same_run = load_script("same_run")
    w = torch.tensor([0.0, float("nan"), 2.0])
    a = fake_run(tmp_path / "a", [0.5, float("nan")], w)
    b = fake_run(tmp_path / "b", [0.5, float("nan")], w.clone())
    assert same_run.differences(a, b)[0] == []
    wider = fake_run(tmp_path / "wider", [0.5, float("nan")], torch.zeros(4))
    diff, _ = same_run.differences(a, wider)
    assert diff == ["step_000002 student/diffusion_pytorch_model.safetensors:w: shape (3,) vs (4,)"]


def test_same_run_names_a_folder_that_is_no_run_in_one_line(tmp_path):
    """A folder with no metrics.jsonl (a job refused before it logged, a typo) or a line that is no metrics line
    ended in a traceback; now one line names the folder or the line."""
    same_run = load_script("same_run")
    a = fake_run(tmp_path / "a", [0.5], torch.zeros(2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match=f"error: {tmp_path / 'empty'} holds no metrics.jsonl: not a run folder"):
        same_run.main([str(a), str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="holds no metrics.jsonl: no such folder"):
        same_run.main([str(tmp_path / "nosuch"), str(a)])
    (tmp_path / "empty" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "student_lo')
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not a metrics line"):
        same_run.main([str(a), str(tmp_path / "empty")])
    (tmp_path / "empty" / "metrics.jsonl").write_bytes(b'{"step": 1}\n\xff\xfe garbage\n')  # (UnicodeDecodeError)
    with pytest.raises(SystemExit, match=r"metrics.jsonl:2: not a metrics line"):
        same_run.main([str(a), str(tmp_path / "empty")])
