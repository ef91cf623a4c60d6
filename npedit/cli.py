"""`python -m npedit COMMAND`: one parser, thin commands over the library (edit, judge, train, export, eval, bench...)."""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import re
import sys
import zipfile
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from .assets import bundle_missing, default_path, in_bundle
from . import files
from .edit_types import EDIT_TYPES, edit_type_name
from .files import image_bytes, own_entries, write_atomic
from .flow import MAX_SAMPLING_STEPS
from .images import DEFAULT_MAX_SIDE, ImageError, load_image
from .pairs import read_pairs
from .refine import DEFAULT_REFINE_ANCHOR, DEFAULT_REFINE_LR, check_refine_settings


class UsageError(SystemExit):
    """A command line that cannot work as typed (a flag's value, flags that do not go together, a setting): `main`
    prints its one line and the process exits with status 2, as argparse's own errors do; 1 is left for failures
    of the work itself (a file that cannot be read, a model that does not load)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def _refine_settings_flags(parser) -> None:
    """--refine-lr and --refine-anchor (edit, eval shapes): how --refine K refines."""
    parser.add_argument("--refine-lr", type=float, default=DEFAULT_REFINE_LR, help="Adam step size of --refine "
                        f"(default {DEFAULT_REFINE_LR})")
    parser.add_argument("--refine-anchor", type=float, default=DEFAULT_REFINE_ANCHOR, help="weight of the pull back "
                        f"to the editor's own latents during --refine (default {DEFAULT_REFINE_ANCHOR})")


def check_refine_flags(steps: int, lr: float, anchor: float) -> None:
    """A UsageError, one line, for --refine, --refine-lr, --refine-anchor values the refinement cannot run with
    (`refine.check_refine_settings`; edit, eval shapes and bench) or given without --refine, before any model loads."""
    if not steps and (lr != DEFAULT_REFINE_LR or anchor != DEFAULT_REFINE_ANCHOR):  # (a plain edit would ignore them)
        raise UsageError("error: --refine-lr and --refine-anchor set how --refine K refines: give --refine too")
    try:
        check_refine_settings(steps, lr, anchor)
    except ValueError as exc:
        raise UsageError(f"error: --refine: {exc}") from None


def _device():
    from .devices import resolve_device

    return str(resolve_device())


def _dtype(name: str, device: str):
    """The torch dtype a --dtype flag names; "auto": bfloat16 on a GPU, float32 on a CPU (as the app does)."""
    from .devices import as_torch_dtype

    if name == "auto":
        name = "bfloat16" if device.startswith("cuda") else "float32"
    return as_torch_dtype(name)


def load_cli_judge(args, device: str, dtype, max_pixels: int | None, texts: Sequence[tuple[str, str]] = ()):
    """The judge of --judge (default: the bundled one) in `dtype`, at most `max_pixels` per image when given; each
    (flag, text) of `texts` is first checked against the control tokens of its tokenizer (`check_judge_words`)."""
    from .judges import load_judge

    check_judge_words(default_path("judge", args.judge), texts)
    extra = {} if max_pixels is None else {"max_pixels": max_pixels}
    try:
        return load_judge(default_path("judge", args.judge), device=device, torch_dtype=dtype, **extra)
    # an unsupported family, a pixel cap on a fixed-view judge, a missing file, a package its processor needs
    except (ValueError, OSError, ImportError) as exc:
        raise SystemExit(f"error: {exc}") from exc


def _note_unasked_object(args, instead: str) -> None:
    """A note on stderr when --object is given for an edit type whose questions do not name it (it was silently
    unused): what to give `instead`."""
    if args.edit_type != "remove" and (args.object or "").strip():
        print(f"note: --object is asked about for --edit-type remove only (is it still there?); for --edit-type "
              f"{args.edit_type}, {instead}", file=sys.stderr)


def check_judge_words(judge_path, texts: Sequence[tuple[str, str]]) -> None:
    """UsageError when a text the judge would read (flag, text) holds one of its tokenizer's control tokens (an image
    placeholder, a turn's end), said from its processor alone (milliseconds) before its weights load (a real judge's
    take minutes; the question was refused only then). A judge whose processor does not load here is left to its own
    load, which says why."""
    from .folders import looks_local
    from .judges.chat import control_tokens, first_control_token, load_processor

    texts = [(flag, text) for flag, text in texts if text]
    if not texts or not looks_local(judge_path) or not Path(judge_path).expanduser().is_dir():
        return  # (a hub id, or a path that is not there: the judge's own load says so, without asking the hub)
    try:
        tokens = control_tokens(load_processor(judge_path))
    except Exception:  # (not a judge folder, a package missing, a processor of its own code: the load says it)
        return
    for flag, text in texts:
        found = first_control_token(text, tokens)
        if found is not None:
            raise UsageError(f"error: {flag} holds {found!r}, which the judge's tokenizer reads as one of its control "
                             "tokens (an image placeholder, a turn's start or end), not as text: reword it without it")


def _edit_type(value: str) -> str:
    """--edit-type: one of EDIT_TYPES (case and the aliases forgiven)."""
    try:
        return edit_type_name(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _read_list(path: str, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line, row) of a .csv/.tsv or JSON-lines list (`npedit.data.read_rows`) with the `required` keys; relative
    image paths resolve against the file's folder; an unknown edit_type is an error here, before any work."""
    from .data import CSV_SUFFIXES, read_rows

    p = Path(path)
    if p.is_dir():  # e.g. the folder of images, where the list of them was meant
        raise SystemExit(f"error: {p} is a folder; give the list of edits in it (a .jsonl, .csv or .tsv file)")
    if not p.is_file():
        raise SystemExit(f"error: {p} not found")
    try:
        rows = read_rows(p, required, text=("instruction", "object", "object_name"))  # the judge quotes them
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    for n, row in rows:
        where = f"{p}:{n}"
        if p.suffix.lower() in CSV_SUFFIXES:  # a short row's missing cells are empty ones, not JSON's null
            row.update({k: "" for k, v in row.items() if v is None})
        for key in ("image", "reference", "edited"):
            if key in row and not isinstance(row[key], str):
                raise SystemExit(f"error: {where}: {key} must be a path (a string), got {row[key]!r}")
            if key in row and row[key].strip() and not Path(row[key]).is_absolute():  # "" is no image, not the folder
                row[key] = str(p.parent / row[key])
        try:
            row["edit_type"] = edit_type_name(row.get("edit_type"))
        except ValueError as exc:
            raise SystemExit(f"error: {where}: {exc}") from None
    return rows


