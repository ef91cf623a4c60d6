"""Training samples: reference image + instruction + captions; never an edited image (except for SFT).

A manifest is a JSON-lines file, one sample a line:
    {"id": "0001", "image": "images/0001.png", "instruction": "make the car red",
     "caption_reference": "a blue car on a street",      # c^y, optional (default: "")
     "caption_target": "a red car on a street",           # c^x, optional (default: the instruction)
     "edit_type": "recolor",                              # optional (default: "edit"; the list: edit_types.EDIT_TYPES)
     "object_name": "car",                                # required when edit_type is "remove"
     "keep": ["tree", "red house"],                       # optional: objects the edit must leave in place
     "new": ["red car"],                                  # optional: objects the edit creates (judge.change_questions)
     "gone": ["blue car"],                                # optional: objects the edit must make disappear
     "target": "targets/0001.png"}                        # only for the paired-SFT baseline
or a .csv file (a spreadsheet's) with a header line naming the same columns, one sample a row, a list column as one
cell "tree; red house" (`read_csv_rows`: cells separated by ',', ';' or tabs; errors name the line, the header's 1).
Paths are resolved against the manifest's folder; absolute paths and `../` are allowed, and a Windows path
(images\\0001.png) whose file is there with '/' in place of each '\\' is read so. With `allow_outside_paths`
off (the setting `data.allow_outside_paths=false`, which the app's jobs always use) they must stay inside that folder,
links followed, so a manifest from someone else trains on its own images, not on any other file of the disk.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import io
import json
import logging
import os
import random
import re
from collections import Counter
from dataclasses import astuple, dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .edit_types import edit_type_name
from .images import ImageError, fit_image, load_image, pil_to_tensor

DO_NOTHING = "do nothing"
logger = logging.getLogger(__name__)


# a comma between two digits is a number's ("1,000-piece puzzle"), not a separator
_COMMA = re.compile(r"(?<!\d),|,(?!\d)")


def object_names(value) -> list[str]:
    """Object names given as a list or as one string separated by ';', or by ',' when it holds no ';' (blank entries
    dropped); a list's entries are names as they are."""
    if not value:
        return []
    if isinstance(value, (list, tuple)):
        items = value
    else:
        # "red circle, blue square" is two objects to whoever types it (it was read as one, asked about as one); a
        # ';' says the commas belong to the names ("a small, red circle; a blue square")
        text = str(value)
        items = text.split(";") if ";" in text else _COMMA.split(text)
    return [str(n).strip() for n in items if str(n).strip()]


def joined_names(value, sep: str = "; ") -> str:
    """`object_names(value)` as one string that `object_names` reads back as the same names."""
    names = object_names(value)
    # one name with a comma ("a small, red circle") would read back as two: a ';' after it keeps it whole
    return sep.join(names) + (";" if len(names) == 1 and _COMMA.search(names[0]) else "")


# What the judge's questions quote, and how long each may be: ~500 tokens of English, more than an edit instruction
# needs and about what a student's text encoder reads (Z-Image: 512 tokens); a longer one is a data mistake that
# would make every question as long, and the student edit from a cut instruction the judge reads whole.
JUDGED_FIELDS = ("instruction", "object_name", "keep", "new", "gone")
MAX_JUDGED_CHARS = 2000


@dataclass(frozen=True)
class EditRecord:
    """One training sample as described in a manifest line."""

    id: str
    image: str
    instruction: str
    caption_reference: str = ""
    caption_target: str = ""
    edit_type: str = "edit"
    object_name: str = ""
    keep: str = ""  # names of objects the edit must leave in place, ";"-separated (judge.keep_questions)
    new: str = ""  # names of objects the edit creates, ";"-separated (judge.change_questions, expected Yes)
    gone: str = ""  # names of objects the edit must make disappear, ";"-separated (expected No)
    target: str = ""

    def __post_init__(self):
        if not self.instruction.strip():
            raise ValueError(f"sample {self.id}: empty instruction")
        for key in JUDGED_FIELDS:
            if len(getattr(self, key)) > MAX_JUDGED_CHARS:
                raise ValueError(f"sample {self.id}: {key} is {len(getattr(self, key)):,} characters long; at most "
                                 f"{MAX_JUDGED_CHARS:,} (the judge reads it whole in its questions, the student's text "
                                 f"encoder only its first few hundred tokens): is it another column's text, or "
                                 f"several lines run together?")
        try:
            object.__setattr__(self, "edit_type", edit_type_name(self.edit_type))
        except ValueError as exc:
            raise ValueError(f"sample {self.id}: {exc}") from None
        if self.edit_type == "remove" and not self.object_name:
            raise ValueError(f"sample {self.id}: edit_type 'remove' needs object_name (what is removed)")

    @property
    def target_caption(self) -> str:
        """c^x, falling back to the instruction when no target caption was given."""
        return self.caption_target or self.instruction

    @property
    def keep_names(self) -> list[str]:
        """The `keep` names as a list (empty entries dropped)."""
        return object_names(self.keep)

    @property
    def new_names(self) -> list[str]:
        """The `new` names as a list."""
        return object_names(self.new)

    @property
    def gone_names(self) -> list[str]:
        """The `gone` names as a list."""
        return object_names(self.gone)


