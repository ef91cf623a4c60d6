"""The whole run's memory, estimated before any weights load (the judge, teacher and critic sit in memory together).

Each network a run holds at once (student, critic, teacher, judge, VAE, text encoders) is built on the meta device
from its config alone (shapes, no weights read) and costed as the trainer holds it: frozen parts in their dtype
(model.dtype, judge.dtype); a network trained in full as float32 weights, float32 gradients and AdamW's two float32
moments (16 bytes a parameter); a LoRA network as its adapters (16 bytes an element) over the teacher's weights,
which it shares. Activations are not counted: the figure is a lower bound.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import torch

from .. import lora
from ..config import TrainConfig, apply_overrides, build_config, to_dict
from ..folders import build_on_meta, device_memory, human_size, locate, model_folder, weights_complete

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
TRAINED = 16  # bytes a trained parameter takes: its float32 weight and gradient and AdamW's two float32 moments
SUGGESTED_RANK = 16  # the LoRA rank a refusal proposes
NAMES = {"vae": "VAE"}  # parts as messages name them (text_encoder_2: "text encoder 2")


class MemoryCheckError(ValueError):
    """A run whose models (activations aside) need more memory than its device has free; the message lists each."""


@dataclasses.dataclass
class Model:
    """Elements of one network's parameters and buffers, as built on the meta device."""

    params: int
    buffers: int  # floating-point buffers' elements (held in the model's dtype)
    fixed: int = 0  # bytes of its other buffers (integer position ids), held as they are whatever the dtype
    width: int = 0  # sum of (in + out) over the linear layers LoRA would wrap (model.lora_targets): adapters / rank
    own: int = 0  # parameters the teacher does not have (a student's additions): trained in full under LoRA
    frozen: int = 0  # parameters optim.frozen keeps as they are
    # its buffers the teacher has too (name and shape), outside the parts a LoRA run trains in full: held once
    # (lora.share_weights) by a LoRA student built from the teacher; floating elements, and other bytes
    shared: int = 0
    shared_fixed: int = 0


def held(model: Model, element: int) -> int:
    """Bytes of `model`'s parameters and floating buffers at `element` bytes each, and of its other buffers."""
    return (model.params + model.buffers) * element + model.fixed


def matching(names, prefixes: tuple[str, ...]) -> dict[str, list[str]]:
    """For each of `prefixes` (optim.frozen), the `names` equal to it or under it (`prefix.`)."""
    return {p: [n for n in names if n == p or n.startswith(p.rstrip(".") + ".")] for p in prefixes}


def _meta(folder: Path, model_class, dtype) -> torch.nn.Module:
    """`model_class` as `folder`'s config builds it on the meta device (shapes only), size-checked as every load is."""
    return build_on_meta(folder, model_class, dtype)[0]


def _counted(net: torch.nn.Module, targets: tuple[str, ...] | None = None, base: torch.nn.Module | None = None,
             frozen: tuple[str, ...] = (), lora_used: bool = False) -> Model:
    """`net`'s counts; its LoRA width for `targets` (None: not asked), an error for targets naming none of its
    layers only where the run uses LoRA (else the width only costs a suggestion)."""
    width = 0
    if targets is not None:
        try:
            width = lora.adapter_elements(net, 1, targets)
        except ValueError:
            if lora_used:
                raise
    params = dict(net.named_parameters())
    theirs = {n for n, _ in base.named_parameters()} if base is not None else set(params)
    kept = {n for hits in matching(params, frozen).values() for n in hits}
    buffers = list(net.buffers())
    shared = []
    if base is not None:  # under LoRA a part made only of parameters the teacher lacks trains in full
        full = [name for name, m in net.named_modules()
                if (names := [f"{name}.{n}" if name else n for n, _ in m.named_parameters()])
                and not any(n in theirs for n in names)]
        their_buffers = {n: b.shape for n, b in base.named_buffers()}
        shared = [b for n, b in net.named_buffers()
                  if their_buffers.get(n) == b.shape and not lora.within(n.rpartition(".")[0], full)]
    return Model(params=sum(p.numel() for p in params.values()),
                 buffers=sum(b.numel() for b in buffers if b.is_floating_point()),
                 fixed=sum(b.numel() * b.element_size() for b in buffers if not b.is_floating_point()),
                 width=width,
                 own=sum(p.numel() for n, p in params.items() if n not in theirs),
                 frozen=sum(params[n].numel() for n in kept),
                 shared=sum(b.numel() for b in shared if b.is_floating_point()),
                 shared_fixed=sum(b.numel() * b.element_size() for b in shared if not b.is_floating_point()))


