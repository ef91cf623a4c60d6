"""The backbone protocol: text encoder + VAE + a way to call a transformer in our flow convention.

One `Backbone` holds the frozen parts shared by the student, the teacher and the critic (text
encoder, tokenizer, VAE). The three transformers are plain diffusers modules; the backbone's
`velocity` calls any of them, with or without reference tokens, and converts the family's
native time/output convention to npedit.flow's (t = 1 is noise, v = eps - x0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn


def set_config(model, **values) -> None:
    """`register_to_config` for a model already built, that also takes the keys off diffusers' `_use_default_values`
    (the keys left at their defaults when it was built): otherwise `from_config(model.config)` resets them, and a
    copy built from the live config (e.g. `npedit.lora.merged_copy`) loses what was set here."""
    model.register_to_config(**values)
    defaults = model.config.get("_use_default_values")
    if defaults:
        model.register_to_config(_use_default_values=[k for k in defaults if k not in values])


def onload(module) -> None:
    """Move `module` to its device now when diffusers' model offload (`enable_model_cpu_offload`) holds it on the CPU:
    its hook fires only in `forward` (and a VAE's `encode` / `decode`), after code that reads the module's device
    first, and never for code that calls its blocks one by one."""
    hook = getattr(module, "_hf_hook", None)
    if hook is not None:
        hook.pre_forward(module)


def resolve_subfolder(path: str | os.PathLike, subfolder: str | None) -> str | None:
    """`subfolder` unless `path` is a local folder that holds the model itself (config.json at its top)."""
    local = Path(str(path))
    if subfolder and local.is_dir() and not (local / subfolder).is_dir() and (local / "config.json").is_file():
        return None
    return subfolder


def check_transformer(path: str | os.PathLike, subfolder: str | None, family: str, dtype=None) -> dict:
    """The config.json of the transformer at `path` (`subfolder`, as `resolve_subfolder` gave it), read alone; a
    `CheckpointError` saying what the path holds unless it names a transformer class of `family` (diffusers would
    otherwise build another family's class from it with random weights, warning only), or, for a local folder, when
    its config builds a model far larger than its weights or than memory allows at `dtype` (`check_model_size`)."""
    import importlib

    from npedit.backbones import FAMILIES
    from npedit.folders import CheckpointError, check_size, check_weights, describe, found_nowhere, looks_local

    classes = FAMILIES[family][2]
    folder = Path(str(path), subfolder or "")
    if looks_local(path) and not (folder / "config.json").is_file():
        raise CheckpointError(f"{describe(path)}: a {family} transformer folder holds config.json and its weights")
    try:
        config = AutoencoderKL.load_config(str(path), subfolder=subfolder)  # reads any config.json, whatever it names
    except OSError as exc:  # a hub id's shape ("runs/x") that is no folder here, and offline or not on the hub
        raise found_nowhere(path, exc) from None
    name = config.get("_class_name")
    if name not in classes:
        held = (f"{path} holds a {name}" if name else describe(path) if looks_local(path) else
                f"{path} holds no diffusers model")
        raise CheckpointError(f"{held}: not a {family} transformer (one of {', '.join(classes)})")
    if looks_local(path):  # diffusers would raise an OSError naming the folder above this one
        check_weights(folder)
    check_size(path, getattr(importlib.import_module(FAMILIES[family][0]), name), dtype, subfolder)
    return config


class SizeChecked:
    """Mixin of our transformer classes: `from_pretrained` runs the size check (`folders.check_size`) first, whoever
    calls it; diffusers' own `DiffusionPipeline.from_pretrained(editor)` builds each component by its class alone."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """The model class's `from_pretrained`, after `check_size` of the folder (or cached hub id) it reads."""
        from npedit.folders import check_size

        dtype = kwargs.get("torch_dtype") or kwargs.get("dtype")
        check_size(pretrained_model_name_or_path, cls, dtype, kwargs.get("subfolder"))
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)


class Backbone(nn.Module):
    """Base class of backbone families (Z-Image, SD3, ...). Subclasses live one per file."""

    family: str = ""
    # The diffusers transformer classes this family drives (used to pick the family of a checkpoint).
    transformer_classes: tuple[type, ...] = ()
    # The text encoders' subfolders and the transformers class each loads as (what the run's memory estimate builds)
    text_encoder_classes: dict[str, type] = {}
    # The frozen parts' subfolders a checkpoint must hold, those it may leave out, and the family's name in messages
    components: tuple[str, ...] = ()
    optional_components: tuple[str, ...] = ()
    title: str = ""

    @classmethod
    def check_folder(cls, path: str | os.PathLike) -> None:
        """CheckpointError naming each frozen part a local checkpoint lacks (its folder, config, tokenizer files or
        weights: `folders.component_problem`), before anything is read; an optional part that is there must be whole."""
        from npedit.folders import check_components

        present = [n for n in cls.optional_components if Path(str(path), n).is_dir()]
        check_components(path, [*cls.components, *present], f"{cls.title} checkpoint")

    @classmethod
    def from_components(cls, transformer=None, **components) -> "Backbone":
        """Build from already-loaded frozen parts named as in `pipeline_components()` (the transformer may size them)."""
        return cls(**components)

    def follow_student(self, student) -> None:
        """Adapt to how `student` sees its instruction (a family with one layout has nothing to do)."""

    # ---- text -----------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], *, with_reference: bool) -> Any:
        """Encode prompts (no gradient); `with_reference` selects the student's editing layout."""
        raise NotImplementedError

    # ---- latents (every family keeps its VAE in `self.codec`, a LatentCodec) ------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] -> scaled latents (B, C, h, w) (posterior mode)."""
        return self.codec.encode(pixels)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> pixels (B, 3, H, W) in about [-1, 1]; differentiable."""
        return self.codec.decode(latents)

    @property
    def latent_channels(self) -> int:
        return self.codec.channels

    @property
    def pixel_multiple(self) -> int:
        """Image sides must be a multiple of this (VAE downsampling x transformer patch)."""
        raise NotImplementedError

    @property
    def max_side(self) -> int | None:
        """The longest image side the transformer takes (None: no limit)."""
        return None

    # ---- transformers ---------------------------------------------------------------------
    def velocity(
        self,
        transformer: nn.Module,
        x_t: torch.Tensor,
        t: torch.Tensor,
        cond: Any,
        reference: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """v = eps - x0 predicted by `transformer` at (x_t, t); `reference` latents join as clean tokens."""
        raise NotImplementedError

    def load_transformer(self, path: str | os.PathLike, *, subfolder: str | None = None, for_student: bool = False) -> nn.Module:
        """Load a transformer of this family from a hub id or folder (student: with reference support)."""
        raise NotImplementedError

    # (class methods, as add_layers and add_reference_encoder: the run's memory estimate builds a meta-device student
    # with them before any backbone loads)
    @classmethod
    def prepare_student(cls, transformer: nn.Module, reference_mode: str = "tokens") -> nn.Module:
        """Return a student transformer initialised from `transformer` (a deep copy, plus any reference parameters);
        `reference_mode` says how it sees the reference where the family offers a choice."""
        raise NotImplementedError

    @classmethod
    def add_layers(cls, student: nn.Module, count: int) -> tuple[nn.Module, list[int]]:
        """`student` grown by `count` transformer blocks that start as the identity (so it computes what it did),
        where the family supports it, and the new blocks' indices; `count` 0 returns it unchanged."""
        if count:
            raise ValueError(f"the {cls.family} family cannot grow a student (model.add_layers must be 0)")
        return student, []

    @classmethod
    def add_reference_encoder(cls, student: nn.Module, layers: int, width: int = 64, gated: bool = False) -> nn.Module:
        """`student` with a convolutional encoder of `layers` layers over its reference (0: unchanged), where the
        family offers one; `gated`: its output normalised behind a learnt gate that starts at zero."""
        if layers:
            raise ValueError(f"the {cls.family} family has no reference encoder (model.reference_encoder must be 0)")
        return student

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the frozen components (text encoder, tokenizer, VAE) in diffusers layout."""
        raise NotImplementedError

    def pipeline_components(self) -> dict[str, Any]:
        """The frozen components under their pipeline names (e.g. vae, text_encoder, tokenizer)."""
        raise NotImplementedError
