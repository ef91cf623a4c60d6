"""scripts/shapes_chain.py: every stage command it builds parses through the real config builders."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _chain_module():
    spec = importlib.util.spec_from_file_location("shapes_chain", ROOT / "scripts" / "shapes_chain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(args: list[str]) -> None:
    from npedit.cli import build_parser
    from npedit.config import load_config
    from npedit.shapes import judge_training
    from npedit.shapes.recipes import make_config

    parsed = build_parser().parse_args(args)
    if parsed.command == "shapes" and parsed.stage in ("vae", "teacher"):
        make_config(parsed.stage, parsed.overrides)
    elif parsed.command == "shapes" and parsed.stage == "judge":
        judge_training.build_config(parsed.overrides)
    elif parsed.command == "train":
        load_config(str(ROOT / parsed.config), parsed.overrides)


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
