"""Training data and examples for the app: tables of (image, instruction, captions) <-> cases.jsonl manifests.

The manifest format is npedit.data's; a `npedit_domain.json` next to a manifest of generated
Shapes cases lets the editor trained on it be recognised as a Shapes-world editor.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image

from npedit.data import CSV_SUFFIXES, TEXT_FIELDS, EditRecord, joined_names, misspelt_fields, read_rows
from npedit.domain import DOMAIN_FILE, SHAPES_DOMAIN, Domain, write_domain
from npedit.files import write_png
from npedit.images import ImageError, load_image
from npedit.pairs import RowWriter

TABLE_COLUMNS = ["image", "instruction", "caption_reference", "caption_target", "edit_type", "object_name", "keep",
                 "new", "gone", "target"]  # target: the true edit of the image, read only by runs that need pairs
TEXT_CELLS = [c for c in TABLE_COLUMNS if c not in ("image", "edit_type")]  # what a user types in a row
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MANIFEST_SUFFIXES = (".jsonl", *CSV_SUFFIXES)  # what load_manifest reads: a CSV by its suffix, else JSON lines
NAMED = 5  # names a message lists before it counts the rest


def empty_table() -> pd.DataFrame:
    """A training table with its columns and no rows."""
    return pd.DataFrame(columns=TABLE_COLUMNS)


def upload_names(paths: Sequence[str]) -> dict[str, str]:
    """{name: path} of uploaded files, each named as the user named it, a second "a.png" as "a (2).png": the names
    the training table shows and `resolve_image` looks up (the server's copies sit in folders named by hashes)."""
    names = {}
    for p in paths:
        name, k = Path(p).name, 2
        while name in names:
            name, k = f"{Path(p).stem} ({k}){Path(p).suffix}", k + 1
        names[name] = str(p)
    return names


def table_for_images(paths: list[str], previous: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[str]]:
    """One row per uploaded file that load_image reads, named as in `upload_names`, with the text columns left for the
    user to fill, or, for an image already in `previous` (the table so far), as typed there: adding files to an upload
    sends them all again; an image with several rows (from a manifest since taken off the upload) keeps them all.
    Also a line "name: why" per file left out (not an image, empty, truncated, too large...)."""
    typed: dict[str, list[dict]] = {}
    if previous is not None:
        for row in previous.reindex(columns=TABLE_COLUMNS).to_dict("records"):
            typed.setdefault(_cell(row["image"]), []).append({c: _cell(row[c]) for c in TABLE_COLUMNS})
    blank = {c: "" for c in TABLE_COLUMNS} | {"edit_type": "edit"}
    rows, skipped = [], []
    for name, p in upload_names(paths).items():
        if name in typed:  # read when it first arrived (each addition sends every file again)
            rows.extend(typed[name])
            continue
        try:
            load_image(p)  # the whole file: a truncated one is named now, not when the run starts
        except ImageError as exc:
            skipped.append(f"{Path(p).name}: {exc}")
            continue
        rows.append(blank | {"image": name})
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)  # an image a typed row names as its target: no row of its own
    return table.drop(index=target_rows(table)).reset_index(drop=True), skipped


def target_rows(table: pd.DataFrame) -> list[int]:
    """The positions of the rows that are only another row's target: their image named (by file name) in another
    row's target cell, nothing typed in them (an uploaded target image, not a training image of its own)."""
    rows = [{c: _cell(v) for c, v in row.items()} for row in table.reindex(columns=TABLE_COLUMNS).to_dict("records")]
    named = {}  # target file name -> the rows naming it
    for i, row in enumerate(rows):
        if row["target"]:
            named.setdefault(_file_name(row["target"]), set()).add(i)
    # a row with anything typed stays: an image can be both one edit's target and the reference of another
    return [i for i, row in enumerate(rows) if named.get(_file_name(row["image"]), set()) - {i}
            and row["edit_type"] in ("", "edit") and not any(row[c] for c in TEXT_CELLS)]


