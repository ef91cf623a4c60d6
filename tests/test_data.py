import codecs
import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from npedit.data import DO_NOTHING, EditDataset, EditRecord, apply_do_nothing, collate, load_manifest, subset


def test_manifest_parsing(tiny_manifest):
    records = load_manifest(tiny_manifest)
    assert len(records) == 4 and records[1].edit_type == "remove" and records[0].image.endswith("images/0.png")
    ds = EditDataset(records, 32, need_target=True)
    item = ds[0]
    assert item["reference"].shape == (3, 32, 32) and item["target"].shape == (3, 32, 32)
    assert -1 <= item["reference"].min() and item["reference"].max() <= 1
    assert len(subset(records, 0.5, 0)) == 2 and subset(records, 0.5, 0) == subset(records, 0.5, 0)
    assert [r.keep_names for r in records] == [["blue square", "red circle"], ["red circle", "green triangle"], [], []]
    assert collate([ds[0], ds[2]])["keep"] == [["blue square", "red circle"], []]
    assert [(r.new_names, r.gone_names) for r in records] == [
        (["green circle"], []), ([], []), (["green circle"], ["red circle"]), ([], [])]
    assert collate([ds[0], ds[2]])["gone"] == [[], ["red circle"]]


@pytest.mark.parametrize("line, message", [
    ("{bad json", "not valid JSON"),
    (json.dumps({"image": "a.png"}), "missing instruction"),
    ("[1, 2]", "not a JSON object"),
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),  # RecursionError: a traceback before
    (json.dumps({"image": "a.png", "instruction": "x", "edit_type": "remvoe"}), "unknown edit_type 'remvoe'; use one of"),
    (json.dumps({"image": "a.png", "instruction": "  "}), "empty instruction"),
    (json.dumps({"image": "a.png", "instruction": "remove it", "edit_type": "remove"}), "needs object_name"),
    # a value of the wrong kind, which trained as its Python spelling ("['x']", "1;None") or as no image at all
    (json.dumps({"image": None, "instruction": "x"}), "image is empty"),
    (json.dumps({"image": " ", "instruction": "x"}), "image is empty"),
    (json.dumps({"image": 5, "instruction": "x"}), "image must be text"),
    (json.dumps({"image": "a.png", "instruction": ["make it red"]}), "instruction must be text"),
    (json.dumps({"image": "a.png", "instruction": "x", "caption_target": {"en": "a"}}), "caption_target must be text"),
    (json.dumps({"image": "a.png", "instruction": "x", "keep": [1, None]}), "keep must be object names"),
    (json.dumps({"image": "a.png", "instruction": "x", "gone": {"a": 1}}), "gone must be object names"),
    (json.dumps({"image": "a.png", "instruction": "x", "id": [1]}), "id must be text or a whole number"),
    (json.dumps({"image": "a\u0000.png", "instruction": "x"}), "image holds a NUL character"),
    # text the judge quotes in each question, far longer than an instruction: columns run together, most likely
    pytest.param(json.dumps({"image": "a.png", "instruction": "red " * 2500}),
                 "instruction is 10,000 characters long; at most 2,000", id="10,000-character instruction"),
    pytest.param(json.dumps({"image": "a.png", "instruction": "x", "keep": ["tree"] * 500}),
                 "keep is 2,499 characters long", id="500 objects to keep"),
])
def test_manifest_errors_name_the_line(tmp_path, line, message):
    """Each mistake in a line is one ValueError naming the file and the line."""
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"image": "x.png", "instruction": "ok"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=f"m.jsonl:2: .*{message}"):
        load_manifest(f)


def test_edit_types_are_checked_and_their_spellings_forgiven(tmp_path):
    """An edit type is one of EDIT_TYPES: case, spaces and a few aliases are forgiven (a removal spelt "Remove" is
    still checked with the contains question), anything else is refused wherever it enters (manifest, questions,
    the verdict's questions, the loss's strong-CFG list)."""
    from npedit.config import LossConfig
    from npedit.judges import EDIT_TYPES, edit_type_name, training_questions
    from npedit.verdicts import edit_questions

    assert [edit_type_name(v) for v in (None, "", " Remove ", "recolour", "RECOLOR", "delete", "style")] == [
        "edit", "edit", "remove", "recolor", "recolor", "remove", "style"]
    assert set(EDIT_TYPES) >= {"add", "remove", "replace", "recolor", "resize", "background"}  # the Shapes categories
    for bad in ("remvoe", "colour change", "edit!"):
        with pytest.raises(ValueError, match="unknown edit_type"):
            edit_type_name(bad)
    assert [q.kind for q in training_questions("remove the red circle", "Remove", "red circle")] == ["contains",
                                                                                                    "identity"]
    with pytest.raises(ValueError, match="unknown edit_type 'remvoe'"):
        training_questions("remove the red circle", "remvoe", "red circle")
    with pytest.raises(ValueError, match="unknown edit_type"):
        edit_questions("remove the red circle", edit_type="removed!", object_name="red circle")
    with pytest.raises(ValueError, match="strong_cfg_edit_types: unknown edit types \\['shapes'\\]"):
        LossConfig(strong_cfg_edit_types=("remove", "shapes"))
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"image": "x.png", "instruction": "drop it", "edit_type": " Removal",
                             "object_name": "cat"}) + "\n")
    assert load_manifest(f)[0].edit_type == "remove"


