"""The command line's own name: usage and error lines say how it was started."""

import json
import os
import sys
import zipfile
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("stage", ["judge-eval", "teacher-eval"])
def test_an_eval_stage_help_names_the_program_as_it_was_started(stage, capsys):
    """The two evaluating stages built their own parsers named "npedit shapes ...", so `python -m npedit shapes
    judge-eval --help` (and each of its usage errors) named the console script, which may not be installed."""
    from npedit import cli

    with pytest.raises(SystemExit) as done:
        cli.main(["shapes", stage, "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m npedit shapes {stage} [-h]")


EXAMPLE = ROOT / "assets" / "examples" / "add-0000.png"


@pytest.fixture
def mistakes(tmp_path, monkeypatch):
    """A working folder holding what a user points the CLI at by mistake: a file, an empty folder, an empty list of
    edits, a broken YAML file, a list of pairs, a Shapes teacher run."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "images").mkdir()
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "one.jsonl").write_text(json.dumps({"id": "a", "image": str(EXAMPLE), "instruction": "add"}) + "\n")
    (tmp_path / "bad.yaml").write_text("stage: warmup\noptim: {lr: 1e-4\n")
    with zipfile.ZipFile(tmp_path / "photos.zip", "w") as z:  # a zip of the user's, no trace
        z.writestr("holiday.png", b"x")
    (tmp_path / "runs" / "t" / "base").mkdir(parents=True)  # a trained teacher's folder
    (tmp_path / "runs" / "t" / "base" / "model_index.json").write_text("{}")
    (tmp_path / "runs" / "v" / "vae").mkdir(parents=True)  # a trained VAE's run
    (tmp_path / "runs" / "v" / "vae" / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    (tmp_path / "runs" / "j" / "judge").mkdir(parents=True)  # a trained judge's run
    (tmp_path / "runs" / "re" / "pipeline").mkdir(parents=True)  # a ref-encoder run's editor
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"reference": str(EXAMPLE), "edited": "edited.png",
                                                      "instruction": "add a circle"}) + "\n")
    return tmp_path


def exit_of(argv: list[str], capsys) -> tuple[int, str]:
    """The exit status `python -m npedit ARGV` ends with and the last line it says (stderr), run in this process."""
    from npedit.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    code = exit_.value.code
    return (1, code) if isinstance(code, str) else (code, capsys.readouterr().err.strip().splitlines()[-1])


EDIT = ["edit", "--image", str(EXAMPLE), "--instruction", "add a circle"]


@pytest.mark.parametrize("argv, status, says", [
    # usage errors: status 2, as argparse's own (these were status 1, --steps only once the editor had loaded)
    (["edit"], 2, "error: give either --image/--instruction/--output or --batch/--output-dir"),
    # an instruction that cannot be edited or judged: said before the weights load (was "--image needs --instruction",
    # or, for "  " and overlong text, status 1 after the models loaded, named by --output's stem as a batch id)
    (["edit", "--image", str(EXAMPLE), "--instruction", "", "--output", "o.png"], 2,
     "error: --instruction: the instruction is empty"),
    (["edit", "--image", str(EXAMPLE), "--instruction", "x" * 2001, "--output", "o.png"], 2,
     "error: --instruction: the instruction has 2001 characters; at most 2000"),
    (["judge", "--reference", str(EXAMPLE), "--edited", str(EXAMPLE), "--instruction", "  "], 2,
     "error: the instruction is empty"),
    # a trace over what is no trace: a zip of the user's files was replaced whole; an output under a trace file's name
    ([*EDIT, "--output", "o.png", "--trace", "photos.zip"], 1, "error: --trace photos.zip exists and is no trace"),
    # the trace's teacher or critic, checked before the judge's and the editor's weights load (was after both)
    ([*EDIT, "--output", "o.png", "--trace", "t", "--critic", "images"], 1,
     "error: --critic: images is a folder without model files"),
    ([*EDIT, "--output", "images/step-2-dmd.png", "--trace", "images"], 2,
     "error: --output and --trace are the same file (images/step-2-dmd.png): the trace writes a file of that name"),
    ([*EDIT, "--output", "o.png", "--steps", "0"], 2, "error: --steps must be between 1 and 1000, got 0"),
    ([*EDIT, "--output", "o.png", "--steps", "-1"], 2, "error: --steps must be between 1 and 1000, got -1"),
    # (100000000 steps: 4.8 GB of sampling times built, and days of sampling, instead of one line)
    ([*EDIT, "--output", "o.png", "--steps", "100000000"], 2, "error: --steps must be between 1 and 1000"),
    ([*EDIT, "--output", "o.png", "--candidates", "0"], 2, "error: --candidates must be >= 1"),
    ([*EDIT, "--output", "o.txt"], 2, "error: --output must end in one of .png"),
    (["train", "--config", "bad.yaml"], 2, "error: bad.yaml: not valid YAML at line 3"),  # was PyYAML's traceback
    (["train", "optim.lrr=1e-4"], 2, "error: unknown config key(s) optim.lrr (did you mean optim.lr?)"),
    (["eval", "shapes", "--steps", "0"], 2, "error: --steps and --teacher-steps must be between 1 and 1000"),
    # a recipe's model folder that is not there: was "checkpoint folder not found: runs/shapes/teacher/base", no key
    (["train", "--config", str(ROOT / "configs/shapes/npedit.yaml"), "output_dir=r"], 1,
     "error: model.base=runs/shapes/teacher/base: no such folder (a folder an earlier stage of the Shapes chain "
     "writes: see the README's Shapes world); the bundled Shapes models to start from: model.base=assets/shapes/"),
    (["train", "--config", str(ROOT / "configs/shapes/npedit.yaml"), "output_dir=r", "model.base=assets/shapes/teacher",
      "model.student=my/own/editor"], 1, "error: model.student=my/own/editor: no such folder; the bundled"),
    (["eval", "shapes", "--baseline", "teacher", "--teacher-steps", "5000"], 2,
     "error: --steps and --teacher-steps must be between 1 and 1000"),
    (["bench", "--teacher-steps", "100000"], 2, "error: --steps and --teacher-steps must be at most 1000"),
    (["eval", "shapes", "--baseline", "teacher", "--strength", "5", "--n", "1"], 2,
     "error: --strength must be in (0, 1] (1: pure noise), got 5.0"),  # was a benchmark of nonsense, status 0
    (["eval", "shapes", "--baseline", "teacher", "--model", "assets/shapes/editor"], 2,
     "error: --baseline teacher benchmarks the teacher (--teacher), not --model"),  # --model was ignored, status 0
    (["eval", "shapes", "--teacher", "assets/shapes/teacher"], 2, "error: --teacher is the teacher of --baseline"),
    # one file for the list read and a file written: the list was emptied (read already, then truncated)
    (["edit", "--batch", "one.jsonl", "--output-dir", "out", "--candidates", "2", "--verdicts", "./one.jsonl"], 2,
     "error: --batch and --verdicts are the same file (./one.jsonl)"),
    (["judge", "--batch", "one.jsonl", "--output", "v.csv", "--questions", "v.csv"], 2,
     "error: --output and --questions are the same file (v.csv)"),
    # an output named as an image of the list: the verdicts were written over the edited image
    (["judge", "--batch", "pairs.jsonl", "--output", "out/../edited.png"], 2,
     "error: --output out/../edited.png is line 1's edited image: writing it would replace that image"),
    (["bench", "--device", "tpu"], 2, "error: --device: unknown device 'tpu': use auto, cpu, cuda or cuda:N"),
    (["shapes", "vae", "lrr=1"], 2, "error: unknown config key(s) lrr (did you mean lr?)"),
    (["shapes", "judge", "steps=ten"], 2, "error: unknown config key(s) steps"),
    # (these were torch's errors, or a ZeroDivisionError after the whole vision stage had trained)
    (["shapes", "judge", "preset=quick", "eval_every=0"], 2, "error: threads must be >= 0 (0: leave as is) and "
     "log_every, eval_every and eval_cases >= 1, got 1, 2, 0 and 6"),
    # (numpy's "expected non-negative integer" inside the run; eval_seed's after the whole training)
    (["shapes", "judge", "preset=quick", "eval_seed=-1"], 2, "error: eval_seed must be between 0 and 2**32 - 1"),
    (["shapes", "judge", "preset=quick", "seed=-1"], 2, "error: seed must be between 0 and 2**32 - 1, got -1"),
    (["shapes", "judge-eval", "seed=-1"], 2, "error: --seed must be between 0 and 2**32 - 1, got -1"),
    (["shapes", "teacher-eval", "seed=-1"], 2, "error: --seed must be between 0 and 2**32 - 1, got -1"),
    (["shapes", "teacher-eval", "cfg=nan"], 2, "error: --cfg must be a number, got nan"),  # NaN went into the JSON
    (["shapes", "judge", "preset=quick", "device=banana"], 2, "error: unknown device 'banana'"),
    # (the other stages wrote their run folder and config.yaml first, then failed with status 1)
    (["shapes", "vae", "preset=quick", "device=banana", "output_dir=dv"], 2, "error: unknown device 'banana'"),
    (["shapes", "judge", "preset=quick", "init=/no/such/judge", "output_dir=runs/nj"], 1,
     "error: init=/no/such/judge: no such folder"),
    (["shapes", "vae", "steps=-1"], 2, "error: steps and batch_size must be >= 1, got steps=-1"),  # was status 0
    (["shapes", "teacher", "batch_size=0"], 2, "error: steps and batch_size must be >= 1"),
    (["shapes", "fast-vae", "seed=-1"], 2, "error: seed must be between 0 and 2**32 - 1, got -1"),
    (["shapes", "judge-eval", "n=0"], 2, "error: --n must be >= 1 and --degrade"),  # was numpy's ValueError
    (["shapes", "judge-eval", "n=2", "out=afile"], 2, "error: --out afile is a file; give a folder"),
    (["shapes", "teacher-eval", "n=2", "out=afile"], 2, "error: --out afile is a file; give a folder"),
    (["export", "run", "--average", "0"], 2, "error: --average takes a number of checkpoints >= 1, got 0"),
    (["export", "run", "--adapters", "--average", "2"], 2, "error: --adapters exports one checkpoint's adapters"),
    (["export", "run", "--adapters", "--keep-paths"], 2, "error: --keep-paths is for a whole editor"),  # was ignored
    # runtime errors: status 1, said before any model loads (these were said after the edit, or not at all)
    ([*EDIT, "--output", "afile/o.png"], 1, "error: cannot write --output afile/o.png ("),  # was "[Errno 17]"
    ([*EDIT, "--output", "images"], 2, "error: --output must end in one of"),
    ([*EDIT, "--output", "o.png", "--verdicts", "images"], 1, "error: --verdicts images is a folder"),
    # a folder of the user's: the trace's reference.png, edited.png, steps.csv... were written over theirs
    ([*EDIT, "--output", "o.png", "--trace", "."], 1, "error: --trace . holds other files and no trace: a trace "
     "writes trace.json, steps.csv, reference.png, edited.png, refined.png and step-N-* files into its folder"),
    ([*EDIT, "--output", "images/edited.png", "--trace", "images"], 2,
     f"error: --output and --trace are the same file ({Path('images/edited.png')})"),
    (["edit", "--batch", "one.jsonl", "--output-dir", "afile"], 1, "error: cannot write --output-dir afile ("),
    (["edit", "--batch", "empty.jsonl", "--output-dir", "out"], 1, "error: empty.jsonl lists no edits"),  # was status 0
    (["edit", "--batch", "images", "--output-dir", "out"], 1, "error: images is a folder; give the list of edits"),
    (["swap-vae", "--vae", "assets/shapes/fast-vae", "--out", "afile"], 1,
     "error: --out afile is a file; give a folder"),  # was a traceback
    (["export", "run", "--out", "afile"], 1, "error: --out afile is a file; give a folder"),  # was [Errno 20], late
    (["export", "run", "--out", "afile/x"], 1, "error: cannot write --out afile/x ("),
    (["import-reimpl", "afile", "--base", "b", "--out", "afile"], 1, "error: --out afile is a file; give a folder"),
    # the checkpoint's path before --base's (which named --base as "checkpoint folder not found: b")
    (["import-reimpl", "nosuch.pt", "--base", "b", "--out", "o"], 1,
     "error: checkpoint not found: nosuch.pt (the state dict file, e.g. from nupurkmr9/npedit"),
    (["import-reimpl", "images", "--base", "b", "--out", "o"], 1, "error: checkpoint images is a folder; give"),
    # a folder holding files: the editor was written into it, over a --base given as --out too
    (["import-reimpl", "images", "--base", ".", "--out", "."], 1, "error: --out . exists and is not empty: give a new"),
    (["swap-vae", "--vae", "assets/shapes/fast-vae", "--out", "."], 1, "error: --out . exists and is not empty: give"),
    (["shapes", "vae", "output_dir=afile", "steps=1"], 1, "error: [Errno 17] File exists: 'afile'"),  # traceback
    # a trained VAE, fast VAE or judge there: a new run replaced it silently (the judge at its first evaluation)
    (["shapes", "vae", "output_dir=runs/v", "steps=1"], 1, f"error: output_dir runs/v already holds a VAE "
     f"({Path('runs/v/vae')}), which a new run would replace: continue it with init={Path('runs/v/vae')} and another"),
    # (the fast VAE saves to vae/ too: a VAE of the other kind there cannot be continued by this stage's init=)
    (["shapes", "fast-vae", "output_dir=runs/v", "steps=1"], 1, f"error: output_dir runs/v already holds a trained "
     f"model (AutoencoderKL) ({Path('runs/v/vae')}), which a new run would replace: pick another output_dir"),
    (["shapes", "judge", "output_dir=runs/j", "preset=quick"], 1, "error: output_dir runs/j already holds a judge"),
    (["shapes", "ref-encoder", "output_dir=runs/re", "steps=1"], 1, "error: output_dir runs/re already holds an "
     f"editor with a pretrained reference encoder ({Path('runs/re/pipeline')}), which a new run would replace: continue "
     f"it with editor={Path('runs/re/pipeline')}"),
    # a trained teacher there: a new run replaced it with an untrained one as it started (even one stopped at once)
    (["shapes", "teacher", "preset=quick", "output_dir=runs/t", f"vae={ROOT / 'assets/shapes/teacher/vae'}"], 1,
     f"error: output_dir runs/t already holds a teacher ({Path('runs/t/base')}), which a new run would replace: "
     f"continue it with init={Path('runs/t/base')} and another output_dir"),
])
def test_a_mistaken_command_line_is_one_line_and_its_status(mistakes, capsys, argv, status, says):
    """Each mistake stops with one line naming it, status 2 for a command line that cannot work as typed, 1 for a
    failure of the work, and writes nothing."""
    before = sorted(p.name for p in mistakes.iterdir())
    code, said = exit_of(argv, capsys)
    assert (code, said[said.find("error:"):][:len(says)]) == (status, says), said  # (argparse's: after its prog)
    assert "Traceback" not in said
    assert sorted(p.name for p in mistakes.iterdir()) == before


def test_an_unexpected_failure_is_one_line_unless_debugging(mistakes, capsys, monkeypatch):
    """A failure no command foresaw says its type and message in one line and how to see the traceback
    (NPEDIT_DEBUG=1, which lets it through)."""
    from npedit import cli

    def broken(args):
        raise RuntimeError("something inside broke")

    monkeypatch.setattr(cli, "cmd_export", broken)
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    assert exit_of(["export", "run"], capsys) == (1, "error: RuntimeError: something inside broke (unexpected; "
                                                     "NPEDIT_DEBUG=1 shows the traceback)")
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(RuntimeError, match="something inside broke"):
        cli.main(["export", "run"])


@pytest.mark.parametrize("error, says", [
    # the manifest's images deleted midway: ImageError was said as an unexpected error, naming no checkpoint
    ("images", "error: none of the 12 samples' images can be read; {ckpt} is the newest complete checkpoint: fix the "
               "data, then continue with the same command and --resume, or export it (python -m npedit export "
               "{run})"),
    # a full disk while appending to metrics.jsonl: "OSError: [Errno 28] ... (unexpected; ...)"
    ("disk", "error: the run stopped: No space left on device ({run}{sep}metrics.jsonl); {ckpt} is the newest complete "
             "checkpoint: free space (or fix that), then continue with the same command and --resume, or export it "
             "(python -m npedit export {run})"),
])
def test_a_run_stopped_by_its_data_or_its_disk_names_the_checkpoint_to_resume_from(mistakes, capsys, monkeypatch,
                                                                                   error, says):
    import errno

    from npedit.images import ImageError
    from npedit.training import trainer

    class Stopped:
        def __init__(self, cfg):
            ckpt = Path(cfg.output_dir) / "checkpoints" / "step_000004"
            ckpt.mkdir(parents=True)
            (ckpt / "trainer_state.json").write_text("{}")
            self.log = Path(cfg.output_dir) / "metrics.jsonl"

        def resume(self):
            return False

        def train(self):
            if error == "images":
                raise ImageError("none of the 12 samples' images can be read")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.log))

    monkeypatch.setattr(trainer, "Trainer", Stopped)
    code, said = exit_of(["train", "model.base=m", "data.train=shapes", "loss.lambda_vlm=0", "output_dir=runs/s"],
                         capsys)
    assert code == 1 and said == says.format(ckpt=Path("runs/s/checkpoints/step_000004"), run=Path("runs/s"),
                                             sep=os.sep), said
    from npedit import cli

    monkeypatch.setenv(cli.DEBUG_ENV, "1")  # debugging: the error itself, with its traceback
    with pytest.raises(ImageError if error == "images" else OSError):
        cli.main(["train", "model.base=m", "data.train=shapes", "loss.lambda_vlm=0", "output_dir=runs/s2"])


def test_an_error_from_a_data_worker_is_said_by_its_last_line():
    """With data.num_workers > 0, torch puts the worker's whole traceback in the error it raises again: the stopped
    run's line was that traceback, then the checkpoint to resume from."""
    from npedit.cli import _last_line
    from npedit.images import ImageError

    worker = ("Caught ImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
              '  File "data.py", line 9, in __getitem__\n    raise ImageError(...)\n'
              "npedit.images.ImageError: none of the 12 samples' images can be read\n")
    assert _last_line(ImageError(worker)) == "none of the 12 samples' images can be read"
    assert _last_line(ImageError("a.png: gone")) == "a.png: gone"


def test_ctrl_c_in_training_names_the_checkpoint_to_resume_from(mistakes, capsys, monkeypatch):
    """Ctrl-C during `train` was a KeyboardInterrupt traceback; it is one line naming the newest complete
    checkpoint (published whole, so complete) and how to go on, status 130 as the shell gives an interrupted
    process; elsewhere, "interrupted"."""
    from npedit.training import trainer

    class Interrupted:
        def __init__(self, cfg):
            ckpt = Path(cfg.output_dir) / "checkpoints" / "step_000010"
            ckpt.mkdir(parents=True)
            (ckpt / "trainer_state.json").write_text("{}")

        def train(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "Trainer", Interrupted)
    code, said = exit_of(["train", "model.base=m", "data.train=shapes", "loss.lambda_vlm=0", "output_dir=runs/r"],
                         capsys)
    assert code == 130 and said == (
        f"interrupted: {Path('runs/r/checkpoints/step_000010')} is the newest complete checkpoint: continue with "
        "the same command and --resume, or export it (python -m npedit export runs/r)"), said

    from npedit import cli

    def stopped(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_export", stopped)
    assert exit_of(["export", "run"], capsys) == (130, "interrupted")


def test_a_usage_error_exits_2_with_its_line_from_a_real_process(tmp_path):
    """Through the interpreter (not `main` in this process): status 2, the line on stderr, no traceback."""
    out = run_python("-m", "npedit", "edit", "--image", str(EXAMPLE), "--instruction", "x", "--output", "o.png",
                     "--steps", "0", cwd=tmp_path, ok=False)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last == "error: --steps must be between 1 and 1000, got 0", out
    assert not (tmp_path / "o.png").exists()


def test_an_edit_replaces_its_output_whole(mistakes, capsys, ctrl_c_at_fsync):
    """The result is written through a temporary file and renamed: a write cut short (Ctrl-C, a full disk) keeps the
    file an earlier run saved there, where PIL's save into it left it truncated."""

    (mistakes / "o.png").write_bytes(b"an earlier result")

    with ctrl_c_at_fsync():
        assert exit_of([*EDIT, "--output", "o.png"], capsys) == (130, "interrupted")
    assert (mistakes / "o.png").read_bytes() == b"an earlier result"
    assert sorted(p.name for p in mistakes.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("script, argv, status, says", [
    ("lora_size", ["--config", "nosuch.json", "--ranks", "64"], 1, "error: --config nosuch.json: No such file"),
    ("lora_size", ["--config", "afile", "--ranks", "64"], 1, "error: --config afile: not a JSON config"),
    ("lora_size", ["--family", "zimage", "--ranks", "-1"], 2, "error: --ranks must each be >= 1, got -1"),
    ("bench_lora_memory", ["--dim", "0"], 2, "error: --dim, --layers, --batch and --repeats must be >= 1"),
    ("profile_train_step", ["--updates", "0"], 2, "error: --updates and --threads must be >= 1"),
    ("shapes_chain", ["--out", "afile", "--smoke"], 2, "error: --out afile is a file; give a folder"),
    ("gpu_smoke", ["--device", "cpu", "--out", "afile/report.json"], 1, "error: cannot write --out afile/report.json"),
])
def test_a_mistaken_script_line_is_one_line(mistakes, capsys, monkeypatch, script, argv, status, says):
    """The README's scripts, given a wrong path or number, stop with one line before any work (each was a traceback:
    FileNotFoundError, JSONDecodeError, a ValueError from the LoRA wrapper, ZeroDivisionError, NotADirectoryError,
    FileExistsError after the first check)."""
    from script_modules import load_script  # tests/script_modules.py

    main = load_script(script).main
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])  # (two of them read sys.argv themselves)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv) if script in ("lora_size", "gpu_smoke") else main()
    code = exit_.value.code
    said = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert (1 if isinstance(code, str) else code, said[said.index("error:"):][:len(says)]) == (status, says), said


def test_tiny_models_into_a_file_is_one_line(mistakes):
    """`python -m workbench.tiny DIR` with a file as DIR: argparse's line, status 2 (was NotADirectoryError's
    traceback)."""
    out = run_python("-m", "workbench.tiny", "afile", cwd=mistakes, ok=False)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].endswith(
        "error: afile is a file; give a folder for the models"), out.stderr
    out = run_python("-m", "workbench.tiny", "afile/sub", cwd=mistakes, ok=False)  # (NotADirectoryError's traceback)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "error: cannot write the tiny models into afile/sub: Not a directory"], out.stderr


