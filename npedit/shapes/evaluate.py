"""Exact Shapes-world benchmark of an editor: `python -m npedit eval shapes [--model DIR] [--n 300] [--seed 0]`.

Editors are functions (list of uint8 (64, 64, 3) references, list of their `EditCase`s) -> list of uint8
outputs; an editor reads only what a user would give (the instruction; a baseline, the target caption; the
best-of-N editor, the questions a user could ask the judge); the scorer is the spec's parser, no judge involved.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .. import flow
from ..flow import MAX_SAMPLING_STEPS
from ..cli import UsageError, check_refine_flags
from ..devices import resolve_device
from ..files import write_atomic
from ..images import tensor_to_pil
from ..sampler import sample
from ..judges.questions import training_questions
from ..refine import DEFAULT_REFINE_ANCHOR, DEFAULT_REFINE_LR
from .edits import EditCase, held_out_cases
from .scoring import FORM_GROUPS, METRICS, by_form, by_objects, error_counts, score_edit, summarize
from .world import CANVAS, parse, render

Editor = Callable[[list[np.ndarray], list[EditCase]], list[np.ndarray]]


def pipeline_editor(pipe, *, steps: int = 4, seed: int = 0) -> Editor:
    """An NPEditPipeline as an editor (a seeded generator per batch)."""

    def edit(images, cases):
        gen = torch.Generator().manual_seed(seed)
        out = pipe(image=[Image.fromarray(a) for a in images], prompt=[c.instruction for c in cases],
                   num_inference_steps=steps, generator=gen, output_type="pil").images
        return [np.asarray(o) for o in out]

    return edit


def best_of_editor(pipe, judge, *, candidates: int, steps: int = 4, seed: int = 0,
                   change_checks: bool = False) -> Editor:
    """An NPEditPipeline sampled `candidates` times per case, the judge keeping the best (`npedit.best_of`). The
    judge is asked what a user could ask from the instruction and the reference alone: the edit (or, for a
    removal, contains) and identity checks and a keep check per untouched object; with `change_checks`, also a
    change check per object the instruction creates (expected there) or makes disappear (expected gone)."""
    from ..best_of import best_of

    def edit(images, cases):
        outs = []
        for image, case in zip(images, cases):
            gen = torch.Generator().manual_seed(seed)  # one generator for all candidates, as the logged figures ran
            picked = best_of(pipe, judge, image, case.instruction, candidates=candidates, steps=steps,
                             generator=gen, edit_type=case.edit_type, object_name=case.object_name or None,
                             keep=case.keep, new=case.new if change_checks else (),
                             gone=case.gone if change_checks else ())
            outs.append(np.asarray(picked.image))
        return outs

    return edit


# latents refined in one judge pass with gradients: memory grows with it (~2 GB for 50 Shapes edits on a CPU)
REFINE_CHUNK = 50


def refined_editor(pipe, judge, *, refine_steps: int, lr: float, anchor: float, steps: int = 4, seed: int = 0,
                   candidates: int = 1) -> Editor:
    """An NPEditPipeline whose outputs are refined by the judge (`npedit.refine`), a batch at a time. The judge is
    asked what a user could ask from the instruction and the reference alone: the edit (or contains) and identity
    checks, a keep check per untouched object and a change check per object the instruction creates or makes
    disappear. With `candidates` > 1, each case is edited that many times (diffusers'
    `num_images_per_prompt`), every edit is refined, and the one with the lowest judge loss after refinement is kept
    (the first on a tie)."""
    def edit(images, cases):
        gen = torch.Generator().manual_seed(seed)  # as `pipeline_editor`: refinement starts from its very outputs
        z = pipe(image=[Image.fromarray(a) for a in images], prompt=[c.instruction for c in cases],
                 num_inference_steps=steps, generator=gen, output_type="latent",
                 num_images_per_prompt=candidates).images
        return _refined_outputs(pipe.backbone, judge, images, cases, z, candidates, refine_steps=refine_steps, lr=lr,
                                anchor=anchor)

    return edit


def refined_sdedit_editor(backbone, teacher, judge, *, refine_steps: int, lr: float, anchor: float,
                          strength: float = 0.6, steps: int = 16, cfg_scale: float = 3.5, seed: int = 0) -> Editor:
    """The zero-shot teacher baseline (`sdedit_editor`, on c^x) with its outputs refined by the judge as
    `refined_editor` refines an editor's: a chain with no editor at all (teacher and judge only)."""
    sdedit = sdedit_sampler(backbone, teacher, strength=strength, steps=steps, cfg_scale=cfg_scale, seed=seed,
                            latents=True)

    def edit(images, cases):
        z = sdedit(images, [c.caption_target for c in cases])
        return _refined_outputs(backbone, judge, images, cases, z, 1, refine_steps=refine_steps, lr=lr, anchor=anchor)

    return edit