def test_caption_fallback_and_do_nothing(tiny_manifest, tmp_path):
    f = tmp_path / "m.jsonl"
    f.write_text(json.dumps({"image": "x.png", "instruction": "make it red"}) + "\n")
    assert load_manifest(f)[0].target_caption == "make it red"
    batch = collate([EditDataset(load_manifest(tiny_manifest), 16)[i] for i in range(2)])
    out = apply_do_nothing(batch, 1.0, torch.Generator().manual_seed(0))
    assert out["do_nothing"].all() and out["instruction"] == [DO_NOTHING] * 2
    assert out["caption_target"] == batch["caption_reference"]
    assert not apply_do_nothing(batch, 0.0, torch.Generator())["do_nothing"].any()



def test_unreadable_images_are_skipped_with_a_warning(tiny_manifest, tmp_path, caplog):
    """One broken or missing image does not end a run: the next readable sample stands in, with a warning (a missing
    one's when the dataset is built, before any model loads; a broken one's when it is drawn)."""
    (tmp_path / "bad.png").write_bytes(b"not an image")
    bad = [EditRecord("bad", str(tmp_path / "bad.png"), "make it red"),
           EditRecord("gone", str(tmp_path / "missing.png"), "make it red")]
    ds = EditDataset([*bad, *load_manifest(tiny_manifest)[:2]], 16)
    assert ds.unreadable == {1} and len(caplog.messages) == 1
    assert caplog.messages[0] == (f"1 of 4 samples name an image that is not there ('gone': image not found: "
                                  f"{tmp_path / 'missing.png'}); training goes on without them, the next sample "
                                  "standing in for each.")
    assert [ds[i]["id"] for i in range(4)] == ["0", "0", "0", "1"] and ds.unreadable == {0, 1}
    assert len(caplog.messages) == 2  # once per bad sample
    assert "'bad'" in caplog.messages[1] and "cannot read" in caplog.messages[1]
    with pytest.raises(ValueError, match="none of the 2 samples' images can be read \\('gone': image not found: .*; "
                                         "'bad': cannot read"):
        EditDataset(bad, 16)[1]


def test_a_pair_whose_target_is_another_shape_is_named_once(tmp_path, caplog):
    """A paired sample whose target is not of its image's shape trained silently on a pair that no longer lines up
    (each cropped to the square on its own); it is named in a warning, once, a few samples by name; a target of the
    same shape at another size is fine (both scale alike)."""
    for name, size in (("a.png", (300, 500)), ("tall.png", (200, 600)), ("big.png", (600, 1000))):
        Image.new("RGB", size).save(tmp_path / name)
    records = [EditRecord("off", str(tmp_path / "a.png"), "x", target=str(tmp_path / "tall.png")),
               EditRecord("scaled", str(tmp_path / "a.png"), "x", target=str(tmp_path / "big.png"))]
    ds = EditDataset(records, 16, need_target=True)
    assert ds[0]["target"].shape == ds[1]["target"].shape == (3, 16, 16) and ds[0]["id"] == "off"
    ds[0]
    assert caplog.messages == ["sample 'off': its target is 200x600 and its image 300x500, another shape: each is "
                               "cropped to the training square on its own, so the pair does not line up (give the "
                               "target its image's size)"]
    many = EditDataset([EditRecord(f"m{i}", str(tmp_path / "a.png"), "x", target=str(tmp_path / "tall.png"))
                        for i in range(6)], 16, need_target=True)
    caplog.clear()
    for i in range(6):
        many[i]
    assert len(caplog.messages) == EditDataset.NAMED + 1 and caplog.messages[-1].startswith("sample 'm3': its target "
                                                                                           "too is of another shape")
    caplog.clear()
    EditDataset(records, 16)[0]  # no target asked for (a stage that trains on none): nothing to line up
    assert caplog.messages == []