def _file_name(path: str) -> str:
    """The file name a cell names (a manifest written on Windows: images\\a.png): what an upload keeps."""
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def table_for_uploads(paths: list[str], previous: pd.DataFrame | None = None,
                      before: Sequence[str] = ()) -> tuple[pd.DataFrame, list[str]]:
    """The table of an upload: with a manifest (cases.jsonl, cases.csv) among the files, its rows matched to the other
    files (`table_for_manifest`; what was typed in `previous` kept while the manifest is the one of the upload
    `before`), else a row per image (`table_for_images`). Also a line per kind of thing left out, or to fix."""
    manifests = [p for p in paths if Path(p).suffix.lower() in MANIFEST_SUFFIXES]
    if not manifests:
        table, skipped = table_for_images(paths, previous)
        return table, [f"{len(skipped)} file{'s' if len(skipped) > 1 else ''} left out of the table: "
                       + "; ".join(skipped)] if skipped else []
    if len(manifests) > 1:
        raise ValueError(f"upload one manifest with its images, not {len(manifests)} "
                         f"({', '.join(Path(p).name for p in manifests)})")
    unchanged = str(manifests[0]) in map(str, before)  # (gradio names an upload by its content's hash)
    return table_for_manifest(manifests[0], [p for p in paths if p != manifests[0]], previous if unchanged else None)


