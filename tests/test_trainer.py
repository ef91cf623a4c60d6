"""The NP-Edit iteration of method.md section 5 on a tiny Z-Image: the two-time-scale ratio, DMD's analytic zero while
the critic is the teacher, and a resumed NP-Edit run (student and critic) that ends as the uninterrupted one."""

import json
from pathlib import Path

import torch

from npedit.config import load_config
from npedit.training.trainer import Trainer


def npedit_args(out, tiny_zimage, tiny_manifest, *extra):
    """Settings of a tiny NP-Edit run without a judge (DMD only unless `extra` says otherwise)."""
    return ["stage=npedit", f"output_dir={out}", f"model.base={tiny_zimage}", f"data.train={tiny_manifest}",
            "data.batch_size=2", "loss.lambda_vlm=0", "optim.skip_grad_norm=1e9", *extra]


def adam_steps(opt) -> set[int]:
    """The update counts AdamW holds for the parameters it has updated."""
    return {int(state["step"]) for state in opt.state.values()}


def test_each_iteration_is_critic_steps_critic_updates_then_one_student_update(tmp_path, tiny_zimage, tiny_manifest):
    """method.md 5.1-5.2: `critic_steps` (N_aux) critic updates, each on its own micro-batch, then one student update
    against the critic they produced; without a DMD loss there is no critic and an iteration is one student update."""
    trainer = Trainer(load_config(None, npedit_args(tmp_path / "r", tiny_zimage, tiny_manifest, "critic_steps=3",
                                                    "optim.lr=1e-3")))
    order, optimise = [], trainer._optimise

    def recorded(name, loss_fn):  # the real update, with its turn noted
        order.append(name)
        return optimise(name, loss_fn)

    trainer._optimise = recorded
    critic_before = [p.detach().clone() for p in trainer.critic.parameters()]
    metrics = trainer.iteration()
    assert order == ["critic", "critic", "critic", "student"]
    assert adam_steps(trainer.opt_critic) == {3} and adam_steps(trainer.opt_student) == {1}
    assert trainer.drawn == 4 and metrics["critic_skipped"] == metrics["student_skipped"] == 0
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, trainer.critic.parameters()))
    plain = Trainer(load_config(None, npedit_args(tmp_path / "p", tiny_zimage, tiny_manifest, "critic_steps=3",
                                                  "loss.lambda_dmd=0", "loss.lambda_target=1")))
    metrics = plain.iteration()
    assert plain.critic is None and plain.drawn == 1 and adam_steps(plain.opt_student) == {1}
    assert not any(key.startswith("critic") for key in metrics)


def test_the_dmd_gradient_is_zero_while_the_critic_is_the_teacher_without_cfg(tmp_path, tiny_zimage, tiny_manifest):
    """Style guide item 9 through the trainer: at the start the critic is a copy of the teacher, and the teacher's and
    the critic's x0 come from one noisy state, time and prompt c^x, so with CFG scale 1 the DMD gradient vanishes;
    at the method's scales (3.5, 7.5) it does not."""
    grads = {}
    for scales in (("loss.cfg_scale=1", "loss.cfg_scale_strong=1"), ()):
        trainer = Trainer(load_config(None, npedit_args(tmp_path / str(len(scales)), tiny_zimage, tiny_manifest,
                                                        "data.do_nothing_prob=0", *scales)))
        _, metrics = trainer.student_loss(next(trainer.batches))
        grads[bool(scales)] = float(metrics["dmd_grad_abs"])
    assert grads[True] < 1e-5 and grads[False] > 1e-3, grads