def _refined_outputs(backbone, judge, images, cases, z, candidates: int, *, refine_steps: int, lr: float,
                     anchor: float) -> list[np.ndarray]:
    """Refine `z` (each case's `candidates` latents, case by case) with the judge asked what follows from each case's
    instruction and reference (see `refined_editor`); decode each case's lowest final loss to uint8."""
    from ..refine import refine_latents
    from ..verdicts import edit_questions

    n = candidates
    questions = [edit_questions(c.instruction, edit_type=c.edit_type, object_name=c.object_name or None,
                                keep=c.keep, new=c.new, gone=c.gone) for c in cases]
    device = next(judge.parameters()).device
    reference = _unit(images).to(device).repeat_interleave(n, dim=0)  # input i's copies first, as the latents
    asked = [q for q in questions for _ in range(n)]
    parts = [refine_latents(backbone, judge, reference[i:i + REFINE_CHUNK], z[i:i + REFINE_CHUNK],
                            asked[i:i + REFINE_CHUNK], steps=refine_steps, lr=lr, anchor=anchor)
             for i in range(0, len(z), REFINE_CHUNK)]  # each sample refines as if alone: chunks change nothing
    latents, final = torch.cat([p.latents for p in parts]), torch.cat([p.losses[-1] for p in parts])
    kept = final.view(len(cases), n).argmin(dim=1) + torch.arange(len(cases)) * n
    with torch.no_grad():
        decoded = backbone.decode_latents(latents[kept.to(latents.device)]).clamp(-1, 1)
    return [np.asarray(tensor_to_pil(x)) for x in decoded]


def sdedit_editor(backbone, teacher, *, strength: float = 0.6, steps: int = 16, cfg_scale: float = 3.5,
                  seed: int = 0) -> Editor:
    """Zero-shot teacher baseline (SDEdit): noise the reference to t = `strength`, then sample with c^x and CFG."""
    sdedit = sdedit_sampler(backbone, teacher, strength=strength, steps=steps, cfg_scale=cfg_scale, seed=seed)
    return lambda images, cases: sdedit(images, [c.caption_target for c in cases])


def sdedit_sampler(backbone, teacher, *, strength: float = 0.6, steps: int = 16, cfg_scale: float = 3.5,
                   seed: int = 0, latents: bool = False) -> Callable[[list[np.ndarray], list[str]], list[np.ndarray]]:
    """SDEdit as a function (uint8 references, captions) -> uint8 outputs (see `sdedit_editor`); with `latents`, the
    output latents (B, C, h, w) instead."""

    @torch.no_grad()
    def edit(images, captions):
        gen = torch.Generator().manual_seed(seed)
        pixels = torch.stack([torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 127.5 - 1 for a in images])
        ref = backbone.encode_image(pixels)
        cond = backbone.encode_prompt(list(captions), with_reference=False)
        uncond = backbone.encode_prompt([""] * len(captions), with_reference=False)
        times = [strength * (1 - i / steps) for i in range(steps)]
        x_t = flow.add_noise(ref, torch.randn(ref.shape, generator=gen).to(ref.device), strength)

        def denoise(x, t):
            return flow.guided(backbone.velocity(teacher, x, t, cond), backbone.velocity(teacher, x, t, uncond), cfg_scale)

        z = sample(denoise, x_t, times, renoise="ode")
        if latents:
            return z
        out = backbone.decode_latents(z).clamp(-1, 1).cpu()
        return [((o + 1) * 127.5).round().byte().permute(1, 2, 0).numpy() for o in out]

    return edit