def test_many_unreadable_images_are_told_in_a_few_lines(tiny_manifest, tmp_path, caplog):
    """A manifest whose images are mostly missing (a wrong folder) is one warning with their count and the first
    few, not a line per sample; all missing is an error at once; many broken files are named up to NAMED, then one
    line says the rest are skipped without a warning each, and the error, if none is left, counts them."""
    good = load_manifest(tiny_manifest)[:2]
    gone = [EditRecord(f"g{i}", str(tmp_path / f"g{i}.png"), "make it red") for i in range(1000)]
    ds = EditDataset([*gone, *good], 16)
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith(
        f"1,000 of 1,002 samples name an image that is not there ('g0': image not found: {tmp_path / 'g0.png'}; "
        f"'g1': image not found: {tmp_path / 'g1.png'}; 'g2': image not found: {tmp_path / 'g2.png'}; and 997 more)")
    assert {ds[i]["id"] for i in range(len(ds))} == {"0", "1"} and len(caplog.messages) == 1
    with pytest.raises(ValueError, match="^none of the 1,000 samples' images is there \\('g0': .*; and 997 more\\): "
                                         "is the manifest"):
        EditDataset(gone, 16)
    caplog.clear()
    for i in range(10):
        (tmp_path / f"b{i}.png").write_bytes(b"not an image")
    broken = [EditRecord(f"b{i}", str(tmp_path / f"b{i}.png"), "make it red") for i in range(10)]
    ds = EditDataset([*broken, *good], 16)
    assert {ds[i]["id"] for i in range(len(ds))} == {"0", "1"} and ds.unreadable == set(range(10))
    assert len(caplog.messages) == EditDataset.NAMED + 1
    assert caplog.messages[-1].startswith("skipping sample 'b3': cannot read") and caplog.messages[-1].endswith(
        "and from now on any other whose images cannot be read without a warning each")
    with pytest.raises(ValueError, match="none of the 10 samples' images can be read \\('b0': .*; and 7 more\\)$"):
        EditDataset(broken, 16)[0]


def test_manifest_paths_stay_inside_its_folder_when_confined(tmp_path):
    """With `data.allow_outside_paths=false` (a manifest from someone else; the app's jobs) a path that leaves its
    folder (absolute, `../`, a link out of it) stops the load naming the line and the setting; by default (your own
    manifest, the CLI) it may name any image. Absolute paths and links that stay inside are always fine."""
    from npedit.config import DataConfig
    from npedit.training.datasets import build_dataset

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "images" / "a.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    (data / "images" / "same.png").symlink_to("a.png")  # a link inside the folder
    (data / "images" / "out.png").symlink_to(tmp_path / "secret.png")  # a link out of it
    (data / "linked").symlink_to(tmp_path)  # a linked folder out of it
    inside = ["images/a.png", str(data / "images" / "a.png"), "images/../images/same.png"]
    for i, image in enumerate(inside):
        f = data / f"in{i}.jsonl"
        f.write_text(json.dumps({"image": image, "instruction": "x", "target": "images/same.png"}) + "\n")
        (record,) = load_manifest(f, allow_outside_paths=False)
        assert record.image == record.target == str((data / "images" / "a.png").resolve())
    for image, says in [("../secret.png", ""), (str(tmp_path / "secret.png"), ""),
                        ("images/out.png", f" (a link to {(tmp_path / 'secret.png').resolve()})"),
                        ("linked/secret.png", " (a link to")]:
        f = data / "m.jsonl"
        f.write_text(json.dumps({"image": "images/a.png", "instruction": "x"}) + "\n"
                     + json.dumps({"image": image, "instruction": "x"}) + "\n")
        with pytest.raises(ValueError) as err:
            load_manifest(f, allow_outside_paths=False)
        assert str(err.value).startswith(f"{f}:2: image {image} is outside the manifest's folder "
                                         f"{data.resolve()}{says}"), str(err.value)
        assert str(err.value).endswith("train with data.allow_outside_paths=true")
        with pytest.raises(ValueError, match="m.jsonl:2: image .* is outside"):
            build_dataset(DataConfig(train=str(f), allow_outside_paths=False), stage="npedit", seed=0)
        assert [r.image for r in load_manifest(f)] == [r.image for r in load_manifest(f, allow_outside_paths=True)]
        assert [r.image for r in load_manifest(f, allow_outside_paths=True)] == [str(data / "images/a.png"),
                                                                               str(data / image)]
        assert len(build_dataset(DataConfig(train=str(f)), stage="npedit", seed=0)) == 2
    f.write_text(json.dumps({"image": "images/a.png", "instruction": "x", "target": "../secret.png"}) + "\n")
    with pytest.raises(ValueError, match="m.jsonl:1: target ../secret.png is outside"):
        load_manifest(f, allow_outside_paths=False)


@pytest.mark.parametrize("encode", [
    lambda t: t.encode("utf-8-sig"),  # Notepad's "UTF-8 with BOM"
    lambda t: t.encode("utf-16"),  # PowerShell's `>` (UTF-16 LE after its byte-order mark)
    lambda t: codecs.BOM_UTF16_BE + t.encode("utf-16-be"),
    lambda t: t.encode("utf-32"),
    lambda t: t.replace("\n", "\r\n").encode(),  # Windows line ends
    lambda t: t.replace("\n", "\r").encode(),  # old Mac line ends
])
def test_manifest_encodings_and_line_ends_are_read(tmp_path, encode):
    """A manifest saved by a Windows editor or shell reads as the same samples, and a JSON string may hold the
    characters str.splitlines breaks at (U+2028, NEL), as json.dumps(..., ensure_ascii=False) writes them."""
    lines = [{"image": "a.png", "instruction": "make it red"},
             {"image": "b.png", "instruction": "café\u2028au\x85lait"}]
    f = tmp_path / "m.jsonl"
    f.write_bytes(encode("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n"))
    assert [(Path(r.image).name, r.instruction) for r in load_manifest(f)] == [(x["image"], x["instruction"])
                                                                              for x in lines]


