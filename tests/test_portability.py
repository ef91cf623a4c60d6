"""What a Windows or macOS laptop needs of the code: text files read and written as UTF-8, whatever the code page."""

import ast
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from script_modules import load_script  # tests/script_modules.py

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "app.py", *sorted((ROOT / "npedit").rglob("*.py")), *sorted((ROOT / "workbench").rglob("*.py")),
           *sorted((ROOT / "scripts").rglob("*.py"))]
NOT_TEXT_FILES = {"Image", "os", "tarfile"}  # receivers of an .open() that opens no text file
# a locale whose default encoding is ASCII: it stands in for Windows' cp1252, which mangles non-Latin-1 text and
# cannot write it (ASCII refuses every non-ASCII character, so the failure shows here at once)
ASCII_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def ascii_locale_env() -> dict:
    """This process's environment with ASCII_LOCALE, the repo on the path and no PYTHONIOENCODING."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "LC_CTYPE")}
    return {**env, **ASCII_LOCALE, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


def _text_opens_without_encoding(path: Path) -> list[int]:
    """The line of each call that opens a text file in the OS's default encoding: read_text, write_text, a text
    mode open / Path.open / os.fdopen, none of them given `encoding=`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        fn = node.func
        name = fn.id if isinstance(fn, ast.Name) else fn.attr if isinstance(fn, ast.Attribute) else None
        receiver = ast.unparse(fn.value) if isinstance(fn, ast.Attribute) else ""
        if name in ("open", "fdopen") and (name == "fdopen" or receiver not in NOT_TEXT_FILES):
            first = 1 if isinstance(fn, ast.Name) or name == "fdopen" else 0  # open(file, mode) / path.open(mode)
            modes = node.args[first:first + 1] + [k.value for k in node.keywords if k.arg == "mode"]
            mode = modes[0].value if modes and isinstance(modes[0], ast.Constant) else "r" if not modes else "?"
            text = "b" not in str(mode)
        else:
            text = name in ("read_text", "write_text")
        if text:
            found.append(node.lineno)
    return found


def test_every_text_file_is_opened_as_utf8():
    """Windows opens a text file in its ANSI code page (cp1252) unless told otherwise: a UTF-8 config, manifest,
    examples file or model card with a non-ASCII instruction, caption or path (C:\\Users\\José) was read mangled or
    refused, and writing one failed. Every text file of the app, the CLI and the scripts names its encoding."""
    found = [f"{path.relative_to(ROOT)}:{n}" for path in SOURCES for n in _text_opens_without_encoding(path)]
    assert not found, f"text files opened in the OS's default encoding: {', '.join(found)}"


def test_the_check_finds_a_text_file_opened_without_encoding(tmp_path):
    """The check above reads calls as they are written (it would pass on code it cannot see)."""
    code = tmp_path / "example.py"
    code.write_text(textwrap.dedent("""\
        Path("a").read_text()
        Path("a").read_text(encoding="utf-8")
        open("b", "w")
        open("b", "wb")
        Path("c").open()
        Image.open("d.png")
        os.fdopen(3, "w")
    """), encoding="utf-8")
    assert _text_opens_without_encoding(code) == [1, 3, 5, 7]


