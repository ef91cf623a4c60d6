"""How well critics model an editor's outputs: flow-matching loss on held-out Shapes cases, teacher as the start.

A critic (DMD's fake score) should predict the noise in the editor's own outputs better than the teacher it
starts from; the app's DMD maps are meaningful only for a critic fitted to the editor shown. For each network
this prints the flow-matching loss (the critic's training loss, conditioned on the target caption c^x) on the
editor's outputs for held-out cases, at fixed noise and a grid of times, and the mean |x0_net - x0_teacher| (what
a DMD map shows, averaged over the image):

    python scripts/critic_fit.py --editor assets/shapes/editor-unroll-npedit \
        --critic assets/shapes/editor/critic runs/critic/run/critic --n 300
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from npedit import NPEditPipeline, flow  # noqa: E402
from npedit.backbones import load_backbone  # noqa: E402
from npedit.files import write_atomic  # noqa: E402
from npedit.sampler import sample, unroll_times  # noqa: E402
from npedit.shapes import held_out_cases  # noqa: E402
from npedit.shapes.training import render_tensor  # noqa: E402

TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


@torch.no_grad()
def editor_outputs(backbone, student, schedule: list[float], cases, *, steps: str, seed: int, batch_size: int):
    """Latents of the editor's outputs and the c^x conditioning, batch by batch: `steps` "4" is the inference
    sampler, "train" the training unroll (one step, or two with probability 0.75, as the critic sees them)."""
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(cases), batch_size):
        chunk = cases[start:start + batch_size]
        ref = backbone.encode_image(torch.stack([render_tensor(c.reference) for c in chunk])).float()
        cond = backbone.encode_prompt([c.instruction for c in chunk], with_reference=True)
        times = schedule if steps == "4" else unroll_times(schedule, 0.75, gen)
        noise = torch.randn(ref.shape, generator=gen)
        x = sample(lambda x_t, t: backbone.velocity(student, x_t, t, cond, reference=ref).float(), noise, times,
                   generator=gen)
        yield x, backbone.encode_prompt([c.caption_target for c in chunk], with_reference=False)


@torch.no_grad()
def measure(backbone, nets: dict, batches, seed: int) -> dict:
    """Per network: flow-matching loss at each time of TIMES and their mean, and mean |x0 - x0_teacher|."""
    gen = torch.Generator().manual_seed(seed + 1)
    sums = {name: {t: 0.0 for t in TIMES} for name in nets}
    gaps = {name: 0.0 for name in nets}
    count = 0
    for x, cond_x in batches:
        for t in TIMES:
            eps = torch.randn(x.shape, generator=gen)
            x_t = flow.add_noise(x, eps, t)
            t_vec = torch.full((x.shape[0],), t)
            x0 = {}
            for name, net in nets.items():
                v = backbone.velocity(net, x_t, t_vec, cond_x).float()
                sums[name][t] += float(((v - flow.velocity_target(x, eps)) ** 2).mean()) * x.shape[0]
                x0[name] = flow.x0_from_velocity(x_t, t, v)
            for name in nets:
                gaps[name] += float((x0[name] - x0["teacher"]).abs().mean()) * x.shape[0] / len(TIMES)
        count += x.shape[0]
    return {name: {"fm_loss": sum(sums[name].values()) / count / len(TIMES),
                   "fm_loss_by_t": {str(t): v / count for t, v in sums[name].items()},
                   "x0_gap_to_teacher": gaps[name] / count} for name in nets}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--editor", required=True, help="the editor (NPEditPipeline folder) whose outputs are modelled")
    ap.add_argument("--base", default="assets/shapes/teacher", help="the teacher's base folder (default: bundled)")
    ap.add_argument("--critic", nargs="+", required=True, help="critic folders to compare with the teacher")
    ap.add_argument("--n", type=int, default=300, help="held-out cases (default 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", choices=["train", "4"], default="train",
                    help="the editor's outputs as training unrolls them (default) or its 4-step inference output")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--out", help="also write the figures as JSON here")
    args = ap.parse_args(argv)
    if args.n < 1:
        raise SystemExit("error: --n must be >= 1")
    missing = [p for p in [args.editor, args.base, *args.critic] if not Path(p).exists()]
    if missing:
        raise SystemExit(f"error: not found: {', '.join(missing)}")
    backbone = load_backbone(args.base)
    editor = NPEditPipeline.from_pretrained(args.editor)
    editor.set_progress_bar_config(disable=True)
    student, schedule = editor.transformer.eval(), editor.times(4)  # its 4-step schedule, under its own shift
    nets = {"teacher": backbone.load_transformer(args.base).eval()}
    for path in args.critic:
        nets[str(path)] = backbone.load_transformer(path).eval()
    cases = held_out_cases(args.n, seed=args.seed)
    batches = tqdm(editor_outputs(backbone, student, schedule, cases, steps=args.steps, seed=args.seed,
                                  batch_size=args.batch_size), total=-(-len(cases) // args.batch_size),
                   desc="editor outputs", mininterval=5)
    result = measure(backbone, nets, batches, args.seed)
    print(f"\n{args.n} held-out cases (seed {args.seed}), editor {args.editor}, its outputs as `--steps {args.steps}`")
    print("| network | flow-matching loss | " + " | ".join(f"t={t}" for t in TIMES) + " | mean abs x0 - teacher's |")
    print("|---|---|" + "---|" * len(TIMES) + "---|")
    for name, r in result.items():
        print(f"| {name} | {r['fm_loss']:.4f} | " + " | ".join(f"{v:.4f}" for v in r["fm_loss_by_t"].values())
              + f" | {r['x0_gap_to_teacher']:.4f} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, json.dumps({"args": vars(args), "result": result}, indent=2))
    return result


if __name__ == "__main__":
    main()