@pytest.mark.parametrize("data, message", [
    ('{"image": "a.png", "instruction": "x"}\n{"image": "b.png", "instruction": "caf\xe9"}\n'.encode("latin-1"),
     "m.jsonl:2: not UTF-8 text \\(byte 0xe9 at offset 77\\): save the file as UTF-8"),
    ('{"image": "a.png", "instruction": "x"}\n'.encode("utf-16-le"), "m.jsonl:1: holds NUL bytes: is the file UTF-16"),
    (b"image,instruction\na.png,make it red\n", "m.jsonl:1: not valid JSON .* not CSV"),
    (b'[\n{"image": "a.png", "instruction": "x"}\n]\n', "m.jsonl:1: not valid JSON .* nor one JSON array"),
])
def test_manifest_text_that_is_not_json_lines_is_named(tmp_path, data, message):
    """Bytes that are not UTF-8 (nor UTF-16/32 after a byte-order mark), UTF-16 without its mark, a CSV or one JSON
    array: a ValueError naming the line and what to do, not a UnicodeDecodeError from deep inside."""
    f = tmp_path / "m.jsonl"
    f.write_bytes(data)
    with pytest.raises(ValueError, match=message):
        load_manifest(f)


def test_judged_text_up_to_the_limit_is_kept_whole(tmp_path):
    """An instruction or object name of up to MAX_JUDGED_CHARS characters trains as written (a caption of any length:
    only the text encoders read it, and they cut it)."""
    from npedit.data import MAX_JUDGED_CHARS

    f = tmp_path / "m.jsonl"
    long = ("make the car red " * 200)[:MAX_JUDGED_CHARS]
    f.write_text(json.dumps({"image": "a.png", "instruction": long, "edit_type": "remove", "object_name": long,
                             "caption_target": "a red car " * 1000}) + "\n")
    (record,) = load_manifest(f)
    assert record.instruction == record.object_name == long and len(record.caption_target) == 10_000


def test_repeated_lines_are_named_in_one_warning_and_a_folder_names_its_manifest(tmp_path, caplog):
    """A line that repeats an earlier one (all but its id) trains, and one warning names the pairs of lines (a file
    appended twice is the usual cause); a folder given as the manifest names the one inside, if there is one."""
    f = tmp_path / "m.jsonl"
    line = {"image": "a.png", "instruction": "make it red"}
    f.write_text("".join(json.dumps(x) + "\n" for x in [line, {**line, "id": "x"}, {**line, "instruction": "blue"},
                                                         line, *[line] * 6]))
    assert len(load_manifest(f)) == 10
    assert caplog.messages == [f"{f}: 8 line(s) repeat an earlier one (line 2 repeats 1, 4 repeats 1, 5 repeats 1, "
                               "6 repeats 1, 7 repeats 1 and 3 more); each copy is drawn as often as a sample of its "
                               "own"]
    caplog.clear()
    f.write_text(json.dumps(line) + "\n" + json.dumps({**line, "edit_type": "recolor"}) + "\n")
    assert len(load_manifest(f)) == 2 and not caplog.messages
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is a folder: did you mean data.train={f}\\?; a manifest"):
        load_manifest(tmp_path)
    (tmp_path / "n.jsonl").write_text("")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path} is a folder; a manifest is a cases.jsonl file"):
        load_manifest(tmp_path)


def test_ids_that_name_several_lines_are_named_in_one_warning(tmp_path, caplog):
    """Two lines with one id trained in silence, though messages name samples by id and `edit --batch` refuses the
    file; one warning names each shared id with its lines (an auto id, the line number, counts as one)."""
    f = tmp_path / "m.jsonl"
    rows = [{"id": "a", "image": "a.png", "instruction": "make it red"},
            {"id": "b", "image": "b.png", "instruction": "make it blue"},
            {"id": "a", "image": "c.png", "instruction": "make it green"},
            {"image": "d.png", "instruction": "make it pink"},
            {"id": "000004", "image": "e.png", "instruction": "make it grey"}]
    f.write_text("".join(json.dumps(x) + "\n" for x in rows))
    assert len(load_manifest(f)) == 5
    assert caplog.messages == [f"{f}: 2 id(s) name more than one line: 'a' (lines 1, 3), '000004' (lines 4, 5); a "
                               "message naming a sample by its id is ambiguous and `edit --batch` refuses the file: "
                               "give each line an id of its own (or none: its line number stands in)"]
    caplog.clear()
    f.write_text("".join(json.dumps({**x, "id": str(i)}) + "\n" for i, x in enumerate(rows)))
    assert len(load_manifest(f)) == 5 and not caplog.messages


