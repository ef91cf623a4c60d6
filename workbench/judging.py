"""The judge inspector's tables: one verdict question by question, and many (reference, edited) pairs at once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pandas as pd

from npedit.data import object_names, read_json_lines
from npedit.images import ImageError
from npedit.verdicts import Verdict, judge_edit

from .datasets import resolve_image

# reference/edited: the images' paths on this machine; reference_name/edited_name: as the list names them
PAIR_COLUMNS = ["id", "reference", "edited", "instruction", "edit_type", "object_name", "keep", "new", "gone",
                "reference_name", "edited_name"]
RESULT_COLUMNS = ["id", "instruction", "edit_type", "p_edit", "p_identity", "p_keep", "p_change", "error"]
# tables show P(Yes) and margins to 1e-6, so they read as `python -m npedit judge` prints them (to 1e-5); files keep
# every digit
SHOWN_DECIMALS = 6


def verdict_table(verdict: Verdict) -> pd.DataFrame:
    """One row per question: kind, what it shows, expected answer, P(Yes) and the Yes-minus-No logit margin."""
    rows = [{"kind": q["kind"], "P(Yes)": round(q["p_yes"], SHOWN_DECIMALS),
             "margin (logit Yes − No)": round(q["margin"], SHOWN_DECIMALS),
             "expected": q["expected"], "images": " + ".join(q["images"]), "question": q["text"]}
            for q in verdict.questions]
    return pd.DataFrame(rows)


def extra_questions(text: str | None) -> list[str]:
    """Free-form questions, one per line (blank lines ignored)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def _read_rows(path: Path) -> list[dict]:
    if path.suffix.lower() == ".csv":
        try:
            return pd.read_csv(path, dtype=str, keep_default_na=False).to_dict("records")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path.name} is not a readable CSV list of pairs: {exc}") from None
    return [row for _, row in read_json_lines(path, text=("instruction", "edit_type", "object_name", "object"),
                                              label=path.name)]


def read_pairs(files: list[str | os.PathLike], uploads_only: bool = False,
               max_pairs: int | None = None) -> pd.DataFrame:
    """The pairs listed in the one .csv/.jsonl among `files`; image names resolve to the other uploaded files.

    Columns: reference, edited, instruction (required); id, edit_type, object_name (or object), keep (objects to
    leave in place, separated by ';'), new and gone (objects the edit creates / must make disappear) optional.
    Relative paths that match no upload resolve against the list file's folder; with `uploads_only` (a public app)
    every image must be one of the uploaded files; with `max_pairs` (a public app) a longer list is refused.
    """
    files = [Path(f) for f in files or []]
    lists = [f for f in files if f.suffix.lower() in (".csv", ".jsonl", ".json")]
    if len(lists) != 1:
        raise ValueError("upload exactly one .csv or .jsonl list of pairs (columns reference, edited, instruction; "
                         "optional id, edit_type, object_name) together with the images it names")
    listing = lists[0]
    uploads = {f.name: str(f) for f in files if f != listing}  # any extension: the loader says which it cannot read
    rows = _read_rows(listing)
    if max_pairs is not None and len(rows) > max_pairs:
        raise ValueError(f"{listing.name} lists {len(rows)} pairs: this public app judges at most {max_pairs} per list "
                         "(split it, or run the app on your own machine)")
    out = []
    for i, row in enumerate(rows, 1):
        missing = [k for k in ("reference", "edited", "instruction") if not str(row.get(k) or "").strip()]
        if missing:
            raise ValueError(f"{listing.name} row {i}: missing {', '.join(missing)}")
        paths = {}
        for key in ("reference", "edited"):
            try:
                p = resolve_image(str(row[key]), uploads, within=[] if uploads_only else None)
            except ValueError as exc:
                raise ValueError(f"{listing.name} row {i}: {exc}") from None
            paths[key] = str(p if p.is_absolute() or p.exists() else listing.parent / p)
        out.append({"id": str(row.get("id") or i), **paths, "instruction": str(row["instruction"]),
                    "edit_type": str(row.get("edit_type") or "edit"),
                    "object_name": str(row.get("object_name") or row.get("object") or ""),
                    **{k: "; ".join(object_names(row.get(k))) for k in ("keep", "new", "gone")},
                    "reference_name": str(row["reference"]).strip(), "edited_name": str(row["edited"]).strip()})
    if not out:
        raise ValueError(f"{listing.name} lists no pairs")
    return pd.DataFrame(out, columns=PAIR_COLUMNS)


def judge_pairs(judge, pairs: pd.DataFrame, progress: Callable[[float, str], None] | None = None,
                named: bool = False) -> pd.DataFrame:
    """P(edit done) and P(identity kept) for every pair, unrounded; a pair that cannot be judged gets its error
    instead, which with `named` (a public app) names each image as the list does, never by its path on this machine."""
    rows = []
    for i, p in enumerate(pairs.itertuples(index=False)):
        if progress:
            progress(i / len(pairs), f"judging pair {i + 1}/{len(pairs)}")
        row = {"id": p.id, "instruction": p.instruction, "edit_type": p.edit_type, "p_edit": None,
               "p_identity": None, "p_keep": None, "p_change": None, "error": ""}
        try:
            v = judge_edit(judge, p.reference, p.edited, p.instruction, edit_type=p.edit_type,
                           object_name=p.object_name or None, keep=object_names(p.keep), new=object_names(p.new),
                           gone=object_names(p.gone))
            row.update(p_edit=v.p_edit, p_identity=v.p_identity, p_keep=v.p_keep, p_change=v.p_change)
        except (ImageError, ValueError) as exc:
            row["error"] = as_named(str(exc), p) if named else str(exc)
        rows.append(row)
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def as_named(message: str, pair) -> str:
    """`message` with the pair's image paths on this machine (an upload's is gradio's copy, /tmp/gradio/<hash>/x.png)
    replaced by the names the list gives them, and any other mention of their folders dropped."""
    images = [(getattr(pair, key), getattr(pair, f"{key}_name", None) or Path(getattr(pair, key)).name)
              for key in ("reference", "edited")]
    for path, name in sorted(images, key=lambda image: -len(image[0])):  # longest first: one path may start another
        message = message.replace(path, name)
    for path, _ in images:
        if Path(path).is_absolute():
            message = message.replace(str(Path(path).parent) + os.sep, "")
    return message