def table_for_manifest(manifest: str | os.PathLike, paths: Sequence[str],
                       typed: pd.DataFrame | None = None) -> tuple[pd.DataFrame, list[str]]:
    """The rows of a manifest (npedit.data's cases.jsonl or cases.csv) whose image is among the uploaded `paths`,
    matched by file name (`upload_names`; uploads keep no folders), each shown as that name; a row of `typed` (the
    table as the user left it) stands in for the manifest's row of the same image and turn. Also a line per kind of
    row left out (its image not uploaded, unreadable, or two files of one name) or to fix (no instruction...).

    Only the manifest and `paths` are read: a manifest's paths name no file of this machine (a public app)."""
    label = Path(manifest).name
    rows = read_rows(manifest, ("image", "instruction"), text=TEXT_FIELDS, label=label, what="manifest")
    misspelt = misspelt_fields(rows)  # (a column the table has no place for: its cells would go in silence)
    files = upload_names(paths)
    # base name -> the spellings naming it, images and targets alike (an upload holds one file per name);
    # (line, row, base name); line -> its target's base name
    spelled, wanted, targets = {}, [], {}
    for n, row in rows:
        path = _cell(row.get("image")).replace("\\", "/")  # a manifest written on Windows: images\\a.png
        name = _file_name(path)
        spelled.setdefault(name, set()).add(path)
        wanted.append((n, row, name))
        target = _cell(row.get("target")).replace("\\", "/")
        targets[n] = _file_name(target)
        if target:
            spelled.setdefault(targets[n], set()).add(target)
    kept = {}
    if typed is not None:
        turns = {}
        for row in typed.reindex(columns=TABLE_COLUMNS).to_dict("records"):
            name = _cell(row["image"])
            turns[name] = turns.get(name, -1) + 1
            kept[(name, turns[name])] = {c: _cell(row[c]) for c in TABLE_COLUMNS}
    out, turns, readable = [], {}, {}
    missing, unreadable, clashes, to_fix, blank = {}, {}, {}, [], []
    for n, row, name in wanted:
        if not name:
            blank.append(str(n))
            continue
        clashing = [k for k in dict.fromkeys((name, targets[n])) if len(spelled.get(k, ())) > 1]
        if clashing:
            for k in clashing:
                clashes.setdefault(k, []).append(n)
            continue
        if name not in files:
            missing.setdefault(name, []).append(n)
            continue
        if name not in readable:
            try:
                load_image(files[name])  # the whole file, as for images uploaded alone
                readable[name] = None
            except ImageError as exc:
                readable[name] = str(exc)
        if readable[name]:
            unreadable[name] = readable[name]
            continue
        turns[name] = turns.get(name, -1) + 1
        if (name, turns[name]) in kept:
            out.append(kept[(name, turns[name])])
            continue
        cells = {c: _cell(row.get(c)) for c in TABLE_COLUMNS} | {"image": name, "target": targets[n]}
        for c in ("keep", "new", "gone"):  # a JSON list, or "a;b", shown as the table takes them
            value = row.get(c)
            cells[c] = joined_names(value if isinstance(value, list) else _cell(value))
        cells["edit_type"] = cells["edit_type"] or "edit"
        try:
            EditRecord(id=str(n), **{c: v for c, v in cells.items()})
        except ValueError as exc:  # the row is shown all the same: it can be fixed in the table
            to_fix.append(f"line {n}: {str(exc).removeprefix(f'sample {n}: ')}")
        out.append(cells)
    notes = []
    if missing:
        lower = {k.lower(): k for k in files}
        names = [f"{k} (line {', '.join(map(str, v))}"
                 + (f"; uploaded as {lower[k.lower()]}? names must match exactly" if k.lower() in lower else "") + ")"
                 for k, v in missing.items()]
        count = sum(map(len, missing.values()))
        notes.append(f"{count} row{'s' if count > 1 else ''} of {label} left out of the table, "
                     f"{_plural(names, 'image')} not uploaded: {_some(names)}. Upload "
                     f"{'it' if len(names) == 1 else 'them'} too (with {label}).")
    if blank:
        notes.append(f"{label}: {'line' if len(blank) == 1 else 'lines'} {_some(blank)} "
                     f"name{'s' if len(blank) == 1 else ''} no image, left out.")
    if unreadable:
        notes.append(f"The rows of {_plural(list(unreadable), 'image')} left out: "
                     + _some([f"{k}: {v}" for k, v in unreadable.items()], "; "))
    if clashes:
        notes.append("Uploads keep no folders, so these rows of " + label + " are left out, as each name stands for "
                     "several files: " + _some([f"{k} ({', '.join(sorted(spelled[k]))}: line "
                                                f"{', '.join(map(str, v))})" for k, v in clashes.items()], "; ")
                     + ". Give the files names of their own.")
    shown = {c["target"] for c in out if c["target"]}  # (the targets of rows left out are no one's business)
    no_target = [k for k in sorted(shown) if k not in files]
    if no_target:
        notes.append(f"{_plural(no_target, 'target image')} of {label} not uploaded: {_some(no_target)}. Only a run "
                     f"that trains on pairs (stage sft) reads them: upload them too (with {label}) for one.")
    unused = [k for k in files if k not in spelled]  # (spelled: the images and the targets)
    if unused:
        notes.append(f"{_plural(unused, 'uploaded file')} not named in {label}, left out of the table: "
                     f"{_some(unused)}.")
    if misspelt:
        notes.append(f"{label}: {misspelt}.")
    if to_fix:
        notes.append(f"{label}: {len(to_fix)} row{'s' if len(to_fix) > 1 else ''} to fix in the table before Start: "
                     + _some(to_fix, "; "))
    return pd.DataFrame(out, columns=TABLE_COLUMNS), notes


def _plural(items: list, noun: str) -> str:
    return f"{len(items):,} {noun}{'s' if len(items) > 1 else ''}"


def _some(items: list[str], sep: str = ", ") -> str:
    """The first NAMED items, and how many more."""
    more = f" and {len(items) - NAMED:,} more" if len(items) > NAMED else ""
    return sep.join(items[:NAMED]) + more