def test_a_tab_separated_pair_list_reads_as_a_manifest_does(tmp_path):
    """A .tsv list is a CSV with tabs (npedit.data.CSV_SUFFIXES): `edit --batch` and manifests read it, and so does
    `judge --batch` (read_pairs refused its suffix)."""
    from npedit.pairs import read_pairs

    (tmp_path / "pairs.tsv").write_text("reference\tedited\tinstruction\na.png\tb.png\tmake it blue\n")
    (pair,) = read_pairs(tmp_path / "pairs.tsv")
    assert (pair.id, pair.edited_path, pair.instruction) == ("2", str(tmp_path / "b.png"), "make it blue")
    (tmp_path / "pairs.txt").write_text("")
    with pytest.raises(ValueError, match="a list of pairs is a .jsonl, .csv or .tsv file"):
        read_pairs(tmp_path / "pairs.txt")


def test_pair_lists_read_alike_as_csv_and_json_lines(tmp_path):
    """A pair list (npedit judge --batch, the app's batch inspection) is JSON lines or CSV; an id is optional (the
    line the pair is on: a CSV's header is line 1, a quoted cell may span lines); images are named as the list
    names them and read from the list's folder; a bad line is refused naming it, before any pair is judged."""
    from npedit.pairs import read_pairs

    (tmp_path / "pairs.csv").write_text('reference,edited,instruction,id,edit_type,object\n'
                                        'a.png,b.png,"make it\nblue",,,\n'
                                        ',,,,,\n'  # a spreadsheet's empty row
                                        '/abs/c.png,d.png,remove the dot,x,Remove,dot\n')
    (tmp_path / "pairs.jsonl").write_text('{"reference": "a.png", "edited": "b.png", "instruction": "make it\\nblue"}'
                                          '\n\n{"id": 0, "reference": "/abs/c.png", "edited": "d.png", "instruction": '
                                          '"remove the dot", "edit_type": "remove", "object_name": "dot"}\n')
    csv_pairs, json_pairs = read_pairs(tmp_path / "pairs.csv"), read_pairs(tmp_path / "pairs.jsonl")
    assert [p.id for p in csv_pairs] == ["2", "x"] and [p.id for p in json_pairs] == ["1", "0"]
    for a, b in zip(csv_pairs, json_pairs):
        assert (a.reference, a.edited, a.instruction, a.edit_type, a.object_name, a.reference_path, a.edited_path) \
            == (b.reference, b.edited, b.instruction, b.edit_type, b.object_name, b.reference_path, b.edited_path)
    assert csv_pairs[0].edited_path == str(tmp_path / "b.png") and csv_pairs[1].reference_path == "/abs/c.png"
    assert csv_pairs[1].edit_type == "remove" and csv_pairs[1].line == 5
    (tmp_path / "blank.csv").write_text("reference,edited,instruction\na.png,,\n")  # judged as that pair's error
    assert [(p.edited_path, p.instruction) for p in read_pairs(tmp_path / "blank.csv")] == [("", "")]
    for text, message in (('reference,instruction\na.png,x\n', r"pairs.csv:1: no edited column"),
                          ('reference,edited,instruction\na.png,b.png,x,y\n', r"pairs.csv:2: 4 cells, the header "
                                                                                r"names 3"),
                          ('reference,edited,instruction,edit_type\na.png,b.png,x,paint\n', r"pairs.csv:2: .*paint"),
                          ('reference,edited,instruction\n"a.png,b.png\n', "not a readable CSV list of pairs"),
                          ('reference,edited,instruction\n', "lists no pairs")):
        (tmp_path / "pairs.csv").write_text(text)
        with pytest.raises(ValueError, match=message):
            read_pairs(tmp_path / "pairs.csv")


def _write_csv(path, rows, columns, **kwargs):
    with open(path, "w", newline="", **{"encoding": "utf-8", **kwargs.pop("open", {})}) as f:
        writer = csv.DictWriter(f, columns, **kwargs)
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize("dialect", [
    {},  # as pandas and Python write it
    {"open": {"encoding": "utf-8-sig"}, "lineterminator": "\r\n"},  # Excel's "CSV UTF-8"
    {"delimiter": ";"},  # a spreadsheet in a language whose decimal point is a comma
    {"delimiter": "\t"},
])
def test_csv_manifest_reads_as_its_json_lines(tiny_manifest, dialect):
    """A manifest from a spreadsheet, .csv with the JSON lines' columns (a list as one cell "a; b"), trains as the
    same samples; a blank row and an empty cell are nothing, a quoted cell may span lines, unknown columns are
    passed over (as unknown keys of a JSON line are)."""
    from npedit.config import DataConfig
    from npedit.training.datasets import build_dataset

    rows = [json.loads(line) for line in tiny_manifest.read_text().splitlines()]
    columns = ["id", "image", "target", "instruction", "caption_reference", "caption_target", "edit_type",
               "object_name", "keep", "new", "gone", "notes"]
    cells = [{**row, **{k: "; ".join(row[k]) for k in ("keep", "new", "gone") if isinstance(row.get(k), list)},
              "notes": "a note,\non two lines"} for row in rows]
    f = tiny_manifest.with_name("cases.csv")
    _write_csv(f, [cells[0], cells[1], {}, cells[2], cells[3]], columns, **dict(dialect))
    assert load_manifest(f) == load_manifest(tiny_manifest)
    assert [r.keep_names for r in load_manifest(f)][:2] == [["blue square", "red circle"],
                                                             ["red circle", "green triangle"]]
    ds = build_dataset(DataConfig(train=str(f)), stage="sft", seed=0)
    assert len(ds) == 4 and ds[3]["target"].shape == (3, 64, 64)
    _write_csv(f, [{"image": "images/0.png", "instruction": "make it red"}], ["id", "image", "instruction"])
    assert [(r.id, r.instruction) for r in load_manifest(f)] == [("000002", "make it red")]  # no id: its line