def cmd_edit(args) -> int:
    """Edit one image, or every line of a cases.jsonl, with an NPEditPipeline."""
    from .folders import looks_local
    from .pipeline import NPEditPipeline

    if bool(args.image) == bool(args.batch):
        raise UsageError("error: give either --image/--instruction/--output or --batch/--output-dir")
    if args.candidates < 1:
        raise UsageError("error: --candidates must be >= 1")
    if args.min_score is not None and not args.verdicts:
        raise UsageError("error: --min-score filters the --verdicts file; give --verdicts too")
    if args.trace and (args.batch or args.candidates > 1 or args.verdicts):
        raise UsageError("error: --trace records one edit's steps: give --image (no --batch, --candidates or "
                         "--verdicts)")
    if (args.teacher or args.critic or args.caption) and not args.trace:
        raise UsageError("error: --teacher, --critic and --caption are for the DMD maps of --trace")
    check_refine_flags(args.refine, args.refine_lr, args.refine_anchor)
    if args.judge_max_pixels is not None and not (args.candidates > 1 or args.verdicts or args.trace or args.refine):
        raise UsageError("error: --judge-max-pixels is for the judge of --candidates, --verdicts, --trace or --refine")
    if not 1 <= args.steps <= MAX_SAMPLING_STEPS:  # (else said by the pipeline once the editor's weights are read)
        raise UsageError(f"error: --steps must be between 1 and {MAX_SAMPLING_STEPS}, got {args.steps}")
    if args.max_side < 1:
        raise UsageError(f"error: --max-side must be >= 1, got {args.max_side}")
    if args.revision and looks_local(default_path("model", args.model)):
        raise UsageError(f"error: --revision picks a version of a hub id; the editor "
                         f"{default_path('model', args.model)} is a local folder")
    if not -2**63 <= args.seed <= 2**64 - max(args.candidates, 1):  # candidate k is seeded seed + k
        raise UsageError(f"error: --seed must be between -2**63 and 2**64 - 1 (less the candidates), got {args.seed}")
    jobs = _edit_jobs_of(args)  # before any weights are read: a bad list or output path fails at once
    if args.image:  # a result that cannot be saved would be found out after the edit (a 6B editor loads for minutes)
        _check_output_file(args.output, "--output")
    else:
        _check_writable(Path(args.output_dir).absolute(), f"--output-dir {args.output_dir}")
    if args.verdicts:
        _check_output_file(args.verdicts, "--verdicts")
    # an output written over an input: the user's own image (or list) replaced by the edit
    zipped = args.trace if (args.trace or "").lower().endswith(".zip") else None
    _check_distinct([(args.image, "--image"), (args.batch, "--batch"), (args.output if args.image else None,
                     "--output"), (args.verdicts, "--verdicts"), (zipped, "--trace")])
    if args.trace:
        _check_writable(Path(args.trace).absolute().parent if zipped else Path(args.trace).absolute(),
                        f"--trace {args.trace}")
        _check_trace_target(args, zipped)
        folder = Path(args.trace)
        if not zipped and folder.is_dir() and own_entries(folder) and not (folder / "trace.json").is_file():
            raise SystemExit(f"error: --trace {args.trace} holds other files and no trace: a trace writes trace.json, "
                             "steps.csv, reference.png, edited.png, refined.png and step-N-* files into its folder, over any of "
                             "those names; give a new or empty folder (or an earlier trace's)")
    for role, path in (("teacher", args.teacher), ("critic", args.critic)):  # what they are, before any weights load
        if path:
            from .backbones import detect_family

            try:
                detect_family(path)
            except (ValueError, OSError) as exc:
                raise SystemExit(f"error: --{role}: {exc}") from None
    device = _device()
    dtype = _dtype(args.dtype, device)
    judge = None  # loaded first: a judge the flags do not fit fails before the editor's weights are read
    if args.candidates > 1 or args.verdicts or args.trace or args.refine:
        judge = load_cli_judge(args, device, dtype, args.judge_max_pixels,
                               [] if args.batch else [("--instruction", args.instruction), ("--keep", args.keep),
                                                      *([("--object", args.object)] if args.edit_type == "remove"
                                                        else [])])
    model = default_path("model", args.model)
    pipe = NPEditPipeline.from_pretrained(model, dtype=dtype, device=device, revision=args.revision)
    pipe.set_progress_bar_config(disable=True)
    if args.trace:
        args.tracer = _tracer(args, pipe, judge, model, dtype)
    with ExitStack() as stack:
        verdicts = None
        if args.verdicts:
            try:
                verdicts = stack.enter_context(_report(args.verdicts, None))
            except OSError as exc:
                raise SystemExit(f"error: cannot write --verdicts: {exc}") from None
        with _said_if_stopped([verdicts] if verdicts else []):
            failures = _edit_jobs(pipe, judge, jobs, args, verdicts)
        if verdicts is not None and not verdicts.rows and failures:
            # no row, edits having failed: an empty file would replace the previous run's verdicts for nothing (all
            # of them judged and below --min-score is an answer: that empty file is written)
            verdicts.close(complete=False)
            before = "is as it was" if verdicts.path.exists() else "was not written"
            rest = ", the rest scored below --min-score" if failures < len(jobs) else ""
            print(f"note: {args.verdicts} {before}: this run has no verdict to write ({failures} of {len(jobs)} edits "
                  f"failed{rest})", file=sys.stderr)
        if verdicts is not None:
            try:
                verdicts.close()  # (after the close above: nothing)
            except OSError as exc:  # its rename failed: what says so names the partial file that holds its rows
                raise SystemExit(f"error: {exc}") from None
    if len(jobs) == 1 and not failures:
        print(jobs[0]["out"])
    return 1 if failures else 0


OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP", ".tif": "TIFF",
                  ".tiff": "TIFF"}


def _image_format(path: Path) -> str:
    """The format a result is saved in, from its file name's extension."""
    fmt = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UsageError(f"error: --output must end in one of {', '.join(OUTPUT_FORMATS)} (the format it is saved "
                         f"in), got {path}")
    return fmt


def _check_image(path: str, flag: str) -> None:
    """Stop on an image the loader refuses, before any weights are read (a 6B editor loads for minutes)."""
    try:
        load_image(path)
    except ImageError as exc:
        raise SystemExit(f"error: {flag}: {exc}") from None


REMOVE_NEEDS_OBJECT = ("error: --edit-type remove needs --object NAME: the judge asks whether that object is still "
                       "there")


def _edit_jobs_of(args) -> list[dict]:
    """The jobs of `edit`: the one --image, or every line of --batch, each with the PNG path it is saved to (a
    --batch id names a file in --output-dir: a plain name, once)."""
    if args.image:
        if args.instruction is None or not args.output:
            raise UsageError("error: --image needs --instruction and --output")
        from .pipeline import check_instruction

        try:  # empty or too long: a mistake of the command line, said before the weights load
            check_instruction(args.instruction)
        except ValueError as exc:
            raise UsageError(f"error: --instruction: {exc}") from None
        out = Path(args.output)
        _image_format(out)
        judged = args.candidates > 1 or args.verdicts or args.trace or args.refine
        if judged and args.edit_type == "remove" and not (args.object or "").strip():
            raise UsageError(REMOVE_NEEDS_OBJECT)
        _note_unasked_object(args, "--keep names the objects to leave in place")
        _check_image(args.image, "--image")
        return [{"id": out.stem, "image": args.image, "instruction": args.instruction, "edit_type": args.edit_type,
                 "object_name": args.object, "keep": args.keep, "out": out}]
    if not args.output_dir:
        raise UsageError("error: --batch needs --output-dir")
    lines = _read_list(args.batch, ("id", "image", "instruction"))
    if not lines:  # (else it "succeeds" having edited nothing)
        raise SystemExit(f"error: {args.batch} lists no edits: one line per edit with id, image, instruction")
    rows = [row for _, row in lines]
    names = [str(r["id"]) for r in rows]
    for (n, _), name in zip(lines, names):
        if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
            raise SystemExit(f"error: {args.batch}:{n}: id {name!r} is not a plain file name (each result is saved as "
                             f"{Path(args.output_dir) / '<id>.png'})")
        problem = files.windows_name_problem(f"{name}.png") if files.WINDOWS else None
        if problem:  # else an id like "case:1" wrote an empty "case" file there, or failed after its edit
            raise SystemExit(f"error: {args.batch}:{n}: id {name!r} cannot name a file here ({problem}; each result is "
                             f"saved as {Path(args.output_dir) / '<id>.png'})")
    twice = [name for name, count in Counter(names).items() if count > 1]
    if twice:
        raise SystemExit(f"error: {args.batch}: ids {', '.join(map(repr, twice))} appear more than once (each names "
                         "its result's file)")
    if files.CASE_INSENSITIVE:  # else "Cat" and "cat" wrote one file, the second edit over the first
        spellings = {}
        for name in names:
            spellings.setdefault(name.casefold(), []).append(name)
        alike = [" and ".join(map(repr, group)) for group in spellings.values() if len(group) > 1]
        if alike:
            raise SystemExit(f"error: {args.batch}: ids {'; '.join(alike)} name one file here (file names on this "
                             "system ignore case; each id names its result's file)")
    jobs = [{**r, "out": Path(args.output_dir) / f"{name}.png"} for r, name in zip(rows, names)]
    _check_no_image_replaced(args.batch, [n for n, _ in lines], jobs)
    return jobs


def _check_no_image_replaced(batch: str, lines: list[int], jobs: list[dict]) -> None:
    """UsageError naming the line when a --batch result would be saved over an image of the list: its own (its
    original lost) or another line's (lost too, and a later line would edit an earlier one's result instead). Refused
    rather than every image read first: either way an image the user gave would be gone, and the list's own
    images are what a user keeps."""
    images = {}
    for n, job in zip(lines, jobs):
        if job["image"].strip():
            images.setdefault(_file_key(job["image"]), n)
    for n, job in zip(lines, jobs):
        m = images.get(_file_key(job["out"]))
        if m is not None:
            whose = "its own image" if m == n else f"the image of line {m}"
            raise UsageError(f"error: {batch}:{n}: id {job['id']!r} would be saved as {job['out']}, {whose}, which "
                             "would then be lost: give an --output-dir that holds none of the list's images")


def _edit_jobs(pipe, judge, jobs: list[dict], args, verdicts) -> int:
    """Edit every job (best of `args.candidates` when there is a judge), save its PNG, write its --verdicts line;
    returns the number of jobs that failed (each says why on stderr)."""
    import torch

    failures = 0
    for job in tqdm(jobs, disable=len(jobs) == 1, desc="edit"):
        gen = torch.Generator().manual_seed(args.seed)
        kept = None  # (which candidate, of how many) of a refinement: only the kept one is judged
        try:
            picture = load_image(job["image"])  # read once; the pipeline's own loading leaves it as it is
            note = pipe.working_note(picture.size, args.max_side)
            if note:  # the app shows the same sentence: an input the editor sees at another size
                tqdm.write(f"note: {job['id']}: {note}" if len(jobs) > 1 else f"note: {note}", file=sys.stderr)
            if getattr(args, "tracer", None):
                img = args.tracer(job, picture)
            elif args.refine:
                img, kept = _refined(pipe, judge, job, picture, args, named=len(jobs) > 1)
                picked = _judged(judge, job, picture, img) if verdicts is not None else None
            elif judge is None:
                img = pipe(image=picture, prompt=job["instruction"], num_inference_steps=args.steps,
                           generator=gen, max_side=args.max_side).images[0]
            else:
                picked = _best_of(pipe, judge, job, picture, args, verbose=len(jobs) == 1)
                img = picked.image
        except (ImageError, ValueError) as exc:
            failures += 1
            tqdm.write(f"error: {job['id']}: {exc}", file=sys.stderr)  # a line of its own, not over the bar
            continue
        try:
            job["out"].parent.mkdir(parents=True, exist_ok=True)
            fmt = _image_format(job["out"])
            # whole or not at all: a Ctrl-C or a full disk mid-write keeps the file a previous run saved there
            write_atomic(job["out"], image_bytes(img, fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {})))
        except OSError as exc:  # an unwritable place: this job fails, the others still run
            failures += 1
            tqdm.write(f"error: {job['id']}: cannot save {job['out']}: {exc}", file=sys.stderr)
            continue
        if verdicts is not None:
            _write_verdict(verdicts, job, picked, args.min_score, kept)
    return failures


