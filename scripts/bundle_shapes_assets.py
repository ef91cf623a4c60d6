"""Copy the trained Shapes-world models into assets/ (the CLI's and app's defaults) and render examples.

    python scripts/bundle_shapes_assets.py --editor runs/shapes/npedit/pipeline --critic runs/shapes/npedit/critic \
        --teacher runs/shapes/teacher/base --judge runs/shapes/judge/final
    # one more editor (assets/shapes/<name>), its whole training history in its card, and optionally its critic
    # (e.g. fitted by `python -m npedit train ... stage=critic`):
    python scripts/bundle_shapes_assets.py --add-editor runs/x/exports/step_000150 --name editor-unroll-npedit \
        --history "Trained first with ..., then ..." --critic runs/x-critic/critic
    # only a critic, for an editor already bundled:
    python scripts/bundle_shapes_assets.py --critic runs/x-critic/critic --critic-for editor-sft-npedit
An editor's critic (for the app's DMD maps) goes inside its folder, as `critic/`. Which bundled editor is the
default of the CLI and the app is set in npedit/assets.py.
Only safetensors weights and small config/tokenizer files are copied; the total size is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import shutil
from pathlib import Path
from typing import Callable

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from npedit.assets import ASSETS_DIR
from npedit.files import write_atomic, write_png
from npedit.shapes import held_out_cases, render
from npedit.training.checkpoint import publishing

KEEP = {".json", ".safetensors", ".txt", ".jinja", ".model", ".md"}


def copy_model(src: Path, dst: Path, finish: Callable[[Path], None] | None = None) -> None:
    """Copy a model folder keeping only weights (safetensors) and small text files, then `finish(copy)`; the copy
    replaces `dst` only once whole (`publishing`): a Ctrl-C or a full disk midway keeps the model bundled before."""
    if not src.is_dir():
        raise SystemExit(f"error: {src} not found")
    with publishing(dst) as tmp:
        for f in src.rglob("*"):
            if f.is_file() and f.suffix in KEEP:
                (tmp / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, tmp / f.relative_to(src))
        tmp.mkdir(parents=True, exist_ok=True)  # (a source of no such file still gives a folder)
        if finish is not None:
            finish(tmp)


def check_copies(copies: list[tuple[Path | None, Path]]) -> None:
    """Stop, before anything is copied, when a source is (or holds, or lies in) a destination folder that a copy
    replaces: bundling assets/shapes/x again as x, or the bundled editor's own critic/, deleted the source first."""
    for src, _ in copies:
        for _, dst in copies:
            if src is None:
                continue
            a, b = src.resolve(), dst.resolve()
            if a == b or b in a.parents or a in b.parents:
                raise SystemExit(f"error: {src} is, or shares a folder with, {dst}, which bundling replaces: copy it "
                                 "elsewhere first and bundle that copy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", type=Path, help="the pair-free NP-Edit editor, assets/shapes/editor (an NPEditPipeline "
                                                "folder)")
    ap.add_argument("--critic", type=Path, help="the critic fitted to that editor (or to --add-editor's): it goes "
                                                "into the editor's folder as critic/")
    ap.add_argument("--critic-for", metavar="NAME", help="bundle only --critic, into the already bundled editor "
                                                         "assets/shapes/NAME (as its critic/)")
    ap.add_argument("--teacher", type=Path)
    ap.add_argument("--judge", type=Path)
    ap.add_argument("--add-editor", type=Path, help="bundle only this editor, as assets/shapes/<--name>")
    ap.add_argument("--name", help="folder name of the --add-editor editor, e.g. editor-unroll-npedit")
    ap.add_argument("--history", default="", help="a paragraph on how --add-editor was trained, for its card")
    ap.add_argument("--out", type=Path, default=ASSETS_DIR)
    args = ap.parse_args()
    shapes = args.out / "shapes"
    if args.critic_for:
        editor = shapes / args.critic_for
        if not args.critic or "/" in args.critic_for or not (editor / "model_index.json").is_file():
            raise SystemExit(f"error: --critic-for needs --critic and a bundled editor's folder name; {editor} is not one")
        check_copies([(args.critic, editor / "critic")])
        copy_model(args.critic, editor / "critic")
        report(args.out)
        return
    if args.add_editor:
        if not args.name or "/" in args.name or args.name in {"editor", "teacher", "critic", "judge", "fast-vae"}:
            raise SystemExit("error: --add-editor needs --name, a new folder name such as editor-unroll-npedit")
        check_copies([(args.add_editor, shapes / args.name), (args.critic, shapes / args.name / "critic")])
        bundle_editor(args.add_editor, shapes / args.name, args.history)
        if args.critic:
            copy_model(args.critic, shapes / args.name / "critic")
        report(args.out)
        return
    if not args.editor or not args.teacher:
        raise SystemExit("error: pass --editor and --teacher (or --add-editor with --name)")
    check_copies([(args.editor, shapes / "editor"), (args.teacher, shapes / "teacher"),
                  (args.critic, shapes / "editor" / "critic"), (args.judge, shapes / "judge")])
    bundle_editor(args.editor, shapes / "editor")
    copy_model(args.teacher, shapes / "teacher")
    if args.critic:
        copy_model(args.critic, shapes / "editor" / "critic")
    if args.judge:
        copy_model(args.judge, shapes / "judge")
    examples = args.out / "examples"
    examples.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in held_out_cases(12, seed=12345):
        path = examples / f"{case.id}.png"
        write_png(path, Image.fromarray(render(case.reference)))
        rows.append({"image": path.name, "instruction": case.instruction, "caption_target": case.caption_target,
                     "edit_type": case.edit_type, "object_name": case.object_name or "", "keep": case.keep})
    write_atomic(examples / "examples.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    report(args.out)


def bundle_editor(src: Path, dst: Path, history: str = "") -> None:
    """Copy an editor pipeline to `dst`, mark it as a Shapes editor, point its provenance at the bundled teacher
    and add `history` (how it was trained, all stages) to its model card; `dst` replaced only once all is written."""

    def finish(copy: Path) -> None:
        write_atomic(copy / "npedit_domain.json", json.dumps({"domain": "shapes", "resolution": 64}))
        cfg_file = copy / "training_config.json"
        if cfg_file.is_file():  # point the editor's provenance at the bundled teacher, not the training machine's runs/
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            cfg["model"] = {**cfg.get("model", {}), "base": "assets/shapes/teacher",
                            "trained_from": cfg["model"]["base"]}
            write_atomic(cfg_file, json.dumps(cfg, indent=2))
        card = copy / "README.md"
        if history and card.is_file():
            text = (card.read_text(encoding="utf-8").rstrip("\n") + "\n\n## Training history\n\n" + history.strip()
                    + "\n")
            card.write_text(text, encoding="utf-8")

    copy_model(src, dst, finish)


def report(out: Path) -> None:
    """Print the size of assets/ and of each bundled model."""
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"assets: {total / 2**20:.1f} MiB in {out}")
    for sub in sorted((out / "shapes").iterdir()):
        size = sum(f.stat().st_size for f in sub.rglob("*") if f.is_file())
        print(f"  {sub.name:20s} {size / 2**20:6.1f} MiB")


if __name__ == "__main__":
    main()