def test_csv_column_names_read_without_case_or_their_spreadsheet_spaces(tmp_path):
    """A spreadsheet's header "Image;Instruction;Edit Type;Object_Name" stopped the run (no image column), and with
    the required columns in lower case, "Edit Type" and "Object_Name" were passed over as unknown columns: each
    removal trained as a plain edit with no object named. Column names now read without case, spaces as '_'."""
    from npedit.data import read_csv_rows

    f = tmp_path / "cases.csv"
    f.write_text("\ufeffImage;INSTRUCTION;Edit Type;Object_Name;Keep\r\nphotos/a.png;remove the cat;Remove;cat;"
                 "\"tree; house\"\r\n", encoding="utf-8")
    [record] = load_manifest(f)
    assert (record.image, record.instruction, record.edit_type, record.object_name, record.keep) == (
        str(tmp_path / "photos/a.png"), "remove the cat", "remove", "cat", "tree;house")
    f.write_text("image,Image,instruction\na.png,b.png,x\n")
    with pytest.raises(ValueError, match="the header names image more than once"):
        read_csv_rows(f)


def test_a_misspelt_field_is_named_with_the_field_meant(tmp_path, caplog):
    """A key or column that is no field was passed over in silence: "caption_tagret" trained each of its lines on the
    instruction as c^x. One warning now names each such key close to a field, its lines and the field meant; other
    keys (an edit --verdicts line's p_edit, p_keep) still pass unnamed. The app's table says the same."""
    from workbench import datasets

    f = tmp_path / "cases.jsonl"
    lines = [{"image": "a.png", "instruction": "make it red", "caption_tagret": "a red car", "p_keep": 0.9},
             {"image": "a.png", "instruction": "make it blue", "caption_tagret": "a blue car", "edittype": "recolor"}]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with caplog.at_level("WARNING", logger="npedit.data"):
        records = load_manifest(f)
    assert [r.caption_target for r in records] == ["", ""]
    said = ("'caption_tagret' (line 1, 2) is no field: passed over (did you mean caption_target?); 'edittype' (line 2)"
            " is no field: passed over (did you mean edit_type?)")
    assert [r.getMessage() for r in caplog.records if "no field" in r.getMessage()] == [f"{f}: {said}"]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    _, notes = datasets.table_for_uploads([str(f), str(tmp_path / "a.png")])
    assert f"cases.jsonl: {said}." in notes


def test_csv_cells_lose_a_spreadsheets_stray_spaces(tiny_manifest):
    """Spaces around a CSV's cells and column names (typed into a spreadsheet) are dropped: the manifest trains on
    the same samples and a pair list names the same files; an instruction keeps the spaces inside it."""
    from dataclasses import replace

    from npedit.data import read_csv_rows
    from npedit.pairs import read_pairs

    rows = [json.loads(line) for line in tiny_manifest.read_text().splitlines()]
    columns = ["id", "image", "target", "instruction", "caption_target", "edit_type", "object_name"]
    f = tiny_manifest.with_name("spaced.csv")
    _write_csv(f, [{f" {k} ": f"  {row[k]} " if row.get(k) is not None else "" for k in columns} for row in rows],
               [f" {c} " for c in columns])
    assert load_manifest(f) == [replace(r, caption_reference="", keep="", new="", gone="")
                                for r in load_manifest(tiny_manifest)]
    f.write_text("image,instruction,edit_type\na.png, \"make it red, please\",recolor\n")  # quoted after a space
    assert read_csv_rows(f) == [(2, {"image": "a.png", "instruction": "make it red, please", "edit_type": "recolor"})]
    f.write_text("image,instruction\na.png, \"make it red\" ,\n")
    with pytest.raises(ValueError, match="m.csv:2: not a readable CSV .*expected after .* no space or text between"):
        read_csv_rows(f, label="m.csv", what="manifest")
    f.write_text("reference , edited,instruction, edit_type\n a.png ,b.png\t,  make it  red  , Remove \n")
    assert read_csv_rows(f) == [(2, {"reference": "a.png", "edited": "b.png", "instruction": "make it  red",
                                     "edit_type": "Remove"})]
    pair = read_pairs(f)[0]
    assert (pair.reference_path, pair.instruction, pair.edit_type) == (str(f.parent / "a.png"), "make it  red",
                                                                       "remove")


