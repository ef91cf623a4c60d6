"""Lists of (reference, edited) pairs for the judge: read from JSON lines or CSV, judged into a row per pair and a row
per question. One builder for `python -m npedit judge --batch` and the app's batch inspection, so both take the same
lists and give the same rows."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .data import CSV_SUFFIXES, joined_names, object_names, read_rows
from .edit_types import edit_type_name
from .files import ReplacedWhenDone
from .images import ImageError

LIST_SUFFIXES = (".jsonl", ".json", *CSV_SUFFIXES)  # what read_rows reads: a CSV by its suffix, else JSON lines
REQUIRED = ("reference", "edited", "instruction")
# reference/edited: the images as the list names them, in every row (a row read alone says which pair it is)
VERDICT_COLUMNS = ["id", "reference", "edited", "instruction", "edit_type", "p_edit", "p_identity", "p_keep",
                   "p_change", "error"]
QUESTION_COLUMNS = ["id", "reference", "edited", "instruction", "kind", "question", "images", "expected", "p_yes",
                    "margin", "p_yes_or_no", "error"]


@dataclass(frozen=True)
class Pair:
    """One pair of a list: `reference`/`edited` as the list names them, `*_path` where this machine reads them."""

    id: str
    reference: str
    edited: str
    instruction: str
    reference_path: str
    edited_path: str
    edit_type: str = "edit"
    object_name: str = ""
    keep: str = ""  # object names separated by "; "
    new: str = ""
    gone: str = ""
    extra: tuple[str, ...] = ()  # free-form Yes/No questions about both images, expected Yes (the CLI's --extra)
    line: int = 0  # where the list has it (a CSV's header is line 1)


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def image_path(listing: str | os.PathLike, name: str) -> str:
    """Where an image a list names is read: an absolute (or ~) path as it is, a relative one from the list's folder;
    "" stays "" (no image, which the loader names as such, not the list's folder)."""
    if not name:
        return ""
    path = Path(name).expanduser()
    return str(path if path.is_absolute() else Path(listing).parent / path)


def extra_questions(value) -> tuple[str, ...]:
    """A list's `extra` questions: a JSON list of questions, or one text of them separated by ';' (as keep lists are,
    but never by ',': a question's own commas stay) or by line breaks; blank ones dropped. ValueError otherwise."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        items = value.replace(";", "\n").splitlines()
    elif isinstance(value, list) and all(isinstance(q, str) for q in value):
        items = value
    else:
        raise ValueError(f"extra must be questions: a list of strings, or one string separated by ';', got {value!r}")
    return tuple(q.strip() for q in items if q.strip())


def read_pairs(path: str | os.PathLike, label: str | None = None) -> list[Pair]:
    """The pairs of a .jsonl, .csv or .tsv list: reference, edited, instruction required; id (default: the line number),
    edit_type, object_name (or object), keep, new, gone and extra (`extra_questions`) optional. A list without a
    required key or column, or with a line that cannot be read, is a ValueError naming it as `label`:N (`label`
    defaults to the path), before any pair is judged; a blank image or instruction is that pair's error when it is
    judged (the others still are)."""
    path = Path(path)
    label = label or str(path)
    if path.suffix.lower() not in LIST_SUFFIXES:
        raise ValueError(f"{label}: a list of pairs is a .jsonl, .csv or .tsv file")
    if not path.is_file():
        raise ValueError(f"{label} not found")
    rows = read_rows(path, REQUIRED, text=(*REQUIRED, "edit_type", "object_name", "object"), label=label,
                     what="list of pairs")
    pairs = []
    for n, row in rows:
        try:
            edit_type = edit_type_name(_text(row.get("edit_type")) or None)
            extra = extra_questions(row.get("extra"))
        except ValueError as exc:
            raise ValueError(f"{label}:{n}: {exc}") from None
        reference, edited = _text(row["reference"]), _text(row["edited"])
        pairs.append(Pair(id=_text(row.get("id")) or str(n), reference=reference, edited=edited,
                          instruction=row["instruction"] or "", reference_path=image_path(path, reference),
                          edited_path=image_path(path, edited), edit_type=edit_type,
                          object_name=_text(row.get("object_name")) or _text(row.get("object")),
                          **{k: joined_names(row.get(k)) for k in ("keep", "new", "gone")}, extra=extra, line=n))
    if not pairs:
        raise ValueError(f"{label} lists no pairs")
    return pairs


def as_named(message: str, pair: Pair) -> str:
    """`message` with the pair's image paths on this machine (an upload's is gradio's copy, /tmp/gradio/<hash>/x.png)
    replaced by the names the list gives them, and any other mention of their folders dropped."""
    images = [(pair.reference_path, pair.reference), (pair.edited_path, pair.edited)]
    for path, name in sorted(images, key=lambda image: -len(image[0])):  # longest first: one path may start another
        message = message.replace(path, name)
    for path, _ in images:
        if Path(path).is_absolute():
            message = message.replace(str(Path(path).parent) + os.sep, "")
    return message


def judge_pairs(judge, pairs: Iterable[Pair], named: bool = False) -> Iterator[tuple[dict, list[dict]]]:
    """For each pair, its verdict row (VERDICT_COLUMNS) and its question rows (QUESTION_COLUMNS), every digit kept.
    A pair that cannot be judged gets its reason in `error` (one question row, with it) and the others go on; with
    `named` (the app) the reason names images as the list does, never by their path on this machine."""
    from .verdicts import judge_edit

    for p in pairs:
        names = {"id": p.id, "reference": p.reference, "edited": p.edited, "instruction": p.instruction}
        try:
            v = judge_edit(judge, p.reference_path, p.edited_path, p.instruction, edit_type=p.edit_type,
                           object_name=p.object_name or None, keep=object_names(p.keep), new=object_names(p.new),
                           gone=object_names(p.gone), extra=list(p.extra))
        except (ImageError, ValueError) as exc:  # this pair fails, the others are still judged
            error = as_named(str(exc), p) if named else str(exc)
            yield ({**dict.fromkeys(VERDICT_COLUMNS), **names, "edit_type": p.edit_type, "error": error},
                   [{**dict.fromkeys(QUESTION_COLUMNS), **names, "error": error}])
            continue
        yield ({**names, "edit_type": p.edit_type, "p_edit": v.p_edit, "p_identity": v.p_identity,
                "p_keep": v.p_keep, "p_change": v.p_change, "error": ""},
               [{**names, "kind": q["kind"], "question": q["text"], "images": " + ".join(q["images"]),
                 "expected": q["expected"], "p_yes": q["p_yes"], "margin": q["margin"],
                 "p_yes_or_no": q["p_yes_or_no"], "error": ""}
                for q in v.questions])


class RowWriter:
    """Rows written as they come: to a .csv file (a header, an empty cell for None), else as JSON lines (null); with
    no `columns`, each row's own keys (JSON lines). They go into PATH.partial, renamed over PATH once all are written
    (`files.ReplacedWhenDone`): a run stopped midway keeps the previous file, and its own rows in the partial one."""

    def __init__(self, path: str | os.PathLike, columns: list[str] | None):
        self.path, self.columns = Path(path), columns
        self.csv = self.path.suffix.lower() == ".csv"
        if self.csv and columns is None:
            raise ValueError(f"{self.path}: a CSV file needs its columns")
        self.out = ReplacedWhenDone(self.path, newline="" if self.csv else None)
        self.rows = 0  # written so far: a partial file with none is not kept
        if self.csv:
            self.writer = csv.DictWriter(self.out.file, columns)
            self.writer.writeheader()

    def write(self, row: dict) -> None:
        """One row (its keys: `columns`), flushed so a long run stopped midway keeps what it judged."""
        if self.columns is not None:
            row = {k: row.get(k) for k in self.columns}
        if self.csv:
            self.writer.writerow(row)
            self.out.file.flush()
        else:
            self.out.write(json.dumps(row) + "\n")
        self.rows += 1

    def close(self, complete: bool = True) -> None:
        """Close; `complete`: the file replaces PATH; else PATH stays as it was (the partial file kept if it has
        rows)."""
        self.out.close(complete, keep=self.rows > 0)

    def __enter__(self) -> "RowWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(complete=exc_type is None)