def test_tiny_models_never_replace_a_folders_models(mistakes, tiny_set):
    """`python -m workbench.tiny RUN` into a training run replaced its trained critic/ with a random one (and an
    editor folder's likewise); a folder of other files is refused, and an earlier tiny set's models are kept."""
    (mistakes / "litter").mkdir()  # a file browser's own files are no models of anyone's
    for name in (".DS_Store", "Thumbs.db", "desktop.ini"):
        (mistakes / "litter" / name).write_text("")
    from workbench.tiny import foreign_entries

    assert foreign_entries(mistakes / "litter") == []
    run = mistakes / "run"
    (run / "critic").mkdir(parents=True)
    (run / "critic" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("stage: npedit\n")
    out = run_python("-m", "workbench.tiny", "run", cwd=mistakes, ok=False)
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].endswith(
        "error: run holds other files (config.yaml): give a new or empty folder, or an earlier tiny set's"), out.stderr
    assert (run / "critic" / "config.json").read_text() == "{}" and not (run / "editor").exists()
    import shutil

    from workbench.tiny import build_tiny_set

    # from Python: an editor there is kept (it was saved again with a new random student whenever critic/ was missing)
    shutil.copytree(tiny_set["model"], mistakes / "set" / "editor")
    weights = mistakes / "set" / "editor" / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    paths = build_tiny_set(mistakes / "set", base=tiny_set["teacher"], judge=tiny_set["judge"])
    assert weights.stat().st_mtime_ns == before and Path(paths["critic"], "config.json").is_file()


