"""Frozen, validated training configuration with one loader and dotted `key=value` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .assets import bundle_missing, in_bundle
from .edit_types import EDIT_TYPES
from .files import write_atomic

STAGES = ("warmup", "npedit", "sft", "critic")
DTYPES = ("float32", "bfloat16", "float16")
VLM_LOSSES = ("yes_no", "full_vocab")
REFERENCE_MODES = ("tokens", "channels")  # how an SD3-family student sees the reference (backbones/sd3.py)
MIXED_PRECISION = ("no", "bf16", "fp16")
# Field metadata of the input paths that an installed package reads from the bundle when they name `assets/...` or
# `configs/...` missing here (models and the manifest; never a prompt, a choice or an output).
BUNDLE_PATH = {"bundle_path": True}


def _check(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Where the networks come from."""

    # folder or hub id of the text-to-image model: teacher, critic init, VAE, text encoder
    base: str = field(default="", metadata=BUNDLE_PATH)
    # optional student init: a pipeline folder, a transformer folder, or "" (= teacher)
    student: str = field(default="", metadata=BUNDLE_PATH)
    dtype: str = "float32"  # weights of the frozen parts (teacher, VAE, text encoder)
    gradient_checkpointing: bool = False
    # How a student built from the teacher sees the reference (SD3 family): "tokens" (extra tokens in the
    # sequence) or "channels" (added per patch; no extra tokens). A `student` checkpoint keeps its own mode.
    reference_mode: str = "tokens"
    # SD3 family: convolution layers of a zero-initialised encoder over the reference latent to give a student that
    # has none (a fresh or a loaded one), so each reference token sees its patch's neighbourhood; 0 = none added.
    reference_encoder: int = 0
    # ... and whether that new encoder's output is normalised behind a learnt per-channel gate that starts at zero
    # (its size then no longer grows with the lr; see ReferenceEncoder). A student with an encoder keeps its own.
    reference_encoder_gated: bool = False
    # Set the student's gated reference encoder's gate to this value, every channel, before training (0: leave it as
    # it is). With `optim.frozen=[ref_encoder.gate]` the student must learn to work with the features at that level.
    reference_gate_init: float = 0.0
    # SD3 family: grow the student (fresh or loaded) by this many transformer blocks, inserted before its last one.
    # Each starts as a copy of its neighbour with its output projections at zero, so the grown student edits exactly
    # as before and training grows them (more capacity without starting over); 0 = as it is.
    add_layers: int = 0
    # Low-rank adapters (npedit.lora): > 0 trains rank-r adapters on the student's linear layers (and, with
    # lora_critic, the critic's) instead of every weight; the rest stays frozen in model.dtype, and a student or
    # critic built from the teacher shares the teacher's weights (one copy of the base model in memory). The
    # student's own additions (reference embedding, reference encoder) still train in full. 0 = full fine-tuning.
    lora_rank: int = 0
    lora_alpha: float = 0.0  # the update is scaled by alpha / rank; 0 = alpha equal to the rank (scale 1)
    # Linear layers that get adapters: names, name endings or path components; empty = every linear layer in the
    # attention and feed-forward blocks (npedit.lora.DEFAULT_TARGETS)
    lora_targets: tuple[str, ...] = ()
    lora_critic: bool = True  # the critic (stage npedit with DMD, and stage critic) trains adapters too

    def __post_init__(self):
        _check(self.dtype, DTYPES, "model.dtype")
        if not 0 <= self.lora_rank <= 4096:
            raise ValueError(f"model.lora_rank must be between 0 (full fine-tuning) and 4096, got {self.lora_rank}")
        if self.lora_alpha < 0:
            raise ValueError(f"model.lora_alpha must be >= 0 (0: equal to the rank), got {self.lora_alpha}")
        if self.lora_rank and self.add_layers:
            raise ValueError("model.add_layers grows the student with new blocks to train in full; it does not go "
                             "with model.lora_rank (train the grown student without LoRA)")
        if not 0 <= self.add_layers <= 64:
            raise ValueError(f"model.add_layers must be between 0 and 64 blocks, got {self.add_layers}")
        _check(self.reference_mode, REFERENCE_MODES, "model.reference_mode")
        if not 0 <= self.reference_encoder <= 8:
            raise ValueError(f"model.reference_encoder must be between 0 and 8 layers, got {self.reference_encoder}")


