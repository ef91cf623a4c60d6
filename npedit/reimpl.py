"""The authors' re-implementation's released Z-Image editor as an `NPEditPipeline` folder (safetensors).

Its checkpoint (`zimage_npedit_internvl.pt` on the hub repo `nupurkmr9/npedit`) is a `torch.save` state dict of
the Z-Image transformer's weights under the prefix "transformer.". It is read with `weights_only=True`, so no code
in the file runs: anything other than tensors in plain containers is refused. The weights go into a
`NPEditZImageTransformer2DModel` with `reference_layout="frames"` (how that editor sees its reference; see
`npedit.backbones.zimage`), beside the base model's text encoder, tokenizer and VAE.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path

import torch

# The released file's keys are the transformer's own under "transformer." (its ZImageDenoiser attribute); a plain
# diffusers state dict (no prefix) converts too.
PREFIXES = ("transformer.", "")
SOURCE = "nupurkmr9/npedit (zimage_npedit_internvl.pt)"


def state_dict_file(path: str | os.PathLike) -> Path:
    """`path` as the state dict file it must be; FileNotFoundError saying what it is instead (missing, a folder)."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is a folder; give the state dict file in it ({SOURCE})")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path} (the state dict file, e.g. from {SOURCE})")
    return path


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a `torch.save` state dict, unpickled with weights_only=True (memory-mapped)."""
    path = state_dict_file(path)
    try:
        # memory-mapped where it can be: a file of the legacy (pre-zip) format cannot, and is read whole
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        # torch's message spans lines and suggests weights_only=False; keep what names the refused content
        text = str(exc)
        if "WeightsUnpickler error:" in text:
            text = text.rsplit("WeightsUnpickler error:", 1)[1]
        # (torch 2.14 words a refused call, e.g. to posix.system, in a paragraph of its own between its advice)
        kept = [part for part in re.split(r"\n\s*\n", text)
                if "weights_only" not in part and "Check the documentation" not in part]
        reason = " ".join(" ".join(kept).split()) or type(exc).__name__
        raise ValueError(f"{path} is not a plain state dict of tensors; refused without running it ({reason})") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict (a mapping from names to tensors)")
    return state


def transformer_weights(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """`state` with its keys' prefix removed, so they are exactly the transformer's `expected` parameter names."""
    for prefix in PREFIXES:
        names = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if set(names) == expected:
            return names
    best = max(PREFIXES, key=lambda p: len(expected & {k[len(p):] for k in state if k.startswith(p)}))
    have = {k[len(best):] for k in state if k.startswith(best)}
    missing, extra = sorted(expected - have), sorted(have - expected)
    raise ValueError(
        f"the checkpoint's tensors do not match this base's Z-Image transformer (best prefix {best!r}): "
        f"{len(missing)} missing (e.g. {missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}); "
        "is --base the Z-Image model it was trained from?"
    )


def import_reimpl(checkpoint: str | os.PathLike, base: str | os.PathLike, out: str | os.PathLike,
                  torch_dtype: torch.dtype = torch.bfloat16) -> Path:
    """Convert the re-implementation's editor checkpoint into an NPEditPipeline folder at `out`; returns it."""
    from .backbones import detect_family, load_backbone
    from .backbones.zimage import NPEditZImageTransformer2DModel, ZImageTransformer2DModel
    from .backbones.base import resolve_subfolder
    from .pipeline import NPEditPipeline
    from .training.checkpoint import publishing

    from .files import own_entries

    if Path(out).is_dir() and own_entries(out):  # (the CLI says so first): it is replaced whole below
        raise ValueError(f"{out} exists and is not empty: give a new or empty folder (it would be replaced whole)")
    state_dict_file(checkpoint)  # a wrong path is said before --base is looked up (a hub id may be fetched)
    if detect_family(base) != "zimage":
        raise ValueError(f"--base must be the Z-Image model the editor was trained from; {base} is "
                         f"of the {detect_family(base)!r} family")
    state = read_state_dict(checkpoint)
    config = ZImageTransformer2DModel.load_config(str(base), subfolder=resolve_subfolder(base, "transformer"))
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):  # no memory until the checkpoint's own tensors are assigned
        transformer = NPEditZImageTransformer2DModel(**config, reference_layout="frames")
    expected = transformer.state_dict()  # meta tensors: their shapes
    weights = transformer_weights(state, set(expected))
    wrong = [f"{k} {tuple(v.shape)} (the base's {tuple(expected[k].shape)})" for k, v in weights.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{len(wrong)} of the checkpoint's tensors differ in shape from this base's Z-Image transformer "
                         f"(e.g. {'; '.join(wrong[:3])}); is --base the Z-Image model it was trained from?")
    transformer.load_state_dict({k: v.to(torch_dtype) for k, v in weights.items()}, assign=True)
    transformer.eval()
    backbone = load_backbone(base, torch_dtype=torch_dtype)
    pipe = NPEditPipeline.from_parts(transformer, backbone)
    out = Path(out)
    with publishing(out) as folder:  # whole or not at all: a Ctrl-C or a full disk midway leaves no half editor
        pipe.save_pretrained(folder, training=f"trained by the authors' re-implementation of NP-Edit (Z-Image student, "
                                              f"InternVL3-14B judge, DMD, no before/after pairs) and converted from "
                                              f"{SOURCE}; it sees the reference as a second frame (`reference_layout: "
                                              "frames`)")
    return out
