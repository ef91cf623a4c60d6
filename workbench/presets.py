"""Training presets for the Train tab: the Shapes recipes of configs/shapes/ plus a few variations.

A preset is a recipe file (its values fill every knob the tab does not show) and the knobs the tab
shows. `train_args` turns it into `python -m npedit train --config FILE key=value ...` arguments,
with the chosen teacher, judge, student and data; `check_train_args` validates them before launch.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from npedit import assets
from npedit.config import TrainConfig, load_config
from npedit.folders import describe, looks_local

LORA_NOTE = ("`lora_rank` 0 fine-tunes the whole student (and critic); a rank > 0 trains low-rank adapters instead, "
             "on one shared copy of the teacher's weights: what a large model needs to fit one GPU.")
RECIPES = assets.CONFIGS_DIR / "shapes"  # the checkout's, or those beside $NPEDIT_ASSETS
SHAPES_STREAM = "shapes"  # data.train value of the library's generated Shapes dataset (targets included)


@dataclass(frozen=True)
class Preset:
    """The knobs the Train tab shows, and the recipe file that supplies everything else."""

    note: str
    config_file: str | None = None
    stage: str = "npedit"
    max_steps: int = 200
    max_minutes: float = 0.0  # wall-clock limit; 0 = none
    critic_steps: int = 5
    lr: float = 2e-5
    lambda_dmd: float = 1.0
    lambda_vlm: float = 0.02
    negative_prompt: str = ""
    keep_questions: int = 0  # judge.keep_questions: "is <object> still there?" checks per sample (the table's keep)
    change_questions: int = 0  # judge.change_questions: checks of the table's new (there) and gone (not there) objects
    batch_size: int = 4
    grad_accum: int = 1  # gradient_accumulation_steps: micro-batches of batch_size added up per update
    lora_rank: int = 0  # model.lora_rank: 0 = full fine-tuning, > 0 = low-rank adapters (npedit.lora)
    resolution: int = 64
    log_every: int = 5
    sample_every: int = 50
    save_every: int = 50
    # its recipe file did not read when the presets were built: its knobs are stand-ins, not the file's
    broken: bool = False

    def values(self) -> dict:
        """The knob values by name (what the tab's inputs are filled with)."""
        return {k: v for k, v in asdict(self).items() if k not in ("note", "config_file", "broken")}


KNOBS = tuple(Preset("").values())


def from_config(cfg: TrainConfig, note: str, config_file: str | None) -> Preset:
    """The preset whose knobs are those of a loaded config."""
    return Preset(note, config_file, stage=cfg.stage, max_steps=cfg.max_steps, max_minutes=cfg.max_minutes,
                  critic_steps=cfg.critic_steps, lr=cfg.optim.lr, lambda_dmd=cfg.loss.lambda_dmd,
                  lambda_vlm=cfg.loss.lambda_vlm, negative_prompt=cfg.loss.negative_prompt,
                  keep_questions=cfg.judge.keep_questions, change_questions=cfg.judge.change_questions,
                  batch_size=cfg.data.batch_size, grad_accum=cfg.gradient_accumulation_steps,
                  lora_rank=cfg.model.lora_rank,
                  resolution=cfg.data.resolution, log_every=cfg.log_every,
                  sample_every=cfg.sample_every, save_every=cfg.save_every)


def _recipe(name: str, note: str, fallback: Preset | None = None) -> Preset | None:
    """The preset of the recipe configs/shapes/NAME.yaml, else `fallback` (None: no preset). A recipe there that does
    not read keeps its preset, its error first in the note, and its file, so that Start names the error."""
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        return fallback
    try:
        return from_config(load_config(path), note, str(path))
    except (ValueError, OSError) as exc:  # a recipe being edited must not break the app, nor be swapped in silence
        print(f"warning: the recipe {path} does not read: {exc}", file=sys.stderr)
        return replace(fallback or Preset(""), note=f"{_broken(path, exc)}{note}", config_file=str(path), broken=True)


BROKEN_END = "Start refuses this preset: fix the file, then restart the app. "


def _broken(path: Path, exc: Exception) -> str:
    return f"⚠️ **{path.name} does not read** ({exc}): {BROKEN_END}"


def _warning(preset: Preset) -> str:
    """The warning a preset's note opens with when its recipe does not read (for the presets made from it)."""
    return preset.note[:preset.note.index(BROKEN_END) + len(BROKEN_END)] if preset.note.startswith("⚠️") else ""


def build_presets() -> dict[str, Preset]:
    """The presets: the Shapes recipes when configs/shapes/ is there, else built-in stand-ins."""
    npedit = _recipe("npedit", "The Shapes NP-Edit recipe (configs/shapes/npedit.yaml): judge + DMD, no pairs.",
                     Preset("NP-Edit stage: judge questions + DMD against the teacher.", max_steps=1000,
                            critic_steps=2, lr=1e-4, batch_size=16, log_every=10, sample_every=100, save_every=100))
    warmup = _recipe("warmup", "The Shapes identity warm-up recipe (configs/shapes/warmup.yaml): the student learns "
                               "to reproduce its input (no judge, no critic).",
                     Preset("Identity warm-up: the student learns to reproduce its input.", stage="warmup",
                            max_steps=400, critic_steps=0, lr=3e-4, lambda_dmd=0.0, lambda_vlm=0.0, batch_size=16,
                            sample_every=200, save_every=200))
    warn = _warning(npedit)
    presets = {
        "Quick check (CPU, minutes)": replace(
            npedit, note=f"{warn}The NP-Edit recipe cut to 30 steps of batch 2: checks the whole loop on a CPU.",
            max_steps=30, critic_steps=min(npedit.critic_steps, 2), batch_size=2, log_every=1, sample_every=10,
            save_every=10),
        "Shapes NP-Edit": npedit,
        "Judge only (λ_DMD = 0)": replace(npedit, lambda_dmd=0.0,
                                          note=f"{warn}Ablation of the NP-Edit recipe: the judge's Yes/No loss only."),
        "DMD only (λ_VLM = 0)": replace(npedit, lambda_vlm=0.0,
                                        note=f"{warn}Ablation of the NP-Edit recipe: distribution matching only."),
        "Shapes identity warm-up": warmup,
    }
    sft = _recipe("sft", "Baseline: paired SFT on true rendered edits (configs/shapes/sft.yaml); needs target "
                         "images: the Shapes stream's, or one per table row (generated cases have theirs).")
    if sft is not None:
        presets["Shapes paired SFT (baseline)"] = sft
    from_sft = _recipe("npedit-from-sft", "The NP-Edit stages of the bundled editors that edit (configs/shapes/"
                                          "npedit-from-sft.yaml): NP-Edit from a paired-SFT student (set Student to "
                                          "one) with change and keep checks, lr 2e-5, updates of 8 x 64 samples.")
    if from_sft is not None:
        presets["Shapes SFT then NP-Edit (bundled editors' recipe)"] = from_sft
    unroll = _recipe("unroll", "Unrolled regression (configs/shapes/unroll.yaml; uses pairs): the student runs its "
                               "4-step sampler and its result is pulled towards the true edit, no judge, no DMD. "
                               "The stage between the second and third bundled editors; needs the Shapes stream.")
    if unroll is not None:
        presets["Shapes unrolled regression (pairs)"] = unroll
    return presets


PRESETS = build_presets()


def train_args(values: dict, *, base: str, judge: str, student: str, data: str,
               config_file: str | None = None, judge_max_pixels: int = 0) -> list[str]:
    """`python -m npedit train` arguments: the recipe file, the knobs, the models and the data (and the judge's
    pixel cap per image, when one is set)."""
    v = {**Preset("").values(), **{k: x for k, x in values.items() if x is not None}}
    # absolute: the paths checked from here mean the same wherever the job (or a later resume of it) runs
    base, judge, student, data = (os.path.abspath(p) if p and p != SHAPES_STREAM and Path(p).exists() else p
                                  for p in (base, judge, student, data))
    args = ["--config", config_file] if config_file else []
    args += [f"stage={v['stage']}", f"max_steps={int(v['max_steps'])}", f"max_minutes={float(v['max_minutes'])}",
             f"critic_steps={int(v['critic_steps'])}",
             f"optim.lr={float(v['lr'])}", f"loss.lambda_dmd={float(v['lambda_dmd'])}",
             f"loss.lambda_vlm={float(v['lambda_vlm'])}", f"loss.negative_prompt={_yaml_str(v['negative_prompt'])}",
             f"judge.keep_questions={int(v['keep_questions'])}", f"judge.change_questions={int(v['change_questions'])}",
             f"data.batch_size={int(v['batch_size'])}", f"gradient_accumulation_steps={int(v['grad_accum'])}",
             f"model.lora_rank={int(v['lora_rank'])}",
             f"data.resolution={int(v['resolution'])}",
             f"log_every={int(v['log_every'])}", f"sample_every={int(v['sample_every'])}",
             f"save_every={int(v['save_every'])}", f"model.base={base}", f"data.train={data}",
             f"model.student={student}",
             # the app's manifests name only the images it copied beside them: no recipe file lets a job it starts
             # read files outside the manifest's folder
             "data.allow_outside_paths=false"]
    uses_judge = v["stage"] == "npedit" and float(v["lambda_vlm"]) > 0
    args.append(f"judge.path={judge if uses_judge else ''}")
    if uses_judge and judge_max_pixels:
        args.append(f"judge.max_pixels={int(judge_max_pixels)}")
    return args


def _yaml_str(text: str) -> str:
    """A string as a YAML scalar for a dotted override (npedit.config parses override values as YAML)."""
    return '""' if not text else "'" + str(text).replace("'", "''") + "'"


def parse_args(args: list[str]) -> tuple[str | None, list[str]]:
    """(config file, dotted overrides) of a `train_args` list."""
    if args[:1] == ["--config"]:
        return args[1], list(args[2:])
    return None, list(args)


def check_train_args(args: list[str]) -> TrainConfig:
    """The validated config, or ValueError with one clear message (invalid value, missing model folder, ...)."""
    config_file, overrides = parse_args(args)
    cfg = load_config(config_file, [*overrides, "output_dir=check"])
    for role, path, flag in (("teacher (base model)", cfg.model.base, "--teacher"),
                             ("judge", cfg.judge.path, "--judge"), ("student init", cfg.model.student, "--model")):
        if path and looks_local(path) and not Path(path).exists():
            raise ValueError(f"the {role} {describe(path)}; type another folder or start the app with {flag}")
    if cfg.judge.path and cfg.judge.max_pixels:
        from npedit.judges import JUDGES, read_model_type

        family = JUDGES.get(read_model_type(cfg.judge.path))
        if family is not None:  # (an unreadable judge fails at its own load, with its own message)
            family.check_max_pixels(cfg.judge.max_pixels)  # a fixed-view judge refuses a pixel cap
    return cfg


def start_problem(preset: Preset) -> str:
    """Why Start refuses `preset` ("" when it does not): a recipe that did not read when the app started keeps
    stand-in knobs, which would override the file once it is fixed (another stage, lr, steps), so it waits for a
    restart that reads the file again."""
    if not preset.broken:
        return ""
    return (f"the recipe {preset.config_file} did not read when the app started, so this preset's settings are not "
            "the file's: fix the file, then restart the app")


def targets_for(cfg: TrainConfig) -> str:
    """What in this run reads target images ("" when nothing does): the words a message about missing ones uses."""
    if cfg.stage == "sft":
        return "stage sft (paired SFT)"
    if cfg.loss.uses_targets:
        keys = [k for k in ("lambda_target", "lambda_target_pixels") if getattr(cfg.loss, k) > 0]
        return f"the regression onto the true edit ({', '.join('loss.' + k for k in keys)})"
    return ""