_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # UTF-32 LE's mark starts like UTF-16 LE's


def file_text(path: Path, label: str) -> str:
    """The text of a JSON-lines or CSV file: UTF-8, or UTF-8/16/32 after a byte-order mark (what Windows editors,
    PowerShell's `>` and spreadsheets write); bytes that are not text are a ValueError naming their line as
    `label`:N."""
    data = path.read_bytes()
    codec = next((c for bom, c in _BOMS if data.startswith(bom)), "utf-8")
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as exc:
        line = data[:exc.start].decode(codec, errors="replace").count("\n") + 1
        raise ValueError(f"{label}:{line}: not {codec.upper().removesuffix('-SIG')} text (byte "
                         f"{data[exc.start]:#04x} at offset {exc.start}): save the file as UTF-8") from None
    if "\0" in text:  # never in JSON or CSV text; UTF-16 read as UTF-8 is every other byte
        line = len(LINE_BREAK.split(text[:text.index("\0")]))
        raise ValueError(f"{label}:{line}: holds NUL bytes: is the file UTF-16 without its byte-order mark? "
                         f"Save it as UTF-8")
    return text


# Only real line breaks: str.splitlines also splits at U+2028, U+0085..., which a JSON string may hold as they are
# (json.dumps(..., ensure_ascii=False) writes them so); a raw \r or \n cannot be inside a JSON string.
LINE_BREAK = re.compile(r"\r\n|\r|\n")