@pytest.mark.parametrize("text, message", [
    ("image,caption\na.png,x\n", "m.csv:1: no instruction column"),
    ("a.png,make it red\n", "m.csv:1: no image, instruction column"),  # no header line
    ("image,instruction\na.png,x\nb.png,y,z\n", "m.csv:3: 3 cells, the header names 2"),
    # an unquoted ',' in the instruction, the row's last column empty: every cell one column on, the extra one empty
    ("image,instruction,edit_type,object_name\na.png,x,,\nb.png,make it red, and shiny,recolor,\nc.png,y,,\n",
     "m.csv:3: 5 cells, the header names 4 and most rows have 4; the extra ones are empty"),
    ("image,instruction,keep\na.png,x,,\nb.png,y,,\nc.png,z, w,,,\n", "m.csv:4: 6 cells, the header names 3 and "
     "most rows have 4"),
    ("image,instruction,instruction\na.png,x,y\n", "m.csv:1: the header names instruction more than once"),
    ('image,instruction\na.png,"make it\nred"\nb.png,x,edit\n', "m.csv:4: 3 cells"),  # line 2's cell spans two
    ("image,instruction,edit_type\na.png,x,\nb.png,y,remvoe\n", "m.csv:3: .*unknown edit_type 'remvoe'"),
    ("image,instruction,edit_type\na.png,remove it,remove\n", "m.csv:2: .*needs object_name"),
    ("image,instruction\n,make it red\n", "m.csv:2: image is empty"),
    ("image,instruction\na.png,\n", "m.csv:2: .*empty instruction"),
    ('image,instruction\na.png,"make it red\n', "m.csv:2: not a readable CSV manifest: unexpected end"),
    ("image,instruction\n\n,\n", "m.csv: no samples"),
    ("image,instruction\na.png,x\nb.png,caf\xe9\n", "m.csv:3: not UTF-8 text .*save the file as UTF-8"),
    ("image,instruction\na\0.png,x\n", "m.csv:2: holds NUL bytes: is the file UTF-16"),
])
def test_csv_manifest_errors_name_the_line(tmp_path, text, message):
    """A CSV manifest is checked as a JSON-lines one is, each mistake a ValueError naming the line (the header's 1),
    also a row with more cells than the header names (a value the run would drop) and text Excel saved as
    Windows-1252."""
    f = tmp_path / "m.csv"
    f.write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=message):
        load_manifest(f)


def test_csv_rows_that_all_end_in_a_separator_are_read(tmp_path):
    """A trailing separator on every row (or on a lone row) is a way of writing the file, not a moved cell."""
    f = tmp_path / "m.csv"
    f.write_text("image,instruction,edit_type\na.png,make it red,recolor,\nb.png,y,,\n")
    assert [(r.instruction, r.edit_type) for r in load_manifest(f)] == [("make it red", "recolor"), ("y", "edit")]
    f.write_text("image,instruction,edit_type\na.png,make it red,recolor,\n")
    assert [r.edit_type for r in load_manifest(f)] == ["recolor"]
    # most rows end in ",," and one in ",": the fewer is no shift (this stopped with an unexpected StopIteration)
    f.write_text("image,instruction,edit_type\na.png,x,recolor,,\nb.png,y,,,\nc.png,z,,\n")
    assert [r.instruction for r in load_manifest(f)] == ["x", "y", "z"]


def test_a_folder_names_its_csv_manifest(tmp_path):
    (tmp_path / "cases.csv").write_text("image,instruction\na.png,x\n")
    with pytest.raises(FileNotFoundError, match=f"did you mean data.train={tmp_path / 'cases.csv'}\\?"):
        load_manifest(tmp_path)