@dataclass(frozen=True)
class JudgeConfig:
    """The frozen VLM and how its answers become a loss."""

    # folder or hub id; required for stage npedit when loss.lambda_vlm > 0
    path: str = field(default="", metadata=BUNDLE_PATH)
    dtype: str = "float32"
    identity_question: bool = True  # ablation: False drops the identity check
    # Extension (not in the paper): up to this many "is <object> still there?" checks per sample, one per
    # object the sample's `keep` list names (objects the edit must leave alone); 0 = the method as published.
    keep_questions: int = 0
    # Extension: up to this many checks of the edit's own result per sample, "is <object> there?" expected Yes
    # for each object the sample's `new` list names and No for each one its `gone` list names; 0 = off.
    change_questions: int = 0
    loss: str = "yes_no"  # "yes_no" (logit-difference BCE) or "full_vocab" (ablation)
    # Judges that see images at their own resolution (Qwen2.5-VL): at most this many pixels per image (0: the
    # judge processor's own cap). Fixed-view judges (LLaVA-OneVision, InternVL) refuse it.
    max_pixels: int = 0
    temperature_start: float = 0.1  # logit temperature ramps linearly to 1 ...
    temperature_warmup_steps: int = 2000  # ... over this many steps (0 = always 1)

    def __post_init__(self):
        _check(self.dtype, DTYPES, "judge.dtype")
        _check(self.loss, VLM_LOSSES, "judge.loss")
        if self.keep_questions < 0:
            raise ValueError(f"judge.keep_questions must be >= 0, got {self.keep_questions}")
        if self.change_questions < 0:
            raise ValueError(f"judge.change_questions must be >= 0, got {self.change_questions}")
        if self.max_pixels < 0:
            raise ValueError(f"judge.max_pixels must be >= 0 (0: the judge's own), got {self.max_pixels}")


