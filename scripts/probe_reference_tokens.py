"""How well an SD3-family Shapes editor's reference tokens know the object they sit on, layer by layer.

A linear probe (multinomial logistic regression) reads, at each layer of the student, the hidden state of the
reference token under each occupied cell's centre and predicts that object's shape, colour and size. It is fitted
on the tokens of some scenes and scored on others. High accuracy for colour and low for shape says the editor
cannot tell which object is "the circle" from what it sees of the reference, whatever the instruction says.

    python scripts/probe_reference_tokens.py --model assets/shapes/editor-sft-npedit [--scenes 3000] [--t 1.0]
    python scripts/probe_reference_tokens.py --model EDITOR --out new.json --plot probe.png --with old.json

If the editor has a reference encoder, the script also prints how large its output is next to the reference tokens
it is added to (mean vector norms): how much of what the editor sees the encoder decides.

`--plot` draws the accuracies by layer (one line per attribute, chance dotted); `--with` adds the results of earlier
runs (their `--out` files) to the plot, dashed, so two editors can be compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npedit import NPEditPipeline, flow  # noqa: E402
from npedit.files import write_atomic  # noqa: E402
from npedit.shapes import CATEGORIES, COLOURS, SHAPES, SIZES, render, sample_case  # noqa: E402
from npedit.shapes.world import cell_token  # noqa: E402

ATTRIBUTES = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES)}  # chance: 1/3, 1/6, 1/2


@torch.no_grad()
def reference_states(pipe, cases, t: float, seed: int) -> list[torch.Tensor]:
    """Per layer (0 = the reference tokens as they enter the first block, then after each block): (B, M, D)
    reference-token states while the student predicts at time t, prompted with each case's instruction.

    The states are read with hooks on the student's own forward, so the probe sees exactly what editing sees."""
    model, bb = pipe.transformer, pipe.backbone
    if getattr(model.config, "reference_mode", None) != "tokens":
        raise SystemExit("the probe reads reference tokens: the model must be an SD3-family student that sees "
                         "the reference as tokens (reference_mode='tokens')")
    pixels, _ = pipe.prepare_images([render(c.reference) for c in cases], 1024)
    reference = bb.encode_image(pixels)
    cond = bb.encode_prompt([c.instruction for c in cases], with_reference=True)
    noise = torch.randn(reference.shape, generator=torch.Generator().manual_seed(seed))
    x_t = flow.add_noise(reference, noise, t)  # the reference noised to t (npedit.flow's convention)
    n_target = model.pos_embed(x_t).shape[1]
    states: list[torch.Tensor] = []
    blocks = model.transformer_blocks
    hooks = [blocks[0].register_forward_pre_hook(
        lambda _m, _a, kw: states.append(kw["hidden_states"][:, n_target:]), with_kwargs=True)]
    hooks += [b.register_forward_hook(lambda _m, _a, out: states.append(out[1][:, n_target:])) for b in blocks]
    try:
        bb.velocity(model, x_t, torch.full((len(cases),), t), cond, reference=reference)
    finally:
        for h in hooks:
            h.remove()
    return states