def _json_written_in_place(path: Path) -> list[int]:
    """The line of each call that writes JSON straight into its file: `json.dump(...)`, or a `write_text` of
    something built with `json.dumps` (a stop or a full disk midway leaves that file cut short)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        dumps = any(isinstance(n, ast.Call) and ast.unparse(n.func) == "json.dumps"
                    for arg in [*node.args, *(k.value for k in node.keywords)] for n in ast.walk(arg))
        if ast.unparse(node.func) == "json.dump" or (node.func.attr == "write_text" and dumps):
            found.append(node.lineno)
    return found


def test_the_scripts_write_their_json_reports_whole():
    """The scripts' end-of-run reports (critic_fit, probe_reference_tokens, app_soak, shapes_chain's chain.json, ...)
    were written in place: a Ctrl-C or a full disk mid-write left a cut JSON file where the previous run's report
    was. They go through `files.write_atomic` (the previous file stays until the new one is whole)."""
    found = [f"{p.relative_to(ROOT)}:{n}" for p in sorted((ROOT / "scripts").rglob("*.py"))
             for n in _json_written_in_place(p)]
    assert not found, f"JSON written in place: {', '.join(found)}"


def test_the_check_finds_json_written_in_place(tmp_path):
    """The check above reads calls as they are written."""
    code = tmp_path / "example.py"
    code.write_text(textwrap.dedent("""\
        Path(out).write_text(json.dumps(report), encoding="utf-8")
        write_atomic(out, json.dumps(report))
        json.dump(report, f)
        (out / "a.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows), encoding="utf-8")
        Path(out).write_text(text, encoding="utf-8")
    """), encoding="utf-8")
    assert _json_written_in_place(code) == [1, 3, 4]


def test_non_ascii_instructions_and_paths_survive_a_locale_that_is_not_utf8(tmp_path):
    """A UTF-8 examples file (the Edit tab's examples), a `.txt` instruction beside an image and a training config
    naming a folder with an accent, read where the locale's encoding is not UTF-8 (Windows: cp1252), give back the
    text as written; each read failed here (and on Windows gave "trÃ¨s")."""
    from PIL import Image

    examples = tmp_path / "examples"
    examples.mkdir()
    Image.new("RGB", (8, 8)).save(examples / "a.png")
    rows = [{"image": "a.png", "instruction": "peins le cercle en rouge — très vite"},
            {"image": "a.png", "instruction": "把圆变成红色"}]
    (examples / "examples.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                             encoding="utf-8")
    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("RGB", (8, 8)).save(loose / "b.png")
    (loose / "b.txt").write_text("ajoute un chapeau à l'étoile\n", encoding="utf-8")
    (tmp_path / "my.yaml").write_text("model: {base: C:/Users/José/teacher}\n", encoding="utf-8")
    script = textwrap.dedent("""\
        import json, sys
        from pathlib import Path
        from npedit.config import load_config
        from workbench import datasets
        root = Path(sys.argv[1])
        cfg = load_config(root / "my.yaml", ["data.train=shapes", "loss.lambda_vlm=0"])
        print(json.dumps({"examples": [e[1] for e in datasets.bundled_examples(root / "examples")],
                          "loose": [e[1] for e in datasets.bundled_examples(root / "loose")],
                          "base": cfg.model.base}))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=ascii_locale_env(), capture_output=True,
                         text=True, encoding="utf-8", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout) == {"examples": [r["instruction"] for r in rows],
                                      "loose": ["ajoute un chapeau à l'étoile"], "base": "C:/Users/José/teacher"}


def test_a_file_held_open_elsewhere_is_replaced_once_it_is_free_on_windows(tmp_path, monkeypatch):
    """Windows refuses to rename over a file another program holds open, even for a moment (the app reading a job's
    status.json while another tab rewrites it, a virus scanner opening a new file): write_atomic and the checkpoint
    and editor folders' publishing failed on the first such refusal. They wait for it now, up to REPLACE_WAIT_S;
    POSIX renames over an open file, so there a PermissionError is final at once. (os.replace is made to refuse here
    as Windows does; the waiting is what is tested.)"""
    from npedit import files
    from npedit.training.checkpoint import publishing

    real, refused = os.replace, []

    def held_open(times):
        def replace(src, dst):
            if len(refused) < times:
                refused.append(Path(dst).name)
                raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                          "process", str(dst))
            real(src, dst)
        return replace

    now = [0.0]  # (a clock the waits move: a loaded CI box stretches real sleeps, and the count of tries with them)

    def sleep(seconds):
        now[0] += seconds

    monkeypatch.setattr(files, "time", types.SimpleNamespace(monotonic=lambda: now[0], sleep=sleep))
    target = tmp_path / "status.json"
    target.write_text("old", encoding="utf-8")
    monkeypatch.setattr(files, "WINDOWS", True)
    monkeypatch.setattr(os, "replace", held_open(3))
    files.write_atomic(target, "new")
    assert target.read_text(encoding="utf-8") == "new" and refused == ["status.json"] * 3
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary left

    refused.clear()
    (tmp_path / "pipeline").mkdir()
    with publishing(tmp_path / "pipeline") as folder:
        folder.mkdir()
        (folder / "model_index.json").write_text("{}", encoding="utf-8")
    assert (tmp_path / "pipeline" / "model_index.json").is_file() and refused == [".trash_pipeline"] * 3

    refused.clear()
    now[0] = 0.0
    monkeypatch.setattr(os, "replace", held_open(10**6))  # never closed: the error, after the wait
    with pytest.raises(PermissionError):
        files.write_atomic(target, "newer")
    assert files.REPLACE_WAIT_S <= now[0] < files.REPLACE_WAIT_S + 0.1  # it waited the whole wait, and no longer
    assert target.read_text(encoding="utf-8") == "new" and len(refused) > 10
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["status.json"]

    refused.clear()
    monkeypatch.setattr(files, "WINDOWS", False)  # POSIX: at once
    with pytest.raises(PermissionError):
        files.write_atomic(target, "newer")
    assert refused == ["status.json"]