@dataclass(frozen=True)
class DataConfig:
    """Training samples: a cases.jsonl or .csv manifest (see npedit.data) or a generated domain."""

    # path to a cases.jsonl (or .csv) manifest, or "shapes" for the built-in Shapes world
    train: str = field(default="", metadata=BUNDLE_PATH)
    # A manifest may name images outside its own folder (absolute, `../`, links out of it): the CLI's user owns the
    # disk, and `edit --verdicts` writes absolute paths. False confines a manifest someone else wrote to its own
    # folder; the app's jobs always run with False.
    allow_outside_paths: bool = True
    resolution: int = 64  # images are fitted to resolution x resolution
    batch_size: int = 1
    fraction: float = 1.0  # ablation: use this share of the data
    pool: int = 0  # generated domains: distinct cases to draw from (0: the domain's default)
    min_objects: int = 0  # generated domains: only cases whose reference scene holds at least this many objects
    # Generated domains: only these edit categories (e.g. [remove]; empty: all) and, for edits that name an object,
    # only these ways of naming it (Shapes: lone, shape, colour shape, shape cell; empty: all).
    categories: tuple[str, ...] = ()
    forms: tuple[str, ...] = ()
    # ... and the share of cases those two filters apply to; the rest come from the whole domain (e.g. 0.5 with
    # data.forms=[shape]: half the cases drill that form, half keep every category in training).
    filter_share: float = 1.0
    # Generated domains: redraw any case that is a held-out benchmark case (same reference and expected result,
    # any wording) of these benchmark seeds (Shapes: `held_out_cases(300, seed)`; e.g. [0, 1, 2, 3, 4]). Empty (the
    # default, and every bundled editor's runs): no exclusion, the draws of earlier runs exactly.
    exclude_held_out: tuple[int, ...] = ()
    num_workers: int = 0
    do_nothing_prob: float = 0.01

    def __post_init__(self):
        if not 0 < self.fraction <= 1:
            raise ValueError(f"data.fraction must be in (0, 1]; got {self.fraction}")
        if self.pool < 0:
            raise ValueError(f"data.pool must be >= 0 (0: the generated domain's default); got {self.pool}")
        if self.min_objects < 0:
            raise ValueError(f"data.min_objects must be >= 0 (0: any scene); got {self.min_objects}")
        if not 0 < self.filter_share <= 1:
            raise ValueError(f"data.filter_share must be in (0, 1]; got {self.filter_share}")
        if any(s < 0 for s in self.exclude_held_out):
            raise ValueError(f"data.exclude_held_out lists benchmark seeds (>= 0); got {list(self.exclude_held_out)}")
        if self.batch_size < 1 or self.resolution < 8:
            raise ValueError("data.batch_size must be >= 1 and data.resolution >= 8")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW settings, shared by the student and the critic."""

    lr: float = 2e-5
    betas: tuple[float, float] = (0.0, 0.9)
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear lr warm-up
    grad_clip: float = 2.0
    skip_grad_norm: float = 300.0  # a step whose gradient norm exceeds this (or is not finite) is skipped
    # The student's reference encoder (model.reference_encoder) learns at lr times this: it starts at zero, and at
    # the lr that fine-tunes the rest it barely moves (its output stayed ~1% of a reference token's over 7,600 steps).
    reference_encoder_lr_scale: float = 1.0
    # The blocks `model.add_layers` adds in this run learn at lr times this: their outputs start at zero, and at the
    # small lr that fine-tunes a trained student they would barely grow.
    new_layers_lr_scale: float = 1.0
    # Student parameters kept as they are, by name or name prefix (e.g. ref_encoder.gate, ref_encoder.body,
    # transformer_blocks.0); each must name at least one parameter.
    frozen: tuple[str, ...] = ()
    # A step-down at the end: the last `final_share` of the run (of max_steps, or of max_minutes when that limit is
    # set and ends the run first) trains the student at lr times `final_lr_scale` (the critic keeps its lr). On the
    # Shapes CPU runs a constant lr swung exact by ~0.03 between checkpoints; ~1,000 steps at a quarter or a half of
    # the rate took that out and added 0.017-0.025 over the checkpoint they started from
    # (docs/shapes_experiments.md). 0 = no step-down.
    final_share: float = 0.0
    final_lr_scale: float = 1.0

    def __post_init__(self):
        if self.lr < 0:  # else AdamW refuses it in the job, after every model has loaded
            raise ValueError(f"optim.lr must be >= 0, got {self.lr}")
        if not 0 <= self.final_share < 1:
            raise ValueError(f"optim.final_share is a share of the run in [0, 1), got {self.final_share}")
        if self.final_lr_scale <= 0:
            raise ValueError(f"optim.final_lr_scale must be > 0, got {self.final_lr_scale}")
        if any(not f.strip() for f in self.frozen):
            raise ValueError("optim.frozen names parameters (or name prefixes); an empty name freezes everything")
        if self.new_layers_lr_scale <= 0:
            raise ValueError(f"optim.new_layers_lr_scale must be > 0, got {self.new_layers_lr_scale}")
        if self.reference_encoder_lr_scale <= 0:
            raise ValueError(f"optim.reference_encoder_lr_scale must be > 0, got {self.reference_encoder_lr_scale}")


@dataclass(frozen=True)
class LossConfig:
    """Loss weights and DMD settings (method.md section 5)."""

    lambda_dmd: float = 1.0  # 0 = VLM-only ablation
    lambda_vlm: float = 0.02  # 0 = DMD-only ablation
    # > 0 (an extension, stage npedit): also regress the student's unrolled output to each sample's `target`
    # (latent mse), e.g. the judge's accepted edits written by `edit --verdicts --min-score`: self-training on
    # the editor's own judged results, no pairs. With data.train=shapes the targets are the true edits (pairs).
    lambda_target: float = 0.0
    # > 0: the target regression weighs each latent position by 1 + target_edit_weight x (how much the true result
    # differs from the reference there, relative to the sample's largest difference): the edit counts more
    target_edit_weight: float = 0.0
    # > 0: also regress the decoded unrolled output to the given result in pixel space (mse on [-1, 1] pixels, through
    # the VAE decoder): a small object's shape is its corner pixels, which a latent mse weighs little
    lambda_target_pixels: float = 0.0
    dmd_t_min: float = 0.02
    dmd_t_max: float = 0.98
    cfg_scale: float = 3.5
    cfg_scale_strong: float = 7.5
    # the re-implementation's strong-CFG types (remove, shape, style, action) plus "replace": an object swapped for
    # another, i.e. the object's shape changes (the Shapes world's shape edit is called "replace")
    strong_cfg_edit_types: tuple[str, ...] = ("remove", "replace", "shape", "style", "action")
    negative_prompt: str = "low quality, artifacts"

    @property
    def uses_targets(self) -> bool:
        """Whether a loss reads each sample's target image (the regression in latents or in pixels)."""
        return self.lambda_target > 0 or self.lambda_target_pixels > 0

    def __post_init__(self):
        if self.target_edit_weight < 0:
            raise ValueError(f"loss.target_edit_weight must be >= 0, got {self.target_edit_weight}")
        if self.lambda_target_pixels < 0:
            raise ValueError(f"loss.lambda_target_pixels must be >= 0, got {self.lambda_target_pixels}")
        unknown = [e for e in self.strong_cfg_edit_types if e not in EDIT_TYPES]
        if unknown:
            raise ValueError(f"loss.strong_cfg_edit_types: unknown edit types {unknown}; use names from "
                             f"{', '.join(EDIT_TYPES)}")