def _tracer(args, pipe, judge, model: str, dtype):
    """The edit of --trace: a function of the job and its loaded image that runs `npedit.trace.trace_edit` with the
    judge and the DMD pair (--teacher / --critic, else the editor's own, else the bundled teacher), writes the trace
    to --trace and returns the edited image. Without a teacher or critic the trace has no DMD maps and says why
    (also on stderr)."""
    from .assets import DEFAULT_TEACHER
    from .trace import load_companion, own_companions, refine_trace, save_trace, trace_edit

    own_teacher, own_critic, loss = own_companions(model)
    bundled = str(DEFAULT_TEACHER) if (DEFAULT_TEACHER / "transformer" / "config.json").is_file() else None
    names = {"editor": model, "judge": default_path("judge", args.judge),
             "teacher": args.teacher or own_teacher or bundled, "critic": args.critic or own_critic}
    nets, note = {}, None
    if names["teacher"] and names["critic"]:
        for role in ("teacher", "critic"):
            try:
                nets[role] = load_companion(role, names[role], pipe, dtype)
            except (ValueError, OSError) as exc:
                raise SystemExit(f"error: --{role}: {exc}") from None
    else:
        note = ("no critic (pass --critic DIR: one fitted to this editor, such as the critic/ of the checkpoint it "
                "was exported from, RUN/checkpoints/step_N/critic; never another editor's)" if names["teacher"]
                else "no teacher (pass --teacher)")
        print(f"note: the trace has no DMD maps: {note}", file=sys.stderr)
        names |= {"teacher": None, "critic": None}  # the trace names the models it used

    def run(job, picture):
        trace = trace_edit(pipe, judge, nets.get("teacher"), nets.get("critic"), picture, job["instruction"],
                           args.caption, steps=args.steps, seed=args.seed, edit_type=job["edit_type"],
                           object_name=(job.get("object_name") or "").strip() or None, max_side=args.max_side,
                           loss=loss, dmd_note=note)
        if args.refine:  # from the traced sampling's own latents: the steps in the trace are the refined edit's
            r = refine_trace(trace, pipe, judge, refine_steps=args.refine, lr=args.refine_lr, anchor=args.refine_anchor,
                             keep=job.get("keep"), new=job.get("new"), gone=job.get("gone"))
            print(f"refined {args.refine} steps: judge loss {r.losses[0]:.3f} -> {r.losses[-1]:.3f}", file=sys.stderr)
        try:
            save_trace(trace, args.trace, names)
        except OSError as exc:  # (checked writable before the models loaded; a full disk still ends here)
            raise SystemExit(f"error: cannot write --trace {args.trace}: {exc}") from None
        return trace.refinement.image if trace.refinement is not None else trace.image

    return run


def _write_verdict(writer, job: dict, picked, min_score: float | None, kept: tuple[int, int] | None = None) -> None:
    """One --verdicts line: the job's own fields, its result as `target` and the judge's numbers on it (a training
    manifest line: paired SFT on these learns the judge's accepted edits); none below `min_score`."""
    v = picked.verdicts[picked.best]
    if min_score is not None and v.score < min_score:
        return
    # refined candidates: only the kept one is judged, and `kept` says which it was and of how many
    candidate, candidates = kept or (picked.best, len(picked.images))
    row = {k: val for k, val in job.items() if k != "out"}
    row |= {"image": str(Path(job["image"]).resolve()), "target": str(job["out"].resolve()), "score": v.score,
            "p_edit": v.p_edit, "p_identity": v.p_identity, "p_keep": v.p_keep, "candidate": candidate,
            "candidates": candidates}
    writer.write(row)


def _job_questions(job: dict) -> dict:
    """What the judge is asked about an edit job besides its instruction (`verdicts.edit_questions`' edit_type,
    object_name, keep, new, gone): --image's flags, or a --batch line's columns."""
    from .data import object_names

    return {"edit_type": job["edit_type"], "object_name": job.get("object_name") or None,
            "keep": object_names(job.get("keep")), "new": object_names(job.get("new")),
            "gone": object_names(job.get("gone"))}


def _judged(judge, job: dict, picture, image):
    """The judge's verdict on one finished edit, as the one candidate of a `best_of.Candidates` (--verdicts' line)."""
    from .best_of import Candidates
    from .verdicts import judge_candidates

    return Candidates([image], judge_candidates(judge, picture, [image], job["instruction"], **_job_questions(job)))


def _refined(pipe, judge, job: dict, picture, args, named: bool):
    """--refine K: the job's edit refined by the judge; with --candidates N, N edits (candidate k seeded --seed + k),
    each refined, the lowest final judge loss kept (`npedit.refine.refine_candidates`; one candidate is the single
    edit seeded --seed). Returns the kept image and (its index, N). On stderr, the judge's loss before -> after: one
    line for an edit, or per candidate, or, in a list (`named`), one line for the job with its id."""
    from .refine import refine_candidates

    # one tick per candidate and judge pass (the last measures the result): minutes of a large editor's refinement,
    # or of many candidates, were silent until every line came at once; a list's jobs have their own bar
    with tqdm(total=args.candidates * (args.refine + 1), desc="refine", unit="pass", disable=named,
              leave=False) as bar:
        def passed(first, step, losses):
            bar.update(len(losses))
            bar.set_postfix(judge_loss=f"{float(losses.min()):.3f}", refresh=False)

        r = refine_candidates(pipe, judge, picture, job["instruction"], candidates=args.candidates, seed=args.seed,
                              steps=args.steps, refine_steps=args.refine, lr=args.refine_lr,
                              anchor=args.refine_anchor, max_side=args.max_side, callback=passed,
                              **_job_questions(job))
    done, n = r.refinements[r.best], len(r.refinements)
    loss = f"judge loss {done.losses[0]:.3f} -> {done.losses[-1]:.3f}"
    if n == 1:
        line = f"refined {args.refine} steps: {loss}"
        tqdm.write(f"{job['id']}: {line}" if named else line, file=sys.stderr)
    elif named:
        tqdm.write(f"{job['id']}: best of {n} refined {args.refine} steps: candidate {r.best} (seed "
                   f"{r.seeds[r.best]}) kept, {loss}", file=sys.stderr)
    else:
        for k, (each, seed) in enumerate(zip(r.refinements, r.seeds)):
            mark = "  <- kept" if k == r.best else ""
            tqdm.write(f"candidate {k} (seed {seed}): refined {args.refine} steps: judge loss {each.losses[0]:.3f} -> "
                       f"{each.losses[-1]:.3f}{mark}", file=sys.stderr)
    return r.image, (r.best, n)


def _best_of(pipe, judge, job: dict, picture, args, verbose: bool):
    """The judge's pick of `args.candidates` edits of one job (its image loaded: `picture`); with `verbose`, each
    candidate's verdict on stderr."""
    from .best_of import best_of

    picked = best_of(pipe, judge, picture, job["instruction"], candidates=args.candidates, steps=args.steps,
                     seed=args.seed, max_side=args.max_side, **_job_questions(job))
    if verbose:
        for k, v in enumerate(picked.verdicts):
            mark = "  <- kept" if k == picked.best else ""
            print(f"candidate {k} (seed {picked.seeds[k]}): score {v.score:.3f}, P(edit) {v.p_edit:.3f}, "
                  f"P(identity) {v.p_identity:.3f}{mark}", file=sys.stderr)
    return picked