def count_models(cfg: TrainConfig) -> tuple[dict[str, Model], list[str]]:
    """Meta-device counts of every network `cfg`'s run loads ("teacher", "student", "text_encoder", "vae",
    "judge", ...), and the parts that could not be counted (a hub id not downloaded yet)."""
    from ..backbones import FAMILIES, backbone_class, detect_family, resolve_subfolder
    from ..backbones.base import check_transformer
    from ..backbones.vae import vae_class

    mc = cfg.model
    dtype = getattr(torch, mc.dtype)
    base = locate(mc.base)
    family = backbone_class(detect_family(base))
    family.check_folder(base)  # the loader's own check first: a part missing is one line naming it, not a read error
    models, missing = {}, []

    def folder_of(path: str, subfolder: str | None, name: str, required: bool = True) -> Path | None:
        found = model_folder(path, subfolder)
        if found is not None and not weights_complete(found):  # its loader says what is wrong with it
            return None
        if found is None and required:
            missing.append(f"{name} ({path}{'/' + subfolder if subfolder else ''}: no local copy yet)")
        return found

    def transformer(path: str, name: str) -> torch.nn.Module | None:
        subfolder = resolve_subfolder(path, "transformer")
        # the loader's own checks first (a folder of another kind or family is one line naming what it holds)
        named = check_transformer(path, subfolder, family.family, dtype)["_class_name"]
        folder = folder_of(path, subfolder, name)
        module = importlib.import_module(FAMILIES[family.family][0])
        return _meta(folder, getattr(module, named), dtype) if folder is not None else None

    teacher = transformer(base, "teacher")
    if teacher is not None:
        models["teacher"] = _counted(teacher, mc.lora_targets, lora_used=bool(mc.lora_rank))
    for name, encoder_class in family.text_encoder_classes.items():
        folder = folder_of(base, name, name, required=name == "text_encoder")
        if folder is not None:
            models[name] = _counted(_meta(folder, encoder_class, dtype))
    vae_folder = folder_of(base, "vae", "vae")
    if vae_folder is not None:
        config = json.loads((vae_folder / "config.json").read_text(encoding="utf-8"))
        models["vae"] = _counted(_meta(vae_folder, vae_class(config, vae_folder), dtype))
    student = None
    if mc.student:
        student = transformer(locate(mc.student), "student")
    elif teacher is not None:
        student = family.prepare_student(teacher, reference_mode=mc.reference_mode)
    if student is not None:  # grown as build_student grows it (class methods: no backbone is loaded)
        student, _ = family.add_layers(student, mc.add_layers)
        student = family.add_reference_encoder(student, mc.reference_encoder, gated=mc.reference_encoder_gated)
        models["student"] = _counted(student, mc.lora_targets, teacher, cfg.optim.frozen, bool(mc.lora_rank))
    if cfg.stage == "npedit" and cfg.loss.lambda_vlm > 0:
        from ..judges import judge_class

        path = locate(cfg.judge.path, "judge folder")
        folder = folder_of(path, None, "judge")
        if folder is not None:
            models["judge"] = _counted(_meta(folder, judge_class(path).model_class, getattr(torch, cfg.judge.dtype)))
    return models, missing