def cfg_scale_for(loss: LossConfig, edit_type: str) -> float:
    """The teacher's CFG scale in training for this edit type (strong for the types the config lists)."""
    return loss.cfg_scale_strong if edit_type in loss.strong_cfg_edit_types else loss.cfg_scale


@dataclass(frozen=True)
class SamplerConfig:
    """The few-step schedule shared by training and inference."""

    num_steps: int = 4
    shift: float = 6.0
    two_step_prob: float = 0.75  # 0 = one-step unroll only (ablation)

    def __post_init__(self):
        from .flow import MAX_SAMPLING_STEPS  # (here: flow imports torch, which a config alone does not need)

        # the bound of edit/eval/bench: the trainer builds this schedule at once and its sample grids sample it
        if not 1 <= self.num_steps <= MAX_SAMPLING_STEPS:
            raise ValueError(f"sampler.num_steps must be between 1 and {MAX_SAMPLING_STEPS}, got {self.num_steps}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything one `python -m npedit train` run needs."""

    # "warmup" (identity), "npedit" (judge + DMD, no pairs), "sft" (paired baseline) or "critic" (fit a critic, the
    # fake score of DMD, to a trained editor's outputs, the editor frozen: for the app's DMD maps)
    stage: str = "npedit"
    output_dir: str = "runs/default"
    max_steps: int = 1000
    max_minutes: float = 0.0  # also stop (checkpoint and export) after this much wall-clock; 0 = no limit
    critic_steps: int = 5  # critic updates per student update (N_aux)
    # micro-batches of data.batch_size whose gradients add up before each update (student and critic alike):
    # each update sees data.batch_size x gradient_accumulation_steps x processes samples at the memory of one
    gradient_accumulation_steps: int = 1
    seed: int = 0
    mixed_precision: str = "no"
    log_every: int = 10
    sample_every: int = 500
    save_every: int = 500
    keep_checkpoints: int = 2
    # Before any weights load, refuse a run whose models (student, critic, teacher, judge, VAE, text encoders, with
    # the optimiser's state; activations not counted) need more memory than the device has free (training/memory.py)
    check_memory: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self):
        _check(self.stage, STAGES, "stage")
        _check(self.mixed_precision, MIXED_PRECISION, "mixed_precision")
        if self.max_steps < 0 or self.critic_steps < 0 or self.max_minutes < 0:
            raise ValueError("max_steps, max_minutes and critic_steps must be >= 0")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}")
        if not 0 <= self.seed < 2**32:  # numpy's range (accelerate seeds it); said by key, before any model loads
            raise ValueError(f"seed must be between 0 and 2**32 - 1, got {self.seed}")
        if self.log_every < 1 or min(self.sample_every, self.save_every, self.keep_checkpoints) < 0:
            raise ValueError(f"log_every must be >= 1 and sample_every, save_every, keep_checkpoints >= 0 (0: no "
                             f"samples, a checkpoint at the end only, keep all); got log_every={self.log_every}, "
                             f"sample_every={self.sample_every}, save_every={self.save_every}, "
                             f"keep_checkpoints={self.keep_checkpoints}")
        if not self.model.base:
            raise ValueError("model.base is required: a folder or hub id of the text-to-image backbone")
        if not self.data.train:
            raise ValueError("data.train is required: a cases.jsonl (or .csv) path or 'shapes'")
        if self.stage == "npedit" and self.loss.lambda_vlm > 0 and not self.judge.path:
            raise ValueError("judge.path is required for stage 'npedit' unless loss.lambda_vlm=0")
        if min(self.loss.lambda_dmd, self.loss.lambda_vlm, self.loss.lambda_target) < 0:
            raise ValueError("loss.lambda_dmd, loss.lambda_vlm and loss.lambda_target must be >= 0")
        if self.stage == "critic" and not self.model.student:
            raise ValueError("stage 'critic' fits a critic to an editor's outputs: set model.student to that editor "
                             "(an NPEditPipeline folder or its transformer)")
        if self.stage == "critic" and (self.model.add_layers or self.model.reference_encoder):
            raise ValueError("stage 'critic' keeps the editor as it is: model.add_layers and model.reference_encoder "
                             "do not apply")
        if self.model.lora_rank and self.model.dtype != "float32" and self.mixed_precision == "no":
            raise ValueError(f"model.lora_rank with model.dtype={self.model.dtype} keeps the frozen weights in "
                             f"{self.model.dtype} and the adapters in float32: set mixed_precision=bf16 (or fp16) "
                             "so that the two meet under autocast")
        if self.loss.uses_targets and self.stage != "npedit":
            raise ValueError("loss.lambda_target and loss.lambda_target_pixels apply to stage 'npedit' (the unrolled "
                             f"student), not {self.stage!r}")