def cmd_judge(args) -> int:
    """Print the judge's verdict on one pair as JSON, or write a row per pair (and per question) of a pair list."""
    from .data import object_names
    from .verdicts import judge_edit

    if args.gradients and (args.batch or not args.gradients.endswith(".npz")):
        raise UsageError("error: --gradients is one .npz file for one pair (not for --batch)")
    if args.batch and not args.output:
        raise UsageError("error: --batch needs --output")
    if args.questions and not args.batch:
        raise UsageError("error: --questions is the per-question file of --batch (one pair prints its questions)")
    if not args.batch and not (args.reference and args.edited and args.instruction is not None):
        raise UsageError("error: give --reference, --edited and --instruction (or --batch/--output)")
    if not args.batch and args.edit_type == "remove" and not (args.object or "").strip():
        raise UsageError(REMOVE_NEEDS_OBJECT)
    if not args.batch:
        from .verdicts import edit_questions

        try:  # an empty or overlong text: a mistake of the command line, said before the judge's weights load
            edit_questions(args.instruction, edit_type=args.edit_type, object_name=args.object or None,
                           keep=object_names(args.keep), new=object_names(args.new), gone=object_names(args.gone),
                           extra=[text.strip() for text in args.extra if text.strip()])
        except ValueError as exc:
            raise UsageError(f"error: {exc}") from None
    if not args.batch:
        _note_unasked_object(args, "--new / --gone / --keep ask about objects")
    _check_distinct([(args.batch, "--batch"), (args.output if args.batch else None, "--output"),
                     (args.questions, "--questions")])
    # before the judge's weights are read: a bad list or image fails at once
    try:
        pairs = read_pairs(args.batch) if args.batch else []
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not args.batch:
        _check_image(args.reference, "--reference")
        _check_image(args.edited, "--edited")
    outputs = [(out, flag) for out, flag in ((args.output if args.batch else None, "--output"),
                                             (args.gradients, "--gradients"), (args.questions, "--questions")) if out]
    for out, flag in outputs:
        _check_output_file(out, flag)
    # an output named like an image it judges (e.g. --output edited.png) would replace that image
    images = {_file_key(path): where for p in pairs
              for path, where in ((p.reference_path, f"line {p.line}'s reference"),
                                  (p.edited_path, f"line {p.line}'s edited image")) if path.strip()}
    images |= {_file_key(path): flag for path, flag in ((args.reference, "--reference"), (args.edited, "--edited"))
               if not args.batch and path}
    for out, flag in outputs:
        if _file_key(out) in images:
            raise UsageError(f"error: {flag} {out} is {images[_file_key(out)]}: writing it would replace that image; "
                             "give another name")
    device = _device()
    words = [] if args.batch else [("--instruction", args.instruction), ("--keep", args.keep), ("--new", args.new),
                                   ("--gone", args.gone),  # (--object is asked about a removal only)
                                   *([("--object", args.object)] if args.edit_type == "remove" else [])]
    judge = load_cli_judge(args, device, _dtype(args.dtype, device), args.max_pixels,
                           [*words, *(("--extra", text) for text in args.extra)])

    extra = [text.strip() for text in args.extra if text.strip()]  # as the app reads its lines of extra questions

    def verdict(ref, edited, instruction, edit_type, obj, keep=None, new=None, gone=None):
        return judge_edit(judge, ref, edited, instruction, edit_type=edit_type, object_name=obj or None, extra=extra,
                          keep=object_names(keep), new=object_names(new), gone=object_names(gone)).report(instruction)

    try:
        if args.batch:
            # --extra: every pair's questions after its own (a list's extra column)
            pairs = [replace(p, extra=(*p.extra, *extra)) for p in pairs]
            return _judge_batch(judge, pairs, args.output, args.questions)
        if not args.gradients:
            print(json.dumps(verdict(args.reference, args.edited, args.instruction, args.edit_type, args.object,
                                     args.keep, args.new, args.gone)))
            return 0
        from .verdicts import answer_gradients  # one pass gives the verdict and, backwards, the gradients

        grads = answer_gradients(judge, args.reference, args.edited, args.instruction,
                                 edit_type=args.edit_type, object_name=args.object or None, extra=extra,
                                 keep=object_names(args.keep), new=object_names(args.new), gone=object_names(args.gone))
        Path(args.gradients).parent.mkdir(parents=True, exist_ok=True)
        grads.save(args.gradients)
        numbers = grads.verdict.report(args.instruction)
        if grads.image.size != load_image(args.edited).size:  # maps of a resized copy: the verdict is of the pair
            numbers = verdict(args.reference, args.edited, args.instruction, args.edit_type, args.object, args.keep,
                              args.new, args.gone)
        print(json.dumps({**numbers, "gradients": args.gradients}))
    except (ImageError, ValueError, OSError) as exc:  # OSError: an --output or --gradients that cannot be written
        raise SystemExit(f"error: {exc}") from None
    return 0


def _judge_batch(judge, pairs, output: str, questions: str | None) -> int:
    """Write each pair's verdict row to `output` and, with `questions`, its question rows there, as they come; 1 when
    a pair could not be judged (its row says why, and so does a line on stderr)."""
    from .pairs import QUESTION_COLUMNS, VERDICT_COLUMNS, judge_pairs

    failures = 0
    with ExitStack() as stack:
        writers = [stack.enter_context(_report(path, columns))
                   for path, columns in ((output, VERDICT_COLUMNS), (questions, QUESTION_COLUMNS)) if path]
        with _said_if_stopped(writers):
            for row, asked in judge_pairs(judge, tqdm(pairs, desc="judge")):
                writers[0].write(row)
                for q in asked if questions else ():
                    writers[1].write(q)
                if row["error"]:
                    failures += 1
                    # a line of its own, not over the bar
                    tqdm.write(f"error: {row['id']}: {row['error']}", file=sys.stderr)
        # each report replaces its file on its own: one whose rename fails must not leave the other, complete too, in
        # its partial file unsaid (the errors name the partial files)
        failed = []
        for w in writers:
            try:
                w.close()
            except OSError as exc:
                failed.append(str(exc))
        if failed:
            raise OSError("; ".join(failed))
    return 1 if failures else 0


def _report(path: str, columns: list[str] | None):
    """A RowWriter for a report written as it goes (--verdicts, --output, --questions), its folder made: `path` stays as
    it was until every row is written (`npedit.pairs.RowWriter`)."""
    from .pairs import RowWriter

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return RowWriter(path, columns)


@contextmanager
def _said_if_stopped(writers: list):
    """On a failure or Ctrl-C inside, a note per report of `writers` (RowWriters) saying that the file there is the
    one from before, and where this run's rows are (a line of its own, not over the progress bar); an OSError (a
    full disk under a report) is then one error line."""
    try:
        yield
    except BaseException as exc:
        for w in writers:
            before = "is as it was" if w.path.exists() else "was not written"
            rows = (f"; the {w.rows} row{'s' * (w.rows != 1)} this run wrote {'are' if w.rows != 1 else 'is'} in "
                    f"{w.out.partial}" if w.rows else "")
            tqdm.write(f"note: {w.path} {before} (the run stopped){rows}", file=sys.stderr)
        if isinstance(exc, OSError) and writers:  # (the work inside says its own read errors: a full or lost disk)
            raise SystemExit(f"error: writing {' and '.join(str(w.path) for w in writers)} failed: "
                             f"{exc.strerror or exc}") from None
        raise


def _check_writable(folder: Path, what: str) -> None:
    """SystemExit naming `what` unless `folder`, or the nearest folder above it that exists, takes a file; creates
    nothing."""
    base = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not base.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{base} is a file")
        probe = base / f".write_test_{os.getpid()}"
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as exc:
        raise SystemExit(f"error: cannot write {what} ({exc.strerror or exc}): pick a folder you can write to") from None


def _file_key(path: str | Path):
    """What one file is, however its path is spelled: its device and inode when it exists (a link to it, a path of
    another case where names ignore case), else its absolute path with links resolved."""
    try:
        found = os.stat(path)
    except (OSError, ValueError):  # (ValueError: a NUL in the name)
        return Path(path).resolve()
    return found.st_dev, found.st_ino


def _check_trace_target(args, zipped: str | None) -> None:
    """Stop when --trace would write over what is not a trace: a zip (or other file) of that name holding no
    trace.json, which is replaced whole; or, in a trace folder, --image or --output under one of the trace's own
    file names (edited.png, step-N-x0.png...: `trace.is_trace_file`), which the trace would replace or which would
    replace the trace's file."""
    if zipped:
        path = Path(zipped)
        if path.is_dir():
            raise SystemExit(f"error: --trace {zipped} is a folder; a name ending in .zip is written as one zip file")
        if path.exists():
            try:
                with zipfile.ZipFile(path) as z:
                    ours = "trace.json" in z.namelist()
            except (OSError, zipfile.BadZipFile):
                ours = False
            if not ours:
                raise SystemExit(f"error: --trace {zipped} exists and is no trace (it holds no trace.json): the trace "
                                 "would replace it whole; give a new name (or an earlier trace's zip)")
        return
    from .trace import is_trace_file

    folder = _file_key(Path(args.trace).absolute())
    for path, flag in ((args.image, "--image"), (args.output if args.image else None, "--output")):
        if path and is_trace_file(Path(path).name) and _file_key(Path(path).absolute().parent) == folder:
            raise UsageError(f"error: {flag} and --trace are the same file ({path}): the trace writes a file of that "
                             "name in its folder, and one would replace the other; give another name or another "
                             "trace folder")


