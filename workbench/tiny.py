"""A complete set of tiny random models (editor, judge, teacher, critic) for tests and for trying the app offline.

Their edits are noise: they exercise every code path in seconds, they do not edit.
"""

from __future__ import annotations

import os
from pathlib import Path


TINY_SET = {"teacher": "base", "judge": "judge", "model": "editor", "critic": "critic"}  # role -> folder written


def build_tiny_set(directory: str | os.PathLike, base: str | None = None, judge: str | None = None) -> dict[str, str]:
    """Save (or reuse) base/, judge/, editor/ and critic/ under `directory`; returns their paths by role."""
    from npedit.backbones import load_backbone
    from npedit.backbones.tiny import build_tiny_zimage
    from npedit.judges.tiny import build_tiny_llava_onevision
    from npedit.pipeline import NPEditPipeline

    root = Path(directory)
    paths = {"teacher": base or str(root / TINY_SET["teacher"]), "judge": judge or str(root / TINY_SET["judge"]),
             "model": str(root / TINY_SET["model"]), "critic": str(root / TINY_SET["critic"])}
    if not Path(paths["teacher"], "transformer", "config.json").is_file():
        build_tiny_zimage(paths["teacher"])
    if not Path(paths["judge"], "config.json").is_file():
        build_tiny_llava_onevision(paths["judge"])
    editor_there, critic_there = (Path(paths["model"], "model_index.json").is_file(),
                                  Path(paths["critic"], "config.json").is_file())
    if not (editor_there and critic_there):  # each written only where it is missing: a model there is never replaced
        backbone = load_backbone(paths["teacher"])
        teacher = backbone.load_transformer(paths["teacher"])
        if not editor_there:
            NPEditPipeline.from_parts(backbone.prepare_student(teacher), backbone).save_pretrained(paths["model"])
        if not critic_there:
            teacher.save_pretrained(paths["critic"], safe_serialization=True)
    return paths


def foreign_entries(folder: Path) -> list[str]:
    """What `folder` holds besides an earlier tiny set (a run's config.yaml and checkpoints, an editor's parts); a file
    browser's litter aside (`files.own_entries`)."""
    from npedit.files import own_entries

    return [p.name for p in own_entries(folder) if p.name not in TINY_SET.values()] if folder.is_dir() else []


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Write a tiny random-weight editor, judge, teacher and critic (the real "
                                             "classes) into DIR and print the app's flags for them.")
    ap.add_argument("dir", nargs="?", default="tiny-models")
    folder = ap.parse_args().dir
    if Path(folder).exists() and not Path(folder).is_dir():  # (else NotADirectoryError's traceback)
        ap.error(f"{folder} is a file; give a folder for the models")
    other = foreign_entries(Path(folder))
    if other:  # (a run's folder: its trained critic/ was replaced by a random one)
        ap.error(f"{folder} holds other files ({', '.join(other[:4])}{', ...' if len(other) > 4 else ''}): give a new "
                 f"or empty folder, or an earlier tiny set's")
    try:
        out = build_tiny_set(folder)
    except OSError as exc:  # (a path under a file, a folder that cannot be made: a traceback before)
        raise SystemExit(f"error: cannot write the tiny models into {folder}: {exc.strerror or exc}") from None
    print(" ".join(f"--{role} {path}" for role, path in out.items()))