# ---- loading, overrides, saving ------------------------------------------------------------

def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML-parsed value to the field's annotated type, with a clear error."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping")
        return build_config(tp, value, key + ".")
    if origin is tuple:
        args = typing.get_args(tp)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in items)
        if len(items) != len(args):
            raise ValueError(f"{key} needs {len(args)} values, got {items!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(items, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes", "on"):
            return True
        if str(value).lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{key} must be true or false, got {value!r}")
    if tp in (int, float):
        if tp is int and isinstance(value, str):  # YAML reads 1e3 as text; an integral number in any notation is fine
            try:
                value = float(value) if float(value).is_integer() else value
            except ValueError:
                pass
        try:
            out = tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be a number ({tp.__name__}), got {value!r}") from None
        if tp is int and isinstance(value, float) and value != out:
            raise ValueError(f"{key} must be an integer, got {value!r}")
        if out != out:  # NaN passes every bound (NaN < 0 is False): lambda_vlm=nan dropped the judge loss in silence
            raise ValueError(f"{key} must be a number ({tp.__name__}), got {value!r}")
        return out
    if tp is str:
        return "" if value is None else str(value)
    return value


def build_config(cls, data: dict, prefix: str = ""):
    """Instantiate dataclass `cls` from nested dicts, coercing types; unknown keys are listed in the error."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}"
                         f"{_close_keys(unknown, names, prefix)}; "
                         f"valid keys here: {', '.join(prefix + n for n in names)}")
    values = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**{**values, **_bundle_paths(cls, values, prefix)})


def _close_keys(unknown: list[str], names: list[str], prefix: str) -> str:
    """` (did you mean optim.lr?)` for the valid keys a typo is close to, else "" (the list after it is long)."""
    close = [f"{prefix}{u} -> {prefix}{m[0]}" if len(unknown) > 1 else f"{prefix}{m[0]}"
             for u in unknown if (m := difflib.get_close_matches(str(u), names, n=1, cutoff=0.6))]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _bundle_paths(cls, values: dict, prefix: str) -> dict:
    """The BUNDLE_PATH fields (given or default) that name `assets/...` or `configs/...` missing here, read from the
    bundle and said on the log; so an installed package's recipes work from any folder."""
    out = {}
    for f in dataclasses.fields(cls):
        value = values.get(f.name, f.default)
        if not f.metadata.get("bundle_path") or not isinstance(value, str):
            continue
        missing = bundle_missing(value)
        if missing:
            raise ValueError(f"{prefix}{f.name}: {missing}")
        found = in_bundle(value, prefix + f.name)
        if found != value:
            out[f.name] = found
    return out