def read_json_lines(path: str | os.PathLike, required: tuple[str, ...] = (), *, text: tuple[str, ...] = (),
                    label: str | None = None) -> list[tuple[int, dict]]:
    """(line number, JSON object) for each non-blank line of a JSON-lines file, each object with the `required`
    keys and a string (or null) at each of the `text` keys it has; a bad line is a ValueError naming it as `label`:N
    (`label` defaults to the path)."""
    path = Path(path)
    label = label or str(path)
    rows = []
    for n, line in enumerate(LINE_BREAK.split(file_text(path, label)), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = "" if rows else (" (a JSON-lines file holds one {...} object per line: not CSV, which is read as "
                                    "such from a file named .csv, nor one JSON array or object spread over several "
                                    "lines)")
            raise ValueError(f"{label}:{n}: not valid JSON ({exc}){hint}") from None
        except RecursionError:  # "[[[[..." thousands deep: Python's parser gives up
            raise ValueError(f"{label}:{n}: JSON nested too deeply to read (one flat {{...}} per line)") from None
        if not isinstance(row, dict):
            keys = f" with {', '.join(required)}" if required else ""
            raise ValueError(f"{label}:{n}: not a JSON object (one {{...}}{keys} per line)")
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{label}:{n}: missing {', '.join(missing)} (each line needs {', '.join(required)})")
        for key in text:
            if row.get(key) is not None and not isinstance(row[key], str):
                raise ValueError(f"{label}:{n}: {key} must be text (a string), got {row[key]!r}")
        rows.append((n, row))
    return rows


CSV_SUFFIXES = (".csv", ".tsv")


def read_csv_rows(path: str | os.PathLike, required: tuple[str, ...] = (), *, label: str | None = None,
                  what: str = "table") -> list[tuple[int, dict]]:
    """(line the row starts on, {column: cell}) for each non-blank row of a CSV file with a header line naming the
    `required` columns (and any others); cells separated by ',', ';' or tabs, whichever the header uses (a European
    spreadsheet's CSV takes ';'); the text as `file_text` reads it. A bad row is a ValueError naming its line as
    `label`:N, the header being line 1; `what` the file is, for the message of one that is no CSV at all. Cells and
    column names lose their surrounding whitespace (a spreadsheet's stray spaces around a path or a type; the inner
    text of an instruction is kept); column names are read without case, spaces inside them as '_'."""
    path = Path(path)
    label = label or str(path)
    text = file_text(path, label)
    header = LINE_BREAK.split(text, maxsplit=1)[0]
    delimiter = max(",;\t", key=header.count)  # the first of the most used: ',' when none is
    # skipinitialspace: a quoted cell after the separator's space (`a.png, "red, please"`) is read as quoted
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True, skipinitialspace=True)
    rows, start = [], 1
    try:
        # a spreadsheet's "Edit Type" or "Object_Name" is the column edit_type or object_name: read as another
        # column, it was passed over, and each row trained as a plain edit with no object named
        reader.fieldnames = [re.sub(r"\s+", "_", name.strip()).lower() for name in reader.fieldnames or []]
        names = [name for name in reader.fieldnames if name]
        missing = [k for k in required if k not in names]
        if missing:
            raise ValueError(f"{label}:1: no {', '.join(missing)} column (the header line names the columns; it "
                             f"needs {', '.join(required)})")
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:  # else the last of them would be read and the others dropped
            raise ValueError(f"{label}:1: the header names {', '.join(twice)} more than once")
        start = reader.line_num + 1
        spare = []  # (line, empty cells past the header's columns) of each row kept
        for row in reader:
            extra = row.pop(None, [])
            if any(cell.strip() for cell in extra):  # a value the header names no column for would be dropped
                raise ValueError(f"{label}:{start}: {len(reader.fieldnames) + len(extra)} cells, the header names "
                                 f"{len(reader.fieldnames)} (a cell holding '{delimiter}' needs quotes around it)")
            row.pop("", None)  # an unnamed column (a spreadsheet's blank header cell)
            # "images/a.png " names no file and " remove" no type: a typed cell's edges are never meant
            row = {k: v if v is None else v.strip() for k, v in row.items()}
            if any(row.values()):
                rows.append((start, row))
                spare.append((start, len(extra)))
            start = reader.line_num + 1  # a quoted cell may span lines
    except csv.Error as exc:
        hint = (" (a quoted cell ends at its closing quote: no space or text between it and the next separator)"
                if "expected after" in str(exc) else "")
        raise ValueError(f"{label}:{start}: not a readable CSV {what}: {exc}{hint}") from None  # (the row it began)
    _check_spare_cells(spare, label, len(reader.fieldnames), delimiter)
    return rows


def _check_spare_cells(spare: list[tuple[int, int]], label: str, named: int, delimiter: str) -> None:
    """Refuse a row whose empty cells past the header's columns are more than the file's usual count: a row with
    one unquoted separator inside a cell has every later cell moved one column on, and ends in an empty cell past
    the header when its last column was empty (an instruction cut short, its edit type read as the object's name).
    Empty cells that every row has (a trailing separator on each line) are a way of writing the file, and pass."""
    counts = Counter(n for _, n in spare)
    if len(counts) < 2:
        return
    usual = min(counts, key=lambda n: (-counts[n], n))  # the commonest count; on a tie the smallest
    more = [(line, n) for line, n in spare if n > usual]
    if not more:  # (the rows with fewer: a row that does not end in the separator the others end in)
        return
    line, n = more[0]
    raise ValueError(f"{label}:{line}: {named + n} cells, the header names {named} and most rows have "
                     f"{named + usual}; the extra ones are empty: a cell holding '{delimiter}' without quotes around "
                     f"it moves every later cell one column on (quote it; if the row only ends in a stray "
                     f"'{delimiter}', remove that)")


def read_rows(path: str | os.PathLike, required: tuple[str, ...] = (), *, text: tuple[str, ...] = (),
              label: str | None = None, what: str = "table") -> list[tuple[int, dict]]:
    """(line, row) of a .csv/.tsv file (`read_csv_rows`, every cell text) or else of a JSON-lines file
    (`read_json_lines`): the one reader of manifests and pair lists."""
    if Path(path).suffix.lower() in CSV_SUFFIXES:
        return read_csv_rows(path, required, label=label, what=what)
    return read_json_lines(path, required, text=text, label=label)


TEXT_FIELDS = ("image", "target", "instruction", "caption_reference", "caption_target", "edit_type", "object_name")


