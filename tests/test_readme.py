"""The README as a newcomer uses it: its links land on headings, and its quick start's commands are ones this
checkout takes (flags the parsers accept, overrides the config accepts, files that are there)."""

import re
import shlex
import sys
from pathlib import Path

import pytest

from npedit.cli import build_parser
from npedit.config import load_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import app as npedit_app  # noqa: E402  (app.py lives at the repository root)


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of `markdown` (lower case, punctuation dropped, spaces as '-', a
    repeated heading suffixed -1, -2...), headings inside code blocks left out."""
    anchors, seen, fenced = set(), {}, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_github_anchors_follow_githubs_rules():
    text = "# A: b (c; 2-core)\n```\n# not a heading\n```\n## Tabs\n## Tabs\n"
    assert github_anchors(text) == {"a-b-c-2-core", "tabs", "tabs-1"}


@pytest.mark.parametrize("name", ["README.md", "docs/architecture.md", "docs/shapes_experiments.md"])
def test_every_link_to_a_section_lands_on_a_heading(name):
    """A renamed heading breaks the contents list and every "see ..." link to it silently on GitHub: caught here."""
    text = (ROOT / name).read_text()
    links = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert links - github_anchors(text) == set()


def broken_table_rows(markdown: str) -> list[str]:
    """The rows of `markdown`'s tables that GitHub would not show as one row of the header's cells: a row with more or
    fewer cells (an unescaped `|`, also inside a code span, starts a new cell) or a line break inside a row (the rest
    of it becomes a row of its own)."""
    def cells(row: str) -> int:
        return len(re.split(r"(?<!\\)\|", row.strip().strip("|")))

    broken, columns, fenced = [], None, False
    lines = markdown.splitlines()
    for line, after in zip(lines, lines[1:] + [""]):
        if line.startswith("```"):
            fenced, columns = not fenced, None
        elif fenced:
            continue
        elif re.fullmatch(r"\|[\s:|-]*-[\s:|-]*\|\s*", after) and line.startswith("|"):
            columns = None  # a header row: its cells are counted from the delimiter row next
        elif re.fullmatch(r"\|[\s:|-]*-[\s:|-]*\|\s*", line):
            columns = cells(line)
        elif columns and line.strip():
            if not line.startswith("|") or cells(line) != columns:
                broken.append(line[:80])
            columns = columns if line.startswith("|") else None
        else:
            columns = None
    return broken


def test_broken_table_rows_are_found():
    table = "| a | b |\n|---|---|\n| `x \\| y` | z |\n"
    assert broken_table_rows(table) == []
    assert broken_table_rows(table + "| `x | y` | z |\n") == ["| `x | y` | z |"]
    assert broken_table_rows(table + "| x | y and\nmore |\n") == ["more |"]


@pytest.mark.parametrize("name", ["README.md", "docs/architecture.md", "docs/shapes_experiments.md"])
def test_every_table_row_is_one_row_of_its_headers_cells(name):
    """docs/architecture.md's map showed `python -m npedit edit | judge | ...` as ten cells and half of the shapes/
    row as a row of its own on GitHub: a pipe in a cell is escaped (`\\|`) and a row is one line."""
    assert broken_table_rows((ROOT / name).read_text()) == []


def quick_start_commands() -> list[list[str]]:
    """The commands of the README's quick start block, continuation lines joined, comments dropped, `a && b` as two,
    leading environment assignments (NPEDIT_PUBLIC=1) dropped."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Quick start"):]
    block = section[section.index("```bash\n") + 8:]
    block = block[:block.index("```")].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            command, words = words[:cut], words[cut + 1:]
            while command and re.match(r"[A-Z_]+=", command[0]):
                command = command[1:]
            commands.append(command)
    return [c for c in commands if c]


def test_the_quick_start_commands_are_ones_this_checkout_takes():
    """Each command parses as its program parses it, a training command's overrides build a config, and every
    repository file it names is there (a run's outputs, runs/... and outputs/..., are written by the commands)."""
    commands = quick_start_commands()
    programs = {" ".join(c[:3]) if c[0] == "python" and c[1] == "-m" else " ".join(c[:2]) for c in commands}
    assert {"pip install", "python app.py", "python -m npedit", "hf auth", "hf upload"} <= programs
    for command in commands:
        if command[:2] == ["pip", "install"]:
            assert (ROOT / command[command.index("-r") + 1]).is_file()
        elif command[:2] == ["python", "app.py"]:
            npedit_app.parse_args(command[2:])  # exits on a flag it does not know
        elif command[:3] == ["python", "-m", "npedit"]:
            args = build_parser().parse_args(command[3:])
            if args.command == "train":
                cfg = load_config(args.config, args.overrides)  # an unknown key or bad value raises
                assert (ROOT / cfg.model.base).is_dir() and (ROOT / cfg.model.student).is_dir()
                assert (ROOT / cfg.data.train).is_file()
            named = [w.split("=", 1)[-1] for w in command if re.match(r"(\w+(\.\w+)*=)?(assets|configs)/", w)]
            assert all((ROOT / path).exists() for path in named), named
        elif command == ["mkdir", "../npedit-space"]:  # (no -p: an earlier copy is never uploaded again)
            continue
        elif command[:2] == ["git", "archive"]:  # the Space's files: what is committed, piped into tar
            assert command[2:] == ["HEAD", "|", "tar", "-x", "-C", "../npedit-space"], command
            if not (ROOT / ".git").exists():  # (tests run from a copy without its history: nothing to archive)
                continue
            import io
            import subprocess
            import tarfile

            archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
            names = set(tarfile.open(fileobj=io.BytesIO(archive)).getnames())
            assert {"app.py", "requirements.txt", "README.md", "assets/shapes/judge/config.json"} <= names
            assert not any(n.startswith(("runs/", "outputs/")) for n in names)
        else:
            assert command[0] == "hf", f"the quick start runs {command}: check it here"


def test_the_app_help_names_what_each_model_flag_falls_back_to(capsys):
    """`python app.py --help` is what a newcomer reads first: without a flag or variable the app uses the bundled
    teacher and the editor's own critic (workbench.models.companions), and serves on 127.0.0.1:7860."""
    with pytest.raises(SystemExit):
        npedit_app.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    flags = dict(re.findall(r"(--[\w-]+) [A-Z_]+ (.*?)(?= --[\w-]+ [A-Z_]+ | --public|$)", text))
    assert "bundled teacher" in flags["--teacher"], flags["--teacher"]
    assert "critic/" in flags["--critic"] and "editor's own" in flags["--critic"], flags["--critic"]
    assert "7860" in flags["--port"] and "127.0.0.1" in flags["--host"] and "runs" in flags["--runs"]
