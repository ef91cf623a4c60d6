"""The judge inspector's tables: one verdict question by question, and many (reference, edited) pairs at once."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pandas as pd

from npedit.pairs import LIST_SUFFIXES, QUESTION_COLUMNS, VERDICT_COLUMNS, Pair, RowWriter
from npedit.pairs import judge_pairs as judge_rows
from npedit.pairs import read_pairs as read_pairs_of
from npedit.verdicts import SHOWN_DECIMALS, Verdict

from .datasets import resolve_image


def verdict_table(verdict: Verdict) -> pd.DataFrame:
    """One row per question: kind, P(Yes) of the two answers, the Yes-minus-No logit margin, the two answers' share of
    the full vocabulary, expected answer, what it shows and the question."""
    rows = [{"kind": q["kind"], "P(Yes)": round(q["p_yes"], SHOWN_DECIMALS),
             "margin (logit Yes − No)": round(q["margin"], SHOWN_DECIMALS),
             "P(Yes or No), full vocab": round(q["p_yes_or_no"], SHOWN_DECIMALS),
             "expected": q["expected"], "images": " + ".join(q["images"]), "question": q["text"]}
            for q in verdict.questions]
    return pd.DataFrame(rows)


def extra_questions(text: str | None) -> list[str]:
    """Free-form questions, one per line (blank lines ignored)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def read_pairs(files: list[str | os.PathLike], uploads_only: bool = False, max_pairs: int | None = None) -> list[Pair]:
    """The pairs of the one .csv/.jsonl among `files` (npedit.pairs.read_pairs: what `python -m npedit judge --batch`
    reads); image names resolve to the other uploaded files first.

    Names that match no upload resolve as the CLI resolves them (from the list file's folder); with `uploads_only` (a
    public app) every image must be one of the uploaded files; with `max_pairs` (a public app) a longer list is
    refused.
    """
    files = [Path(f) for f in files or []]
    lists = [f for f in files if f.suffix.lower() in LIST_SUFFIXES]
    if len(lists) != 1:
        raise ValueError("upload exactly one .csv or .jsonl list of pairs (columns reference, edited, instruction; "
                         "optional id, edit_type, object_name, keep, new, gone, extra) together with the images it "
                         "names")
    listing = lists[0]
    uploads = {f.name: str(f) for f in files if f != listing}  # any extension: the loader says which it cannot read
    pairs = read_pairs_of(listing, label=listing.name)
    if max_pairs is not None and len(pairs) > max_pairs:
        raise ValueError(f"{listing.name} lists {len(pairs)} pairs: this public app judges at most {max_pairs} per "
                         "list (split it, or run the app on your own machine)")
    out = []
    for p in pairs:
        paths = {}
        for key in ("reference", "edited"):
            name = getattr(p, key)
            if not name:  # no image: that pair's error when it is judged, as in the CLI
                continue
            try:
                found = resolve_image(name, uploads, within=[] if uploads_only else None)
            except ValueError as exc:
                raise ValueError(f"{listing.name}:{p.line}: {exc}") from None
            paths[f"{key}_path"] = str(found) if Path(name).name in uploads else getattr(p, f"{key}_path")
        out.append(replace(p, **paths))
    return out


def judge_pairs(judge, pairs: list[Pair], progress: Callable[[float, str], None] | None = None,
                named: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The verdict rows and question rows of every pair (npedit.pairs.judge_pairs: what `python -m npedit judge
    --batch` writes), unrounded; with `named` (the app) errors name images as the list does, never by their
    path on this machine."""
    verdicts, questions = [], []
    for i, (row, asked) in enumerate(judge_rows(judge, pairs, named=named)):
        verdicts.append(row)
        questions += asked
        if progress:
            progress((i + 1) / len(pairs), f"judged pair {i + 1}/{len(pairs)}")
    return pd.DataFrame(verdicts, columns=VERDICT_COLUMNS), pd.DataFrame(questions, columns=QUESTION_COLUMNS)


def write_rows(path: str | os.PathLike, table: pd.DataFrame) -> None:
    """`table`'s rows as `python -m npedit judge --batch` writes them (.csv or .jsonl, every digit)."""
    with RowWriter(path, list(table.columns)) as f:
        for row in table.astype(object).where(table.notna(), None).to_dict("records"):
            f.write(row)
