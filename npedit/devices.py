"""Where models run: one rule for every command ("auto" = the first CUDA device when present, else CPU)."""

from __future__ import annotations

import torch


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" -> cuda when a GPU is visible, else cpu; anything else as torch spells it ("cpu", "cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
