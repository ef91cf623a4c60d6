"""An editor shipped as LoRA adapters alone: a few megabytes instead of the whole transformer.

A run with `model.lora_rank` checkpoints its adapters (`student_adapters.safetensors`). `export_adapters` turns them
into a folder that names the base model (and the student checkpoint the run started from, if any) instead of
holding its weights:

    pytorch_lora_weights.safetensors   the adapters in diffusers' LoRA layout: `transformer.<layer>.lora_A.weight`
                                       (r x in) and `lora_B.weight` (out x r), the scale alpha / r already in B, so
                                       any loader that assumes alpha = r (diffusers' `load_lora_weights` and
                                       `load_lora_adapter` with PEFT) adds exactly the update the run trained
    npedit_student_extra.safetensors   parameters the student has and the base lacks, trained in full (the SD3
                                       student's reference embedding or projection, a reference encoder); absent
                                       when there are none (a Z-Image student)
    npedit_lora.json                   base, student origin, rank, alpha, dtype, sampler shift, step
    training_config.json               the run's config (how its student was built; the app reads its domain)
    README.md                          a model card saying how to load it

`load_adapter_pipeline` (what `NPEditPipeline.from_pretrained` does with such a folder, so the CLI, the app, `eval`
and `bench` all take one) rebuilds the run's starting student from the base exactly as the trainer did, sets the
extra parameters, folds the adapters into the weights and returns an ordinary `NPEditPipeline`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .folders import BaseNotFound

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a pipeline's LoRA weights
EXTRA_FILE = "npedit_student_extra.safetensors"
META_FILE = "npedit_lora.json"
PREFIX = "transformer"


def is_adapter_folder(path) -> bool:
    """Whether `path` is a folder of adapters (`npedit_lora.json`, no `model_index.json`), not a whole editor."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file() and not (path / "model_index.json").is_file()


def to_diffusers_layout(adapters: dict[str, torch.Tensor], scale: float) -> tuple[dict, dict]:
    """Split a run's adapter state (`X.lora_down.weight`, `X.lora_up.weight` and parameters trained in full) into
    (diffusers-layout LoRA tensors with the scale folded into B, the full parameters under their own names)."""
    lora, extra = {}, {}
    for name, value in adapters.items():
        if name.endswith(".lora_down.weight"):
            lora[f"{PREFIX}.{name[: -len('.lora_down.weight')]}.lora_A.weight"] = value.float().contiguous()
        elif name.endswith(".lora_up.weight"):
            lora[f"{PREFIX}.{name[: -len('.lora_up.weight')]}.lora_B.weight"] = (value.float() * scale).contiguous()
        else:
            extra[name] = value.contiguous()
    layers = {k.rsplit(".lora_", 1)[0] for k in lora}
    if any(f"{layer}.lora_{half}.weight" not in lora for layer in layers for half in "AB"):
        raise ValueError("the saved adapters are incomplete: a layer has one LoRA half without the other")
    return lora, extra