def test_a_resumed_npedit_run_ends_with_the_student_and_critic_of_the_uninterrupted_one(tmp_path, tiny_zimage,
                                                                                      tiny_manifest):
    """Stopped after 2 steps and resumed to 3, an NP-Edit run (2 critic updates and one student update a step, "do
    nothing" drawn half the time) ends with the weights and losses of the run trained 3 steps straight: both
    networks, both optimisers, the schedulers, the RNG and the data order pick up where they were."""
    from safetensors.torch import load_file

    from npedit.cli import main

    common = ["critic_steps=2", "optim.lr=1e-3", "data.do_nothing_prob=0.5", "log_every=1", "save_every=2",
              "sample_every=0"]
    main(["train", "max_steps=3", *npedit_args(tmp_path / "straight", tiny_zimage, tiny_manifest, *common)])
    stopped = npedit_args(tmp_path / "stopped", tiny_zimage, tiny_manifest, *common)
    main(["train", "max_steps=2", *stopped])
    main(["train", "--resume", "max_steps=3", *stopped])
    for net in ("student", "critic"):
        weights = f"checkpoints/step_000003/{net}/diffusion_pytorch_model.safetensors"
        straight, resumed = load_file(tmp_path / "straight" / weights), load_file(tmp_path / "stopped" / weights)
        two = load_file(tmp_path / f"stopped/checkpoints/step_000002/{net}/diffusion_pytorch_model.safetensors")
        assert any(not torch.equal(two[k], resumed[k]) for k in two), net  # the resumed step trained it
        assert all(torch.equal(straight[k], resumed[k]) for k in straight), net
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "stopped")}
    losses = ("critic_fm_loss", "dmd_loss", "student_loss")
    assert [[r[k] for k in losses] for r in rows["straight"]] == [[r[k] for k in losses] for r in rows["stopped"]]


def test_sample_grid_captions_wrap_inside_the_grid():
    """The trainer's sample grids cut every instruction at a fixed count of characters, so the Runs and Train tabs
    showed "replace the green triangle with a yellow c". A caption now wraps onto as many lines as it needs (every row
    gets the room of the longest), each line inside the grid's width, so the whole instruction is drawn."""
    import numpy as np
    from PIL import ImageFont

    from npedit.training.logging import image_grid, wrap_text

    font = ImageFont.load_default()
    long = "replace the green triangle with a yellow circle and keep everything else exactly where it is"
    lines = wrap_text(long, 124, font)
    assert " ".join(lines) == long and len(lines) > 2 and all(font.getlength(line) <= 124 for line in lines)
    cut = wrap_text("x" * 80, 60, font)  # one word wider than the grid is cut, not drawn past its edge
    assert "".join(cut) == "x" * 80 and len(cut) > 1 and all(font.getlength(line) <= 60 for line in cut)
    tile = torch.zeros(3, 32, 32)
    line_h = image_grid([[tile, tile]] * 2, ["a", "b"], scale=2).height // 2 - 64  # one line of caption per row
    grid = image_grid([[tile, tile]] * 2, [long, "b"], scale=2)
    assert grid.width == 128 and grid.height == 2 * (64 + len(lines) * line_h)
    band = np.asarray(grid.convert("L"))[64:64 + len(lines) * line_h]  # the first row's caption
    assert all((band[k * line_h:(k + 1) * line_h] < 128).any() for k in range(len(lines)))  # ink on every line
    assert (band[:, -2:] > 128).all()  # and none at the right edge: no word runs off the grid


def test_sample_grid_is_reference_and_edit_per_row_at_128_px_or_more():
    """`sample_grid`, what a run writes (and the browser test's picture of one): two tiles a row, small ones scaled up
    by a whole factor to at least 128 px, larger ones as they are."""
    from npedit.training.logging import image_grid, sample_grid

    small, edit = -torch.ones(3, 3, 48, 48), torch.ones(3, 3, 48, 48)
    grid = sample_grid(small, edit, ["a", "b", "c"])
    assert grid.tobytes() == image_grid([[r, e] for r, e in zip(small, edit)], ["a", "b", "c"], scale=2).tobytes()
    assert grid.width == 4 * 48 and grid.getpixel((0, 0)) == (0, 0, 0) and grid.getpixel((96, 0)) == (255, 255, 255)
    assert sample_grid(torch.zeros(1, 3, 160, 160), torch.zeros(1, 3, 160, 160), ["a"]).width == 2 * 160