def test_an_eval_report_is_replaced_whole(mistakes, capsys, ctrl_c_at_fsync):
    """`eval shapes` writes its report through a temporary file: a write cut short keeps the report an earlier run
    of the same name wrote (it was rewritten in place, so Ctrl-C there left half a JSON file)."""

    (mistakes / "ev").mkdir()
    (mistakes / "ev" / "mine.json").write_text('{"earlier": true}')

    with ctrl_c_at_fsync():
        assert exit_of(["eval", "shapes", "--n", "1", "--out", "ev", "--name", "mine"], capsys) == (130, "interrupted")
    assert (mistakes / "ev" / "mine.json").read_text() == '{"earlier": true}'
    assert sorted(p.name for p in (mistakes / "ev").iterdir()) == ["mine.json"]


def test_judge_says_when_object_is_not_asked_about(capsys):
    """--object names the removed object; with another edit type no question asks about it, which the verdict did
    not say (a researcher's `--edit-type replace --object cat` looked judged about the cat)."""
    from npedit.cli import main

    pair = ["judge", "--reference", str(EXAMPLE), "--edited", str(EXAMPLE), "--instruction", "make the circle blue"]
    assert main([*pair, "--edit-type", "recolor", "--object", "red circle"]) == 0
    out, err = capsys.readouterr()
    assert "note: --object is asked about for --edit-type remove only" in err
    assert "red circle" not in out  # indeed not asked
    assert main([*pair, "--edit-type", "remove", "--object", "red circle"]) == 0
    out, err = capsys.readouterr()
    assert "note: --object" not in err and "red circle" in out


