"""`python -m npedit bench`: latency and throughput of the editor on this machine (prints measured figures)."""

from __future__ import annotations

import json
import sys
import statistics
import time

import numpy as np
import torch
from PIL import Image

from .cli import UsageError, check_refine_flags, load_cli_judge
from .devices import resolve_device
from .flow import MAX_SAMPLING_STEPS
from .refine import DEFAULT_REFINE_ANCHOR, DEFAULT_REFINE_LR


def _median_time(fn, repeats: int) -> float:
    return _median_times([fn], repeats)[0]


def _median_times(fns, repeats: int) -> list[float]:
    """Median seconds of each function, timed in alternation (one call of each per round), so a machine whose
    speed drifts during the measurement shifts them all alike and their ratios stay meaningful."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def bench_main(args) -> int:
    """Measure: one 4-step edit, batch throughput, the bare transformer evaluations inside an edit, the teacher baseline."""
    from .assets import DEFAULT_TEACHER, default_path
    from .pipeline import NPEditPipeline

    for flag, value in (("--repeats", args.repeats), ("--batch", args.batch), ("--steps", args.steps),
                        ("--size", args.size), ("--teacher-steps", args.teacher_steps)):
        if value < 1:
            raise UsageError(f"error: {flag} must be >= 1, got {value}")
    if max(args.steps, args.teacher_steps) > MAX_SAMPLING_STEPS:
        raise UsageError(f"error: --steps and --teacher-steps must be at most {MAX_SAMPLING_STEPS}, got {args.steps} "
                         f"and {args.teacher_steps}")
    if args.refine:
        check_refine_flags(args.refine, DEFAULT_REFINE_LR, DEFAULT_REFINE_ANCHOR)
    elif args.judge:  # (else silently not loaded)
        raise UsageError("error: --judge is the judge of --refine; give --refine K too")
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise UsageError(f"error: --device: {exc}") from None
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = getattr(torch, "bfloat16" if args.dtype == "auto" and device.type == "cuda" else
                    "float32" if args.dtype == "auto" else args.dtype)
    # first, as `edit` does: a judge that does not load fails before the editor loads, not after the other figures
    judge = load_cli_judge(args, str(device), dtype, None) if args.refine else None
    pipe = NPEditPipeline.from_pretrained(default_path("model", args.model), dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    size = args.size
    image = Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8))
    instruction = args.instruction
    gen = torch.Generator().manual_seed(0)
    steps = args.steps
    # the parts are timed at the size the edit works at (a 64 px Shapes editor edits a 128 px image at 64 px: timed
    # at 128, the parts outweighed the whole edit, the overhead came out negative, and odd sizes failed the VAE)
    work = pipe.working_size(image.size)
    res = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
           "image_size": size, "working_size": list(work), "steps": steps}
    bb = pipe.backbone
    pixels = torch.from_numpy(np.array(image.resize(work, Image.BICUBIC))).permute(2, 0, 1)[None].float() / 127.5 - 1
    ref = bb.encode_image(pixels.to(device, dtype))
    cond = bb.encode_prompt([instruction], with_reference=True)
    times = pipe.times(steps)

    def bare():
        x = torch.randn(ref.shape, generator=gen).to(device, ref.dtype)
        for t in times:
            bb.velocity(pipe.transformer, x, torch.full((1,), t, device=device), cond, reference=ref)
        sync()

    def edit():
        pipe(image=image, prompt=instruction, num_inference_steps=steps, generator=gen)
        sync()

    def encode_text():
        bb.encode_prompt([instruction], with_reference=True)
        sync()

    def encode_image():
        bb.encode_image(pixels.to(device, dtype))
        sync()

    def decode():
        bb.decode_latents(ref)
        sync()

    # the parts of an edit outside the transformer, each timed alone
    parts = {"text_encode_ms": encode_text, "vae_encode_ms": encode_image, "vae_decode_ms": decode}
    fns = [edit, bare, *parts.values()]
    teacher_dir = args.teacher or str(DEFAULT_TEACHER)
    # the bundled teacher is a baseline for a Shapes editor only: it makes 64 px Shapes scenes (a general editor's
    # baseline is its own base model, --teacher; timed at 512 px, the bundled one was no baseline of anything)
    default_fits = pipe.domain.is_shapes and (DEFAULT_TEACHER / "transformer").exists()
    if not args.teacher and not default_fits:
        print("no teacher baseline: give --teacher BASE (this editor's base model) to time the zero-shot teacher; "
              "the bundled Shapes teacher is the baseline of Shapes editors only", file=sys.stderr)
    if default_fits or args.teacher:
        from .backbones import load_backbone
        from .shapes.evaluate import sdedit_sampler

        tb = load_backbone(teacher_dir, torch_dtype=dtype).to(device)
        teacher = tb.load_transformer(teacher_dir, torch_dtype=dtype).to(device).eval()
        sdedit = sdedit_sampler(tb, teacher, steps=args.teacher_steps)
        arr = np.asarray(image.resize(work, Image.BICUBIC))  # the teacher edits at the editor's working size too

        def baseline():
            sdedit([arr], [instruction])
            sync()

        fns.append(baseline)
    # edit, bare transformer and baseline in alternation: their ratios are what the figures are about
    medians = _median_times(fns, args.repeats)
    res["edit_latency_ms"], res["bare_transformer_ms"] = 1000 * medians[0], 1000 * medians[1]
    res["pipeline_overhead"] = res["edit_latency_ms"] / res["bare_transformer_ms"] - 1
    for name, median in zip(parts, medians[2:]):
        res[name] = 1000 * median
    # the rest: image preparation, noise, the sampler's own work, the output image (a difference of medians: rough)
    res["other_overhead_ms"] = res["edit_latency_ms"] - res["bare_transformer_ms"] - sum(res[n] for n in parts)
    if len(medians) > 2 + len(parts):
        res["teacher_sdedit_steps"] = args.teacher_steps
        res["teacher_sdedit_latency_ms"] = 1000 * medians[2 + len(parts)]
        res["speedup_vs_teacher"] = res["teacher_sdedit_latency_ms"] / res["edit_latency_ms"]
    batch = [image] * args.batch
    sec = _median_time(lambda: pipe(image=batch, prompt=[instruction] * args.batch, num_inference_steps=steps,
                                    generator=gen), max(1, args.repeats // 4))
    res["batch"] = args.batch
    res["batch_throughput_img_per_s"] = args.batch / sec
    if args.refine:  # timed on its own, as the batch: its seconds would stretch the alternation's every round
        from .refine import refine_edit

        def refined():
            refine_edit(pipe, judge, image, instruction, steps=steps, refine_steps=args.refine, generator=gen)
            sync()

        res["refine_steps"] = args.refine
        res["refined_edit_latency_ms"] = 1000 * _median_time(refined, max(1, args.repeats // 4))
    for k, v in res.items():
        print(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    if args.json:
        print(json.dumps(res))
    return 0
