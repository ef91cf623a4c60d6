"""What an editor was trained on: a fixed-resolution world (the Shapes world, 64x64) or general images.

An editor folder says so in `npedit_domain.json` ({"domain": "shapes", "resolution": 64}); `NPEditPipeline` reads it
on loading and edits every input at that resolution (`NPEditPipeline.working_size`), whichever entry point called it:
the Python API, `python -m npedit edit` and the app all give the same edit.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from . import assets

DOMAIN_FILE = "npedit_domain.json"  # {"domain": "shapes", "resolution": 64} next to model_index.json


@dataclass(frozen=True)
class Domain:
    """The image domain an editor was trained on: "shapes" (fixed resolution) or "general"."""

    name: str = "general"
    resolution: int | None = None  # the longest side it was trained at; None: any size

    @property
    def is_shapes(self) -> bool:
        """Whether this is the Shapes world."""
        return self.name == "shapes"


SHAPES_DOMAIN = Domain("shapes", 64)


def read_domain(path: str | os.PathLike | None, depth: int = 0) -> Domain:
    """The domain file of an editor folder; without one, the bundled editor is Shapes, an editor whose training
    config names Shapes data (or a manifest marked with a domain file) has that domain, and others are general."""
    if not path:
        return Domain()
    p = Path(path)
    file = p / DOMAIN_FILE
    if file.is_file():
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
            resolution = data.get("resolution")
            resolution = int(resolution) if resolution else None
            return Domain(str(data.get("domain", "general")), resolution if resolution and resolution > 0 else None)
        except (ValueError, TypeError, AttributeError):
            return Domain()
    if p.resolve() == assets.DEFAULT_MODEL.resolve():
        return SHAPES_DOMAIN
    cfg = p / "training_config.json"  # an export older than its domain file: the data and student its config names
    if cfg.is_file():
        try:
            settings = json.loads(cfg.read_text(encoding="utf-8"))
            data, model = settings.get("data", {}), settings.get("model", {})
            return run_domain(str(data.get("train", "")), str(model.get("student") or ""), data.get("resolution"),
                              depth)
        except (ValueError, AttributeError, TypeError):
            return Domain()
    return Domain()


def run_domain(train: str, student: str = "", resolution: int | None = None, depth: int = 0) -> Domain:
    """The domain of an editor a run trains: its data's (`data_domain`) when the data says one; else its student's
    when the run kept the student's resolution (the Shapes editor fine-tuned at 64 px on a manifest of its own, as the
    README's quick start does, is still a Shapes editor: as a general one it edited a 256 px image at 128 px, into
    noise); else general."""
    domain = data_domain(train)
    student = assets.in_bundle(student, quiet=True) if student else student  # (assets/shapes/editor, from elsewhere)
    if domain != Domain() or not student or not Path(student).is_dir() or depth > 8:  # (a hub id: general)
        return domain
    inherited = read_domain(student, depth + 1)  # (depth: an export whose config names itself as its student)
    return inherited if inherited.resolution is not None and inherited.resolution == resolution else domain


def data_domain(train: str) -> Domain:
    """The domain of training data `data.train`: the Shapes stream, a manifest in a folder marked with a domain file
    (workbench.datasets), else general. A relative path is read from the current folder: ask where it was trained."""
    if train == "shapes":
        return SHAPES_DOMAIN
    if train and (Path(train).parent / DOMAIN_FILE).is_file():
        return read_domain(Path(train).parent)
    return Domain()


def write_domain(path: str | os.PathLike, domain: Domain) -> None:
    """Record an editor's domain next to its model_index.json."""
    Path(path, DOMAIN_FILE).write_text(json.dumps({"domain": domain.name, "resolution": domain.resolution}) + "\n",
                                       encoding="utf-8")