def to_dict(cfg) -> dict:
    """The config as plain nested dicts/lists (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten(data: dict, prefix: str = "") -> dict:
    """{"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out = {}
    for k, v in data.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def changed_settings(before: dict, after: dict) -> list[str]:
    """`key: old -> new` for every dotted key whose value differs between two config dicts (added or dropped keys
    included)."""
    old, new = flatten(before), flatten(after)
    return [f"{k}: {old.get(k, '(unset)')} -> {new.get(k, '(unset)')}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only true/false are booleans, so `mixed_precision=no` is the
    word "no" (YAML 1.1 reads no/yes/on/off as booleans; a bool setting still takes those words, see `_coerce`)."""


_BOOL_TAG = "tag:yaml.org,2002:bool"
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


MAX_YAML_NODES = 100_000  # a config holds a few hundred values; more, once aliases are copied out, is a YAML bomb


def read_yaml(text: str) -> Any:
    """Parse config YAML (a file or one override's value) with YAML 1.2's booleans (`_ConfigLoader`); ValueError for
    YAML whose aliases stand for more than MAX_YAML_NODES values (a "billion laughs") or that is nested too deeply."""
    try:
        data = yaml.load(text, Loader=_ConfigLoader)
    except RecursionError:
        raise ValueError("the YAML is nested too deeply to be a config") from None
    except yaml.YAMLError as exc:  # a syntax error is the user's to fix: where it is, not PyYAML's traceback
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"not valid YAML{where}: {problem}") from None
    _check_expansion(data)
    return data


def _check_expansion(data: Any) -> None:
    """ValueError unless `data`, with every alias copied out (as JSON, str() and the dataclasses copy it), holds at
    most MAX_YAML_NODES values; each shared node is counted once per use, in time linear in the YAML's own size."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ValueError("the YAML holds an alias to a node that holds itself (a loop): not a config")
        open_nodes.add(key)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        sizes[key] = total = 1 + sum(size(child) for child in children)
        open_nodes.discard(key)
        if total > MAX_YAML_NODES:
            raise ValueError(f"the YAML's aliases (*name) stand for more than {MAX_YAML_NODES:,} values: not a config")
        return total

    try:
        size(data)
    except RecursionError:
        raise ValueError("the YAML is nested too deeply to be a config") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (values parsed as YAML scalars) to a nested dict."""
    out = json.loads(json.dumps(data))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-4)")
        key, raw = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {p} is not a section")
        try:
            node[parts[-1]] = read_yaml(raw) if raw.strip() else ""
        except ValueError as exc:
            raise ValueError(f"override {item!r}: {exc}") from None
    return out


def pick_preset(overrides, default: str = "default") -> tuple[str, list[str]]:
    """The preset `preset=NAME` words pick (the last, as for every other key given twice) and the other words."""
    preset, rest = default, []
    for item in overrides:
        key, _, raw = str(item).partition("=")
        if key.strip() == "preset":
            preset = str(read_yaml(raw)) if raw.strip() else ""
        else:
            rest.append(item)
    return preset, rest


def overrides_as_flags(words) -> list[str]:
    """`key=value` words (the `python -m npedit shapes ...` override style) as `--key value` for argparse."""
    return [w for item in words for w in
            ((f"--{item.split('=', 1)[0]}", item.split("=", 1)[1]) if "=" in item and not item.startswith("-") else (item,))]


def load_config(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML/JSON config file (optional), apply dotted overrides and validate."""
    data: dict = {}
    if path:
        p = Path(path)
        if p.is_dir():  # e.g. a run folder, whose config.yaml was meant
            own = f" (its config: {p / 'config.yaml'})" if (p / "config.yaml").is_file() else ""
            raise FileNotFoundError(f"{p} is a folder, not a config file: --config takes a YAML file{own}")
        if not p.is_file():
            from .training.checkpoint import latest_checkpoint

            saved = latest_checkpoint(p.parent / "checkpoints") if p.name == "config.yaml" else None
            kept = (f" (the run's settings as of its newest checkpoint: {saved / 'config.yaml'}, which --config "
                    "takes)") if saved and (saved / "config.yaml").is_file() else ""
            raise FileNotFoundError(f"config file not found: {p}{kept}")
        try:
            data = read_yaml(p.read_text(encoding="utf-8")) or {}
        except ValueError as exc:
            raise ValueError(f"{p}: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{p} must hold a mapping of config keys")
    return build_config(TrainConfig, apply_overrides(data, list(overrides)))


def config_text(cfg) -> str:
    """A resolved config (a TrainConfig, a Shapes stage's) as the YAML `save_config` writes."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg, path: str | os.PathLike) -> None:
    """Write a resolved config (a TrainConfig, a Shapes stage's) as YAML, whole or not at all (a resume rewrites the
    run's own config.yaml)."""
    write_atomic(path, config_text(cfg))