def write_table_csv(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """The table's rows (blank ones and targets' own rows dropped) as a cases.csv manifest: its images named as the
    table names them, so the file read from the folder holding those images trains as the table would (`python -m
    npedit train data.train=...`), and, uploaded with them, fills the table again (`table_for_manifest`)."""
    table = table.reindex(columns=TABLE_COLUMNS)
    table = table.drop(index=table.index[target_rows(table)])  # a target's own row: no training case (no instruction)
    records = [{c: _cell(v) for c, v in row.items()} for row in table.to_dict("records")]
    records = [r for r in records if any(r.values())]
    if not records:
        raise ValueError("the training table is empty: nothing to download")
    with RowWriter(path, TABLE_COLUMNS) as f:
        for record in records:
            f.write(record)
    return Path(path)


def shapes_cases(n: int, seed: int = 0, paraphrase_prob: float = 0.0, cycle: bool = True) -> list:
    """`n` random Shapes-world edit cases: the six categories in turn (`cycle`) or drawn at random."""
    from npedit.shapes import CATEGORIES, sample_case

    rng = np.random.default_rng(seed)
    return [sample_case(rng, CATEGORIES[i % len(CATEGORIES)] if cycle else None, paraphrase_prob,
                        id=f"shapes-{seed}-{i:05d}") for i in range(n)]


def shapes_table(n: int, directory: str | os.PathLike, seed: int = 0, paraphrase_prob: float = 0.0) -> pd.DataFrame:
    """Render `n` Shapes cases into `directory` (cases.jsonl + images/, their true edits in targets/) and return them
    as a table, each target the true edit's render (what a paired-SFT run trains towards)."""
    from npedit.shapes import render, write_cases_jsonl

    directory = Path(directory)
    cases = shapes_cases(n, seed, paraphrase_prob)
    write_cases_jsonl(cases, directory)
    write_domain(directory, SHAPES_DOMAIN)
    (directory / "targets").mkdir(exist_ok=True)
    for c in cases:  # named apart from the references: the table shows both by file name (`named_images`)
        write_png(directory / "targets" / f"{c.id}-target.png", Image.fromarray(render(c.expected)), sync=False)
    rows = [{"image": str(directory / "images" / f"{c.id}.png"), "instruction": c.instruction,
             "caption_reference": c.caption_reference, "caption_target": c.caption_target, "edit_type": c.edit_type,
             "object_name": c.object_name or "", "keep": "; ".join(c.keep), "new": "; ".join(c.new),
             "gone": "; ".join(c.gone), "target": str(directory / "targets" / f"{c.id}-target.png")} for c in cases]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def named_images(table: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """The table with each image and target named by its file name (as `upload_names` names uploads), and {name:
    path}: what a table of generated cases shows in place of their folder (`resolve_image` maps the names back)."""
    images = [_cell(x) for x in table["image"]]
    targets = [_cell(x) for x in table.get("target", [""] * len(table))]
    files = upload_names(images + [t for t in targets if t])
    names = list(files)
    shown = iter(names[len(images):])
    return table.assign(image=names[:len(images)], target=[next(shown) if t else "" for t in targets]), files


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value).strip()


def resolve_image(name: str, uploads: dict[str, str], within: Sequence[str | os.PathLike] | None = None) -> Path:
    """An uploaded file of that base name, else the path itself; with `within` (a public app), only a path inside
    one of those folders: strangers read no other file of the server."""
    if Path(name).name in uploads:
        return Path(uploads[Path(name).name])
    path = Path(name).expanduser()
    if within is not None and not any(path.resolve().is_relative_to(Path(w).resolve()) for w in within):
        raise ValueError(f"{name} is not among the uploaded files (this app reads no other file)")
    return path


def write_manifest(table: pd.DataFrame, directory: str | os.PathLike, uploads: dict[str, str] | None = None,
                   domain: Domain | None = None, within: Sequence[str | os.PathLike] | None = None,
                   targets_for: str = "") -> Path:
    """Validate the table, copy its images into `directory`/images and write `directory`/cases.jsonl (images not
    uploaded only from the folders `within`, when given). With `targets_for` (what needs them, e.g. "stage sft"),
    every row needs a target image, copied into `directory`/targets; without, the target column is ignored.

    Empty caption_target means the instruction is used as c^x; empty caption_reference means an
    empty c^y (warm-up prompt; "do nothing" samples then use c^x). Errors name the row.
    """
    uploads = uploads or {}
    directory = Path(directory)
    table = table.reindex(columns=TABLE_COLUMNS)
    rows = [(i, {c: _cell(v) for c, v in row.items()}) for i, row in enumerate(table.to_dict("records"), 1)]
    rows = [(i, values) for i, values in rows if any(values.values())]
    only_targets = set(target_rows(table))  # (the table's rows keep their numbers in the messages below)
    rows = [(i, values) for i, values in rows if i - 1 not in only_targets]
    lacking = [str(i) for i, values in rows if not values["target"]]
    if targets_for and lacking:  # one message for them all, not one Start per row
        one = len(lacking) == 1
        raise ValueError(f"{targets_for} needs a target image (the true edit) in every row: {'row' if one else 'rows'} "
                         f"{_some(lacking)} {'has' if one else 'have'} none. Upload the target images with the others "
                         f"and name each in its row's target cell (other stages ignore the target column).")
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, values in rows:
        if not values["image"]:
            raise ValueError(f"row {i}: no image")
        record = {"id": f"{i:05d}", "image": _copy_image(values["image"], directory / "images", i, uploads, within)}
        record |= {"instruction": values["instruction"],
                   "caption_reference": values["caption_reference"], "caption_target": values["caption_target"],
                   "edit_type": values["edit_type"] or "edit", "object_name": values["object_name"],
                   "keep": values["keep"], "new": values["new"], "gone": values["gone"]}
        if targets_for:
            record["target"] = _copy_image(values["target"], directory / "targets", i, uploads, within, "target ")
        try:
            record["edit_type"] = EditRecord(**record).edit_type  # as the manifest reads it (e.g. "Remove" -> remove)
        except ValueError as exc:
            raise ValueError(f"row {i}: {exc}") from None
        lines.append(json.dumps(record))
    if not lines:
        raise ValueError("the training table is empty: upload images and give each an instruction, "
                         "or generate Shapes cases")
    path = directory / "cases.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    if domain is not None:
        write_domain(directory, domain)
    return path


def _copy_image(name: str, folder: Path, row: int, uploads: dict[str, str],
                within: Sequence[str | os.PathLike] | None, what: str = "") -> str:
    """Copy the image `name` (`resolve_image`) of table row `row` into `folder` as ROW_NAME, once read whole; its path
    relative to the manifest. Errors name the row (and `what`, e.g. "target ")."""
    try:
        src = resolve_image(name, uploads, within)
        load_image(src)
    except (ImageError, ValueError) as exc:
        raise ValueError(f"row {row}: {what}{_outlived(name, uploads, within) or exc}") from None
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, folder / f"{row:05d}_{src.name}")
    return f"{folder.name}/{row:05d}_{src.name}"


