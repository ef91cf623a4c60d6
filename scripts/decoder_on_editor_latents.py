"""Is an editor's mistake in its latents or in their decoding? Fit the VAE decoder to the editor's own latents.

The editor edits `--cases` random training cases (canonical instructions); its output latents are kept with the
TRUE rendered result of each case (pairs: this is a diagnostic, not a pair-free method). The editor's
VAE decoder is then fine-tuned for `--minutes` on (editor latent -> true result), half of each batch, and
(encoder latent of a random scene -> that scene), the other half, which keeps it a decoder of real scenes. If the
latents held the right edit and only the decoding lost it, the fitted decoder would score far better on the
very cases it was fitted to; if it does not, the editor wrote the mistake into its latents.
Printed and written as JSON: exact match on the first 500 fitted cases before and after, and the exact
reconstruction of 300 random scenes after (the decoder must stay a decoder).

    python scripts/decoder_on_editor_latents.py --cases 12000 --minutes 20 --out runs/decft/report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npedit.assets import DEFAULT_MODEL  # noqa: E402
from npedit.files import write_atomic  # noqa: E402
from npedit.shapes.edits import sample_case  # noqa: E402
from npedit.shapes.recipes import palette_loss, render_tensor, scene_batch, to_uint8  # noqa: E402
from npedit.shapes.world import parse, render  # noqa: E402


@torch.no_grad()
def exact_share(backbone, latents: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of `latents` whose decode parses as the scene of `truth` (both in the spec's parser's eyes)."""
    decoded = backbone.decode_latents(latents).clamp(-1, 1)
    return float(np.mean([parse(to_uint8(d)) == parse(to_uint8(t)) for d, t in zip(decoded, truth)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="the editor (NPEditPipeline folder)")
    ap.add_argument("--cases", type=int, default=12000)
    ap.add_argument("--minutes", type=float, default=20.0, help="fine-tuning time")
    ap.add_argument("--batch", type=int, default=16, help="editor latents per step (and as many real scenes)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--palette-weight", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--out", help="write the report here (JSON)")
    args = ap.parse_args()
    if args.cases < 500 or args.minutes <= 0:
        ap.error("--cases must be >= 500 (the fit is checked on the first 500) and --minutes > 0")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from npedit import NPEditPipeline

    pipe = NPEditPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng([args.seed, 77])
    cases = [sample_case(rng) for _ in range(args.cases)]
    latents = []
    for first in tqdm(range(0, len(cases), 64), desc="editor latents"):
        chunk = cases[first:first + 64]
        latents.append(pipe(image=[Image.fromarray(render(c.reference)) for c in chunk],
                            prompt=[c.instruction for c in chunk], output_type="latent",
                            generator=torch.Generator().manual_seed(args.seed * 1000 + first)).images)
    z_all = torch.cat(latents)
    truth = torch.stack([render_tensor(c.expected) for c in cases])
    backbone = pipe.backbone
    before = exact_share(backbone, z_all[:500], truth[:500])
    print(f"before: exact {before:.3f} on the first 500 cases (the editor's own decoding)", flush=True)
    vae = backbone.codec.vae
    vae.requires_grad_(False)
    decoder = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in decoder:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(decoder, lr=args.lr)
    pick_rng = np.random.default_rng(args.seed + 1)
    start, step = time.monotonic(), 0
    bar = tqdm(desc="fit decoder", unit="step")
    while time.monotonic() - start < args.minutes * 60:
        step += 1
        pick = torch.from_numpy(pick_rng.integers(0, len(z_all), args.batch))
        real, _ = scene_batch(pick_rng, args.batch)
        with torch.no_grad():
            z_real = backbone.encode_image(real)
        x = torch.cat([truth[pick], real])
        rec = backbone.decode_latents(torch.cat([z_all[pick], z_real]))
        loss = (rec - x).abs().mean() + (rec - x).pow(2).mean() + args.palette_weight * palette_loss(rec, x, 0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder, 1.0)
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    bar.close()
    vae.eval()
    after = exact_share(backbone, z_all[:500], truth[:500])
    scenes, _ = scene_batch(np.random.default_rng(999), 300)
    with torch.no_grad():
        recon = exact_share(backbone, backbone.encode_image(scenes), scenes)
    report = {"model": args.model, "cases": args.cases, "steps": step, "minutes": args.minutes, "lr": args.lr,
              "exact_fitted_cases_before": before, "exact_fitted_cases_after": after,
              "scene_reconstruction_exact_after": recon}
    print(json.dumps(report, indent=1))
    if args.out:
        write_atomic(args.out, json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