def test_a_report_whose_rename_fails_says_its_complete_text_is_in_the_partial_file(tmp_path, monkeypatch):
    """A report written as it goes (`ReplacedWhenDone`: `edit --verdicts`, `judge --batch`, the app's downloads) is
    renamed over NAME at the end. When that fails (Windows: another program holds NAME open; a read-only folder) or
    the flush before it does (a full disk), the error was the bare system one ("[Errno 28] No space left on device"),
    naming no file: it now says NAME was not replaced and that the complete text is kept in NAME.partial, which is
    there, whole; the error keeps its kind and errno. (os.replace and os.fsync are made to fail here.)"""
    from npedit import files

    target = tmp_path / "verdicts.jsonl"
    target.write_text("an earlier report\n", encoding="utf-8")
    partial = tmp_path / "verdicts.jsonl.partial"
    real_replace, real_fsync = os.replace, os.fsync

    def held_open(src, dst):
        raise PermissionError(13, "Permission denied", str(src), None, str(dst))

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    for patched, fails, kind, errno_, says in (
            ("replace", held_open, PermissionError, 13,
             "renaming it over verdicts.jsonl failed (Permission denied); its complete text is kept in "
             f"{partial}"),
            ("fsync", disk_full, OSError, 28,
             f"flushing it to the disk failed (No space left on device); its complete text is kept in {partial} "
             "(written, not confirmed by the disk)")):
        partial.unlink(missing_ok=True)
        with monkeypatch.context() as m:
            m.setattr(os, patched, fails)
            with pytest.raises(OSError) as got:
                with files.ReplacedWhenDone(target) as report:
                    report.write("row 1\n")
                    report.write("row 2\n")
        assert str(got.value) == f"{target} was not replaced: {says}", got.value
        assert type(got.value) is kind and got.value.errno == errno_
        assert partial.read_text(encoding="utf-8") == "row 1\nrow 2\n"
        assert target.read_text(encoding="utf-8") == "an earlier report\n"
    assert (os.replace, os.fsync) == (real_replace, real_fsync)
    with files.ReplacedWhenDone(target) as report:  # the rename works again: the report replaces NAME, no partial
        report.write("row 1\n")
    assert [p.name for p in tmp_path.iterdir()] == ["verdicts.jsonl"]