def _outlived(name: str, uploads: dict[str, str], within: Sequence[str | os.PathLike] | None) -> str | None:
    """Why an image the table names by file name is missing when the page has outlived it, else None: its upload (or
    generated case) removed by the app's cleanup since, or a page whose uploads the server no longer holds (it keeps
    the state of its most recent pages only): without this, "image not found: photo.png", looked up in the server's
    working folder, did not say what to do."""
    if Path(name).name in uploads:
        if Path(uploads[Path(name).name]).exists():
            return None
        return (f"{name} is no longer on the server: the app removes uploaded files and generated cases a while after "
                "they arrive (a local app after a day), and this page kept its table longer. Upload the file again "
                "(generated Shapes cases: press Generate again), then Start")
    # a name as the table shows an upload, not a path (a public app, `within`, says so without looking: whether the
    # server has such a file is none of a stranger's business)
    if Path(name).name == name and (within is not None or not Path(name).exists()):
        return (f"{name} is not among the uploaded files{' (this app reads no other file)' * (within is not None)}: "
                "if you uploaded it, upload it again (a page left open for long can lose its uploads: the server "
                "remembers those of its most recent pages only; generated Shapes cases: press Generate again), then "
                "Start")
    return None


def table_domain(table: pd.DataFrame, uploads: dict[str, str] | None = None) -> Domain | None:
    """Shapes when every image of the table (a name in `uploads` meaning its file) lies in a folder marked as Shapes
    cases."""
    images = [str(resolve_image(x, uploads or {})) for x in map(_cell, table.get("image", [])) if x]
    folders = {Path(x).parent.parent for x in images if x}
    if folders and all((f / DOMAIN_FILE).is_file() for f in folders):
        return SHAPES_DOMAIN
    return None


