"""Exact Shapes-world benchmark of an editor: `python -m npedit eval shapes [--model DIR] [--n 300] [--seed 0]`.

Editors are functions (list of uint8 (64, 64, 3) references, list of instructions, list of
target captions) -> list of uint8 outputs; the scorer is the spec's parser, no judge involved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import flow
from ..devices import resolve_device
from ..sampler import sample
from .edits import EditCase, held_out_cases
from .scoring import METRICS, score_edit, summarize
from .world import render

Editor = Callable[[list[np.ndarray], list[str], list[str]], list[np.ndarray]]


def pipeline_editor(pipe, *, steps: int = 4, seed: int = 0) -> Editor:
    """An NPEditPipeline as an editor (a seeded generator per batch)."""

    def edit(images, instructions, captions):
        gen = torch.Generator().manual_seed(seed)
        out = pipe(image=[Image.fromarray(a) for a in images], prompt=instructions, num_inference_steps=steps,
                   generator=gen, output_type="pil").images
        return [np.asarray(o) for o in out]

    return edit


def sdedit_editor(backbone, teacher, *, strength: float = 0.6, steps: int = 16, cfg_scale: float = 3.5,
                  seed: int = 0) -> Editor:
    """Zero-shot teacher baseline (SDEdit): noise the reference to t = `strength`, then sample with c^x and CFG."""

    @torch.no_grad()
    def edit(images, instructions, captions):
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.stack([torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 127.5 - 1 for a in images])
        ref = backbone.encode_image(pixels)
        cond = backbone.encode_prompt(list(captions), with_reference=False)
        uncond = backbone.encode_prompt([""] * len(captions), with_reference=False)
        times = [strength * (1 - i / steps) for i in range(steps)]
        x_t = flow.add_noise(ref, torch.randn(ref.shape, generator=gen).to(ref.device), strength)

        def denoise(x, t):
            return flow.guided(backbone.velocity(teacher, x, t, cond), backbone.velocity(teacher, x, t, uncond), cfg_scale)

        out = backbone.decode_latents(sample(denoise, x_t, times, renoise="ode")).clamp(-1, 1).cpu()
        return [((o + 1) * 127.5).round().byte().permute(1, 2, 0).numpy() for o in out]

    return edit


def evaluate(editor: Editor, cases: list[EditCase], *, batch_size: int = 50, progress: bool = True) -> tuple[list[dict], dict]:
    """Run `editor` on every case and score it exactly; returns per-case rows and the summary table."""
    rows = []
    for i in tqdm(range(0, len(cases), batch_size), desc="eval", disable=not progress):
        chunk = cases[i:i + batch_size]
        outs = editor([render(c.reference) for c in chunk], [c.instruction for c in chunk],
                      [c.caption_target for c in chunk])
        rows += [score_edit(o, c) for o, c in zip(outs, chunk)]
    return rows, summarize(rows)


def markdown_table(summary: dict, title: str = "") -> str:
    """The per-category table as Markdown."""
    head = f"### {title}\n\n" if title else ""
    lines = ["| category | " + " | ".join(METRICS) + " | n |", "|---" * (len(METRICS) + 2) + "|"]
    for cat, vals in summary.items():
        lines.append(f"| {cat} | " + " | ".join(f"{vals[m]:.3f}" for m in METRICS) + f" | {vals['count']} |")
    return head + "\n".join(lines) + "\n"


def write_report(summary: dict, rows: list[dict], out_dir: Path, name: str, meta: dict) -> None:
    """Write <name>.json (summary, rows, meta) and <name>.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=1))
    (out_dir / f"{name}.md").write_text(markdown_table(summary, name))


def eval_main(args) -> int:
    """`python -m npedit eval shapes`: benchmark an editor (or the zero-shot teacher) and print the table."""
    from ..assets import DEFAULT_TEACHER, default_path

    cases = held_out_cases(args.n, seed=args.seed)
    device = resolve_device()
    if args.baseline == "teacher":
        from ..backbones import load_backbone

        base = args.teacher or str(DEFAULT_TEACHER)
        backbone = load_backbone(base).to(device)
        teacher = backbone.load_transformer(base).to(device).eval()
        editor = sdedit_editor(backbone, teacher, strength=args.strength, steps=args.teacher_steps, seed=args.seed)
        name, model = args.name or "teacher-sdedit", base
    else:
        from ..pipeline import NPEditPipeline

        model = default_path("model", args.model)
        pipe = NPEditPipeline.from_pretrained(model).to(device)
        pipe.set_progress_bar_config(disable=True)
        editor = pipeline_editor(pipe, steps=args.steps, seed=args.seed)
        name = args.name or Path(model).name
    rows, summary = evaluate(editor, cases)
    meta = {"model": str(model), "n": args.n, "seed": args.seed, "steps": args.steps, "baseline": args.baseline}
    write_report(summary, rows, Path(args.out), name, meta)
    print(markdown_table(summary, name))
    print(f"wrote {Path(args.out) / name}.json and .md")
    return 0