def _check_distinct(files: list[tuple[str | None, str]]) -> None:
    """UsageError when two of the given (path, flag) name one file: an output would replace the image or list being
    read, or the other output."""
    seen: dict[object, str] = {}
    for path, flag in files:
        if not path:
            continue
        key = _file_key(path)
        if key in seen:
            raise UsageError(f"error: {seen[key]} and {flag} are the same file ({path}): writing one would replace "
                             "the other; give another name")
        seen[key] = flag


def _check_output_file(path: str, flag: str) -> None:
    """SystemExit naming `flag` unless `path` can be written as a file: not a folder, in a folder that takes files;
    creates nothing."""
    if Path(path).is_dir():
        raise SystemExit(f"error: {flag} {path} is a folder; give the file to write")
    _check_writable(Path(path).absolute().parent, f"{flag} {path}")


def _check_output_folder(path: str | Path, flag: str) -> None:
    """SystemExit naming `flag` unless `path` can be (or is) a folder that takes files; creates nothing."""
    if Path(path).exists() and not Path(path).is_dir():
        raise SystemExit(f"error: {flag} {path} is a file; give a folder")
    _check_writable(Path(path).absolute(), f"{flag} {path}")


def _check_new_folder(path: str | Path, flag: str) -> None:
    """`_check_output_folder`, and SystemExit when `path` holds anything: a command that writes a whole model there
    would mix it with (or write over) what is there, e.g. the --model or --base folder it reads."""
    _check_output_folder(path, flag)
    if Path(path).is_dir() and own_entries(path):
        raise SystemExit(f"error: {flag} {path} exists and is not empty: give a new or empty folder")


def cmd_train(args) -> int:
    """Train one stage from a config file plus dotted overrides."""
    from .config import load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as exc:  # the settings as typed (a file's or an override's)
        raise UsageError(f"error: {exc}") from None
    run = Path(cfg.output_dir)
    if args.resume and args.config:
        _check_resumed_folder(Path(args.config), run, args.overrides)
    # Before any model loads (else the first save fails). Nothing is created, so a run stopped by a mistyped setting
    # leaves no folder, and the processes of a multi-process launch do not race over one.
    _check_writable(run, f"output_dir {run}")
    with ExitStack() as held:
        if _main_process():  # the main process of a launch writes the run for them all
            try:  # two trainers in one folder (a --resume typed while the run still ran) wrote each step twice
                held.enter_context(files.run_lock(run))
            except files.FolderBusy as exc:
                raise SystemExit(f"error: output_dir {exc}, which trains there: wait for it to end, or stop it, then "
                                 "continue with --resume; or pick another output_dir") from None
        if os.environ.get("LOCAL_RANK", "0") in ("", "0"):  # once per machine of a launch, for all its devices
            _warn_of_other_trainers()
        return _train(cfg, run, args.resume, args.config)


def _last_line(exc: BaseException) -> str:
    """An error's message; for one a DataLoader worker raised (torch puts the worker's whole traceback in it), the
    message of its last line, without the exception's name."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if re.match(r"[\w.]+(Error|Exception): ", last) else last


def _check_resumed_folder(config: Path, run: Path, overrides) -> None:
    """UsageError when `--resume --config RUN/config.yaml` would continue another folder than RUN: the config keeps
    the output_dir the run was started with (relative to where it was started), so a run moved or renamed since, or
    resumed from another folder, trained again from step 0 into the old place, its checkpoints unused."""
    folder = config.parent
    from .training.checkpoint import earlier_run

    is_run = config.name == "config.yaml" and bool(earlier_run(folder))
    given = any(str(o).split("=", 1)[0].strip() == "output_dir" for o in overrides)
    if is_run and not given and folder.resolve() != run.resolve():
        raise UsageError(f"error: {config} is the config of the run in {folder}, but its output_dir is {run} (where "
                         f"it was started, from that folder; moved since?): add output_dir={folder} to continue it "
                         "there")


def _warn_of_other_trainers() -> None:
    """One line on stderr naming the other `npedit train` processes on this launch's devices (typed in a shell, an
    app's job, another launch), which it would share: said, not refused (two may fit one big GPU, or a CPU)."""
    import psutil
    import torch

    from .processes import launch_devices, sharing_warning

    try:
        line = sharing_warning(launch_devices(dict(os.environ), torch.cuda.is_available()))
    except (psutil.Error, OSError):  # a process table this system does not show: advice only, the run goes on
        return
    if line:
        print(line, file=sys.stderr)


def _main_process() -> bool:
    """Whether this is the main process of a launch (`accelerate launch` sets RANK), the one that writes the run."""
    return os.environ.get("RANK", "0") in ("", "0")


def _keep_given_config(config: str | None, run: Path, cfg) -> None:
    """When --config `config` is `run`'s own config.yaml, which the trainer writes the resolved config over, and not
    a file the trainer wrote: its bytes copied beside it first (config.given.yaml, or -2, -3, ... when that name holds
    other bytes), said on stderr; a config written by hand lost its comments and layout."""
    from .config import config_text, load_config

    own = run / "config.yaml"
    if not config or not own.is_file() or _file_key(config) != _file_key(own):
        return
    given = own.read_bytes()
    try:  # the file's own config as the trainer writes it (a resume from the config.yaml the trainer wrote)
        written = config_text(load_config(own)).encode()
    except ValueError:  # (valid only with this run's overrides: not the trainer's)
        written = None
    if given in (config_text(cfg).encode(), written):  # (this run's config: nothing would change)
        return
    for k in itertools.count(1):
        keep = run / f"config.given{f'-{k}' if k > 1 else ''}.yaml"
        if not keep.exists() or keep.read_bytes() == given:
            break
    write_atomic(keep, given)
    print(f"note: --config {config} is the run's own config.yaml, where the trainer writes the resolved config: your "
          f"file is kept as {keep}", file=sys.stderr)


