"""Backbone families, picked by the transformer class named in a checkpoint's config."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

from .base import Backbone, resolve_subfolder

# family -> (module, Backbone class, transformer class names it drives)
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "zimage": ("npedit.backbones.zimage", "ZImageBackbone",
               ("ZImageTransformer2DModel", "NPEditZImageTransformer2DModel")),
    "sd3": ("npedit.backbones.sd3", "SD3Backbone", ("SD3Transformer2DModel", "NPEditSD3Transformer2DModel")),
}


def backbone_class(family: str) -> type[Backbone]:
    """The Backbone subclass of a family name."""
    if family not in FAMILIES:
        raise ValueError(f"unknown backbone family {family!r}; supported: {', '.join(FAMILIES)}")
    module, name, _ = FAMILIES[family]
    return getattr(importlib.import_module(module), name)


# Our own component classes (besides the families' transformers) a saved pipeline may name.
COMPONENT_MODULES = ("npedit.backbones.fast_vae",)


def import_families() -> None:
    """Import every family module (and our component classes), so diffusers can resolve their classes named in
    model_index.json."""
    for module in [m for m, _, _ in FAMILIES.values()] + list(COMPONENT_MODULES):
        importlib.import_module(module)


def family_of_class_name(class_name: str) -> str:
    """The family whose transformer class is `class_name`."""
    for family, (_, _, classes) in FAMILIES.items():
        if class_name in classes:
            return family
    supported = sorted(c for _, _, cs in FAMILIES.values() for c in cs)
    raise ValueError(f"unsupported transformer class {class_name!r}; supported: {', '.join(supported)}")


def detect_family(path: str | os.PathLike) -> str:
    """Read `transformer/config.json` (or `config.json`) of a local folder or hub id to find its family."""
    local = Path(str(path))
    if local.is_dir():
        from npedit.folders import CheckpointError, describe

        for cfg in (local / "transformer" / "config.json", local / "config.json"):
            if cfg.is_file():
                name = json.loads(cfg.read_text(encoding="utf-8")).get("_class_name")
                if not name:  # e.g. a judge's config.json: say what the folder is, not "class ''"
                    raise CheckpointError(f"{describe(local)}: not a diffusers-layout checkpoint of a supported backbone")
                try:
                    return family_of_class_name(name)
                except ValueError as exc:  # e.g. an SDXL UNet: name the folder that holds it
                    raise CheckpointError(f"{cfg.parent} holds a {name}: {exc}") from None
        # e.g. an SDXL pipeline (unet/, no transformer/): say what it is
        raise FileNotFoundError(f"{describe(local)}, with no transformer/config.json: not a diffusers-layout "
                                "checkpoint of a supported backbone")
    from npedit.folders import found_nowhere, locate, looks_local

    if looks_local(path):  # a missing local folder: say so now, not after the hub client's retries
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    located = locate(path)
    if located != str(path):  # the hub is unreachable and the cache holds the repo: read its snapshot
        return detect_family(located)
    from huggingface_hub import hf_hub_download

    try:
        cfg = hf_hub_download(str(path), "transformer/config.json")
    except Exception as exc:  # missing repo, private, ...: say what was looked for and what to pass instead
        raise found_nowhere(path, exc) from None
    return family_of_class_name(json.loads(Path(cfg).read_text(encoding="utf-8")).get("_class_name", ""))


def load_backbone(path: str | os.PathLike, *, family: str | None = None, **kwargs) -> Backbone:
    """Load the frozen parts (text encoder, tokenizer, VAE) of the checkpoint at `path` (a folder or hub id; offline,
    a hub id's cached snapshot: `folders.locate`)."""
    from pathlib import Path

    from npedit.folders import CheckpointError, latent_space_problem, locate

    path = locate(path)
    family = family or detect_family(path)
    problem = latent_space_problem(Path(path)) if Path(path).is_dir() else None
    if problem:  # (a base model's or an editor's: training and editing failed at the first step)
        raise CheckpointError(f"{path}: {problem}")
    return backbone_class(family).from_pretrained(path, **kwargs)


__all__ = ["Backbone", "FAMILIES", "backbone_class", "detect_family", "import_families", "family_of_class_name", "load_backbone",
           "resolve_subfolder"]
