"""Where models run: one rule for every command ("auto" = the first CUDA device when present, else CPU)."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when a GPU is visible, else cpu; anything else as torch spells it ("cpu", "cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:  # torch's message lists twenty device types; these are the ones that run here
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    # said now, not as a CUDA error from deep inside the first model that loads
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA GPU is visible here; use cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return device


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def as_torch_dtype(value):
    """A dtype given by name ("bfloat16", as the CLI, configs and the README write it) as torch's; a torch dtype or
    None as it is; any other name a ValueError listing the names."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in TORCH_DTYPES:
        return TORCH_DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {', '.join(TORCH_DTYPES)} (or a torch dtype), got {value!r}")
