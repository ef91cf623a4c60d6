"""scripts/shapes_chain.py: every stage command it builds parses through the real config builders."""

from pathlib import Path

import pytest

from script_modules import load_script  # tests/script_modules.py

ROOT = Path(__file__).resolve().parents[1]


def _chain_module():
    return load_script("shapes_chain")


def _check(args: list[str]):
    """Parse a stage command as its entry point would; the training config for `train` commands."""
    from npedit.cli import build_parser
    from npedit.config import load_config
    from npedit.shapes import judge_training
    from npedit.shapes.recipes import make_config

    parsed = build_parser().parse_args(args)
    if parsed.command == "shapes" and parsed.stage in ("vae", "teacher"):
        return make_config(parsed.stage, parsed.overrides)
    if parsed.command == "shapes" and parsed.stage == "judge":
        return judge_training.build_config(parsed.overrides)
    if parsed.command == "train":
        return load_config(str(ROOT / parsed.config), parsed.overrides)
    return parsed


@pytest.mark.parametrize("smoke", [True, False])
def test_every_stage_command_is_valid(tmp_path, smoke):
    sc = _chain_module()
    chain = sc.Chain(tmp_path / "chain", smoke=smoke, scale=1.0, threads=1)
    commands = [chain.vae(), chain.vae_decoder(), chain.judge(), chain.teacher(), chain.train("warmup", "warmup", 0.5, []),
                chain.train("sft", "sft", 0.5, [], max_steps=10), chain.evaluate("x", "some/pipeline"),
                chain.evaluate("teacher-sdedit", baseline=True)]
    commands += [chain.train("npedit", name, 1.0, ["model.student=s", "judge.path=j", *extra])
                 for name, extra in sc.NPEDIT_VARIANTS.items()]
    for args in commands:
        _check(args)
    if not smoke:
        assert any("max_minutes=" in a for a in chain.teacher())


def test_best_editor_ranks_full_recipes_by_exact_then_followed(tmp_path):
    sc = _chain_module()
    chain = sc.Chain(tmp_path / "c", smoke=True, scale=1.0, threads=1)
    chain.record["eval"] = {
        "npedit": {"summary": {"exact": 0.2, "followed": 0.3, "preserved": 0.5}},
        "npedit-lr2e-4": {"summary": {"exact": 0.2, "followed": 0.4, "preserved": 0.1}},
        "ablation-vlm-only": {"summary": {"exact": 0.9, "followed": 0.9, "preserved": 0.9}},
    }
    assert chain.best_editor() == "npedit-lr2e-4"


def _editors_module():
    return load_script("shapes_gpu_editors")


@pytest.mark.parametrize("smoke", [True, False])
def test_editor_stage_commands_are_valid(tmp_path, smoke):
    se = _editors_module()
    run = se.Editors(tmp_path / "ed", smoke=smoke, minutes=5, batch=128, workers=2, threads=1,
                     teacher="teacher/base", judge="the/judge", sft_student="sft/pipeline")
    commands = [run.run_args(se.RUNS[name][0], name, "sft/pipeline", run.left(), se.RUNS[name][1])
                for name in se.FROM_SFT]
    commands += [run.train("warmup", "warmup", 0.8, run.data()),
                 run.run_args("sft", "sft-equal", "sft/pipeline", 1.5, [], max_steps=379)]
    for args in commands:
        _check(args)
        assert "model.base=teacher/base" in args
    npedit = commands[0]
    assert "judge.path=the/judge" in npedit and "model.student=sft/pipeline" in npedit
    assert not any(a.startswith("judge.path") for a in commands[3])  # paired SFT asks no judge
    if not smoke:
        assert "data.batch_size=128" in npedit and "max_steps=379" in commands[-1]
        assert 4.0 < run.left() <= 5.0  # runs started now end with the phase


