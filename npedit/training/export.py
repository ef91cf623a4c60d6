"""Turn a training checkpoint into an `NPEditPipeline` folder, without training.

The trainer exports `<run>/pipeline` only when a run ends; a run killed halfway, or any earlier
checkpoint (to compare steps), is exported here from `<run>/checkpoints/step_N`: the student's
weights plus the frozen parts of the run's `model.base`, with the run's sampler shift.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import load_config, to_dict
from . import checkpoint as ckpt


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """`<run_dir>/checkpoints/step_N` for `step`, or the newest complete one; a clear error when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    found = ckpt.checkpoint_dirs(run_dir / "checkpoints")
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir / 'checkpoints'} "
                                f"(a run writes one every save_every steps and when it stops)")
    if step is None:
        return found[-1]
    for path in found:
        if ckpt.checkpoint_step(path) == step:
            return path
    steps = ", ".join(str(ckpt.checkpoint_step(p)) for p in found)
    raise FileNotFoundError(f"{run_dir} has no complete checkpoint at step {step}; it has step(s) {steps}")


def export_checkpoint(run_dir: str | Path, step: int | None = None, out: str | Path | None = None,
                      base: str | None = None) -> Path:
    """Save the student of a checkpoint as an `NPEditPipeline` under `out` (default `<run>/exports/step_N`), with
    the frozen parts (text encoder, VAE) of the run's `model.base`, or of `base` (e.g. the same model elsewhere)."""
    from ..backbones import load_backbone
    from ..pipeline import NPEditPipeline, training_summary

    path = find_checkpoint(run_dir, step)
    config_file = path / "config.yaml" if (path / "config.yaml").is_file() else Path(run_dir) / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.yaml in {path} or {run_dir}: cannot tell which base model it trained on")
    cfg = load_config(config_file)
    state = json.loads((path / "trainer_state.json").read_text())
    base = base or cfg.model.base
    try:
        backbone = load_backbone(base)
    except (OSError, ValueError) as exc:
        hint = (" (a relative path: run export from the folder the training ran in, or pass --base)"
                if not Path(base).is_absolute() and base == cfg.model.base else "")
        raise FileNotFoundError(f"cannot load the run's base model {base!r}{hint}: {exc}") from None
    student = backbone.load_transformer(path / "student", for_student=True)  # saved by the trainer's save_pretrained
    out = Path(out) if out else Path(run_dir) / "exports" / path.name
    pipe = NPEditPipeline.from_parts(student.eval(), backbone, shift=cfg.sampler.shift)
    summary = training_summary(cfg.stage, cfg.model.student or None)
    pipe.save_pretrained(out, training=f"{summary}; exported from the checkpoint at step {state['step']}")
    (out / "training_config.json").write_text(json.dumps(
        {**to_dict(cfg), "exported_from": str(path), "step": int(state["step"]), "base": str(base)}, indent=2))
    return out
