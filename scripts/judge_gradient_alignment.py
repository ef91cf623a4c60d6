"""How well does the judge's gradient point toward the true edit? Measured on Shapes cases, per question kind.

    python scripts/judge_gradient_alignment.py                      # bundled judge and VAE, 300 cases, seed 0
    python scripts/judge_gradient_alignment.py --n 60 --at 0 0.5 --out runs/alignment.json
    python scripts/judge_gradient_alignment.py --at --editor assets/shapes/editor assets/shapes/editor-sft-npedit

For each held-out case, the "edited" image starts at the reference (what a copier, e.g. the identity-warmed-up
student, outputs), with --at a at reference + a * (true result - reference), and with --editor where that
editor's own output lands (the point NP-Edit training differentiates at). The judge is asked the
questions training asks, one kind at a time: the edit check (for a removal, "does it contain <object>?"),
the identity question, the change checks (`judge.change_questions`: the created object there, the replaced
one gone) and the training losses combining them. Each kind's loss (-log P(expected answer), as
`npedit.losses.vlm_loss` with temperature 1) is differentiated with respect to the edited image, in pixel
space and, through the VAE decoder, in latent space (where the student acts). Reported: the mean cosine
between the descent direction and (true result - current image), per category and overall, and the share
of cases where it is positive. A cosine near 0 means the judge's gradient does not say which way the edit
goes; 1 would point straight at it. The "focus" tables say where the pixel gradient is: the share of its size
on the pixels the true edit changes (grown by 2 pixels) over the share of the image those pixels cover (1: spread
evenly; 5: five times denser on the edit than elsewhere).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from npedit.backbones import load_backbone  # noqa: E402
from npedit.files import write_atomic  # noqa: E402
from npedit.judges import change_questions, load_judge, training_questions  # noqa: E402
from npedit.losses import vlm_loss  # noqa: E402
from npedit.shapes.edits import CATEGORIES, held_out_cases  # noqa: E402
from npedit.shapes.judge_training import to_tensor  # noqa: E402
from npedit.shapes.world import render  # noqa: E402

# kind -> which of a case's questions its loss averages
KINDS = ("edit", "identity", "change", "edit+identity", "edit+identity+change")


def case_questions(case, change_slots: int = 2) -> dict[str, tuple[list, list[bool]]]:
    """The questions of each kind for one case, with a mask (False marks padding)."""
    edit, identity = training_questions(case.instruction, case.edit_type, case.object_name, kept=case.keep)
    removed = case.object_name if case.edit_type == "remove" else None
    change, mask = change_questions(case.new, case.gone, change_slots, removed=removed)
    return {
        "edit": ([edit], [True]),
        "identity": ([identity], [True]),
        "change": (change, mask),
        "edit+identity": ([edit, identity], [True, True]),
        "edit+identity+change": ([edit, identity, *change], [True, True, *mask]),
    }


def judge_loss(judge, reference: torch.Tensor, edited: torch.Tensor, rows: list[tuple[list, list[bool]]]) -> torch.Tensor:
    """The training loss (`vlm_loss`, temperature 1) over each sample's asked questions. Samples stay independent,
    so each image's gradient is its own loss's (scaled by 1/batch, which no cosine sees)."""
    questions = [q for q, _ in rows]
    out = judge.answer(reference, edited, questions)
    expected = torch.tensor([[q.expected == "Yes" for q in qs] for qs in questions])
    mask = torch.tensor([m for _, m in rows])
    return vlm_loss(out.logits, out.vocab_logprobs, expected, question_mask=mask)[0]


def cosines(grad: torch.Tensor, toward: torch.Tensor) -> torch.Tensor:
    """Per-sample cosine between the descent direction (-grad) and `toward`."""
    return F.cosine_similarity(-grad.flatten(1), toward.flatten(1), dim=1)


def focus(grad: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """Per-sample lift of the gradient's size on the pixels the true edit changes: (share of sum |grad| there) /
    (share of the image they cover). 1: spread evenly; above 1: the judge's answer comes from where the edit is."""
    size = grad.norm(dim=1).flatten(1)  # (B, H*W): length over colour channels
    mask = changed.flatten(1).float()
    share = (size * mask).sum(1) / size.sum(1).clamp_min(1e-30)
    return share / mask.mean(1).clamp_min(1e-30)


def changed_pixels(ref: torch.Tensor, tgt: torch.Tensor, grow: int = 2) -> torch.Tensor:
    """(B, H, W) bool: where the true result differs from the reference, grown by `grow` pixels (edges count)."""
    diff = ((tgt - ref).abs().amax(dim=1, keepdim=True) > 0.02).float()
    return F.max_pool2d(diff, 2 * grow + 1, stride=1, padding=grow)[:, 0] > 0