@torch.no_grad()
def encoder_share(pipe, cases) -> dict | None:
    """Mean norm of the reference encoder's per-patch output and of the reference tokens it is added to (patch
    embedding + type embedding), over `cases`' references; None for an editor without an encoder."""
    model, bb = pipe.transformer, pipe.backbone
    if not getattr(model.config, "reference_encoder_layers", 0):
        return None
    pixels, _ = pipe.prepare_images([render(c.reference) for c in cases], 1024)
    reference = bb.encode_image(pixels)
    tokens = model.pos_embed(reference) + model.ref_embed
    return {"encoder_norm": float(model.ref_encoder(reference).norm(dim=-1).mean()),
            "token_norm": float(tokens.norm(dim=-1).mean()),
            "gated": bool(getattr(model.config, "reference_encoder_gated", False))}


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 400) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised features (full batch, Adam, light weight decay)."""
    probe = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(x), y).backward()
        opt.step()
    return probe


def plot_layers(results: list[dict], path: str) -> None:
    """Probe accuracy by layer, one colour per attribute, one line style per result (the first solid); chance dotted."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    colours = {"shape": "#c44e52", "colour": "#4c72b0", "size": "#55a868"}
    for k, result in enumerate(results):
        layers = sorted(result["layers"], key=int)
        for a, c in colours.items():
            ax.plot([int(x) for x in layers], [result["layers"][x][a] for x in layers], color=c,
                    linestyle=("-", "--", "-.", ":")[k % 4], marker="o", markersize=3,
                    label=f"{a}: {Path(result['model']).name}")
    for a, c in colours.items():
        ax.axhline(1 / len(ATTRIBUTES[a]), color=c, linestyle=":", linewidth=0.8, alpha=0.6)
    ax.set_xticks(sorted({int(x) for r in results for x in r["layers"]}))
    ax.set_xlabel("layer (0: the reference tokens entering the first block)")
    ax.set_ylabel("held-out probe accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"What the reference token under an object knows (t = {results[0]['t']}; chance dotted)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=len(results), loc="lower right")
    fig.savefig(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="assets/shapes/editor-sft-npedit")
    ap.add_argument("--scenes", type=int, default=3000, help="scenes in all; the last quarter is held out for scoring")
    ap.add_argument("--t", type=float, default=1.0, help="the time of the noisy target (1: the first sampling step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the accuracies as JSON here")
    ap.add_argument("--plot", help="draw the accuracies by layer into this image (PNG)")
    ap.add_argument("--with", dest="others", nargs="+", default=[], metavar="JSON",
                    help="with --plot: earlier results (--out files) to draw alongside, dashed")
    args = ap.parse_args(argv)
    if args.others and not args.plot:
        ap.error("--with needs --plot")
    others = []
    for f in args.others:
        try:
            others.append(json.loads(Path(f).read_text(encoding="utf-8")))
        except (OSError, ValueError) as e:
            ap.error(f"--with {f}: not a probe result ({e})")
        if not isinstance(others[-1], dict) or "layers" not in others[-1]:
            ap.error(f"--with {f}: not a probe result (written by --out)")
    if args.scenes < 8:
        ap.error("--scenes must be at least 8 (a quarter of them are held out)")
    if not 0.0 <= args.t <= 1.0:
        ap.error("--t must be in [0, 1]")
    torch.manual_seed(args.seed)
    pipe = NPEditPipeline.from_pretrained(args.model)
    pipe.transformer.eval()
    rng = np.random.default_rng([args.seed, 77])
    cases = [sample_case(rng, CATEGORIES[i % len(CATEGORIES)], id=str(i)) for i in range(args.scenes)]
    grid = 64 // (pipe.backbone.codec.downsample * pipe.transformer.config.patch_size)
    feats: list[list[torch.Tensor]] = []
    labels = {a: [] for a in ATTRIBUTES}
    scene_of = []
    for i in tqdm(range(0, len(cases), 100), desc="reference states"):
        chunk = cases[i:i + 100]
        states = reference_states(pipe, chunk, args.t, args.seed + i)
        for b, case in enumerate(chunk):
            for obj in case.reference.objects:
                k = cell_token(obj.cell, grid)
                feats.append([s[b, k] for s in states])
                for a, values in ATTRIBUTES.items():
                    labels[a].append(values.index(getattr(obj, a)))
                scene_of.append(i + b)
    held = torch.from_numpy(np.asarray(scene_of) >= int(0.75 * len(cases)))
    sizes = torch.tensor(labels["size"])
    result = {"model": args.model, "t": args.t, "scenes": len(cases), "objects": len(scene_of), "layers": {}}
    share = encoder_share(pipe, cases[:200])
    if share is not None:
        result["encoder"] = share
        print(f"reference encoder output: mean norm {share['encoder_norm']:.3f} against the reference tokens' "
              f"{share['token_norm']:.3f}", flush=True)
    for layer in range(len(feats[0])):
        x = torch.stack([f[layer] for f in feats])
        x = (x - x[~held].mean(0)) / (x[~held].std(0) + 1e-6)
        row = {}
        for a, values in ATTRIBUTES.items():
            y = torch.tensor(labels[a])
            probe = fit_probe(x[~held], y[~held], len(values))
            with torch.no_grad():
                right = probe(x[held]).argmax(-1) == y[held]
            row[a] = float(right.float().mean())
            if a == "shape":  # a small object's centre patch sees little of its outline
                for k, size in enumerate(SIZES):
                    row[f"shape of {size}"] = float(right[sizes[held] == k].float().mean())
        result["layers"][layer] = row
        print(f"layer {layer}: " + ", ".join(f"{a} {v:.3f}" for a, v in row.items()), flush=True)
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot_layers([result, *others], args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
