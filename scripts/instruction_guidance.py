"""Does guidance on the instruction help a few-step editor? The exact Shapes benchmark of an editor sampled with
v = v("do nothing") + s (v(instruction) - v("do nothing")) at each of its steps, for a few scales s.

"do nothing" is the instruction the editor is trained to answer with its input (`data.do_nothing_prob`), so the
guided step pushes away from an unchanged image, as classifier-free guidance pushes away from the unconditional
prediction. s = 1 is the editor as it is (the same figures as `python -m npedit eval shapes`, same seed). Each
scale > 1 costs two transformer evaluations per step instead of one.

    python scripts/instruction_guidance.py --model assets/shapes/editor-sft-npedit --scales 1 1.5 2 [--n 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npedit import NPEditPipeline, flow  # noqa: E402
from npedit.data import DO_NOTHING  # noqa: E402
from npedit.files import write_atomic  # noqa: E402
from npedit.images import tensor_to_pil  # noqa: E402
from npedit.sampler import sample  # noqa: E402
from npedit.shapes.edits import held_out_cases  # noqa: E402
from npedit.shapes.evaluate import evaluate  # noqa: E402


def guided_editor(pipe, scale: float, *, steps: int = 4, seed: int = 0):
    """An editor (uint8 references, cases) -> uint8 outputs, sampled like the pipeline (the same noise for the
    same seed) with instruction guidance at `scale`."""
    bb = pipe.backbone

    @torch.no_grad()
    def edit(images, cases):
        gen = torch.Generator().manual_seed(seed)
        pixels, _ = pipe.prepare_images([Image.fromarray(a) for a in images], 1024)
        reference = bb.encode_image(pixels)
        cond = bb.encode_prompt([c.instruction for c in cases], with_reference=True)
        uncond = bb.encode_prompt([DO_NOTHING] * len(cases), with_reference=True) if scale != 1 else None
        noise = torch.randn(reference.shape, generator=gen)

        def denoise(x, t):
            v = bb.velocity(pipe.transformer, x, t, cond, reference=reference)
            if uncond is None:
                return v
            return flow.guided(v, bb.velocity(pipe.transformer, x, t, uncond, reference=reference), scale)

        out = bb.decode_latents(sample(denoise, noise, pipe.times(steps), generator=gen))
        return [np.asarray(tensor_to_pil(o)) for o in out]  # as the pipeline converts its output

    return edit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="assets/shapes/editor-sft-npedit")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, help="write the summaries here as JSON")
    args = ap.parse_args()
    if any(s <= 0 for s in args.scales):
        ap.error("--scales must be positive")
    pipe = NPEditPipeline.from_pretrained(args.model)
    cases = held_out_cases(args.n, seed=args.seed)
    results = {}
    print("| scale | exact | followed | preserved | clean |\n|---|---|---|---|---|")
    for scale in args.scales:
        _, summary = evaluate(guided_editor(pipe, scale, steps=args.steps, seed=args.seed), cases, progress=False)
        overall = summary["overall"]
        results[str(scale)] = summary
        print(f"| {scale:g} | " + " | ".join(f"{overall[k]:.3f}" for k in ("exact", "followed", "preserved", "clean"))
              + " |", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps({"model": args.model, "n": args.n, "seed": args.seed, "steps": args.steps,
                                           "scales": results}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