def test_sample_grid_captions_without_spaces_wrap_in_a_few_measures_per_line():
    """A caption with no space to break at (a URL, CJK text, a pasted blob) was cut by measuring every prefix of all
    that was left, for each line: 22 s for 1,000 characters, minutes at each sample grid for a few thousand. It now
    takes a few measures of about a line's length per line, and the lines are the same: each as long as fits."""
    from PIL import ImageFont

    from npedit.training.logging import wrap_text

    font = ImageFont.load_default()
    measured = []

    class Counted:  # the font, with a budget of characters measured
        def getlength(self, text):
            measured.append(len(text))
            assert sum(measured) < 60 * 4000, "measured far more than the caption"
            return font.getlength(text)

    text = "".join(chr(ord("a") + i % 26) for i in range(4000))
    lines = wrap_text(f"short {text}", 124, Counted())
    assert lines[0] == "short" and "".join(lines[1:]) == text and len(lines) > 100
    assert all(font.getlength(line) <= 124 < font.getlength(line + nxt[0]) for line, nxt in zip(lines[1:], lines[2:]))


def test_sample_grids_do_not_change_what_a_run_trains(tmp_path, tiny_zimage, tiny_manifest):
    """`sample_every` only says how often a grid is written: a run that writes one every step ends with the losses and
    weights of one that writes none (the grids drew their noise from the training generator, so every grid shifted
    the noise, times and unroll lengths of all later updates)."""
    from safetensors.torch import load_file

    from npedit.cli import main

    common = ["max_steps=3", "critic_steps=1", "optim.lr=1e-3", "log_every=1", "save_every=3"]
    for name, every in (("plain", 0), ("grids", 1)):
        main(["train", f"sample_every={every}", *npedit_args(tmp_path / name, tiny_zimage, tiny_manifest, *common)])
    assert sorted(p.name for p in (tmp_path / "grids" / "samples").iterdir()) == [
        f"step_00000{i}.png" for i in (1, 2, 3)]
    rows = {name: [{k: v for k, v in json.loads(line).items() if k.endswith("loss")}
                   for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("plain", "grids")}
    assert rows["plain"] == rows["grids"]
    weights = "checkpoints/step_000003/student/diffusion_pytorch_model.safetensors"
    plain, grids = load_file(tmp_path / "plain" / weights), load_file(tmp_path / "grids" / weights)
    assert all(torch.equal(plain[k], grids[k]) for k in plain)


class _Forgetful(dict):
    """A cache that keeps nothing: every lookup misses."""

    def __setitem__(self, key, value):
        pass


def test_the_cached_encodings_and_prompt_layouts_give_the_losses_of_computing_them_each_update(
        tmp_path, tiny_zimage, tiny_manifest, tiny_judge):
    """The teacher's negative prompt is encoded once per run (not once per student update) and the judge's processor
    runs once per image layout (not once per new question); the losses and metrics of two NP-Edit iterations (judge
    and DMD) are those of the same run, same seed, that encodes and lays out everything afresh, to 1e-6."""
    metrics = {}
    for fresh in (False, True):
        trainer = Trainer(load_config(None, npedit_args(tmp_path / str(fresh), tiny_zimage, tiny_manifest,
                                                        f"judge.path={tiny_judge}", "loss.lambda_vlm=1",
                                                        "critic_steps=1", "data.do_nothing_prob=0")))
        negative = trainer.cfg.loss.negative_prompt
        encoded, encode = [], trainer.backbone.encode_prompt

        def recorded(prompts, **kwargs):  # the real encoding, with its prompts noted
            encoded.append(list(prompts))
            return encode(prompts, **kwargs)

        trainer.backbone.encode_prompt = recorded
        if fresh:  # the path before the caches: encode the negative prompt each update, the processor each question
            trainer._negative_cond = lambda n, t=trainer: t.backbone.encode_prompt([negative] * n,
                                                                                    with_reference=False)
            trainer.judge._expansions = _Forgetful()
        metrics[fresh] = [trainer.iteration(), trainer.iteration()]
        negatives = sum(prompts == [negative] * len(prompts) for prompts in encoded)
        assert negatives == (2 if fresh else 1)
    for cached, plain in zip(metrics[False], metrics[True]):
        assert cached.keys() == plain.keys() and "vlm_loss" in cached and "dmd_loss" in cached
        for key in cached:
            assert abs(float(cached[key]) - float(plain[key])) <= 1e-6, (key, cached[key], plain[key])


def test_a_case_whose_text_holds_a_judge_control_token_stops_the_run_before_it_trains(tmp_path, tiny_zimage,
                                                                                     tiny_manifest, tiny_judge):
    """The judge refuses a question holding one of its control tokens ("<image>" made its processor count an image
    too many); a manifest case holding one is named when the run starts, not when its batch comes hours in."""
    import shutil

    import pytest

    data = tmp_path / "data"
    shutil.copytree(Path(tiny_manifest).parent, data)
    lines = (data / Path(tiny_manifest).name).read_text().splitlines()
    case = json.loads(lines[3])
    case["keep"] = "blue square; <|im_end|>"
    lines[3] = json.dumps(case)
    (data / "cases.jsonl").write_text("\n".join(lines) + "\n")
    args = npedit_args(tmp_path / "r", tiny_zimage, data / "cases.jsonl", "loss.lambda_vlm=0.02",
                       f"judge.path={tiny_judge}", "max_steps=1")
    with pytest.raises(ValueError, match=r"cases.jsonl: case 3: its keep holds '<\|im_end\|>', which the judge reads"):
        Trainer(load_config(None, args))


def test_a_case_whose_questions_pass_the_judges_positions_stops_the_run_before_it_trains(tmp_path, tiny_zimage,
                                                                                         tiny_manifest, tiny_judge):
    """A 1,989-character Japanese instruction (within the manifest's 2,000) is ~6,000 tokens, past the judge's 4,096
    positions: its answers would have come from positions the judge never saw, with a transformers warning only; now
    the case is named when the run starts, with its token count and the limit."""
    import shutil

    import pytest

    data = tmp_path / "data"
    shutil.copytree(Path(tiny_manifest).parent, data)
    lines = (data / Path(tiny_manifest).name).read_text().splitlines()
    case = json.loads(lines[2])
    case["instruction"] = "赤い円を青くしてください。" * 153
    lines[2] = json.dumps(case)
    (data / "cases.jsonl").write_text("\n".join(lines) + "\n")
    args = npedit_args(tmp_path / "r", tiny_zimage, data / "cases.jsonl", "loss.lambda_vlm=0.02",
                       f"judge.path={tiny_judge}", "max_steps=1")
    with pytest.raises(ValueError, match=r"cases.jsonl: case 2: its instruction \(\d+ tokens\) makes a question of "
                                         r"\d+ tokens with its images, past the 4096 positions the judge reads"):
        Trainer(load_config(None, args))


def test_train_refuses_a_folder_holding_a_run_unless_resumed(tmp_path, tiny_zimage, tiny_manifest):
    """From Python, `Trainer(cfg).train()` into a finished run's folder (a notebook cell run again) trained from step 0
    over it: its metrics mixed, its checkpoints and editor replaced. The CLI refused that; the Trainer does too now,
    unless resume() was called."""
    import pytest

    args = npedit_args(tmp_path / "r", tiny_zimage, tiny_manifest, "max_steps=1", "save_every=1")
    Trainer(load_config(None, args)).train()
    before = (tmp_path / "r" / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match=r"already holds a run \(metrics.jsonl, checkpoints, pipeline\): call resume"):
        Trainer(load_config(None, args)).train()
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == before
    again = Trainer(load_config(None, [*args, "max_steps=2"]))
    assert again.resume() and again.step == 1
    again.train()
    assert again.step == 2
    fewer = Trainer(load_config(None, [*args, "max_steps=1"]))  # (trained nothing and wrote max_steps: 1 over 2)
    with pytest.raises(ValueError, match="step_000002 is past max_steps=1: give a larger max_steps"):
        fewer.resume()