def test_an_edit_never_saves_over_an_image_it_reads(mistakes, capsys, monkeypatch):
    """`edit --image a.png --output a.png` replaced the user's photo with its edit; with --batch, a line's result
    DIR/<id>.png could be its own image or that of a line not yet read (which then edited the first line's result,
    and the photo was gone). Each stops before any model loads, naming the flags or the line; nothing is written."""
    import os
    import shutil

    from npedit.pipeline import NPEditPipeline

    def loaded(*args, **kwargs):
        raise AssertionError("the editor loaded")

    monkeypatch.setattr(NPEditPipeline, "from_pretrained", loaded)
    photos = mistakes / "photos"
    photos.mkdir()
    for name in ("x.png", "y.png"):
        shutil.copyfile(EXAMPLE, photos / name)
    try:
        os.symlink(photos / "x.png", mistakes / "link.png")
    except OSError:  # (Windows without the right to make links: the other spellings are still checked)
        pass
    lines = [{"id": "y", "image": "photos/x.png", "instruction": "add"},  # saved as photos/y.png: line 2's image
             {"id": "z", "image": "photos/y.png", "instruction": "add"}]
    (mistakes / "two.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (mistakes / "own.jsonl").write_text(json.dumps(lines[1] | {"id": "y"}) + "\n")
    before = {p: p.read_bytes() for p in mistakes.rglob("*") if p.is_file()}
    edit = ["edit", "--instruction", "add a circle", "--image"]
    for argv, says in [
        ([*edit, "photos/x.png", "--output", "photos/x.png"], "error: --image and --output are the same file"),
        ([*edit, "photos/x.png", "--output", "./photos/../photos/x.png"], "error: --image and --output are the same"),
        *([([*edit, "link.png", "--output", "photos/x.png"], "error: --image and --output are the same file")]
          if (mistakes / "link.png").exists() else []),
        (["edit", "--batch", "two.jsonl", "--output-dir", "photos"],
         f"error: two.jsonl:1: id 'y' would be saved as {Path('photos/y.png')}, the image of line 2, which would then "
         "be lost: give an --output-dir that holds none of the list's images"),
        (["edit", "--batch", "own.jsonl", "--output-dir", "photos"],
         f"error: own.jsonl:1: id 'y' would be saved as {Path('photos/y.png')}, its own image"),
    ]:
        code, said = exit_of(argv, capsys)
        assert (code, said[:len(says)]) == (2, says), said
    assert {p: p.read_bytes() for p in mistakes.rglob("*") if p.is_file()} == before


def _two_of_each(folder: Path) -> None:
    """In `folder`: two.jsonl (edits "a" and "b"), pairs.jsonl (pairs "a" and "b") and an earlier report at each of
    v.jsonl, q.csv and e.jsonl, for the tests of reports written as they go."""
    line = json.loads((folder / "one.jsonl").read_text())
    (folder / "two.jsonl").write_text("".join(json.dumps(line | {"id": i}) + "\n" for i in "ab"))
    pair = {"reference": str(EXAMPLE), "edited": str(EXAMPLE), "instruction": "add a circle"}
    (folder / "pairs.jsonl").write_text("".join(json.dumps(pair | {"id": i}) + "\n" for i in "ab"))
    for name in ("v.jsonl", "q.csv", "e.jsonl"):
        (folder / name).write_text("an earlier report\n")


def test_a_report_written_as_it_goes_replaces_the_previous_one_only_once_complete(mistakes, capsys, monkeypatch):
    """`edit --verdicts` and `judge --batch --output/--questions` opened their files for writing at the start: a run
    that failed or was stopped (Ctrl-C, a full disk) had emptied the previous report. Rows now go into NAME.partial,
    renamed over NAME when the run ends: stopped at the second line, the previous report is as it was and the first
    line's row is in the partial file, both said on stderr (a full disk: one error line, not "unexpected"); a run that
    ends replaces it and leaves no partial file."""
    from npedit import cli, pairs

    _two_of_each(mistakes)
    loaded, load_image = [], cli.load_image

    def stopped_at_the_second(path):
        loaded.append(path)
        if len(loaded) == 2:
            raise KeyboardInterrupt
        return load_image(path)

    monkeypatch.setattr(cli, "load_image", stopped_at_the_second)
    assert exit_of(["edit", "--batch", "two.jsonl", "--output-dir", "out", "--verdicts", "e.jsonl"],
                   capsys) == (130, "interrupted")
    assert (mistakes / "e.jsonl").read_text() == "an earlier report\n"
    assert [json.loads(r)["id"] for r in (mistakes / "e.jsonl.partial").read_text().splitlines()] == ["a"]
    monkeypatch.setattr(cli, "load_image", load_image)

    judged = pairs.judge_pairs

    def stopped_after_one(judge, rows):
        for k, got in enumerate(judged(judge, rows)):
            if k == 1:
                raise KeyboardInterrupt
            yield got

    monkeypatch.setattr(pairs, "judge_pairs", stopped_after_one)
    judge = ["judge", "--batch", "pairs.jsonl", "--output", "v.jsonl", "--questions", "q.csv"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(judge)
    said = capsys.readouterr().err
    assert exit_.value.code == 130, exit_.value.code
    assert f"note: v.jsonl is as it was (the run stopped); the 1 row this run wrote is in {Path('v.jsonl.partial')}" \
        in said, said
    assert [(mistakes / n).read_text() for n in ("v.jsonl", "q.csv")] == ["an earlier report\n"] * 2
    assert [json.loads(r)["id"] for r in (mistakes / "v.jsonl.partial").read_text().splitlines()] == ["a"]
    assert (mistakes / "q.csv.partial").read_text().startswith("id,reference,edited,instruction,kind")

    monkeypatch.setattr(pairs, "judge_pairs", judged)
    write = pairs.RowWriter.write

    def disk_full(self, row):
        if self.rows == 1:
            raise OSError(28, "No space left on device")
        write(self, row)

    monkeypatch.setattr(pairs.RowWriter, "write", disk_full)
    assert exit_of(judge, capsys) == (1, "error: writing v.jsonl and q.csv failed: No space left on device")
    assert [(mistakes / n).read_text() for n in ("v.jsonl", "q.csv")] == ["an earlier report\n"] * 2
    monkeypatch.setattr(pairs.RowWriter, "write", write)
    assert cli.main(judge) == 0
    assert [json.loads(r)["id"] for r in (mistakes / "v.jsonl").read_text().splitlines()] == ["a", "b"]
    assert (mistakes / "q.csv").read_text().startswith("id,reference,edited,instruction,kind")
    assert sorted(p.name for p in mistakes.glob("*.partial")) == ["e.jsonl.partial"]  # (the edit's, above)


def test_a_report_whose_rename_fails_is_one_error_line_naming_its_partial_file(mistakes, capsys, monkeypatch):
    """The rename that puts a finished report in place can fail (Windows: another program holds it open). `edit
    --verdicts` ended with "error: PermissionError: ... (unexpected; ...)", and when `judge --batch`'s --questions
    file failed, its --output file, complete too, was silently left in its partial file. Now each report that can be
    replaced is, and one error line names each that was not and the partial file holding its complete text."""
    _two_of_each(mistakes)
    real = os.replace
    held = set()

    def replace(src, dst):
        if Path(dst).name in held:
            raise PermissionError(13, "Permission denied", str(src), None, str(dst))
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    not_replaced = "{0} was not replaced: renaming it over {0} failed (Permission denied); its complete text is kept " \
                   "in {0}.partial"
    held.add("e.jsonl")
    assert exit_of(["edit", "--batch", "two.jsonl", "--output-dir", "out", "--verdicts", "e.jsonl"], capsys) \
        == (1, "error: " + not_replaced.format("e.jsonl"))
    assert sorted(p.name for p in (mistakes / "out").iterdir()) == ["a.png", "b.png"]  # (the edits are saved)
    assert (mistakes / "e.jsonl").read_text() == "an earlier report\n"
    assert [json.loads(r)["id"] for r in (mistakes / "e.jsonl.partial").read_text().splitlines()] == ["a", "b"]

    judge = ["judge", "--batch", "pairs.jsonl", "--output", "v.jsonl", "--questions", "q.csv"]
    for failing in (["q.csv"], ["v.jsonl", "q.csv"]):
        held.clear()
        held.update(failing)
        for name in ("v.jsonl", "q.csv"):
            (mistakes / name).write_text("an earlier report\n")
        assert exit_of(judge, capsys) == (1, "error: " + "; ".join(not_replaced.format(n) for n in failing))
        for name in ("v.jsonl", "q.csv"):
            held_open = name in failing
            assert ((mistakes / name).read_text() == "an earlier report\n") is held_open, name
            assert (mistakes / f"{name}.partial").exists() is held_open, name
        assert [json.loads(r)["id"] for r in (mistakes / "v.jsonl" if "v.jsonl" not in failing else
                                              mistakes / "v.jsonl.partial").read_text().splitlines()] == ["a", "b"]


def test_an_edit_run_that_wrote_no_verdict_keeps_the_previous_verdicts(mistakes, capsys):
    """`edit --batch --verdicts V` where every line failed ended normally and replaced the previous V with an empty
    file. V is now kept as it was and stderr says so; a run that writes rows still replaces it."""
    line = json.loads((mistakes / "one.jsonl").read_text())
    (mistakes / "lost.jsonl").write_text("".join(json.dumps(line | {"id": i, "image": f"gone-{i}.png"}) + "\n"
                                                 for i in "ab"))
    (mistakes / "v.jsonl").write_text("an earlier report\n")
    from npedit.cli import main

    capsys.readouterr()
    assert main(["edit", "--batch", "lost.jsonl", "--output-dir", "out", "--verdicts", "v.jsonl"]) == 1
    assert (mistakes / "v.jsonl").read_text() == "an earlier report\n"
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert said == "note: v.jsonl is as it was: this run has no verdict to write (2 of 2 edits failed)", said
    assert not list(mistakes.glob("*.partial"))
    assert main(["edit", "--batch", "one.jsonl", "--output-dir", "out", "--verdicts", "v.jsonl"]) == 0
    assert [json.loads(r)["id"] for r in (mistakes / "v.jsonl").read_text().splitlines()] == ["a"]


def test_an_export_never_replaces_the_runs_own_folders_or_a_users_files(mistakes, capsys):
    """`export RUN --out RUN/checkpoints` published the editor in place of the checkpoints folder (an export inside the
    run replaces its target whole), and `--out .` or any folder of the user's wrote README.md, model_index.json and
    the model's folders into it over files of those names. Each is refused before any model loads, naming why; a
    new folder, one inside exports/, or an earlier export, is still taken."""
    run = mistakes / "runs" / "r"
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    (run / "checkpoints" / "step_000010" / "trainer_state.json").write_text("{}")
    (run / "pipeline").mkdir()
    (mistakes / "project").mkdir()
    (mistakes / "project" / "README.md").write_text("my own notes")
    before = {p: p.read_bytes() for p in mistakes.rglob("*") if p.is_file()}
    for out, says in [
        ("runs/r", "it is the run folder itself, which the export would replace"),
        ("runs/r/checkpoints", "it is the run's own checkpoints, which the export would replace"),
        ("runs/r/checkpoints/step_000010", "it is the run's own checkpoints"),
        ("runs/r/pipeline", "it is the run's own pipeline"),
        ("runs/r/exports", "it is the run's own exports"),
        ("project", "it holds files of its own (README.md) and is no exported editor"),
        (".", "it holds files of its own (afile, bad.yaml, empty.jsonl, images, one.jsonl, ...)"),
    ]:
        code, said = exit_of(["export", "runs/r", "--out", out], capsys)
        assert code == 1 and said.startswith(f"error: cannot export to {out}: {says}"), said
    assert {p: p.read_bytes() for p in mistakes.rglob("*") if p.is_file()} == before
    (mistakes / "earlier").mkdir()
    (mistakes / "earlier" / "model_index.json").write_text("{}")
    from npedit.training.export import check_export_out

    (mistakes / "from-finder").mkdir()  # a folder a file browser made holds its own files, not the user's
    for litter in (".DS_Store", "Thumbs.db", "desktop.ini", "._x"):
        (mistakes / "from-finder" / litter).write_bytes(b"")
    for out in ("runs/r/exports/step_000010", "runs/r/mine", "new", "images", "earlier", "from-finder"):
        check_export_out(run, mistakes / out)  # (raises nothing)
    from npedit.cli import _check_new_folder

    _check_new_folder(mistakes / "from-finder", "--out")  # (import-reimpl's check: raises nothing)


def test_a_swapped_vae_editor_is_written_whole(mistakes, capsys, monkeypatch):
    """`swap-vae` saved the new editor straight into --out: a Ctrl-C or a full disk midway left half an editor there
    (a model_index.json that loads, or a folder a second try refused as not empty). It is written beside and renamed
    in once whole: stopped midway, nothing is left at --out."""
    from npedit import pipeline

    def cut_short(src, out, note):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "carry_over", cut_short)  # (after the models are saved, before the card)
    vae = str(ROOT / "assets" / "shapes" / "fast-vae")
    assert exit_of(["swap-vae", "--vae", vae, "--out", "fast"], capsys) == (130, "interrupted")
    assert not [p.name for p in mistakes.iterdir() if "fast" in p.name]


@pytest.mark.parametrize("argv, report", [
    (["shapes", "judge-eval", "n=2", "out=ev"], "judge_eval.json"),
    (["shapes", "teacher-eval", "n=2", "steps=1", "out=ev"], "teacher_eval.json"),
])
def test_a_shapes_eval_report_is_replaced_whole(mistakes, capsys, ctrl_c_at_fsync, argv, report):
    """`shapes judge-eval` and `shapes teacher-eval` wrote their reports in place (as `eval shapes` once did): a
    Ctrl-C or a full disk midway left half a JSON file where an earlier report was. Both are written whole now."""

    (mistakes / "ev").mkdir()
    (mistakes / "ev" / report).write_text('{"earlier": true}')

    with ctrl_c_at_fsync():
        assert exit_of(argv, capsys) == (130, "interrupted")
    assert (mistakes / "ev" / report).read_text() == '{"earlier": true}'
    assert sorted(p.name for p in (mistakes / "ev").iterdir()) == [report]


def test_help_into_a_closed_pipe_is_quiet(tmp_path):
    """`python -m npedit edit --help | head -1` sometimes ended "error: BrokenPipeError ... (unexpected ...)", status 1,
    when the reader left before the help was written: the output's reader leaving is no error to report."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-m", "npedit", "edit", "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    proc.stdout.close()  # the reader has gone before anything is written
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "BrokenPipeError" not in err and "Traceback" not in err and "error:" not in err, err


def test_bench_times_the_bundled_teacher_for_shapes_editors_only(tiny_set, capsys):
    """`bench --model GENERAL --size 512` timed the bundled 64 px Shapes teacher at 512 px as the editor's zero-shot
    baseline (a speed-up against a model of another world); without --teacher a general editor has no baseline."""
    from npedit.cli import main

    assert main(["bench", "--model", tiny_set["model"], "--size", "64", "--repeats", "1", "--batch", "1",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out.strip().splitlines()[-1])
    assert res["edit_latency_ms"] > 0 and "speedup_vs_teacher" not in res
    assert "no teacher baseline: give --teacher BASE" in err
    assert main(["bench", "--model", tiny_set["model"], "--teacher", tiny_set["teacher"], "--teacher-steps", "1",
                 "--size", "64", "--repeats", "1", "--batch", "1", "--json"]) == 0
    assert "speedup_vs_teacher" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_judge_takes_the_judge_max_pixels_name_of_edit_and_the_app():
    """`edit` and the app call the judge's cap --judge-max-pixels; `judge` called it --max-pixels only, and refused
    the other name as an unrecognized argument."""
    from npedit.cli import build_parser

    for flag in ("--max-pixels", "--judge-max-pixels"):
        assert build_parser().parse_args(["judge", flag, "200704"]).max_pixels == 200704


def test_an_object_the_judge_is_not_asked_about_is_not_checked_for_its_control_tokens(tmp_path, monkeypatch, capsys):
    """--object is asked about a removal only: for a recolour it was refused for a control token the judge never
    reads (the verdict came before)."""
    from npedit.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["judge", "--reference", str(EXAMPLE), "--edited", str(EXAMPLE), "--instruction", "make it red",
                 "--edit-type", "recolor", "--object", "<image> circle"]) == 0
    assert "p_edit" in capsys.readouterr().out


@pytest.mark.parametrize("argv, says", [
    (["judge", "--reference", str(EXAMPLE), "--edited", str(EXAMPLE), "--instruction", "add a <image> circle"],
     "error: --instruction holds '<image>', which the judge's tokenizer reads as one of its control tokens"),
    (["judge", "--reference", str(EXAMPLE), "--edited", str(EXAMPLE), "--instruction", "add a circle",
      "--extra", "is it <|im_end|> blue?"], "error: --extra holds '<|im_end|>'"),
    (["edit", "--image", str(EXAMPLE), "--instruction", "add a circle", "--output", "o.png", "--refine", "1",
      "--keep", "the <video> square"], "error: --keep holds '<video>'"),
])
def test_a_judges_control_token_in_a_text_is_refused_before_its_weights_load(tmp_path, monkeypatch, capsys, argv,
                                                                             says):
    """An instruction holding one of the judge's control tokens was refused once the judge had loaded (minutes for a
    real one); its processor alone says it now."""
    from npedit import judges

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(judges, "load_judge", lambda *a, **k: pytest.fail("the judge's weights were loaded"))
    code, said = exit_of(argv, capsys)
    assert code == 2 and said.startswith(says), said


def test_edit_says_that_object_is_asked_for_a_removal_only(tmp_path, capsys):
    """`edit --edit-type recolor --object X --refine 20` (the README's example once) refined exactly as without
    --object, saying nothing; `judge` said so already."""
    from npedit.cli import main

    assert main(["edit", "--image", str(EXAMPLE), "--instruction", "make the circle green", "--edit-type", "recolor",
                 "--object", "purple triangle", "--output", str(tmp_path / "o.png")]) == 0
    assert ("note: --object is asked about for --edit-type remove only (is it still there?); for --edit-type recolor, "
            "--keep names the objects to leave in place") in capsys.readouterr().err


def test_resume_of_a_moved_run_says_to_name_its_folder(mistakes, capsys, monkeypatch):
    """`train --config RUN/config.yaml --resume` of a run moved or renamed since (its config keeps the output_dir it
    started in) said "no checkpoint in OLD/checkpoints; starting from step 0" and trained a new run there."""
    from npedit.config import load_config, save_config
    from npedit.training import trainer

    cfg = load_config(None, ["model.base=m", "data.train=shapes", "loss.lambda_vlm=0", "output_dir=runs/orig"])
    moved = mistakes / "runs" / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    save_config(cfg, moved / "config.yaml")
    code, said = exit_of(["train", "--config", "runs/moved/config.yaml", "--resume"], capsys)
    assert (code, said) == (2, f"error: {Path('runs/moved/config.yaml')} is the config of the run in "
                               f"{Path('runs/moved')}, but its output_dir is {Path('runs/orig')} (where it was started, "
                               f"from that folder; moved since?): add output_dir={Path('runs/moved')} to continue it "
                               "there"), said
    assert not (mistakes / "runs" / "orig").exists()

    class Resumed:
        def __init__(self, cfg):
            self.cfg = cfg

        def resume(self):
            raise ValueError(f"resumed {self.cfg.output_dir}")

    monkeypatch.setattr(trainer, "Trainer", Resumed)
    code, said = exit_of(["train", "--config", "runs/moved/config.yaml", "--resume", "output_dir=runs/moved"], capsys)
    assert (code, said) == (1, "error: resumed runs/moved"), said