def fold_lora(model: nn.Module, lora: dict[str, torch.Tensor], prefix: str = PREFIX) -> int:
    """Add B @ A of each adapter in diffusers' layout (`<prefix>.<layer>.lora_A.weight` / `lora_B.weight`, scale
    already in B) into the weight of `model`'s linear layer `<layer>`, in float32; returns how many layers changed.
    A layer `model` does not have, or factors of the wrong shape, is a clear error before anything changes."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        name = key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key
        layer, _, half = name.rpartition(".lora_")
        if half not in ("A.weight", "B.weight"):
            raise ValueError(f"not a LoRA tensor in diffusers' layout: {key}")
        pairs.setdefault(layer, {})[half[0]] = value
    modules = dict(model.named_modules())
    for layer, ab in pairs.items():
        module = modules.get(layer)
        if not isinstance(module, nn.Linear):
            near = [n for n, m in modules.items() if isinstance(m, nn.Linear)][:5]
            raise ValueError(f"the adapters name a layer {layer!r} that this {type(model).__name__} has no linear "
                             f"layer for (its linear layers include {near}): adapters for another model?")
        if set(ab) != {"A", "B"}:
            raise ValueError(f"layer {layer!r} has only lora_{''.join(ab)} in the adapters")
        a, b = ab["A"], ab["B"]
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(f"adapter for {layer!r} is {tuple(b.shape)} x {tuple(a.shape)}, its layer "
                             f"{module.out_features} x {module.in_features}: adapters for another model?")
    with torch.no_grad():
        for layer, ab in pairs.items():
            w = modules[layer].weight
            w.copy_((w.float() + ab["B"].float() @ ab["A"].float()).to(w.dtype))
    return len(pairs)


def export_adapters(run_dir: str | Path, step: int | None = None, out: str | Path | None = None,
                    base: str | None = None) -> Path:
    """Write the adapters of a LoRA run's checkpoint (the newest, or `step`) as an adapter folder (default
    `<run>/exports/step_N-lora`); `base` overrides the base model it names (the run's `model.base`)."""
    from .config import to_dict
    from .sharing import portable, shareable_config
    from .training.export import checkpoint_config, export_writing, find_checkpoint

    path = find_checkpoint(run_dir, step)
    cfg, state = checkpoint_config(run_dir, path)
    if cfg.stage == "critic":
        raise ValueError("a critic run trains no editor: export it without --adapters (its folded critic)")
    source = path / "student_adapters.safetensors"
    if not cfg.model.lora_rank or not source.is_file():
        raise ValueError(f"{path} holds no LoRA adapters (the run trained its whole student: model.lora_rank=0); "
                         "export it without --adapters")
    rank = int(cfg.model.lora_rank)
    alpha = float(cfg.model.lora_alpha or rank)
    lora, extra = to_diffusers_layout(load_file(str(source)), alpha / rank)
    out = Path(out) if out else Path(run_dir) / "exports" / f"{path.name}-lora"
    # a local base or student as an absolute path: as typed (`hub/Z-Image-Turbo`) it loaded only from the folder the
    # run was started in; `--base` is as typed now, here
    root = started_in(run_dir, cfg.output_dir)
    meta = {"format": 1, "base": absolute_local(base, Path.cwd()) if base else absolute_local(cfg.model.base, root),
            "student": absolute_local(cfg.model.student, root) or None,
            "rank": rank, "alpha": alpha, "layers": len(lora) // 2, "dtype": cfg.model.dtype,
            "shift": cfg.sampler.shift, "stage": cfg.stage, "step": int(state["step"]),
            "exported_from": portable(str(path)),
            "extra": sorted(extra)}
    # published whole (as an editor export is): an export killed or out of disk midway left a folder that the app
    # lists as an editor (its npedit_lora.json, from this or an earlier export) with weights cut short
    with export_writing(out, run_dir) as folder:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(lora, str(folder / LORA_FILE), metadata={"format": "pt"})
        if extra:  # (an earlier export's is never carried over: `export.EXPORT_OWNED`)
            save_file(extra, str(folder / EXTRA_FILE), metadata={"format": "pt"})
        # the run's folder, judge and data named only (as a whole export does); base and student stay: a load needs
        # them
        shared = shareable_config(to_dict(cfg), (("output_dir",), ("judge", "path"), ("data", "train")))
        (folder / "training_config.json").write_text(json.dumps(shared, indent=2), encoding="utf-8")
        (folder / META_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        (folder / "README.md").write_text(_card(meta, cfg), encoding="utf-8")
    return out


def started_in(run_dir: str | Path, output_dir: str) -> Path:
    """The folder a run was started in, where the relative paths of its config lead: `run_dir` less its relative
    `output_dir` (runs/x trained from /work is /work/runs/x), else (an absolute or other output_dir) the current one."""
    run, out = Path(run_dir).resolve(), Path(output_dir)
    parts = out.parts
    if out.is_absolute() or not parts or ".." in parts or run.parts[-len(parts):] != parts:
        return Path.cwd()
    return run.parents[len(parts) - 1]


def absolute_local(value: str, root: Path) -> str:
    """A model path from a run's config (relative to `root`) as it may be recorded: a folder found under `root`
    absolute; a hub id, or a relative path not found there (an app run's `root` may be a guess), as typed."""
    if not value:
        return value
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    if not (root / path).exists():  # a hub id, or a path this export cannot place: recorded as typed, as before
        return value
    return str((root / path).resolve())


def _card(meta: dict, cfg) -> str:
    """The adapter folder's model card: how it was trained, what it adapts, how to load it."""
    from .pipeline import training_summary

    summary = training_summary(cfg.stage, cfg.model.student or None, cfg.loss, cfg.data.train, 0)
    origin = (f"the student checkpoint `{meta['student']}`" if meta["student"] else
              f"the base model `{meta['base']}` (the student starts as a copy of its transformer)")
    extra = (f"`{EXTRA_FILE}` holds {len(meta['extra'])} tensor(s) the student has and the base lacks "
             f"({', '.join(meta['extra'][:4])}{', ...' if len(meta['extra']) > 4 else ''}), trained in full.\n"
             if meta["extra"] else "")
    return f"""---
library_name: diffusers
tags: [image-editing, npedit, lora]
---
# NP-Edit editor as LoRA adapters

An instruction-based image editor, {summary}; step {meta['step']}. This folder holds low-rank adapters only
(rank {meta['rank']}, alpha {meta['alpha']:g}, {meta['layers']} layers); the weights they adapt are those of
{origin}, which must be at hand (a hub id or a local folder). {extra}
```python
from npedit import NPEditPipeline

pipe = NPEditPipeline.from_pretrained("path/to/this/folder")      # base = "{meta['base']}"
# or, when the base model lives elsewhere: NPEditPipeline.from_pretrained(folder, base="path/to/base")
image = pipe(image="photo.png", prompt="make the sky pink").images[0]
```
The CLI and the app take the folder as `--model`. `{LORA_FILE}` is in diffusers' LoRA layout (the scale
alpha / r already folded into `lora_B`), so with PEFT installed diffusers applies the same update to the base's
transformer: `transformer.load_lora_adapter(folder, prefix="transformer", weight_name="{LORA_FILE}")`.
"""


def read_meta(folder: str | Path) -> dict:
    """The folder's `npedit_lora.json`, checked for what loading needs (format 1, a base)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{folder / META_FILE} is not readable adapter metadata: {exc}") from None
    if meta.get("format") != 1 or "base" not in meta:
        raise ValueError(f"{folder / META_FILE} is not an NP-Edit adapter description (format 1 with a base)")
    return meta


def _cast(net: nn.Module, dtype: torch.dtype) -> nn.Module:
    """`net` in `dtype`, left alone when every floating tensor already is: diffusers 0.42 warns on each `to(dtype)`
    of its models that "modules should be kept in float32: []", a list it leaves empty."""
    if all(t.dtype == dtype for t in net.state_dict().values() if t.is_floating_point()):
        return net
    return net.to(dtype)


def load_adapter_pipeline(folder: str | Path, *, base: str | None = None, student: str | None = None,
                          torch_dtype: torch.dtype | None = None):
    """An `NPEditPipeline` from an adapter folder: the base (or `base`) supplies the text encoder, VAE and, unless the
    run started from a student checkpoint (or `student` names one), the transformer the adapters adapt. Its weights
    are rebuilt in the run's `model.dtype` (what the adapters were trained on) and held in `torch_dtype` (default
    float32); each adapter's update is added in float32 and the sum rounded once, and a bfloat16 run loaded in
    bfloat16 never needs a float32 copy of the model."""
    from .backbones import load_backbone
    from .config import load_config
    from .pipeline import NPEditPipeline
    from .training.trainer import DTYPES, build_student

    folder = Path(folder)
    meta = read_meta(folder)
    cfg = load_config(folder / "training_config.json")
    base = base or meta["base"]
    mc = dataclasses.replace(cfg.model, student=student or meta["student"] or "")
    dtype = DTYPES[meta.get("dtype", "float32")]
    target = torch_dtype or torch.float32
    try:
        backbone = load_backbone(base, torch_dtype=target)
        teacher = None if mc.student else backbone.load_transformer(base, torch_dtype=dtype).eval()
        net, _ = build_student(backbone, teacher, mc, dtype, keep_dtype=True)
    except (OSError, ValueError) as exc:
        origin = f"student checkpoint {mc.student!r} or base model {base!r}" if mc.student else f"base model {base!r}"
        raise BaseNotFound(f"cannot load the adapters' {origin}: {exc}. Where the same model lives elsewhere, "
                                f"pass base=... / student=... to NPEditPipeline.from_pretrained, or set \"base\" / "
                                f"\"student\" in {folder / META_FILE}") from None
    del teacher
    work = torch.float32 if torch.float32 in (dtype, target) else target  # round once, after adding the update
    net = _cast(net, work).requires_grad_(False)
    if (folder / EXTRA_FILE).is_file():
        own = dict(net.named_parameters())
        extra = load_file(str(folder / EXTRA_FILE))
        for name, value in extra.items():
            if name not in own or own[name].shape != value.shape:
                raise ValueError(f"{folder / EXTRA_FILE}: {name} {tuple(value.shape)} does not fit this student "
                                 f"({tuple(own[name].shape) if name in own else 'no such parameter'})")
        with torch.no_grad():
            for name, value in extra.items():
                own[name].copy_(value)
    fold_lora(net, load_file(str(folder / LORA_FILE)))
    shift = float(meta.get("shift", cfg.sampler.shift))
    return NPEditPipeline.from_parts(_cast(net, target).eval(), backbone, shift=shift)


def adapter_size(folder: str | Path) -> int:
    """Bytes of the adapter folder's weight files."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in (folder / LORA_FILE, folder / EXTRA_FILE) if p.is_file())