# ---- examples for the Edit tab ---------------------------------------------------------------

def _example(image: str, instruction: str, caption_target: str = "", edit_type: str = "edit",
             object_name: str = "", keep="") -> list:
    """One Edit-tab example row: image, instruction, c^x, edit type, removed object, objects to keep (';')."""
    edit_type = edit_type or "edit"
    return [image, instruction, caption_target, edit_type, (object_name or "") if edit_type == "remove" else "",
            joined_names(keep)]


def bundled_examples(examples_dir: str | os.PathLike) -> list[list]:
    """Examples from a folder: examples.jsonl or cases.jsonl ({image, instruction[, caption_target, edit_type,
    object_name, keep]} per line, images relative to the folder), else images with a same-named .txt instruction."""
    root = Path(examples_dir)
    if not root.is_dir():
        return []
    out = []
    manifest = next((root / n for n in ("examples.jsonl", "cases.jsonl") if (root / n).is_file()), None)
    if manifest is not None:
        for line in manifest.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                image = root / row["image"]
            except (ValueError, KeyError, TypeError):
                continue
            if image.is_file() and row.get("instruction"):
                out.append(_example(str(image), row["instruction"], row.get("caption_target") or "",
                                    row.get("edit_type") or "edit", row.get("object_name") or "", row.get("keep")))
        return out
    for image in sorted(root.iterdir()):
        text = image.with_suffix(".txt")
        if image.suffix.lower() in IMAGE_SUFFIXES and text.is_file() and text.read_text(encoding="utf-8").strip():
            out.append(_example(str(image), text.read_text(encoding="utf-8").strip().splitlines()[0]))
    return out


def shapes_examples(directory: str | os.PathLike, n: int = 6, seed: int = 0) -> list[list]:
    """`n` generated Shapes cases (one per category first) rendered into `directory`, as example rows. The folder is
    shared by every app on the machine (the system's temp folder): two starting at once write the same files (one
    seed, the same bytes) through one temporary name each, and one can find the other's gone: it writes them again."""
    try:
        table = shapes_table(n, directory, seed=seed)
    except FileNotFoundError:  # (the other app renamed the temporary file this one was about to)
        time.sleep(0.2)
        table = shapes_table(n, directory, seed=seed)
    return [_example(r.image, r.instruction, r.caption_target, r.edit_type, r.object_name, r.keep)
            for r in table.itertuples(index=False)]


def random_shapes_case(seed: int) -> tuple[np.ndarray, str, str, str, str, str]:
    """(64x64 render, instruction, caption_target, edit_type, object_name, keep) of one random Shapes case; keep:
    the objects the instruction leaves alone, separated by ';'."""
    from npedit.shapes import render

    case = shapes_cases(1, seed, paraphrase_prob=0.3, cycle=False)[0]
    removed = case.object_name or "" if case.edit_type == "remove" else ""
    return render(case.reference), case.instruction, case.caption_target, case.edit_type, removed, "; ".join(case.keep)
