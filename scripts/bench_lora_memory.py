"""Memory and time of an NP-Edit training iteration with full fine-tuning against LoRA (prints measured figures).

Builds a random-weight SD3-family model of the chosen width and depth, then, for each setting in its own process
(so that peak memory is its own): the distinct parameter tensors the teacher, the critic and the student hold
between them, how many of them train, the optimisers' state, the process's peak resident memory and the median
time of one iteration (critic update + student update; judge off, DMD and regression on).

    python scripts/bench_lora_memory.py [--dim 512] [--layers 8] [--ranks 0 4 16] [--batch 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def _mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: getrusage's ru_maxrss counts KiB on Linux but bytes on macOS, and
    Windows has no `resource` module (psutil's peak working set there)."""
    try:
        import resource
    except ImportError:  # Windows
        import psutil

        return _mib(psutil.Process().memory_info().peak_wset)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return _mib(peak) if sys.platform == "darwin" else peak / 1024


def measure(base: str, cases: str, rank: int, batch: int, repeats: int, out_dir: str) -> dict:
    """One setting, in this process: build the trainer, run iterations, report memory and time."""
    import torch

    from npedit.config import load_config
    from npedit.training.trainer import Trainer

    cfg = load_config(None, [f"model.base={base}", f"data.train={cases}", f"output_dir={out_dir}",
                             "loss.lambda_vlm=0", "loss.lambda_target=1", f"data.batch_size={batch}", "critic_steps=1",
                             f"model.lora_rank={rank}", "optim.skip_grad_norm=1e9"])
    tr = Trainer(cfg)
    held = {}
    for net in (tr.teacher, tr.critic, tr.student):
        for p in net.parameters():
            held[id(p)] = p
    trainable = sum(p.numel() for net in (tr.critic, tr.student) for p in net.parameters() if p.requires_grad)
    tr.iteration()  # warm-up; also creates the optimisers' state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tr.iteration()
        times.append(time.perf_counter() - start)
    opt_bytes = sum(t.numel() * t.element_size() for opt in (tr.opt_student, tr.opt_critic)
                    for state in opt.state.values() for t in state.values() if torch.is_tensor(t))
    return {"rank": rank, "held_params_mib": _mib(sum(p.numel() * p.element_size() for p in held.values())),
            "trainable": trainable, "optimizer_state_mib": _mib(opt_bytes),
            "peak_rss_mib": peak_rss_mib(),
            "iteration_s": statistics.median(times), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ranks", type=int, nargs="+", default=[0, 4, 16])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--one", nargs=3, metavar=("BASE", "CASES", "RANK"), help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args()
    if min(args.dim, args.layers, args.batch, args.repeats) < 1 or min(args.ranks) < 0:
        ap.error("--dim, --layers, --batch and --repeats must be >= 1 and --ranks >= 0 (0: full fine-tuning)")
    if args.one:
        base, cases, rank = args.one
        print(json.dumps(measure(base, cases, int(rank), args.batch, args.repeats, tempfile.mkdtemp())))
        return
    from npedit.backbones.tiny import build_tiny_sd3

    root = Path(tempfile.mkdtemp())
    base = build_tiny_sd3(root / "base", dim=args.dim, layers=args.layers)
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(4):
        for kind in ("r", "t"):
            Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(root / f"images/{kind}{i}.png")
        lines.append(json.dumps({"image": f"images/r{i}.png", "target": f"images/t{i}.png",
                                 "instruction": "make the red circle green", "caption_reference": "a red circle",
                                 "caption_target": "a green circle", "edit_type": "recolor"}))
    (root / "cases.jsonl").write_text("\n".join(lines), encoding="utf-8")
    rows = []
    for rank in args.ranks:
        out = subprocess.run([sys.executable, __file__, "--one", str(base), str(root / "cases.jsonl"), str(rank),
                              "--batch", str(args.batch), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"SD3-family transformer, width {args.dim}, {args.layers} blocks; batch {args.batch} at 64x64; "
          f"{rows[0]['threads']} threads; teacher + critic + student, judge off")
    print(f"{'setting':16s} {'weights held':>13s} {'trained':>12s} {'optimiser':>11s} {'peak RSS':>10s} "
          f"{'iteration':>10s}")
    for r in rows:
        name = "full fine-tune" if r["rank"] == 0 else f"LoRA rank {r['rank']}"
        print(f"{name:16s} {r['held_params_mib']:10.1f} MiB {r['trainable']:12,d} {r['optimizer_state_mib']:7.1f} MiB "
              f"{r['peak_rss_mib']:6.0f} MiB {r['iteration_s']:9.2f}s")


if __name__ == "__main__":
    main()