def test_the_cli_prints_a_path_its_output_cannot_encode_escaped_instead_of_failing(tmp_path):
    """`npedit edit ... > log.txt` on Windows prints in cp1252, which has no Chinese letters: an output folder named
    in Chinese stopped the command with UnicodeEncodeError once the image was written (exit 1, the edit reported as
    failed). Here the output encoding is ASCII (PYTHONIOENCODING); the path is printed escaped and the command
    succeeds."""
    out = tmp_path / "结果" / "edit.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "ascii"}
    image = ROOT / "assets" / "examples" / "recolor-0000.png"
    done = subprocess.run([sys.executable, "-m", "npedit", "edit", "--image", str(image), "--instruction",
                           "make the circle red", "--output", str(out)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, encoding="ascii", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.is_file() and done.stdout.strip() == str(out).encode("ascii", "backslashreplace").decode()


def test_training_data_loads_in_spawned_workers(tiny_manifest):
    """Windows (and macOS by default) start DataLoader workers by spawning a fresh interpreter, which gets the
    dataset and collate function by pickling: `data.num_workers` > 0 works there only while both pickle (a lambda or
    a local function in either would stop the run at its first batch). Checked with the manifest dataset the Train
    tab's jobs read, in a spawned worker as those OSes run it."""
    import torch
    from torch.utils.data import DataLoader

    from npedit.config import load_config
    from npedit.data import collate
    from npedit.training.datasets import EpochSampler, build_dataset

    cfg = load_config(None, ["model.base=/m", f"data.train={tiny_manifest}", "data.resolution=32", "loss.lambda_vlm=0"])
    dataset = build_dataset(cfg.data, stage="npedit", seed=0)
    loader = DataLoader(dataset, batch_size=2, sampler=EpochSampler(len(dataset), 0), collate_fn=collate,
                        num_workers=1, multiprocessing_context="spawn")
    batch = next(iter(loader))
    assert batch["reference"].shape == (2, 3, 32, 32) and isinstance(batch["reference"], torch.Tensor)
    assert batch["instruction"][0] in ("make the red circle green", "remove the red circle")


def test_a_batch_id_windows_cannot_name_a_file_by_is_refused_there_before_loading(tmp_path, monkeypatch):
    """`edit --batch` saves each result as OUTPUT_DIR/<id>.png. On Windows an id with ':' (a time, "case:1") wrote
    an empty file "case" holding the PNG in a hidden stream, '?' or '*' failed after the edit, "con" is a device; such
    an id is refused there, before any weights are read, naming it and why. (The Windows branch is switched on here;
    Linux, where each of these names is a file's, keeps them.)"""
    from npedit import files
    from npedit.cli import main

    assert files.windows_name_problem("case:1.png") == "Windows forbids ':' in a file name"
    assert files.windows_name_problem("a?b*.png") == "Windows forbids '*' '?' in a file name"
    assert files.windows_name_problem("con.png") == "Windows keeps the name 'con' for a device"
    assert files.windows_name_problem("end. ") == "Windows drops a trailing dot or space from a file name"
    fine = ("case-1.png", "结果.png", "console.png", "com10.png")
    assert [files.windows_name_problem(n) for n in fine] == [None] * len(fine)

    listing = tmp_path / "cases.jsonl"
    listing.write_text(json.dumps({"id": "2024-05-01T10:00", "image": "in.png", "instruction": "x"}) + "\n",
                       encoding="utf-8")
    edit = ["edit", "--model", str(tmp_path / "no-model"), "--batch", str(listing), "--output-dir", str(tmp_path)]
    monkeypatch.setattr(files, "WINDOWS", True)
    with pytest.raises(SystemExit, match="id '2024-05-01T10:00' cannot name a file here \\(Windows forbids ':'"):
        main(edit)
    monkeypatch.setattr(files, "WINDOWS", False)
    with pytest.raises(SystemExit, match="no-model does not exist"):  # POSIX: the id passes; the model stops it
        main(edit)


def test_batch_ids_that_differ_only_in_case_are_refused_where_file_names_ignore_case(tmp_path, monkeypatch):
    """On Windows and (by default) macOS, "Cat.png" and "cat.png" are one file: `edit --batch` with ids "Cat" and
    "cat" saved the second edit over the first and reported both written. There such ids are refused before any
    weights are read; Linux, where they are two files, keeps them. (The case-insensitive branch is switched on.)"""
    from npedit import files
    from npedit.cli import main

    listing = tmp_path / "cases.jsonl"
    listing.write_text("".join(json.dumps({"id": i, "image": "in.png", "instruction": "x"}) + "\n"
                               for i in ("Cat", "dog", "cat")), encoding="utf-8")
    edit = ["edit", "--model", str(tmp_path / "no-model"), "--batch", str(listing), "--output-dir", str(tmp_path)]
    monkeypatch.setattr(files, "CASE_INSENSITIVE", True)
    with pytest.raises(SystemExit, match="ids 'Cat' and 'cat' name one file here"):
        main(edit)
    monkeypatch.setattr(files, "CASE_INSENSITIVE", False)
    with pytest.raises(SystemExit, match="no-model does not exist"):  # Linux: two files; the model stops it
        main(edit)


def test_the_lora_memory_benchmark_reads_peak_memory_in_each_systems_unit(monkeypatch):
    """scripts/bench_lora_memory.py divided ru_maxrss by 1024 everywhere: MiB on Linux (KiB), but a figure 1024 times
    too large on macOS (bytes), and on Windows its import of `resource` stopped the script. (macOS's branch runs here
    by faking the platform; Windows' psutil branch is not exercised: Linux's psutil has no peak working set.)"""
    import psutil

    bench = load_script("bench_lora_memory")
    linux = bench.peak_rss_mib()
    assert psutil.Process().memory_info().rss / 2**20 - 1 <= linux < 64 * 1024
    monkeypatch.setattr(sys, "platform", "darwin")
    assert abs(bench.peak_rss_mib() - linux / 1024) < 1  # ru_maxrss taken as bytes


def test_a_file_held_open_elsewhere_is_deleted_once_free_or_left_on_windows(tmp_path, monkeypatch):
    """Windows refuses to delete a file another program holds open: a resumed run deleting the sample grids of steps
    it trains again stopped with PermissionError while the app showed one, and so did a session's previous download.
    `files.remove` waits for it there (up to REPLACE_WAIT_S) and then says it could not, for the caller to go on; on
    POSIX a PermissionError is final at once. (os.unlink is made to refuse here as Windows does.)"""
    from npedit import files

    real, refused = os.unlink, []

    def held_open(times):
        def unlink(path, *args, **kwargs):
            if len(refused) < times:
                refused.append(Path(path).name)
                raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                          "process", str(path))
            real(path, *args, **kwargs)
        return unlink

    now = [0.0]

    def sleep(seconds):
        now[0] += seconds

    monkeypatch.setattr(files, "time", types.SimpleNamespace(monotonic=lambda: now[0], sleep=sleep))
    grid = tmp_path / "step_000009.png"
    grid.write_bytes(b"png")
    monkeypatch.setattr(files, "WINDOWS", True)
    monkeypatch.setattr(os, "unlink", held_open(3))
    assert files.remove(grid) and not grid.exists() and refused == [grid.name] * 3
    grid.write_bytes(b"png")
    refused.clear()
    monkeypatch.setattr(os, "unlink", held_open(10**9))
    assert not files.remove(grid) and grid.exists() and now[0] >= files.REPLACE_WAIT_S
    monkeypatch.setattr(files, "WINDOWS", False)
    with pytest.raises(PermissionError):
        files.remove(grid)
    monkeypatch.setattr(os, "unlink", real)
    assert files.remove(tmp_path / "gone.png")  # (nothing to delete: done)