def _train(cfg, run: Path, resume: bool, config: str | None = None) -> int:
    """`cmd_train` once its run folder is held: train the config into `run` (from its checkpoint with `resume`),
    keeping the bytes of a --config `config` that is the run's own config.yaml."""
    from .training.checkpoint import WriteError, earlier_run
    from .training.trainer import Trainer

    used = earlier_run(run)
    if used and not resume:  # a second run there would mix its metrics and checkpoints with the first's
        raise SystemExit(f"error: output_dir {run} already holds a run ({', '.join(used)}): add --resume to continue "
                         "it, or pick another output_dir")
    try:  # a setting that does not fit the data, the models or the checkpoint is one line, before any training
        trainer = Trainer(cfg)
        if resume and not trainer.resume():
            print(f"no checkpoint in {cfg.output_dir}/checkpoints; starting from step 0", file=sys.stderr)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from None
    if _main_process():
        try:
            _keep_given_config(config, run, cfg)
        except OSError as exc:  # (a full disk) before the file is written over, not after
            raise SystemExit(f"error: cannot keep a copy of --config {config} before the run writes over it: "
                             f"{exc.strerror or exc}") from None
    from .training.checkpoint import latest_checkpoint

    def kept(then: str = "") -> str:
        """What a stopped run keeps (checkpoints are published whole, so the newest one is complete)."""
        newest = latest_checkpoint(run / "checkpoints")
        return (f"{newest} is the newest complete checkpoint: {then}continue with the same command and --resume, or "
                f"export it (python -m npedit export {run})" if newest else "no checkpoint was saved yet")

    try:
        out = trainer.train()
    except WriteError as exc:  # a full or read-only disk: what is kept and what to do, in one line
        raise SystemExit(f"error: {exc}") from None
    except ImageError as exc:  # the data's images gone or unreadable midway (was an "unexpected" error)
        if os.environ.get(DEBUG_ENV):
            raise
        tqdm.write(f"error: {_last_line(exc)}; {kept('fix the data, then ')}", file=sys.stderr)
        raise SystemExit(1) from None
    except OSError as exc:  # a full disk while logging metrics, a folder gone: said with what is kept
        if os.environ.get(DEBUG_ENV):
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        tqdm.write(f"error: the run stopped: {exc.strerror or exc}{where}; {kept('free space (or fix that), then ')}",
                   file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:  # Ctrl-C
        tqdm.write(f"interrupted: {kept()}", file=sys.stderr)  # a line of its own, not after the progress bar
        raise SystemExit(INTERRUPTED) from None
    if trainer.acc.is_main_process:
        print(out)
    return 0


def cmd_export(args) -> int:
    """Export a run's checkpoint (the newest, or --step) as an NPEditPipeline folder; with --push, upload it."""
    from .adapters import adapter_size, export_adapters
    from .training.export import check_export_out, export_checkpoint

    if args.push and not re.fullmatch(r"[\w.-]+/[\w.-]+", args.push):
        raise UsageError(f"error: --push takes a hub repo id OWNER/NAME (e.g. alice/shapes-editor), got {args.push!r}")
    if args.out:  # (the default, inside the run, is checked by the run's own checks)
        _check_output_folder(args.out, "--out")
        try:  # before any model loads: an --out that is the run's checkpoints, or a folder of the user's own files
            check_export_out(args.run, args.out)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
    if args.adapters and args.average != 1:
        raise UsageError("error: --adapters exports one checkpoint's adapters; averaging factors of a low-rank update "
                         "is not averaging the update: drop --average, or export whole weights without --adapters")
    if args.average < 1:
        raise UsageError(f"error: --average takes a number of checkpoints >= 1, got {args.average}")
    if args.adapters and (args.metrics or args.license):
        raise UsageError("error: --metrics and --license go into a whole editor's model card; an adapter folder's "
                         "card is written from its run alone")
    if args.adapters and args.keep_paths:  # (it was silently ignored)
        raise UsageError("error: --keep-paths is for a whole editor; an adapter folder names its base and student "
                         "(local ones as absolute paths: a load needs them) and its run, judge and data by name only")
    # an existing --out keeps what this export does not rewrite (carried into the new folder), and a push uploads it
    earlier = _file_times(args.out) if args.out else {}
    try:
        metrics = _eval_report(args.metrics) if args.metrics else None
        if args.adapters:
            out = export_adapters(args.run, args.step, args.out, base=args.base)
            print(f"{adapter_size(out) / 2**20:.2f} MiB of adapters; loads with its base model", file=sys.stderr)
        else:
            out = export_checkpoint(args.run, args.step, args.out, base=args.base, average=args.average,
                                    keep_paths=args.keep_paths, license=args.license, metrics=metrics,
                                    repo_id=args.push)
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(out)
    now = _file_times(out)
    stale = sorted(name for name, time in earlier.items() if now.get(name) == time)
    named = f"({', '.join(stale[:5])}{', ...' if len(stale) > 5 else ''})"
    if stale and args.push:
        raise SystemExit(f"error: not pushed: {out} also holds files this export did not write {named}, and a push "
                         "uploads the whole folder: remove them, or export to a new folder")
    if stale:  # e.g. an earlier editor's critic/, which the app and edit --trace would take for this editor's
        print(f"note: {out} also holds files this export did not write {named}, left as they were: remove those "
              "of another editor (a critic/ is this editor's to the app), or export to a new folder", file=sys.stderr)
    if args.push:
        print(_push(out, args), file=sys.stderr)
    return 0


def _file_times(folder) -> dict[str, int]:
    """Each file under `folder` (relative, POSIX) -> its modification time in ns; {} when there is no such folder."""
    root = Path(folder)
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _eval_report(path: str) -> dict:
    """The `npedit eval shapes` report (JSON) that --metrics names, checked to be one."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"--metrics {path}: cannot read it as JSON ({exc})") from None
    if not isinstance(report, dict) or not isinstance(report.get("summary"), dict):
        raise ValueError(f"--metrics {path} is not a report of `python -m npedit eval shapes` (no \"summary\")")
    from .sharing import metrics_section

    try:  # before any weights are read: a report no editor's card may show (the teacher baseline's) is said now
        metrics_section(report)
    except ValueError as exc:
        raise ValueError(f"--metrics {path}: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:  # a "summary" or "meta" of another shape
        raise ValueError(f"--metrics {path} is not a report of `python -m npedit eval shapes` ({exc!r})") from None
    return report


def _push(out: Path, args) -> str:
    """Upload the exported folder to --push's repo, unless it holds a local path or a token (see `private_traces`);
    a folder that needs a local model to load (adapters naming a local base) is refused too."""
    from .adapters import META_FILE, is_adapter_folder
    from .sharing import is_hub_id, private_traces, push

    if is_adapter_folder(out):
        meta = json.loads((Path(out) / META_FILE).read_text(encoding="utf-8"))
        local = [f"{key} {meta[key]!r}" for key in ("base", "student") if meta.get(key) and not is_hub_id(meta[key])]
        if local:
            raise SystemExit(f"error: not pushed: the adapters name the local {' and '.join(local)}, which whoever "
                             "downloads them cannot load; export with --base HUB_ID (a student checkpoint must be "
                             f"on the hub too). The folder is {out}")
    traces = private_traces(out, (str(Path(args.run).resolve()),))
    if traces and not args.keep_paths:
        raise SystemExit(f"error: not pushed: {out} holds what should stay on this machine ({'; '.join(traces)}); "
                         "remove it, or pass --keep-paths to publish it as it is")
    try:
        return push(out, args.push, private=args.private)
    except Exception as exc:  # the hub client's errors (no login, no rights, no network) in one line
        raise SystemExit(f"error: the export is in {out}, but pushing it to {args.push} failed: "
                         f"{type(exc).__name__}: {exc}") from None


def cmd_import_reimpl(args) -> int:
    """Convert the authors' re-implementation's released Z-Image editor into an NPEditPipeline folder."""
    import torch

    from .reimpl import import_reimpl

    _check_new_folder(args.out, "--out")  # before a 6B state dict is read
    try:
        out = import_reimpl(args.checkpoint, args.base, args.out, torch_dtype=getattr(torch, args.dtype))
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    print(out)
    return 0


def _stage_config(stage: str, overrides: list[str]):
    """A Shapes training stage's config from `preset=NAME` and `key=value` overrides (ValueError: what is wrong)."""
    if stage == "judge":
        from .shapes.judge_training import build_config

        return build_config(overrides)
    from .shapes.recipes import make_config

    return make_config(stage, overrides)


def _stage_help(stage: str) -> str:
    """`shapes STAGE --help`: the stage's presets and every key it takes, with the default preset's values."""
    from .config import flatten, to_dict

    if stage == "judge":
        from .shapes.judge_training import PRESETS as presets
    else:
        from .shapes.recipes import PRESETS

        presets = PRESETS[stage]
    cfg = _stage_config(stage, [])

    keys = flatten({k: v for k, v in to_dict(cfg).items() if k != "preset"})
    return "\n".join([f"usage: {prog_name()} shapes {stage} [preset=NAME] [key=value ...]",
                      f"presets: {', '.join(presets)}", "keys (the default preset's values):",
                      *(f"  {k}={v}" for k, v in keys.items())])


def cmd_shapes(args) -> int:
    """Train a Shapes-world base-model stage (vae, teacher, judge) or evaluate the judge."""
    if args.stage not in ("judge-eval", "teacher-eval") and {"-h", "--help"} & set(args.overrides):
        print(_stage_help(args.stage))
        return 0
    if args.stage not in ("judge-eval", "teacher-eval"):  # the settings as typed: status 2, before any work
        try:
            _stage_config(args.stage, args.overrides)
        except ValueError as exc:
            raise UsageError(f"error: {exc}") from None
    if args.stage == "judge":
        from .shapes.judge_training import run
    elif args.stage == "judge-eval":
        from .shapes.judge_training import eval_main

        return eval_main(args.overrides, prog=f"{prog_name()} shapes judge-eval") or 0
    elif args.stage == "teacher-eval":
        from .shapes.recipes import teacher_eval_main

        try:
            return teacher_eval_main(args.overrides, prog=f"{prog_name()} shapes teacher-eval") or 0
        except (ValueError, FileNotFoundError, OSError) as exc:
            raise SystemExit(f"error: {exc}") from None
    else:
        from functools import partial

        from .shapes.recipes import run as run_stage

        run = partial(run_stage, args.stage)
    try:
        print(run(args.overrides))
    # (training.checkpoint.WriteError, an OSError: a full disk, what is kept, what to do; an output_dir that is a file)
    except (ValueError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    return 0


def cmd_eval(args) -> int:
    """Exact Shapes-world benchmark of an editor or the zero-shot teacher baseline."""
    from .shapes.evaluate import eval_main

    return eval_main(args)


def cmd_bench(args) -> int:
    """Latency, throughput and pipeline overhead of an editor on this machine."""
    from .bench import bench_main

    return bench_main(args)


def cmd_swap_vae(args) -> int:
    """Write a copy of an editor whose VAE is replaced by one sharing its latent space (e.g. a distilled fast VAE)."""
    from .backbones.vae import AnyVAE
    from .pipeline import NPEditPipeline, carry_over
    from .training.checkpoint import publishing

    src, out = Path(default_path("model", args.model)), Path(args.out)
    _check_new_folder(out, "--out")  # before the models load
    try:
        pipe = NPEditPipeline.from_pretrained(str(src)).with_vae(AnyVAE.from_pretrained(args.vae))
    except (ValueError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        with publishing(out) as folder:  # whole or not at all: a half editor at --out would load, or block a rerun
            pipe.save_pretrained(folder)
            carry_over(src, folder, f"Its VAE was replaced by `{args.vae}` (`python -m npedit swap-vae`; same latent "
                                    "space).")
    except OSError as exc:  # a full disk (checkpoint.WriteError: what is kept), a folder made read-only meanwhile
        raise SystemExit(f"error: {exc}") from None
    print(out)
    return 0


def _bundled(text: str) -> str:
    """An input path, with `assets/...` and `configs/...` read from the bundle when missing here (an installed package
    run from another folder); a missing bundle is one line saying how to get it."""
    missing = bundle_missing(text)
    if missing:
        raise argparse.ArgumentTypeError(missing)
    return in_bundle(text)


MODULE_PROG = "python -m npedit"
DEBUG_ENV = "NPEDIT_DEBUG"  # set: an unexpected failure, or Ctrl-C, shows its traceback
INTERRUPTED = 130  # the shell's status for a process stopped by Ctrl-C (128 + SIGINT)


def prog_name() -> str:
    """How this process started the CLI: the console script's own name (`npedit`), else `python -m npedit`."""
    started = sys.modules.get("__main__")
    # pip's console script imports `main` into the script it runs; argparse's default (argv[0]'s base name) would say
    # "__main__.py" for `python -m npedit`, and "pytest" or a script's name when another program calls main()
    by_module = getattr(getattr(started, "__spec__", None), "name", "") == "npedit.__main__"
    if not by_module and getattr(started, "main", None) is main and sys.argv and sys.argv[0]:
        return Path(sys.argv[0]).name
    return MODULE_PROG


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog_name(), description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    e = sub.add_parser("edit", help="edit images with a trained editor")
    e.add_argument("--image", type=_bundled, help="input image")
    e.add_argument("--instruction", help="what to change")
    e.add_argument("--output", help="where the result goes: .png (lossless), .jpg, .webp, .bmp or .tif")
    e.add_argument("--batch", type=_bundled, help="cases.jsonl with {id, image, instruction[, edit_type, object_name, "
                   "keep, new, gone]} per line, or cases.csv with those columns (the last five: the judge's questions)")
    e.add_argument("--output-dir", help="where --batch writes <id>.png")
    e.add_argument("--model", type=_bundled,
                   help="NPEditPipeline folder or hub id (default: the bundled Shapes-world editor)")
    e.add_argument("--revision", help="with a hub id: its branch, tag or commit (default: main); offline, the "
                                      "cache's snapshot of it")
    e.add_argument("--steps", type=int, default=4)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="longest side a general editor works at "
                   f"(default {DEFAULT_MAX_SIDE}, as in the app; an editor trained at one resolution, e.g. a "
                   "Shapes-world editor's 64 px, works at that: a note on stderr says when an image is scaled)")
    e.add_argument("--candidates", type=int, default=1, help="sample this many edits and keep the one the judge "
                   "rates highest (best-of-N; 1: a single edit); with --refine, each is refined and the lowest "
                   "final judge loss kept")
    e.add_argument("--judge", type=_bundled, help="judge for --candidates, --verdicts and --refine (default: the "
                   "bundled Shapes-world judge)")
    e.add_argument("--refine", type=int, default=0, metavar="K", help="refine the edit with K judge-guided Adam steps "
                   "on its latents (npedit.refine; the judge's questions: --edit-type, --object, --keep, or a --batch "
                   "line's edit_type, object_name, keep, new, gone; 0: off); one stderr line per edit says the judge's "
                   "loss before -> after")
    _refine_settings_flags(e)
    e.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="the editor's and the judge's weights in this dtype (default auto: bfloat16 on a GPU, "
                        "float32 on a CPU)")
    e.add_argument("--judge-max-pixels", type=int, help="a Qwen2.5-VL judge sees at most this many pixels per image "
                   "(e.g. 200704 = 448x448; default: its processor's own cap)")
    e.add_argument("--edit-type", default="edit", type=_edit_type, help="for the judge's questions: one of "
                   f"{', '.join(EDIT_TYPES)} (--batch lines: edit_type)")
    e.add_argument("--object", help="the removed object's name, for --edit-type remove (--batch lines: object_name)")
    e.add_argument("--keep", help="objects the edit must leave in place, separated by ';' (or ',' in a text without "
                   "';': 'red circle, blue square' is two) (a keep check each; --batch lines: keep)")
    e.add_argument("--verdicts", help="judge each result and write one JSON line per edit: the input line's fields, "
                   "the result as 'target', the judge's score, p_edit, p_identity, p_keep (a training manifest)")
    e.add_argument("--trace", metavar="DIR_OR_ZIP", help="also record the edit's sampling steps (one --image): each "
                   "step's x0 (step-N-x0.png), its DMD map (step-N-dmd.npy, step-N-dmd.png), the judge's P(edit done) "
                   "and identity P(Yes) on it, in trace.json (with the seed, steps, instruction and models) and "
                   "steps.csv; with --refine also refined.png and trace.json's \"refinement\" (settings, loss per "
                   "step); a folder, or one zip if it ends in .zip (the app's Edit tab download, the same files)")
    e.add_argument("--caption", help="with --trace: the target caption c^x the teacher and critic see for the DMD maps "
                   "(default: the instruction)")
    e.add_argument("--teacher", help="with --trace: the teacher (text-to-image base folder) of the DMD maps (default: "
                   "the editor's training config's model.base, else the bundled teacher)")
    e.add_argument("--critic", help="with --trace: the critic of the DMD maps (default: the editor's own critic/, or "
                   "the critic/ beside a run's pipeline/; none: no maps)")
    e.add_argument("--min-score", type=float, help="leave edits the judge scores below this out of --verdicts "
                   "(score: the sum of log P(expected answer); e.g. -0.5)")
    e.set_defaults(func=cmd_edit)

    j = sub.add_parser("judge", help="ask the judge about an edit")
    j.add_argument("--reference", type=_bundled)
    j.add_argument("--edited", type=_bundled)
    j.add_argument("--instruction")
    j.add_argument("--edit-type", default="edit", type=_edit_type, help=f"one of {', '.join(EDIT_TYPES)}")
    j.add_argument("--object", help="the removed object's name (for --edit-type remove)")
    j.add_argument("--keep", help="objects the edit must leave in place, separated by ';' (or ',' in a text without "
                                  "';': 'red circle, blue square' is two) (a keep check each; p_keep = the lowest of "
                                  "their P(Yes))")
    j.add_argument("--new", help="objects the edit creates, separated by ';' or ',' (a change check each, expected "
                                 "Yes)")
    j.add_argument("--gone", help="objects the edit must make disappear, separated by ';' or ',' (a change check "
                                  "each, expected No; p_change = the lowest P(expected answer) of the change checks)")
    j.add_argument("--extra", action="append", default=[], metavar="QUESTION",
                   help="a free-form Yes/No question about both images, asked as typed (expected Yes; not part of the "
                        "training signal); repeat it for more (the app's extra questions); with --batch, asked of "
                        "every pair after its own (a list's extra column)")
    j.add_argument("--judge", type=_bundled, help="judge folder or hub id: LLaVA-OneVision, Qwen2.5-VL or "
                                                   "InternVL3-hf (default: the bundled Shapes-world judge)")
    j.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="the judge's weights in this dtype (default auto: bfloat16 on a GPU, where it halves a real "
                        "judge's memory, float32 on a CPU)")
    j.add_argument("--max-pixels", "--judge-max-pixels", type=int, dest="max_pixels",  # (edit's and the app's name)
                   help="Qwen2.5-VL judges: at most this many pixels per image (e.g. 200704 = 448x448; default: its "
                        "processor's own cap)")
    j.add_argument("--batch", type=_bundled,
                   help="PAIRS.jsonl or PAIRS.csv with reference, edited, instruction[, id (default: the "
                                   "line number), edit_type, object_name (or object), keep, new, gone, extra (Yes/No "
                                   "questions separated by ';')] per pair; "
                                   "relative image paths from the list's folder (the app's batch list, the same rows)")
    j.add_argument("--output", help="where --batch writes a row per pair (CSV if it ends in .csv, else JSON "
                                    "lines): id, reference, edited, instruction, edit_type, p_edit, p_identity, "
                                    "p_keep, p_change, error")
    j.add_argument("--questions", help="with --batch: also a row per question (CSV or JSON lines, as --output): id, "
                                       "reference, edited, instruction, kind, question, images, expected, p_yes, "
                                       "margin, p_yes_or_no, error")
    j.add_argument("--gradients", metavar="FILE.npz",
                   help="also write where each answer comes from: d log P(expected answer) / d pixel of the edited "
                        "image per question (grads, (Q, 3, H, W)), their mean over the questions NP-Edit trains on "
                        "(training), the image as differentiated (image) and the questions (a JSON string); read it "
                        "with npedit.verdicts.AnswerGradients.load")
    j.set_defaults(func=cmd_judge)

    t = sub.add_parser("train", help="train a stage (warmup, npedit, sft; critic: fit a critic to an editor)")
    t.add_argument("--config", type=_bundled, help="YAML config file")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of output_dir")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_steps=100 optim.lr=1e-4")
    t.set_defaults(func=cmd_train)

    x = sub.add_parser("export", help="turn a run's checkpoint into an editor (NPEditPipeline folder), e.g. of a run "
                                      "killed halfway or an earlier step")
    x.add_argument("run", help="the run folder (output_dir of `train`)")
    x.add_argument("--step", type=int, help="the checkpoint's step (default: the newest complete checkpoint)")
    x.add_argument("--out", help="where the pipeline goes (default: RUN/exports/step_N)")
    x.add_argument("--base", type=_bundled, help="the base model whose text encoder and VAE complete it (default: the "
                   "run's model.base; e.g. when that was a relative path or has moved)")
    x.add_argument("--average", type=int, default=1, metavar="K",
                   help="save the mean of the student's weights over the K newest checkpoints up to --step (default 1: "
                        "that checkpoint alone); out defaults to RUN/exports/step_N-avgK")
    x.add_argument("--adapters", action="store_true",
                   help="a LoRA run (model.lora_rank): write its adapters alone (diffusers' LoRA layout) plus the "
                        "names of the base model they adapt, a folder of megabytes that --model, the app and "
                        "NPEditPipeline.from_pretrained load; out defaults to RUN/exports/step_N-lora")
    x.add_argument("--keep-paths", action="store_true",
                   help="keep the run's local paths (base, student, judge, data, run folder) in training_config.json "
                        "and the card as they are; by default they are named only (`local:NAME`; hub ids and "
                        "bundled assets/ paths stay), so the folder can be shared")
    x.add_argument("--license", help="the Hub license id for the model card (e.g. apache-2.0; default: other); it "
                                     "must allow what the base model's license allows")
    x.add_argument("--metrics", metavar="REPORT.json",
                   help="an `npedit eval shapes` report of this editor: its table goes into the model card")
    x.add_argument("--push", metavar="OWNER/NAME",
                   help="then upload the folder to this Hugging Face model repo (created if missing; huggingface_hub's "
                        "upload_folder, logged in with `hf auth login` or HF_TOKEN); refused while the folder holds a "
                        "local path or a token, unless --keep-paths")
    x.add_argument("--private", action="store_true", help="with --push: create the repo private")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("import-reimpl", help="convert the NP-Edit authors' re-implementation's released Z-Image "
                                             "editor (a .pt state dict) into an editor folder (safetensors)")
    r.add_argument("checkpoint", help="the state dict, e.g. zimage_npedit_internvl.pt from the hub repo "
                                      "nupurkmr9/npedit (read with weights_only=True: no code in it runs)")
    r.add_argument("--base", required=True, help="the Z-Image model it was trained from (folder or hub id, e.g. "
                                                 "Tongyi-MAI/Z-Image): its text encoder, tokenizer and VAE")
    r.add_argument("--out", required=True, help="where the NPEditPipeline folder goes")
    r.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16",
                   help="the saved weights' dtype (default bfloat16, as trained)")
    r.set_defaults(func=cmd_import_reimpl)

    s = sub.add_parser("shapes", help="train the Shapes-world base models (vae, teacher, judge) or evaluate the judge "
                                      "or the teacher")
    s.add_argument("stage", choices=["vae", "teacher", "fast-vae", "ref-encoder", "judge", "judge-eval", "teacher-eval"])
    s.add_argument("overrides", nargs=argparse.REMAINDER, help="preset=NAME and dotted key=value overrides")
    s.set_defaults(func=cmd_shapes)

    v = sub.add_parser("eval", help="exact Shapes-world benchmark (per-category table, JSON + Markdown)")
    v.add_argument("domain", choices=["shapes"])
    v.add_argument("--model", type=_bundled, help="NPEditPipeline folder (default: the bundled Shapes editor)")
    v.add_argument("--baseline", choices=["teacher"], help="evaluate the zero-shot teacher (SDEdit with c^x) instead")
    v.add_argument("--teacher", type=_bundled, help="teacher base folder for --baseline teacher (default: bundled)")
    v.add_argument("--strength", type=float, default=0.6, help="SDEdit noise level for --baseline teacher")
    v.add_argument("--teacher-steps", type=int, default=16)
    v.add_argument("--n", type=int, default=300)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--steps", type=int, default=4)
    v.add_argument("--train-pool", type=int, metavar="P", help="score the first --n cases a run trained on (data.train="
                   "shapes with data.pool=P and --train-seed; canonical instructions) instead of held-out cases: "
                   "how well an editor fits its training cases")
    v.add_argument("--train-seed", type=int, default=0, help="the training run's seed, for --train-pool (default 0)")
    v.add_argument("--candidates", type=int, default=1, help="sample this many edits per case and keep the one the "
                   "judge (--judge, default the bundled one) rates highest (best-of-N; 1: a single edit)")
    v.add_argument("--change-checks", action="store_true", help="with --candidates: the judge's pick also weighs a "
                   "check per object the instruction creates (expected there) or makes disappear (expected gone)")
    v.add_argument("--refine", type=int, default=0, metavar="K", help="refine each edit with K judge-guided steps "
                   "on its latents (npedit.refine; the judge: --judge, default the bundled one; 0: off); with "
                   "--candidates N, every candidate is refined and the lowest judge loss kept; with --baseline "
                   "teacher, the teacher's SDEdit outputs are refined (teacher and judge, no editor)")
    _refine_settings_flags(v)
    v.add_argument("--judge", type=_bundled, help="also ask this judge (a folder, or 'bundled') about every edit and "
                                                   "report how often its answers match the exact scorer")
    v.add_argument("--name", help="report name (default: the model folder's name, then each setting given that "
                                  "differs from its default, e.g. editor-refined-20-seed1)")
    v.add_argument("--out", default="runs/eval", help="where <name>.json and <name>.md go")
    v.set_defaults(func=cmd_eval)

    w = sub.add_parser("swap-vae", help="copy an editor with its VAE replaced (same latent space, e.g. a fast VAE)")
    w.add_argument("--model", type=_bundled, help="NPEditPipeline folder (default: the bundled Shapes editor)")
    w.add_argument("--vae", type=_bundled, required=True, help="the new VAE folder (AutoencoderKL or PatchAutoencoder)")
    w.add_argument("--out", required=True, help="where the new pipeline is written")
    w.set_defaults(func=cmd_swap_vae)

    b = sub.add_parser("bench", help="measure edit latency, throughput and pipeline overhead on this machine")
    b.add_argument("--model", type=_bundled, help="NPEditPipeline folder (default: the bundled Shapes editor)")
    b.add_argument("--teacher", type=_bundled, help="teacher base folder for the zero-shot baseline (default: bundled)")
    b.add_argument("--teacher-steps", type=int, default=16)
    b.add_argument("--size", type=int, default=64)
    b.add_argument("--steps", type=int, default=4)
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--repeats", type=int, default=20)
    b.add_argument("--instruction", default="make the circle blue")
    b.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    b.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="editor and teacher (default auto: bfloat16 on a GPU, float32 on a CPU, as `edit` does)")
    b.add_argument("--refine", type=int, default=0, metavar="K", help="also time an edit refined with K judge-guided "
                   "steps (`edit --refine K`; its default step size and anchor; 0: not timed)")
    b.add_argument("--judge", type=_bundled, help="the judge of --refine (default: the bundled Shapes-world judge)")
    b.add_argument("--json", action="store_true", help="also print one JSON line")
    b.set_defaults(func=cmd_bench)
    return parser