def run_parts(cfg: TrainConfig, models: dict[str, Model]) -> dict[str, tuple[int, str]]:
    """Bytes each part of `cfg`'s run holds at once, with how it is held, from `count_models`' counts (arithmetic
    only, so other settings can be costed without building anything again)."""
    mc = cfg.model
    frozen = BYTES[mc.dtype]
    fits_critic = cfg.stage == "critic"
    lora_student = bool(mc.lora_rank) and not fits_critic
    lora_critic = bool(mc.lora_rank) and mc.lora_critic
    has_critic = fits_critic or (cfg.stage == "npedit" and cfg.loss.lambda_dmd > 0)
    parts: dict[str, tuple[int, str]] = {}
    teacher, student = models.get("teacher"), models.get("student")
    if teacher is not None and (has_critic or (lora_student and not mc.student)):  # else dropped once copied
        parts["teacher"] = (held(teacher, frozen), f"{mc.dtype}, frozen")
    if student is not None:
        if fits_critic:
            parts["student"] = (held(student, 4), "float32, frozen")
        elif lora_student:
            adapters = mc.lora_rank * student.width + student.own
            # a student from the teacher shares its parameters and buffers (lora.share_weights); a loaded one's own
            base = held(student, frozen) - (student.own * frozen if mc.student else
                                            (student.params + student.shared) * frozen + student.shared_fixed)
            parts["student"] = (adapters * TRAINED + base, f"LoRA rank {mc.lora_rank}: {adapters:,} trained elements"
                                + (f" over {mc.dtype} weights" if mc.student else " over the teacher's weights"))
        else:
            trained = student.params - student.frozen
            parts["student"] = (trained * (TRAINED - 4) + held(student, 4),
                                "trained in full: float32 weights, gradients and AdamW's two moments")
    if has_critic and teacher is not None:
        if lora_critic:
            adapters = mc.lora_rank * teacher.width
            parts["critic"] = (adapters * TRAINED, f"LoRA rank {mc.lora_rank} over the teacher's weights")
        else:
            parts["critic"] = (teacher.params * (TRAINED - 4) + held(teacher, 4), "trained in full, as the student")
    for name, model in models.items():
        if name.startswith("text_encoder") or name == "vae":
            parts[name] = (held(model, frozen), f"{mc.dtype}, frozen")
    if "judge" in models:
        judge = models["judge"]
        parts["judge"] = (held(judge, BYTES[cfg.judge.dtype]), f"{cfg.judge.dtype}, frozen")
    return parts


def _alternatives(cfg: TrainConfig, has_judge: bool) -> list[tuple[str, TrainConfig]]:
    """Settings that shrink the run (LoRA, bfloat16 frozen parts, both), as (overrides, config)."""
    lora_words = [f"model.lora_rank={SUGGESTED_RANK}"] if not cfg.model.lora_rank and not cfg.model.add_layers else []
    half = [f"{key}=bfloat16" for key, value, used in (("model.dtype", cfg.model.dtype, True),
                                                       ("judge.dtype", cfg.judge.dtype, has_judge))
            if value == "float32" and used]
    out = []
    for words in (lora_words, half, lora_words + half if lora_words and half else []):
        if not words:
            continue
        data = apply_overrides(to_dict(cfg), words)
        if data["model"]["lora_rank"] and data["model"]["dtype"] != "float32" and data["mixed_precision"] == "no":
            words = [*words, "mixed_precision=bf16"]  # adapters over 16-bit weights meet them under autocast
            data["mixed_precision"] = "bf16"
        out.append((" ".join(words), build_config(TrainConfig, data)))
    return out


def check_run_memory(cfg: TrainConfig, device: torch.device) -> str:
    """MemoryCheckError unless every network `cfg`'s run loads fits, together, in `device_memory(device)`: one line
    listing each part's size and the settings that would make it fit (`check_memory=false` skips this check).
    Returns a line saying what was estimated. Activations are not counted: a lower bound."""
    models, missing = count_models(cfg)
    parts = run_parts(cfg, models)
    total = sum(n for n, _ in parts.values())
    memory, where = device_memory(device)
    listed = ", ".join(f"{NAMES.get(name, name.replace('_', ' '))} {human_size(n)} ({how})"
                       for name, (n, how) in parts.items())
    uncounted = f"; not counted: {', '.join(missing)}" if missing else ""
    if memory is None or total <= memory:
        room = f" of the {human_size(memory)} {where}" if memory is not None else ""
        return (f"memory check: the models need at least {human_size(total)}{room} before activations ({listed})"
                f"{uncounted}")
    fixes = [f"{words} ({human_size(sum(n for n, _ in run_parts(alt, models).values()))})"
             for words, alt in _alternatives(cfg, "judge" in parts)]
    if "judge" in parts:
        fixes.append(f"a smaller judge (judge.path; this one is {human_size(parts['judge'][0])})")
    fixes.append("check_memory=false to try anyway")
    raise MemoryCheckError(
        f"this run's models need at least {human_size(total)} together, more than the {human_size(memory)} {where}, "
        f"before activations (not counted: the real need is higher): {listed}{uncounted}; to fit, set "
        f"{'; or '.join(fixes)}")
