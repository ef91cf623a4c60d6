"""The command line's own name: usage and error lines say how it was started."""

import sys
from pathlib import Path

from cli_runner import run_python  # tests/cli_runner.py

ROOT = Path(__file__).resolve().parents[1]
# what pip writes as the `npedit` console script (pip's wheel installer's template, [project.scripts] npedit)
CONSOLE_SCRIPT = """import re
import sys
from npedit.cli import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(main())
"""


def test_usage_names_the_program_as_it_was_started(tmp_path):
    """`npedit --help` (the console script) said "usage: python -m npedit", a command that the user had not typed
    and that may not work with the Python on their path; each way now names itself (argparse's errors print the
    same name)."""
    script = tmp_path / "bin" / "npedit"
    script.parent.mkdir()
    script.write_text(CONSOLE_SCRIPT)
    for args, prog in ((["-m", "npedit"], "python -m npedit"), ([str(script)], "npedit")):
        shown = run_python(*args, "--help", cwd=tmp_path)
        assert shown.returncode == 0 and shown.stdout.startswith(f"usage: {prog} [-h]"), shown


def test_a_stage_help_names_the_program_as_it_was_started(monkeypatch, capsys, tmp_path):
    """`shapes STAGE --help` writes its own usage line: the console script's name there too (in this process: the
    console script's module is faked, as a subprocess importing the stage's trainer takes seconds)."""
    import types

    from npedit import cli

    monkeypatch.chdir(tmp_path)
    assert cli.main(["shapes", "vae", "--help"]) == 0  # called from another program: the documented spelling
    assert capsys.readouterr().out.startswith("usage: python -m npedit shapes vae [preset=NAME]")
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(main=cli.main, __spec__=None))
    monkeypatch.setattr(sys, "argv", [str(tmp_path / "bin" / "npedit"), "shapes", "vae", "--help"])
    assert cli.main() == 0
    assert capsys.readouterr().out.startswith("usage: npedit shapes vae [preset=NAME]")
    assert list(tmp_path.iterdir()) == []  # (help trains nothing)