def _stdout_gone() -> bool:
    """Whether stdout is a pipe whose reader has left: what is buffered cannot be flushed, or (nothing buffered) the
    pipe reports an error (POSIX)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLERR)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # (no poll on Windows; a stdout with no file descriptor)
        return False


def _quiet_stdout() -> None:
    """Point stdout at the null device: its reader has gone, and Python's flush at exit would fail once more."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
    except (OSError, ValueError):  # (a stdout with no file descriptor: a test's capture)
        pass


def main(argv: list[str] | None = None) -> int:
    from .folders import BaseNotFound, CheckpointError

    if callable(getattr(sys.stdout, "reconfigure", None)):
        # a path or text the output's encoding cannot write (Windows' cp1252 when redirected to a file: a Chinese
        # folder name) is shown escaped, as Python's stderr does, instead of failing the command after its work
        sys.stdout.reconfigure(errors="backslashreplace")
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except BrokenPipeError:  # `--help | head`
        _quiet_stdout()
        raise SystemExit(1) from None
    if extra:  # `train a=1 --resume b=2`: overrides after a flag are still overrides (argparse stops at the flag)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except UsageError as exc:  # status 2 carries no message of its own
        print(exc, file=sys.stderr)
        raise
    except (CheckpointError, BaseNotFound) as exc:  # a model path that is not what the command needs: one line
        raise SystemExit(f"error: {exc}") from None
    except KeyboardInterrupt:  # Ctrl-C: a line, not the traceback of wherever it landed (files are written whole)
        if os.environ.get(DEBUG_ENV):
            raise
        tqdm.write("interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    except Exception as exc:  # a failure no command foresaw: one line and how to see where it came from
        if isinstance(exc, BrokenPipeError) and _stdout_gone():  # the output's reader left (`| head`): nothing more
            _quiet_stdout()                                        # to say to it (another pipe's error is one below)
            raise SystemExit(1) from None
        if os.environ.get(DEBUG_ENV):
            raise
        raise SystemExit(f"error: {type(exc).__name__}: {exc} (unexpected; {DEBUG_ENV}=1 shows the traceback)") \
            from None