def misspelt_fields(rows: list[tuple[int, dict]]) -> str:
    """A sentence naming the keys (columns) of manifest `rows` that are no field but close to one, with their lines
    and the field meant; "" when none. Other keys are passed over in silence (a verdict's numbers, notes)."""
    fields = set(EditRecord.__dataclass_fields__)
    near, meant = {}, {}  # meant: each other key once -> its close field or None (100,000 lines: 0.05 s, 2-core CPU)
    for n, raw in rows:
        for key in sorted(set(raw) - fields):
            if key not in meant:
                meant[key] = next(iter(difflib.get_close_matches(str(key).lower(), fields, n=1, cutoff=0.85)),
                                  None)  # (0.85: not p_keep, an edit --verdicts line's, for keep)
            if meant[key]:
                near.setdefault((key, meant[key]), []).append(n)
    return "; ".join(f"{key!r} (line {', '.join(map(str, ns[:3]))}{' ...' if len(ns) > 3 else ''}) is no field: "
                     f"passed over (did you mean {field}?)" for (key, field), ns in near.items())


def manifest_file(path: Path, value: str, n: int, key: str, allow_outside_paths: bool) -> str:
    """The file a manifest's `key` names at line `n`: resolved against the manifest's folder, and unless
    `allow_outside_paths`, refused (naming the line and the setting) when it, or a link on its way, leads outside."""
    full = path.parent / value  # an absolute value replaces the folder
    if allow_outside_paths:
        return str(full)
    root, real = path.parent.resolve(), full.resolve()
    if not real.is_relative_to(root):
        via = "" if real == Path(os.path.abspath(full)) else f" (a link to {real})"
        raise ValueError(f"{path}:{n}: {key} {value} is outside the manifest's folder {root}{via}: this run confines a "
                         f"manifest to its folder (data.allow_outside_paths=false). If this manifest and its images "
                         f"are yours, train with data.allow_outside_paths=true")
    return str(real)  # the checked file itself: a link swapped later changes nothing


def load_manifest(path: str | os.PathLike, *, allow_outside_paths: bool = True) -> list[EditRecord]:
    """Parse a cases.jsonl (or cases.csv) manifest, resolving its paths against its folder (confined to it unless
    `allow_outside_paths`); errors name the line."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(f for f in path.iterdir() if f.suffix.lower() in (".jsonl", *CSV_SUFFIXES))
        hint = f": did you mean data.train={inside[0]}?" if len(inside) == 1 else ""
        raise FileNotFoundError(f"{path} is a folder{hint}; a manifest is a cases.jsonl file, one line per image with "
                                f'its instruction, e.g. {{"image": "images/0001.png", "instruction": "make the car '
                                f'red"}}, or a cases.csv with those columns (format: npedit/data.py; the app\'s Train '
                                f'tab writes one from uploads)')
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    records, lines, slashed = [], [], []
    fields = set(EditRecord.__dataclass_fields__)
    rows = read_rows(path, ("image", "instruction"), text=TEXT_FIELDS, what="manifest")
    misspelt = misspelt_fields(rows)
    if misspelt:  # "caption_tagret" read as no field: each of its lines trained on the instruction as c^x, in silence
        logger.warning("%s: %s", path, misspelt)
    for n, raw in rows:
        # else a number, a list or a mapping would train as its Python spelling ("['x']", "{'a': 1}", "1;None")
        for key in ("keep", "new", "gone"):
            value = raw.get(key)
            if isinstance(value, (list, str)) and all(isinstance(x, str) for x in value):
                raw[key] = joined_names(value, ";")  # a list, "a; b" and "a;b" alike
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"{path}:{n}: {key} must be object names: a list of strings, or one string "
                                 f"separated by ';', got {value!r}")
        ident = raw.get("id")
        if ident is not None and (isinstance(ident, bool) or not isinstance(ident, (str, int))):
            raise ValueError(f"{path}:{n}: id must be text or a whole number, got {ident!r}")
        if not (raw["image"] or "").strip():
            raise ValueError(f"{path}:{n}: image is empty (each line names its image file)")
        raw = {k: ("" if v is None else str(v)) for k, v in raw.items() if k in fields}
        if not raw.get("id"):  # (a CSV's empty id cell too)
            raw["id"] = f"{n:06d}"
        for key in ("image", "target"):
            if "\0" in raw.get(key, ""):  # else os.stat's "embedded null byte", naming no line
                raise ValueError(f"{path}:{n}: {key} holds a NUL character, which no file name can")
            if raw.get(key):
                value = posix_spelling(path.parent, raw[key])
                if value != raw[key]:
                    slashed.append(f"{n} ({raw[key]})")
                raw[key] = manifest_file(path, value, n, key, allow_outside_paths)
        try:
            records.append(EditRecord(**raw))
        except ValueError as exc:
            raise ValueError(f"{path}:{n}: {exc}") from None
        lines.append(n)
    if not records:
        raise ValueError(f"{path}: no samples")
    if slashed:
        more = f" and {len(slashed) - 3} more" if len(slashed) > 3 else ""
        logger.warning("%s: %d path(s) written with Windows backslashes are read with '/', the files being there "
                       "(line %s%s)", path, len(slashed), ", ".join(slashed[:3]), more)
    _warn_repeats(path, records, lines)
    _warn_shared_ids(path, records, lines)
    return records


def posix_spelling(folder: Path, value: str) -> str:
    """`value` with its backslashes turned to '/' when that names a file (from `folder`) and `value` itself names
    none: a manifest written on Windows (images\\a.png), read where '\\' is a letter of a file name."""
    if "\\" not in value or os.sep == "\\" or (folder / value).exists():
        return value
    posix = value.replace("\\", "/")
    return posix if (folder / posix).exists() else value


def _warn_repeats(path: Path, records: list[EditRecord], lines: list[int]) -> None:
    """One warning naming the lines that repeat an earlier one (all but the id): legal, e.g. to draw a sample more
    often, but more often a file appended twice."""
    first, repeats = {}, []
    for record, n in zip(records, lines):
        key = astuple(record)[1:]  # (id is the first field)
        if key in first:
            repeats.append(f"{n} repeats {first[key]}")
        first.setdefault(key, n)
    if repeats:
        more = f" and {len(repeats) - 5} more" if len(repeats) > 5 else ""
        logger.warning("%s: %d line(s) repeat an earlier one (line %s%s); each copy is drawn as often as a sample of "
                       "its own", path, len(repeats), ", ".join(repeats[:5]), more)


def _warn_shared_ids(path: Path, records: list[EditRecord], lines: list[int]) -> None:
    """One warning naming the ids that more than one line has, with their lines: training takes them, but every
    message naming a sample by its id (an unreadable image, a judged text) is then ambiguous, and `edit --batch`,
    which names each result's file by its id, refuses the manifest."""
    found: dict[str, list[int]] = {}
    for record, n in zip(records, lines):
        found.setdefault(record.id, []).append(n)
    shared = [f"{ident!r} (lines {', '.join(map(str, ns))})" for ident, ns in found.items() if len(ns) > 1]
    if shared:
        more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
        logger.warning("%s: %d id(s) name more than one line: %s%s; a message naming a sample by its id is ambiguous "
                       "and `edit --batch` refuses the file: give each line an id of its own (or none: its line number "
                       "stands in)", path, len(shared), ", ".join(shared[:5]), more)


