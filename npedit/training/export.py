"""Turn a training checkpoint into an `NPEditPipeline` folder, without training.

The trainer exports `<run>/pipeline` only when a run ends; a run killed halfway, or any earlier
checkpoint (to compare steps), is exported here from `<run>/checkpoints/step_N`: the student's
weights plus the frozen parts of the run's `model.base`, with the run's sampler shift. With `average=K` the
student's weights are the mean over the K newest checkpoints up to that step (a uniform average of the late
iterates, as in stochastic weight averaging: it cancels part of the noise that a constant learning rate leaves
in the weights).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from ..config import load_config, to_dict
from ..files import own_entries
from . import checkpoint as ckpt


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """`<run_dir>/checkpoints/step_N` for `step`, or the newest complete one; a clear error when there is none."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder not found: {run_dir}")
    found = ckpt.checkpoint_dirs(run_dir / "checkpoints")
    here = run_dir.resolve()  # (`export step_000002` typed inside checkpoints/ has no parent to tell by)
    if not found and here.parent.name == "checkpoints" and ckpt.checkpoint_step(here) is not None:
        run = run_dir.parent.parent if run_dir.parent.name == "checkpoints" else here.parent.parent
        raise FileNotFoundError(f"{run_dir} is one checkpoint of the run {run}: export the run, with --step "
                                f"{ckpt.checkpoint_step(here)} for this step")
    if not found and run_dir.name == "checkpoints" and ckpt.checkpoint_dirs(run_dir):
        raise FileNotFoundError(f"{run_dir} is the checkpoints folder of the run {run_dir.parent}: export the run")
    if not found and (run_dir / "model_index.json").is_file():
        raise FileNotFoundError(f"{run_dir} is already an editor (an NPEditPipeline folder): it loads as it is, e.g. "
                                f"edit --model {run_dir}; export takes a training run's folder")
    if not found:
        raise FileNotFoundError(f"no complete checkpoint in {run_dir / 'checkpoints'} "
                                f"(a run writes one every save_every steps and when it stops)")
    chosen = found[-1] if step is None else next((p for p in found if ckpt.checkpoint_step(p) == step), None)
    if chosen is None:
        steps = ", ".join(str(ckpt.checkpoint_step(p)) for p in found)
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint at step {step}; it has step(s) {steps}")
    _check_readable(run_dir, chosen)
    return chosen


def _check_readable(run_dir: Path, path: Path) -> None:
    """A clear error, naming the steps that do read back, when checkpoint `path` is damaged (`checkpoint.damage`)."""
    why = ckpt.damage(path, use="export")
    if why is None:
        return
    readable = [ckpt.checkpoint_step(p) for p in ckpt.checkpoint_dirs(Path(run_dir) / "checkpoints")
                if p != path and ckpt.damage(p, use="export") is None]
    hint = (f"export step {readable[-1]} with --step {readable[-1]} (steps that read back: "
            f"{', '.join(map(str, readable))})" if readable else "no other checkpoint of the run reads back")
    raise ValueError(f"{path.name} is damaged ({why}): {hint}")


def checkpoints_to_average(run_dir: str | Path, step: int | None, count: int) -> list[Path]:
    """The `count` newest complete checkpoints of a run at or before `step` (default: the newest), oldest first."""
    if count < 1:
        raise ValueError(f"--average takes a number of checkpoints >= 1, got {count}")
    last = find_checkpoint(run_dir, step)
    found = [p for p in ckpt.checkpoint_dirs(Path(run_dir) / "checkpoints")
             if ckpt.checkpoint_step(p) <= ckpt.checkpoint_step(last)]
    if len(found) < count:
        steps = ", ".join(str(ckpt.checkpoint_step(p)) for p in found)
        raise ValueError(f"cannot average {count} checkpoints up to step {ckpt.checkpoint_step(last)}: "
                         f"{run_dir} has only step(s) {steps} there")
    damaged = [f"{p.name} is damaged ({why})" for p in found[-count:-1] if (why := ckpt.damage(p, use="export"))]  # (last: checked)
    if damaged:
        raise ValueError(f"cannot average {count} checkpoints up to step {ckpt.checkpoint_step(last)}: {damaged[0]}; "
                         "average fewer (--average) or up to an earlier --step")
    return found[-count:]


def checkpoint_config(run_dir: str | Path, path: Path):
    """(the run config a checkpoint was written under, its trainer state): the checkpoint's own `config.yaml`, else
    the run folder's; a clear error when neither is there."""
    config_file = path / "config.yaml" if (path / "config.yaml").is_file() else Path(run_dir) / "config.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.yaml in {path} or {run_dir}: cannot tell which base model it trained on")
    return load_config(config_file), json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))