def evaluate(editor: Editor, cases: list[EditCase], *, batch_size: int = 50, progress: bool = True,
             judge=None) -> tuple[list[dict], dict]:
    """Run `editor` on every case and score it exactly; returns per-case rows and the summary table.

    With a `judge`, each row also holds the judge's verdict on the edit (see `judge_verdicts`)."""
    rows = []
    for i in tqdm(range(0, len(cases), batch_size), desc="eval", disable=not progress):
        chunk = cases[i:i + batch_size]
        refs = [render(c.reference) for c in chunk]
        outs = editor(refs, chunk)
        scored = [score_edit(o, c) for o, c in zip(outs, chunk)]
        if judge is not None:
            scored = [{**row, **v} for row, v in zip(scored, judge_verdicts(judge, chunk, refs, outs))]
        rows += scored
    return rows, summarize(rows)


def _unit(images: list[np.ndarray]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255 for a in images])  # a copy: writable


def judge_verdicts(judge, cases: list[EditCase], references: list[np.ndarray], outputs: list[np.ndarray]) -> list[dict]:
    """The judge's P(Yes) to the two training questions about each (reference, output) pair, and whether its
    answer (P >= 0.5) is the truth read from the parsed output (None where the output does not parse)."""
    from .judge_training import true_answers

    questions = [training_questions(c.instruction, c.edit_type, c.object_name or None) for c in cases]
    p_yes = judge.score(_unit(references), _unit(outputs), questions)
    verdicts = []
    for case, out, (p_check, p_identity) in zip(cases, outputs, p_yes):
        image = np.asarray(out)
        scene = parse(image) if image.shape == (CANVAS, CANVAS, 3) else None
        truth = true_answers(case, scene) if scene is not None else (None, None)
        verdicts.append({
            "judge_check_p": p_check, "judge_identity_p": p_identity,
            "judge_check_agrees": None if truth[0] is None else (p_check >= 0.5) == truth[0],
            "judge_identity_agrees": None if truth[1] is None else (p_identity >= 0.5) == truth[1],
        })
    return verdicts


def judge_agreement(rows: list[dict]) -> dict:
    """Share of parsed outputs on which the judge's answers match the truth: per question, overall and by category."""
    def share(keep, key):
        hits = [r[key] for r in rows if keep(r) and r.get(key) is not None]
        return {"agreement": float(np.mean(hits)) if hits else float("nan"), "count": len(hits)}

    out = {"overall": {q: share(lambda r: True, f"judge_{q}_agrees") for q in ("check", "identity")}}
    for cat in sorted({r["category"] for r in rows}):
        out[cat] = {q: share(lambda r, c=cat: r["category"] == c, f"judge_{q}_agrees") for q in ("check", "identity")}
    return out


def agreement_table(agreement: dict) -> str:
    """The judge-agreement summary as Markdown."""
    lines = ["| category | edit/contains check | identity check | parsed outputs |", "|---|---|---|---|"]
    for cat, v in agreement.items():
        lines.append(f"| {cat} | {v['check']['agreement']:.3f} | {v['identity']['agreement']:.3f} | "
                     f"{v['check']['count']} |")
    return "\n".join(lines) + "\n"


def markdown_table(summary: dict, title: str = "") -> str:
    """The per-category table as Markdown."""
    head = f"### {title}\n\n" if title else ""
    lines = ["| category | " + " | ".join(METRICS) + " | n |", "|---" * (len(METRICS) + 2) + "|"]
    for cat, vals in summary.items():
        lines.append(f"| {cat} | " + " | ".join(f"{vals[m]:.3f}" for m in METRICS) + f" | {vals['count']} |")
    return head + "\n".join(lines) + "\n"