class EditDataset(Dataset):
    """Manifest samples as tensors in [-1, 1] at `resolution`, plus their text fields; a sample whose image cannot
    be read is skipped, the next one standing in (one bad file must not end a long run), and said so in a few lines
    however many there are."""

    NAMED = 3  # unreadable samples named one by one (per process) before the rest are only counted

    def __init__(self, records: list[EditRecord], resolution: int, *, need_target: bool = False):
        if need_target and any(not r.target for r in records):
            missing = next(r.id for r in records if not r.target)
            raise ValueError(f"this run needs a 'target' image in every manifest line (paired SFT, or "
                             f"loss.lambda_target > 0 or loss.lambda_target_pixels > 0); line id {missing!r} has none")
        self.records = records
        self.resolution = resolution
        self.need_target = need_target
        self.unreadable: set[int] = set()  # samples skipped so far (per DataLoader worker)
        self.reasons: list[str] = []  # why each was, in the order found
        self.warned = 0  # samples found unreadable while drawing, each named in a warning up to NAMED
        self.misaligned: set[str] = set()  # ids of pairs whose target is not of its image's shape (warned)
        self._skip_missing()

    def _skip_missing(self) -> None:
        """Mark the samples whose image is not there at all (a wrong folder, Windows paths) before the first is drawn:
        one warning with their count and the first few, or an ImageError when that is all of them."""
        windows = False
        for k, r in enumerate(self.records):
            files = {"image": r.image, "target": r.target} if self.need_target else {"image": r.image}
            missing = [(key, f) for key, f in files.items() if not Path(f).exists()]
            if missing:
                self.unreadable.add(k)
                self.reasons.append(f"{r.id!r}: {missing[0][0]} not found: {missing[0][1]}")
                windows |= any("\\" in f for _, f in missing)
        if not self.reasons:
            return
        # (a Windows path whose '/' spelling exists was read so by load_manifest: these exist in neither)
        hint = " Paths with '\\' are Windows paths: this machine reads '\\' as a letter of a file name." \
            if windows and os.sep == "/" else ""
        n = len(self.records)
        if len(self.unreadable) == n:
            raise ImageError(f"none of the {n:,} samples' images is there ({self._named()}): is the manifest in the "
                             f"folder its paths start from?{hint}")
        logger.warning("%s of %s samples name an image that is not there (%s); training goes on without them, the "
                       "next sample standing in for each.%s", f"{len(self.unreadable):,}", f"{n:,}", self._named(),
                       hint)

    def _named(self) -> str:
        """The first few reasons, and how many more."""
        more = f"; and {len(self.reasons) - self.NAMED:,} more" if len(self.reasons) > self.NAMED else ""
        return "; ".join(self.reasons[:self.NAMED]) + more

    def __len__(self) -> int:
        return len(self.records)

    def _fit(self, image) -> torch.Tensor:
        return pil_to_tensor(fit_image(image, (self.resolution, self.resolution)))

    def _check_pair(self, r: EditRecord, image: tuple[int, int], target: tuple[int, int]) -> None:
        """Warn, naming the sample, when its target's shape is not its image's: each is cropped to the training
        square on its own, so the two no longer line up (a few named, then one line for the rest)."""
        (w, h), (tw, th) = image, target
        if abs(w * th - h * tw) <= 0.01 * max(w * th, h * tw) or r.id in self.misaligned:
            return
        self.misaligned.add(r.id)
        if len(self.misaligned) <= self.NAMED:
            logger.warning("sample %r: its target is %dx%d and its image %dx%d, another shape: each is cropped to the "
                           "training square on its own, so the pair does not line up (give the target its image's "
                           "size)", r.id, tw, th, w, h)
        elif len(self.misaligned) == self.NAMED + 1:
            logger.warning("sample %r: its target too is of another shape than its image, and so may be others, "
                           "without a warning each", r.id)

    def __getitem__(self, i: int) -> dict:
        """Sample `i`, or the next one whose images can be read."""
        n = len(self.records)
        for k in ((i + j) % n for j in range(n)):
            if k in self.unreadable:
                continue
            try:
                return self._item(self.records[k])
            except ImageError as exc:
                self.unreadable.add(k)
                self.reasons.append(f"{self.records[k].id!r}: {exc}")
                self.warned += 1
                if self.warned <= self.NAMED:
                    logger.warning("skipping sample %s; training goes on without it", self.reasons[-1])
                elif self.warned == self.NAMED + 1:
                    logger.warning("skipping sample %s, and from now on any other whose images cannot be read "
                                   "without a warning each", self.reasons[-1])
        raise ImageError(f"none of the {n:,} samples' images can be read ({self._named()})")

    def _item(self, r: EditRecord) -> dict:
        image = load_image(r.image)
        item = {
            "id": r.id,
            "reference": self._fit(image),
            "instruction": r.instruction,
            "caption_reference": r.caption_reference,
            "caption_target": r.target_caption,
            "edit_type": r.edit_type,
            "object_name": r.object_name,
            "keep": r.keep_names,
            "new": r.new_names,
            "gone": r.gone_names,
        }
        if self.need_target:
            target = load_image(r.target)
            self._check_pair(r, image.size, target.size)
            item["target"] = self._fit(target)
        return item


def subset(records: list, fraction: float, seed: int) -> list:
    """A deterministic random share of the records (at least one)."""
    if fraction >= 1:
        return list(records)
    rng = random.Random(seed)
    k = max(1, int(round(len(records) * fraction)))
    return rng.sample(list(records), k)


def collate(items: list[dict]) -> dict:
    """Stack tensors, keep strings as lists."""
    out = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        out[key] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


def apply_do_nothing(batch: dict, prob: float, generator: torch.Generator) -> dict:
    """With probability `prob` per sample, turn the instruction into "do nothing" (target = reference)."""
    n = len(batch["instruction"])
    mask = torch.rand(n, generator=generator) < prob
    out = dict(batch)
    out["do_nothing"] = mask
    if mask.any():
        out["instruction"] = [DO_NOTHING if m else s for m, s in zip(mask.tolist(), batch["instruction"])]
        out["caption_target"] = [
            (cy or ct) if m else ct
            for m, cy, ct in zip(mask.tolist(), batch["caption_reference"], batch["caption_target"])
        ]
    return out