def editor_start(pipe, backbone, seed: int = 0):
    """Start where an editor's 4-step output lands: its latents, and their decode (by `backbone`'s VAE, the one
    the judge loss differentiates through) as the pixel-space image."""
    from PIL import Image

    def start(chunk, ref, tgt, z_ref, z_tgt):
        images = [Image.fromarray((r.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for r in ref]
        with torch.no_grad():
            z = pipe(image=images, prompt=[c.instruction for c in chunk], num_inference_steps=4,
                     generator=torch.Generator().manual_seed(seed), output_type="latent").images.float()
            pixels = ((backbone.decode_latents(z) + 1) / 2).clamp(0, 1)
        return pixels, z

    return start


def blend_start(at: float):
    """Start at reference + at * (true result - reference), in pixel and in latent space."""
    def start(chunk, ref, tgt, z_ref, z_tgt):
        return ref + at * (tgt - ref), z_ref + at * (z_tgt - z_ref)
    return start


def measure(judge, backbone, cases, start, batch: int) -> dict:
    """{space: {kind: {category: [cosine per case]}}} for edited images where `start(chunk, ref, tgt, z_ref, z_tgt)
    -> (pixels, latents)` puts them (`blend_start(a)`, `editor_start(pipe, backbone)`)."""
    result = {space: {kind: defaultdict(list) for kind in KINDS} for space in ("pixel", "latent", "focus")}
    for first in tqdm(range(0, len(cases), batch), desc="alignment"):
        chunk = cases[first:first + batch]
        ref = torch.stack([to_tensor(render(c.reference)) for c in chunk])
        tgt = torch.stack([to_tensor(render(c.expected)) for c in chunk])
        with torch.no_grad():
            z_ref, z_tgt = backbone.encode_image(ref * 2 - 1), backbone.encode_image(tgt * 2 - 1)
        pixels0, latents0 = start(chunk, ref, tgt, z_ref, z_tgt)
        questions = [case_questions(c) for c in chunk]
        for kind in KINDS:
            rows = [q[kind] for q in questions]
            if not any(any(m) for _, m in rows):
                continue
            asked = torch.tensor([any(m) for _, m in rows])
            pixels = pixels0.clone().requires_grad_(True)
            judge_loss(judge, ref, pixels, rows).backward()
            cos_pixel = cosines(pixels.grad, tgt - pixels.detach())
            lift = focus(pixels.grad, changed_pixels(ref, tgt))
            latents = latents0.clone().requires_grad_(True)
            decoded = ((backbone.decode_latents(latents) + 1) / 2).float()
            judge_loss(judge, ref, decoded, rows).backward()
            cos_latent = cosines(latents.grad, z_tgt - latents.detach())
            for i, case in enumerate(chunk):
                if asked[i]:
                    result["pixel"][kind][case.category].append(float(cos_pixel[i]))
                    result["latent"][kind][case.category].append(float(cos_latent[i]))
                    result["focus"][kind][case.category].append(float(lift[i]))
    return result


def summarise(values: dict[str, list[float]], above: float = 0.0) -> dict:
    """Mean per category and overall, and the share of cases above `above`."""
    every = [v for vs in values.values() for v in vs]
    row = {cat: round(float(np.mean(values[cat])), 3) if values.get(cat) else None for cat in CATEGORIES}
    row["overall"] = round(float(np.mean(every)), 3) if every else None
    row["positive"] = round(float(np.mean([v > above for v in every])), 3) if every else None
    row["count"] = len(every)
    return row


def markdown(table: dict, above: float = 0.0) -> str:
    head = ["kind", *CATEGORIES, "overall", f"share > {above:g}", "cases"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, row in table.items():
        cells = [row[c] for c in (*CATEGORIES, "overall", "positive", "count")]
        lines.append("| " + " | ".join([kind, *("" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))
                                                  for v in cells)]) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge", default=str(ROOT / "assets" / "shapes" / "judge"))
    ap.add_argument("--vae-from", default=str(ROOT / "assets" / "shapes" / "editor"),
                    help="an editor or teacher folder whose VAE maps latents to pixels")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--at", type=float, nargs="*", default=[0.0],
                    help="how far along (reference -> true result) the edited image starts")
    ap.add_argument("--editor", nargs="*", default=[],
                    help="also measure at these editors' own 4-step outputs (NPEditPipeline folders)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--out", help="write the tables as JSON here")
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    judge = load_judge(args.judge)
    judge.model.requires_grad_(False)
    judge.train(False)
    backbone = load_backbone(args.vae_from)
    cases = held_out_cases(args.n, seed=args.seed)
    report = {"judge": args.judge, "vae_from": args.vae_from, "n": args.n, "seed": args.seed, "tables": {}}
    starts = [(f"at {at:g}", f"edited image at reference + {at:g} x (true result - reference)", blend_start(at))
              for at in args.at]
    for folder in args.editor:
        from npedit import NPEditPipeline

        pipe = NPEditPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        starts.append((f"editor {folder}", f"edited image = the output of {folder}", editor_start(pipe, backbone)))
    for key, title, start in starts:
        measured = measure(judge, backbone, cases, start, args.batch)
        for space, kinds in measured.items():
            above = 1.0 if space == "focus" else 0.0
            table = {kind: summarise(values, above) for kind, values in kinds.items()}
            report["tables"][f"{space}, {key}"] = table
            if space == "focus":
                print(f"\n### focus: |pixel gradient| on the pixels the true edit changes, per unit of area "
                      f"(1 = spread evenly), {title}\n")
            else:
                print(f"\n### cosine(descent direction, true result - image): {space} space, {title}\n")
            print(markdown(table, above))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps(report, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