def test_windows_paths_read_with_slashes_when_the_files_are_there(tmp_path, caplog):
    """A manifest written on Windows (images\\a.png) reads its images with '/' when they are there, with one
    warning for the file; confined to its folder, a '..\\' path is refused as its '/' spelling is; a name that holds
    a '\\' and exists is read as it is; Windows paths that exist in neither spelling stop the run at once in one
    line that says why, not a warning per sample."""
    from npedit.config import DataConfig
    from npedit.training.datasets import build_dataset

    data = tmp_path / "data"
    (data / "images" / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        Image.new("RGB", (8, 8), (200, 30, 30)).save(data / "images" / name)
    (tmp_path / "secret.png").write_bytes(b"x")
    f = data / "m.jsonl"
    lines = [{"image": "images\\a.png", "instruction": "x", "target": "images\\sub\\b.png"},
             {"image": "images\\sub\\b.png", "instruction": "y"}, {"image": "images/a.png", "instruction": "z"}]
    f.write_text("".join(json.dumps(x) + "\n" for x in lines))
    records = load_manifest(f, allow_outside_paths=False)
    assert [(r.image, r.target) for r in records] == [
        (str(data / "images/a.png"), str(data / "images/sub/b.png")), (str(data / "images/sub/b.png"), ""),
        (str(data / "images/a.png"), "")]
    assert caplog.messages == [f"{f}: 3 path(s) written with Windows backslashes are read with '/', the files being "
                               "there (line 1 (images\\a.png), 1 (images\\sub\\b.png), 2 (images\\sub\\b.png))"]
    caplog.clear()
    assert len(build_dataset(DataConfig(train=str(f)), stage="npedit", seed=0)) == 3
    assert len(caplog.messages) == 1 and "backslashes" in caplog.messages[0]  # the load's, no sample's
    caplog.clear()
    f.write_text(json.dumps({"image": "..\\secret.png", "instruction": "x"}) + "\n")
    with pytest.raises(ValueError, match="m.jsonl:1: image ../secret.png is outside the manifest's folder"):
        load_manifest(f, allow_outside_paths=False)
    (data / "odd\\name.png").write_bytes((data / "images" / "a.png").read_bytes())  # a '\\' in a Linux file name
    f.write_text(json.dumps({"image": "odd\\name.png", "instruction": "x"}) + "\n")
    assert load_manifest(f)[0].image == str(data / "odd\\name.png") and not caplog.messages
    f.write_text(json.dumps({"image": "images/a.png", "instruction": "x"}) + "\n"
                 + json.dumps({"image": "images\\c.png", "instruction": "x"}) + "\n")
    build_dataset(DataConfig(train=str(f)), stage="npedit", seed=0)
    assert caplog.messages == [f"1 of 2 samples name an image that is not there ('000002': image not found: "
                               f"{data / 'images'}\\c.png); training goes on without them, the next sample standing in "
                               "for each. Paths with '\\' are Windows paths: this machine reads '\\' as a letter of a "
                               "file name."]
    caplog.clear()
    f.write_text("".join(json.dumps({"image": f"C:\\Users\\me\\photos\\{i}.png", "instruction": "x"}) + "\n"
                         for i in range(500)))
    with pytest.raises(ValueError, match=r"^none of the 500 samples' images is there \('000001': image not found: "
                                         r".*; and 497 more\): .* Paths with '\\' are Windows paths"):
        build_dataset(DataConfig(train=str(f)), stage="npedit", seed=0)
    assert not caplog.messages


def test_object_names_separated_by_commas_are_several_and_a_semicolon_keeps_commas_inside_names(tmp_path):
    """`--keep "red circle, blue square"` (the app's fields, a manifest's or pair list's keep/new/gone) was one object,
    asked about as "does the image contain red circle, blue square?"; a string with no ';' now splits at commas (not
    a number's: "1,000"), one with ';' keeps its commas inside names, and a list's entries stay whole everywhere."""
    from npedit.data import joined_names, object_names
    from npedit.pairs import read_pairs
    from npedit.verdicts import edit_questions

    assert object_names("red circle, blue square") == ["red circle", "blue square"]
    assert object_names("a small, red circle; a blue square") == ["a small, red circle", "a blue square"]
    assert object_names("1,000-piece puzzle, red circle") == ["1,000-piece puzzle", "red circle"]
    assert object_names(["a small, red circle"]) == ["a small, red circle"]
    for names in (["a small, red circle"], ["red circle", "blue square"], ["a, b", "c"], ["1,000 dots"]):
        assert object_names(joined_names(names)) == names  # written so that it reads back as the same names
    keeps = [q.text for q in edit_questions("make it green", keep="red circle, blue square") if q.kind == "keep"]
    assert keeps == ["Does this image contain the following object: red circle? Answer with Yes or No.",
                     "Does this image contain the following object: blue square? Answer with Yes or No."]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [{"id": "one", "image": "a.png", "instruction": "x", "keep": ["a small, red circle"]},
             {"id": "two", "image": "a.png", "instruction": "x", "keep": "red circle, blue square", "gone": "a, b; c"}]
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    one, two = load_manifest(tmp_path / "cases.jsonl")
    assert one.keep_names == ["a small, red circle"] and two.keep_names == ["red circle", "blue square"]
    assert two.gone_names == ["a, b", "c"]
    pairs = [{"reference": "a.png", "edited": "a.png", "instruction": "x",
              **{k: v for k, v in line.items() if k in ("keep", "gone")}} for line in lines]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    one, two = read_pairs(tmp_path / "pairs.jsonl")
    assert object_names(one.keep) == ["a small, red circle"] and object_names(two.keep) == ["red circle", "blue square"]
    assert object_names(two.gone) == ["a, b", "c"]