OBJECTS_TITLE = "Exact by the number of objects in the reference scene (cases in brackets):\n\n"


def objects_table(split: dict[str, dict[int, dict]]) -> str:
    """A `by_objects` split (exact per category by the reference scene's object count) as Markdown ("" if empty)."""
    if not split:
        return ""
    counts = sorted({k for ks in split.values() for k in ks})
    lines = ["| category | " + " | ".join(f"{k} object{'s' * (k != 1)}" for k in counts) + " |",
             "|---" * (len(counts) + 1) + "|"]
    for cat, ks in split.items():
        cells = [f"{ks[k]['exact']:.3f} ({ks[k]['count']})" if k in ks else "" for k in counts]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


FORM_TITLE = ("Exact of the object edits by how the instruction names the object: alone in its scene, or among "
              "others by its shape, by colour and shape, or by shape and cell (cases in brackets):\n\n")


def form_table(split: dict[str, dict[str, dict]]) -> str:
    """A `by_form` split (exact per object-edit category by how the object is named) as Markdown ("" if empty)."""
    if not split:
        return ""
    groups = [g for g in FORM_GROUPS.values() if any(g in v for v in split.values())]
    lines = ["| category | " + " | ".join(f"`{g}`" if g.startswith("the") else g for g in groups) + " |",
             "|---" * (len(groups) + 1) + "|"]
    for cat, vals in split.items():
        cells = [f"{vals[g]['exact']:.3f} ({vals[g]['count']})" if g in vals else "" for g in groups]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def errors_table(rows: list[dict], top: int = 12) -> str:
    """The most frequent mistakes (`scoring.error_kinds`) as Markdown: count and share of cases showing each."""
    counts = error_counts(rows)
    if not counts:
        return "No mistakes: every output is exact.\n"
    lines = ["| mistake | count | share of cases |", "|---|---|---|"]
    for kind, n in counts[:top]:
        share = sum(kind in r.get("errors", []) for r in rows) / max(len(rows), 1)
        lines.append(f"| {kind} | {n} | {share:.3f} |")
    if len(counts) > top:
        lines.append(f"| ({len(counts) - top} rarer kinds) | {sum(n for _, n in counts[top:])} | |")
    return "\n".join(lines) + "\n"