def average_into(student, others: list) -> None:
    """Set the floating-point weights of `student` to their mean with those of the modules `others` (same
    architecture), accumulated in float32; integer buffers stay the student's."""
    own = student.state_dict()
    mean = {k: v.detach().float().clone() for k, v in own.items() if v.is_floating_point()}
    for i, other in enumerate(others, start=2):
        theirs = other.state_dict()
        for k, acc in mean.items():
            if k not in theirs or theirs[k].shape != acc.shape:
                raise ValueError(f"the checkpoints to average differ in their weights ({k}): not one architecture")
            acc += (theirs[k].float() - acc) / i
    student.load_state_dict({**own, **{k: v.to(own[k].dtype) for k, v in mean.items()}})


def export_checkpoint(run_dir: str | Path, step: int | None = None, out: str | Path | None = None,
                      base: str | None = None, average: int = 1, *, keep_paths: bool = False,
                      license: str | None = None, metrics: dict | None = None, repo_id: str | None = None) -> Path:
    """Save the student of a checkpoint as an `NPEditPipeline` under `out` (default `<run>/exports/step_N`, or
    `step_N-avgK`), with the frozen parts (text encoder, VAE) of the run's `model.base`, or of `base` (e.g. the same
    model elsewhere). `average=K` > 1 saves the mean of the student's weights over the K newest checkpoints up to
    that step. A `critic` run's checkpoint gives its critic instead (default `<run>/exports/step_N/critic`).
    The folder is one to share: its training_config.json and model card name the trainer's local paths as
    `sharing.portable` does (`keep_paths` keeps them as they are); the card takes a Hub `license` id, the eval report
    `metrics` (`npedit eval shapes` JSON) and the `repo_id` it will have, for its loading lines."""
    from ..domain import run_domain
    from ..pipeline import NPEditPipeline, training_summary
    from ..sharing import is_hub_id, metrics_section, portable, shareable_config, training_section

    for attempt in range(3):
        averaged = checkpoints_to_average(run_dir, step, average)
        try:
            cfg, state, backbone, net = _read_checkpoints(run_dir, averaged, base)
            break
        except (OSError, ValueError):
            # a live run pruned a checkpoint between its choice and its reading (the newest, with no --step, moves on):
            # choose again; anything else, or a third time, is the error it is
            if step is not None or attempt == 2 or all(p.is_dir() for p in averaged):
                raise
    path, base_model, role = averaged[-1], base or cfg.model.base, _role(cfg)
    steps = [ckpt.checkpoint_step(p) for p in averaged]
    if role == "critic":
        return _export_critic(cfg, net, averaged, Path(out) if out else None, run_dir, int(state["step"]), steps)
    name = path.name if average == 1 else f"{path.name}-avg{average}"
    out = Path(out) if out else Path(run_dir) / "exports" / name
    pipe = NPEditPipeline.from_parts(net.eval(), backbone, shift=cfg.sampler.shift)
    # (a relative data.train or model.student: from this folder, as the run was started)
    pipe.domain = run_domain(cfg.data.train, cfg.model.student, cfg.data.resolution)
    shown = (lambda value: value) if keep_paths else portable
    student = shown(cfg.model.student) or None
    summary = training_summary(cfg.stage, student, cfg.loss, cfg.data.train, cfg.model.lora_rank)
    origin = (f"exported from the checkpoint at step {state['step']}" if average == 1 else
              f"the mean of the weights of the checkpoints at steps {', '.join(map(str, steps))}")
    extra = {"averaged_steps": steps} if average > 1 else {}
    config = {**to_dict(cfg), "exported_from": str(path), "step": int(state["step"]), "base": str(base_model), **extra}
    config = config if keep_paths else shareable_config(config)
    card = {"repo_id": repo_id, "license": license, "base_model": base_model if is_hub_id(base_model) else None,
            "sections": (training_section(config),) + ((metrics_section(metrics),) if metrics else ())}
    with export_writing(out, run_dir) as folder:
        pipe.save_pretrained(folder, training=f"{summary}; {origin}", card=card)
        (folder / "training_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return out


def _role(cfg) -> str:
    """The network a run's checkpoints export: a critic run trains no editor, its export is the critic."""
    return "critic" if cfg.stage == "critic" else "student"


def _read_checkpoints(run_dir, averaged: list[Path], base: str | None):
    """(config, trainer state, backbone of the run's base or of `base`, the network `_role` names, averaged over the
    `averaged` checkpoints) of the newest of `averaged`; one more network in memory at a time."""
    from ..backbones import load_backbone

    cfg, state = checkpoint_config(run_dir, averaged[-1])
    base_model = base or cfg.model.base
    try:
        backbone = load_backbone(base_model)
    except (OSError, ValueError) as exc:
        hint = (" (a relative path: run export from the folder the training ran in, or pass --base)"
                if not Path(base_model).is_absolute() and base_model == cfg.model.base else "")
        raise FileNotFoundError(f"cannot load the run's base model {base_model!r}{hint}: {exc}") from None
    role = _role(cfg)
    net = backbone.load_transformer(averaged[-1] / role, for_student=role == "student")
    if len(averaged) > 1:
        average_into(net, (backbone.load_transformer(p / role, for_student=role == "student") for p in averaged[:-1]))
    return cfg, state, backbone, net


# what marks a folder an export wrote (an editor, adapters, a critic): one that an export may write into again
EXPORT_MARKS = ("model_index.json", "npedit_lora.json", "npedit_critic.json")


def check_export_out(run_dir: str | Path, out: str | Path) -> None:
    """ValueError when exporting to `out` would lose files: `out` is the run folder, its exports/ or another of its own
    entries (checkpoints/, pipeline/...: an export inside the run replaces its folder whole, so the checkpoints went),
    or an existing folder elsewhere that holds files and is no export (an export writes into it: its README.md,
    model_index.json and model folders would replace any of the same names)."""
    run, target = Path(run_dir).resolve(), Path(out).resolve()
    if target == run or run in target.parents:
        parts = target.relative_to(run).parts
        if not parts or parts == ("exports",) or (parts[0] != "exports" and (run / parts[0]).exists()):
            what = "the run folder itself" if not parts else f"the run's own {parts[0]}"
            raise ValueError(f"cannot export to {out}: it is {what}, which the export would replace; give a new "
                             f"folder (by default it goes to {Path(run_dir) / 'exports'}/step_N)")
        return
    if target.is_dir() and not any((target / mark).is_file() for mark in EXPORT_MARKS):
        held = [p.name for p in own_entries(target)]
        if held:
            raise ValueError(f"cannot export to {out}: it holds files of its own ({', '.join(held[:5])}"
                             f"{', ...' if len(held) > 5 else ''}) and is no exported editor; an export writes into an "
                             "existing folder, replacing any file of the names it writes (README.md, model_index.json, "
                             "the model's folders): give a new or empty folder")


# what makes a folder an editor or an adapter export (and which kind): never carried from an earlier export into a new
# one, whose own kind and weights must decide how it loads (a stale npedit_student_extra.safetensors was loaded into
# a re-exported adapter editor; an earlier editor's model_index.json made an adapter export load as that editor)
EXPORT_OWNED = ("model_index.json", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler", "npedit_lora.json",
                "pytorch_lora_weights.safetensors", "npedit_student_extra.safetensors")


def export_writing(out: Path, run_dir) -> contextlib.AbstractContextManager[Path]:
    """Where to write export `out` (`check_export_out` first): a temporary folder published whole
    (`checkpoint.publishing`); into an existing export elsewhere, the files of it that this export does not write
    are carried over first (a folder written into file by file was, stopped midway, half the earlier export), except
    those that make an export what it is (`EXPORT_OWNED`)."""
    check_export_out(run_dir, out)
    inside = Path(run_dir).resolve() in Path(out).resolve().parents
    return ckpt.publishing(out) if inside or not Path(out).is_dir() else _rewriting(Path(out))


@contextlib.contextmanager
def _rewriting(out: Path):
    """`checkpoint.publishing(out)` for an earlier export outside the run: once the new one is written, each file of
    the earlier one it did not write is linked (else copied, times kept) into it, then it is swapped in whole."""
    with ckpt.publishing(out) as folder:
        yield folder
        for old in sorted(out.rglob("*")):
            new = folder / old.relative_to(out)
            if old.is_dir() or new.exists() or new.is_symlink() or old.relative_to(out).parts[0] in EXPORT_OWNED:
                continue
            new.parent.mkdir(parents=True, exist_ok=True)
            if old.is_symlink():  # (as it was: not what it points to)
                new.symlink_to(old.readlink())
                continue
            try:  # a hard link: the same file, no time or space spent on a large one (an earlier critic/)
                new.hardlink_to(old)
            except OSError:  # (a file system without them)
                shutil.copy2(old, new)


def _export_critic(cfg, critic, averaged: list[Path], out: Path | None, run_dir, step: int, steps: list[int]) -> Path:
    """A `critic` run's checkpoint(s), read into `critic`, as a critic folder (default
    `<run>/exports/step_N[-avgK]/critic`): what `--critic` takes, or what goes into an editor folder as its `critic/`
    for the app's DMD maps."""
    name = averaged[-1].name if len(averaged) == 1 else f"{averaged[-1].name}-avg{len(averaged)}"
    out = out or Path(run_dir) / "exports" / name / "critic"
    with export_writing(out, run_dir) as folder:
        save_critic(critic, folder, cfg, step, steps if len(averaged) > 1 else None)
    return out


def save_critic(critic, out: Path, cfg, step: int, averaged_steps: list[int] | None = None) -> None:
    """Write a critic folder (safetensors) with `npedit_critic.json`: the editor it was fitted to, the base, the step."""
    critic.save_pretrained(out, safe_serialization=True)
    (Path(out) / "npedit_critic.json").write_text(json.dumps(
        {"editor": cfg.model.student, "base": cfg.model.base, "step": step,
         **({"averaged_steps": averaged_steps} if averaged_steps else {})}, indent=2), encoding="utf-8")
