"""The edit types a training sample or a judged edit may name (method.md section 1), kept free of heavy imports so
that the CLI can check them before loading anything."""

from __future__ import annotations

# The edit types a sample may name (method.md section 1). Only "remove" changes the questions asked; the loss's
# `strong_cfg_edit_types` picks the stronger DMD guidance by name. "edit" is the generic type.
EDIT_TYPES = ("edit", "add", "remove", "replace", "recolor", "resize", "background", "style", "shape", "action")
# Spellings read as one of EDIT_TYPES.
EDIT_TYPE_ALIASES = {"recolour": "recolor", "removal": "remove", "delete": "remove", "": "edit"}


def edit_type_name(value: str | None) -> str:
    """`value` as one of EDIT_TYPES (case, surrounding spaces and the aliases above forgiven; None or blank:
    "edit"); anything else is a ValueError listing them, so a misspelt "remove" is never checked as a generic
    edit."""
    name = ("" if value is None else str(value)).strip().lower()
    name = EDIT_TYPE_ALIASES.get(name, name)
    if name not in EDIT_TYPES:
        raise ValueError(f"unknown edit_type {value!r}; use one of: {', '.join(EDIT_TYPES)} "
                         f"(\"edit\" for any other kind of edit)")
    return name