def write_report(summary: dict, rows: list[dict], out_dir: Path, name: str, meta: dict,
                 agreement: dict | None = None) -> None:
    """Write <name>.json (summary, by_objects, by_form, rows, mistakes, meta[, judge_agreement]) and <name>.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    split, forms = by_objects(rows), by_form(rows)
    report = {"meta": meta, "summary": summary, "by_objects": split, "by_form": forms,
              "errors": dict(error_counts(rows)), "rows": rows}
    md = (markdown_table(summary, name) + "\n" + OBJECTS_TITLE + objects_table(split)
          + "\n" + FORM_TITLE + form_table(forms)
          + "\nMost frequent mistakes (against the expected scene):\n\n" + errors_table(rows))
    if agreement is not None:
        report["judge_agreement"] = agreement
        md += "\nJudge agreement with the exact scorer on these outputs:\n\n" + agreement_table(agreement)
    # whole or not at all: a report cut short (Ctrl-C, a full disk) keeps the one an earlier run of the name wrote
    write_atomic(out_dir / f"{name}.json", json.dumps(report, indent=1))
    write_atomic(out_dir / f"{name}.md", md)


def report_name(args, stem: str) -> str:
    """The default report name: `stem` and each setting that differs from the default, in the `NAME-seed<k>` form
    `workbench.benchmarks` pools by (e.g. `editor-best-of-4-refined-20-seed1`), so that a run with other cases, steps
    or picks writes its own report instead of replacing one of another setting."""
    from ..assets import DEFAULT_JUDGE
    from ..cli import build_parser

    default = build_parser().parse_args(["eval", "shapes"])  # (the flags' own defaults, not copies of them)
    parts = [stem]
    if args.baseline:
        parts += [f"s{args.strength:g}"] if args.strength != default.strength else []
        parts += [f"k{args.teacher_steps}"] if args.teacher_steps != default.teacher_steps else []
    elif args.steps != default.steps:
        parts.append(f"steps{args.steps}")
    parts += [f"best-of-{args.candidates}"] if args.candidates > 1 else []
    bundled = args.judge in (None, "bundled") or Path(args.judge).resolve() == DEFAULT_JUDGE.resolve()
    if not bundled and (args.candidates > 1 or args.refine):  # another judge picks or refines
        judge = Path(args.judge)  # (a judge run's folder is <run>/judge: the run's name says which)
        parts.append(f"judge-{judge.parent.name if judge.name == 'judge' and judge.parent.name else judge.name}")
    parts += ["change-checks"] if args.change_checks else []
    if args.refine:
        parts.append(f"refined-{args.refine}")
        parts += [f"lr{args.refine_lr:g}"] if args.refine_lr != DEFAULT_REFINE_LR else []
        parts += [f"anchor{args.refine_anchor:g}"] if args.refine_anchor != DEFAULT_REFINE_ANCHOR else []
    parts += [f"n{args.n}"] if args.n != default.n else []
    if args.train_pool is not None:  # the cases a run trained on (--seed still seeds the sampling noise)
        parts += [f"train-pool{args.train_pool}"] + ([f"train-seed{args.train_seed}"] if args.train_seed else [])
    parts += [f"seed{args.seed}"] if args.seed else []
    return "-".join(parts)


def eval_main(args) -> int:
    """`python -m npedit eval shapes`: benchmark an editor (or the zero-shot teacher) and print the table."""
    from ..assets import DEFAULT_TEACHER, default_path

    if args.candidates < 1 or (args.candidates > 1 and args.baseline):
        raise UsageError("error: --candidates must be >= 1 and applies to an editor, not to --baseline teacher")
    change_checks = args.change_checks
    if change_checks and args.candidates < 2:
        raise UsageError("error: --change-checks shapes the judge's pick among --candidates (2 or more)")
    check_refine_flags(args.refine, args.refine_lr, args.refine_anchor)
    if args.refine:
        if change_checks:
            raise UsageError("error: --refine always asks the change checks (and a keep check per untouched object); "
                             "--change-checks is for --candidates without --refine")
    if args.n < 1:
        raise UsageError(f"error: --n must be >= 1, got {args.n}")
    if not 0 <= args.seed < 2**64:  # held-out cases take a non-negative seed, the sampler's generator 64 bits
        raise UsageError(f"error: --seed must be between 0 and 2**64 - 1, got {args.seed}")
    if args.name is not None and (not args.name or Path(args.name).name != args.name or args.name in (".", "..")):
        raise UsageError(f"error: --name must be a plain file name (the report is --out/<name>.json), got "
                         f"{args.name!r}")
    if not (1 <= args.steps <= MAX_SAMPLING_STEPS and 1 <= args.teacher_steps <= MAX_SAMPLING_STEPS):
        raise UsageError(f"error: --steps and --teacher-steps must be between 1 and {MAX_SAMPLING_STEPS}, got "
                         f"{args.steps} and {args.teacher_steps}")  # (else said by the sampler after the models load)
    if args.baseline and args.steps != 4:  # (the report recorded it; it shaped nothing)
        raise UsageError("error: --steps is the editor's sampling steps; --baseline teacher samples --teacher-steps")
    if args.baseline and args.model:  # (the report said teacher-sdedit; --model was silently not benchmarked)
        raise UsageError("error: --baseline teacher benchmarks the teacher (--teacher), not --model: give one of them")
    if args.teacher and not args.baseline:
        raise UsageError("error: --teacher is the teacher of --baseline teacher; an editor's benchmark does not use it")
    if not 0 < args.strength <= 1:  # the SDEdit noise level is a time t in (0, 1]
        raise UsageError(f"error: --strength must be in (0, 1] (1: pure noise), got {args.strength}")
    try:  # before any model loads: a report that cannot be written would throw the whole benchmark away
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "it is a file, not a folder")
        Path(args.out).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"error: --out {args.out}: {exc.strerror or exc}") from None
    if args.train_pool is not None:
        from .training import training_cases

        try:
            cases = training_cases(args.n, args.train_pool, seed=args.train_seed)
        except ValueError as exc:
            raise UsageError(f"error: --train-pool: {exc}") from None
    else:
        cases = held_out_cases(args.n, seed=args.seed)
    device = resolve_device()
    if args.baseline == "teacher":
        from ..backbones import load_backbone

        base = args.teacher or str(DEFAULT_TEACHER)
        backbone = load_backbone(base).to(device)
        teacher = backbone.load_transformer(base).to(device).eval()
        editor = sdedit_editor(backbone, teacher, strength=args.strength, steps=args.teacher_steps, seed=args.seed)
        name, model = args.name or report_name(args, "teacher-sdedit"), base
    else:
        from ..pipeline import NPEditPipeline

        model = default_path("model", args.model)
        pipe = NPEditPipeline.from_pretrained(model).to(device)
        pipe.set_progress_bar_config(disable=True)
        editor = pipeline_editor(pipe, steps=args.steps, seed=args.seed)
        name = args.name or report_name(args, Path(model).name)
    judge, judge_dir = None, None
    if args.judge or args.candidates > 1 or args.refine:
        from ..judges import load_judge

        judge_dir = default_path("judge", None if args.judge in (None, "bundled") else args.judge)
        judge = load_judge(judge_dir, device=device)
        if args.candidates > 1 and not args.refine:
            editor = best_of_editor(pipe, judge, candidates=args.candidates, steps=args.steps, seed=args.seed,
                                    change_checks=change_checks)
        if args.refine and args.baseline:  # the teacher's SDEdit outputs refined: teacher and judge, no editor
            editor = refined_sdedit_editor(backbone, teacher, judge, refine_steps=args.refine, lr=args.refine_lr,
                                           anchor=args.refine_anchor, strength=args.strength,
                                           steps=args.teacher_steps, seed=args.seed)
        elif args.refine:  # (with --candidates: each candidate refined, the lowest judge loss kept)
            editor = refined_editor(pipe, judge, refine_steps=args.refine, lr=args.refine_lr, anchor=args.refine_anchor,
                                    steps=args.steps, seed=args.seed, candidates=args.candidates)
        if args.candidates > 1 or args.refine:
            judge = judge if args.judge else None  # agreement figures only when asked for
    rows, summary = evaluate(editor, cases, judge=judge)
    meta = {"model": str(model), "n": len(cases), "seed": args.seed,
            "steps": args.teacher_steps if args.baseline else args.steps, "baseline": args.baseline,
            "strength": args.strength if args.baseline else None,
            "cases": (f"training (data.pool={args.train_pool}, seed {args.train_seed})" if args.train_pool is not None
                      else "held-out"),
            # the judge that picked or refined the outputs (the bundled one unless --judge), or scored agreement
            "judge": str(judge_dir) if judge_dir is not None else None, "candidates": args.candidates,
            "change_checks": change_checks,
            "refine": ({"steps": args.refine, "lr": args.refine_lr, "anchor": args.refine_anchor,
                        "keep_checks": True, "change_checks": True} if args.refine else None)}
    agreement = judge_agreement(rows) if judge is not None else None
    write_report(summary, rows, Path(args.out), name, meta, agreement)
    print(markdown_table(summary, name))
    print(OBJECTS_TITLE + objects_table(by_objects(rows)))
    print(FORM_TITLE + form_table(by_form(rows)))
    print("Most frequent mistakes (against the expected scene):\n\n" + errors_table(rows))
    if agreement is not None:
        print("Judge agreement with the exact scorer on these outputs:\n\n" + agreement_table(agreement))
    print(f"wrote {Path(args.out) / name}.json and .md")
    return 0