def test_editor_stage_large_batch_runs_and_their_baselines(tmp_path):
    se = _editors_module()
    run = se.Editors(tmp_path / "ed", smoke=False, minutes=5, batch=128, workers=2, threads=1, teacher="t",
                     judge="the/judge", sft_student="s", runs=("sft-npedit-change-b512", "sft-more-b512"),
                     equal_steps=("sft-npedit-change-b512",), pairfree_judge="other/judge")
    big = run.run_args("npedit", "x", "s", 5, se.RUNS["sft-npedit-change-b512"][1])
    cfg = _check(big)
    assert cfg.data.batch_size == 512 and cfg.data.pool == 2_000_000 and cfg.judge.change_questions == 2
    assert _check(run.run_args("sft", "y", "s", 5, se.RUNS["sft-more-b512"][1])).optim.lr == 1e-4
    keep = _check(run.run_args("npedit", "k", "s", 5, se.RUNS["sft-npedit-change-keep-b512-lr2e-5"][1]))
    assert (keep.data.batch_size, keep.judge.keep_questions, keep.judge.change_questions, keep.optim.lr) == \
        (512, 2, 2, 2e-5)
    change = _check(run.run_args("npedit", "c", "s", 5, se.RUNS["sft-npedit-change-b512-lr2e-5"][1]))
    assert (change.judge.keep_questions, change.judge.change_questions, change.optim.lr) == (0, 2, 2e-5)
    enc = _check(run.run_args("npedit", "e", "s", 5, se.RUNS["sft-npedit-change-keep-b512-lr2e-5-enc20"][1]))
    assert (enc.judge.keep_questions, enc.optim.lr, enc.optim.reference_encoder_lr_scale) == (2, 2e-5, 20.0)
    assert _check(run.run_args("sft", "f", "s", 5, se.RUNS["sft-more-b512-enc20"][1])).optim.reference_encoder_lr_scale == 20.0
    mix = _check(run.run_args("npedit", "m", "s", 5, se.RUNS["unroll-b512-lr2e-5-shapemix"][1]))
    assert (mix.data.forms, mix.data.filter_share, mix.data.batch_size, mix.optim.lr) == (("shape",), 0.5, 512, 2e-5)
    assert (mix.loss.lambda_target, mix.loss.lambda_dmd, mix.loss.lambda_vlm, mix.data.do_nothing_prob) == (1, 0, 0, 0)
    plain = _check(run.run_args("npedit", "u", "s", 5, se.RUNS["unroll-b512-lr2e-5"][1]))
    assert plain.data.forms == () and plain.loss.lambda_target == 1 and plain.optim.final_share == 0
    final = _check(run.run_args("npedit", "v", "s", 5, se.RUNS["unroll-b512-lr2e-5-final"][1]))
    assert (final.optim.final_share, final.optim.final_lr_scale, final.loss.lambda_target) == (0.15, 0.25, 1)
    pairfree = run.run_args("npedit", "npedit", "w", 5, [], judge_path=run.pairfree_judge)
    assert "judge.path=other/judge" in pairfree and _check(pairfree).data.batch_size == 128
    assert run.equal_name("sft-npedit") == "sft-equal"
    assert run.equal_name("sft-npedit-change-b512") == "sft-npedit-change-b512-sft-equal"
    with pytest.raises(ValueError, match="unknown runs"):
        se.Editors(tmp_path / "e2", smoke=True, minutes=1, batch=8, workers=0, threads=1, teacher="t", judge="j",
                   sft_student="s", runs=("sft-bogus",))
    with pytest.raises(ValueError, match="must name NP-Edit runs"):
        se.Editors(tmp_path / "e3", smoke=True, minutes=1, batch=8, workers=0, threads=1, teacher="t", judge="j",
                   sft_student="s", runs=("sft-more",), equal_steps=("sft-more",))


def test_editor_stage_stops_everything_when_a_run_fails_early(tmp_path):
    import subprocess
    import sys
    import time

    se = _editors_module()
    run = se.Editors(tmp_path / "ed", smoke=True, minutes=5, batch=8, workers=0, threads=1,
                     teacher="t", judge="j", sft_student=None)
    jobs = []
    for name, code in (("broken", "import sys; sys.exit(3)"), ("long", "import time; time.sleep(60)")):
        run.record["stages"][name] = {}
        (run.out / "logs" / f"{name}.log").write_text(code)
        jobs.append((name, subprocess.Popen([sys.executable, "-c", code]), time.monotonic(), 120))
    assert run.stop_if_failed_early(jobs) is False
    assert run.record["stopped_early"] == ["broken"]
    assert run.record["stages"]["broken"]["rc"] == 3
    assert run.record["stages"]["long"]["killed"] is True


def test_editor_stage_ranks_trained_runs_and_packs_their_transformers(tmp_path):
    se = _editors_module()
    run = se.Editors(tmp_path / "ed", smoke=True, minutes=5, batch=8, workers=0, threads=1,
                     teacher="t", judge="j", sft_student="s")
    for name in ("sft-npedit", "sft-more"):
        folder = run.out / name / "pipeline" / "transformer"
        folder.mkdir(parents=True)
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(name.encode())
    run.record["eval"] = {
        "sft-npedit": {"summary": {"exact": 0.30, "followed": 0.5, "preserved": 0.5}},
        "sft-more": {"summary": {"exact": 0.33, "followed": 0.4, "preserved": 0.6}},
        "sft-student": {"summary": {"exact": 0.9, "followed": 0.9, "preserved": 0.9}},  # not trained here
    }
    assert run.ranked() == ["sft-more", "sft-npedit"]
    se.pack(run, tmp_path / "pack", keep=1)
    assert (tmp_path / "pack" / "sft-more.safetensors").read_bytes() == b"sft-more"
    assert not (tmp_path / "pack" / "sft-npedit.safetensors").exists()
    assert (tmp_path / "pack" / "reports.tar.gz").stat().st_size > 0
