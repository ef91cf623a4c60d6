"""Other `npedit train` processes: the CLI trainer's warning that it would share its device (npedit.processes)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from cli_runner import ROOT

from npedit import processes
from npedit.cli import main
from npedit.processes import MAIN, launch_devices, sees, sharing_warning, shown

PY = "/usr/bin/python3"


class FakeProcess:
    """A process table entry as `psutil.process_iter(["pid", "ppid", "cmdline"])` gives it."""

    def __init__(self, pid, ppid, cmdline, env=None):
        self.pid, self.info, self._env = pid, {"pid": pid, "ppid": ppid, "cmdline": cmdline}, env or {}

    def environ(self):
        if isinstance(self._env, Exception):
            raise self._env
        return self._env


def _job(pid, ppid, run, gpu):
    """An app job's wrapper (`pid`) and its trainer (`pid + 1`), as workbench.jobs.start_job starts them."""
    env = {"NPEDIT_PID_FILE": f"{run}/job.pid", "CUDA_VISIBLE_DEVICES": gpu}
    command = [PY, "-c", MAIN, "train", "max_steps=9", f"output_dir={run}"]
    return [FakeProcess(pid, ppid, [PY, "-I", "/src/workbench/job_wrapper.py", *command], env),
            FakeProcess(pid + 1, pid, command, env)]


TABLE = [
    FakeProcess(1, 0, ["/sbin/init"]),
    FakeProcess(10, 1, ["bash"]),
    FakeProcess(100, 10, [PY, "-m", "npedit", "train", "output_dir=runs/mine"]),  # the trainer that checks
    FakeProcess(200, 10, [PY, "-m", "npedit", "train", "output_dir=runs/shell"]),  # typed in another shell
    FakeProcess(400, 10, ["npedit", "train", "output_dir=runs/gpu1"], {"CUDA_VISIBLE_DEVICES": "1"}),
    FakeProcess(500, 10, [PY, "-m", "pytest", "-k", "train"]),  # no trainer
    FakeProcess(50, 1, [PY, "app.py"]),
    *_job(300, 50, "/runs/app-job", "0"),
    # a torchrun launch of two ranks on GPUs 2 and 3
    FakeProcess(600, 10, [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "npedit", "train",
                          "output_dir=runs/ddp"], {"CUDA_VISIBLE_DEVICES": "2,3"}),
    *(FakeProcess(600 + r, 600, [PY, "-u", "-m", "npedit", "train", "output_dir=runs/ddp"],
                  {"CUDA_VISIBLE_DEVICES": "2,3", "LOCAL_RANK": str(r - 1)}) for r in (1, 2)),
]


@pytest.fixture
def table(monkeypatch):
    """The process table is TABLE (plus what a test adds to the list it returns)."""
    rows = list(TABLE)
    monkeypatch.setattr(processes, "listing", lambda: iter(rows))
    monkeypatch.delenv("NPEDIT_PID_FILE", raising=False)
    return rows


def _named(line):
    """The pids a warning names."""
    return sorted(int(part.split(" ", 1)[0].split(":")[0]) for part in line.split("pid ")[1:]) if line else []


def test_a_shell_trainer_is_warned_of_the_others_on_its_device_each_launch_once(table):
    """From a shell, on GPU 0: the other shell trainer (which sees every GPU), the app's job on GPU 0 (once: its
    wrapper, not its trainer too) and, the process table's say being all there is, not the trainers hidden from
    GPU 0 (GPU 1; the launch on GPUs 2 and 3, named once, by its launcher, on GPU 3)."""
    line = sharing_warning(["cuda:0"], me=100)
    assert _named(line) == [200, 300], line
    assert line.startswith("warning: 2 other npedit trains may train on GPU 0 (pid 200: "
                           f"{PY} -m npedit train output_dir=runs/shell; pid 300 (an app job): {PY} -m npedit train "
                           "max_steps=9 output_dir=/runs/app-job): this run will share the GPU with them, both slower, "
                           "and its memory may run out; to avoid that, wait for them to end or stop them (an app job: "
                           "Cancel in the app's Train tab), or start this run on another GPU with "
                           "CUDA_VISIBLE_DEVICES=N"), line
    assert "\n" not in line
    assert _named(sharing_warning(["cuda:1"], me=100)) == [200, 400]
    line = sharing_warning(["cuda:3"], me=100)
    assert _named(line) == [200, 600] and "GPU 3 (" in line
    table[:] = [p for p in table if p.pid in (10, 100, 400)]
    assert sharing_warning(["cuda:0"], me=100) is None
    assert sharing_warning(["cuda:1"], me=100) == (
        "warning: another npedit train may train on GPU 1 (pid 400: npedit train output_dir=runs/gpu1): this run will "
        "share the GPU with it, both slower, and its memory may run out; to avoid that, wait for it to end or stop it, "
        "or start this run on another GPU with CUDA_VISIBLE_DEVICES=N")


def test_on_a_cpu_every_other_trainer_counts(table):
    """A CPU trainer shares the cores with any trainer, on a GPU or not."""
    line = sharing_warning(["cpu"], me=100)
    assert _named(line) == [200, 300, 400, 600], line
    assert line.startswith("warning: 4 other npedit trains run on this machine (pid 200: ")
    assert line.endswith("training on the CPU, this run will share its cores with them, both slower; to avoid that, "
                         "wait for them to end or stop them (an app job: Cancel in the app's Train tab)")
    assert "CUDA_VISIBLE_DEVICES" not in line


def test_a_trainer_is_not_warned_of_its_own_launch_or_its_own_app_job(table, monkeypatch):
    """A rank of a torchrun / accelerate launch does not count its launcher or the launch's other ranks; an app job's
    trainer does not count its wrapper, by ancestry or, where the parent is not known, by the job's pid file."""
    table.remove(next(p for p in table if p.pid == 100))  # (the shell trainer of the tests above)
    assert _named(sharing_warning(["cuda:2", "cuda:3"], me=601)) == [200]
    assert _named(sharing_warning(["cuda:0"], me=301)) == [200]  # its wrapper is its parent
    # this process's own children are others (the app checks for trainers it started in another runs folder)
    assert _named(sharing_warning(["cuda:0"], me=50)) == [200, 300]
    wrapper, trainer = _job(300, None, "/runs/app-job", "0")
    table[:] = [p for p in table if p.pid not in (200, 300, 301)] + [wrapper, FakeProcess(301, None, trainer.info[
        "cmdline"], trainer.environ())]  # (their parents not known: a pid reused on Windows)
    assert _named(sharing_warning(["cuda:0"], me=301)) == [300]
    monkeypatch.setenv("NPEDIT_PID_FILE", "/runs/app-job/job.pid")  # (the job's, in the trainer's environment)
    assert sharing_warning(["cuda:0"], me=301) is None


def test_a_trainer_whose_environment_cannot_be_read_counts_and_one_that_ended_does_not(table):
    """Another user's trainer (AccessDenied): on which GPU it trains is not known, so it counts; one that ended
    between the listing and the look at its environment is gone."""
    table[:] = [p for p in table if p.pid in (10, 100)]
    table.append(FakeProcess(700, 10, ["npedit", "train"], psutil.AccessDenied(700)))
    table.append(FakeProcess(800, 10, ["npedit", "train"], psutil.NoSuchProcess(800)))
    assert _named(sharing_warning(["cuda:5"], me=100)) == [700]


def test_the_devices_of_a_launch():
    """This launch's devices on this machine: GPU r per local rank, counted in CUDA_VISIBLE_DEVICES when set; the CPU
    without a GPU or with ACCELERATE_USE_CPU."""
    assert launch_devices({}, gpus=False) == ["cpu"]
    assert launch_devices({"CUDA_VISIBLE_DEVICES": "1"}, gpus=False) == ["cpu"]
    assert launch_devices({}, gpus=True) == ["cuda:0"]
    assert launch_devices({"CUDA_VISIBLE_DEVICES": "2,3"}, gpus=True) == ["cuda:2"]
    assert launch_devices({"CUDA_VISIBLE_DEVICES": "2, 3", "LOCAL_WORLD_SIZE": "2"}, gpus=True) == ["cuda:2", "cuda:3"]
    assert launch_devices({"LOCAL_WORLD_SIZE": "2"}, gpus=True) == ["cuda:0", "cuda:1"]
    assert launch_devices({"ACCELERATE_USE_CPU": "true"}, gpus=True) == ["cpu"]
    # a GPU named by UUID: any trainer that may see a GPU counts
    assert launch_devices({"CUDA_VISIBLE_DEVICES": "GPU-8f2a"}, gpus=True) == ["cuda:GPU-8f2a"]
    assert sees("0", "cuda:GPU-8f2a") and sees(None, "cuda:GPU-8f2a") and not sees("", "cuda:GPU-8f2a")


def test_a_gpu_named_by_uuid_is_warned_of_by_its_name(table):
    """CUDA_VISIBLE_DEVICES=GPU-<uuid>: the other trainer may be on it whatever index it names, so it counts."""
    line = sharing_warning(["cuda:GPU-8f2a"], me=100)
    assert _named(line) == [200, 300, 400, 600] and line.startswith("warning: 4 other npedit trains may train on "
                                                                     "GPU-8f2a (pid 200: "), line


def test_a_long_command_line_keeps_its_start_and_its_end():
    """A trainer's command is named by its start (the program) and its end (where output_dir usually is)."""
    long = [PY, "-m", "npedit", "train", *(f"loss.lambda_{i}=0.5" for i in range(20)), "output_dir=runs/the-one"]
    text = shown(long)
    assert len(text) == processes.SHOWN_CHARS and text.startswith(f"{PY} -m npedit train loss.lambda_0=0.5")
    assert " ... " in text and text.endswith("output_dir=runs/the-one")


def test_the_cli_trainer_warns_then_goes_on(tmp_path, table, capsys, monkeypatch):
    """`npedit train` names the other trainer on its device in one stderr line before any model loads, and goes on
    (here to the next check, a folder that already holds a run); a rank of a launch other than each machine's first
    says nothing (the first speaks for the machine)."""
    me = os.getpid()
    table[:] = [FakeProcess(me, 10, [PY, "-m", "pytest"]), *(p for p in table if p.pid in (10, 200))]
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    args = ["train", "model.base=m", "data.train=shapes", "loss.lambda_vlm=0", f"output_dir={run}"]
    with pytest.raises(SystemExit, match="already holds a run"):
        main(args)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: another npedit train ") and "(pid 200: " in err[0], err
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(SystemExit, match="already holds a run"):
        main(args)
    assert capsys.readouterr().err == ""


def test_a_scan_that_fails_does_not_stop_training(tmp_path, capsys, monkeypatch):
    """The warning is advice: a process table that cannot be read says nothing and the run goes on."""
    def refused():
        raise psutil.AccessDenied()

    monkeypatch.setattr(processes, "listing", refused)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit, match="already holds a run"):
        main(["train", "model.base=m", "data.train=shapes", "loss.lambda_vlm=0", f"output_dir={run}"])
    assert capsys.readouterr().err == ""


def _trainer_line(out_dir: Path) -> subprocess.Popen:
    """A process whose command line reads as `npedit train` (it sleeps)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "npedit", "train",
                             f"output_dir={out_dir}"], env={k: v for k, v in os.environ.items()
                                                            if k not in ("NPEDIT_PID_FILE", "CUDA_VISIBLE_DEVICES")})
    deadline = time.time() + 10
    while time.time() < deadline and "train" not in psutil.Process(proc.pid).cmdline():  # (until exec)
        time.sleep(0.01)
    return proc


def test_a_real_cli_trainer_names_a_real_trainer_and_not_its_launch(tmp_path):
    """Through the interpreter and the real process table: a `python -m npedit train` names a trainer running beside
    it; under torchrun, rank 0 does not name its launcher or rank 1 (on this machine other sessions' trainers may
    be named too: only ours are looked for)."""
    other = _trainer_line(tmp_path / "other")
    env = {k: v for k, v in os.environ.items() if k not in ("NPEDIT_PID_FILE", "CUDA_VISIBLE_DEVICES")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    args = ["-m", "npedit", "train", "model.base=m", "data.train=shapes", "loss.lambda_vlm=0"]
    try:
        run = tmp_path / "run"
        run.mkdir()
        (run / "metrics.jsonl").write_text("")  # the check after the warning stops it before any model loads
        out = subprocess.run([sys.executable, *args, f"output_dir={run}"], env=env, capture_output=True, text=True,
                             timeout=120)
        warnings = [line for line in out.stderr.splitlines() if line.startswith("warning: ")]
        assert out.returncode == 1 and "already holds a run" in out.stderr, out.stderr
        assert len(warnings) == 1 and f"pid {other.pid}: " in warnings[0], out.stderr
        assert warnings[0].startswith("warning: ") and "/other" in warnings[0]  # (its output_dir, at the end)
        launched = tmp_path / "launch"
        launched.mkdir()
        (launched / "metrics.jsonl").write_text("")
        launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node", "2", *args, f"output_dir={launched}"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = launcher.communicate(timeout=180)
        warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
        assert launcher.returncode != 0 and err.count("already holds a run") >= 2, err[-3000:]  # (both ranks)
        assert len(warnings) == 1 and f"pid {other.pid}: " in warnings[0], err[-3000:]
        # neither the launcher nor rank 1 (whose command lines end in the launch's output_dir)
        assert f"pid {launcher.pid}" not in warnings[0] and "/launch" not in warnings[0], warnings
    finally:
        other.kill()
        other.wait()


def test_an_app_job_does_not_warn_of_itself(tmp_path, monkeypatch):
    """A trainer the app started (workbench.jobs: a wrapper that runs it, both with the job's NPEDIT_PID_FILE) does
    not name its own wrapper; it stops here at a model that is not there, after the check."""
    from workbench import jobs

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = tmp_path / "runs"
    (tmp_path / "not-a-model").mkdir()  # there, so the trainer gets to load it (a missing one stops before the check)
    st = jobs.start_job(root / "job", [f"model.base={tmp_path / 'not-a-model'}", "data.train=shapes",
                                       "loss.lambda_vlm=0"], runs_root=root, device="cpu")
    deadline = time.time() + 120
    while jobs.job_status(root / "job").active and time.time() < deadline:
        time.sleep(0.3)
    log = (root / "job" / "train.log").read_text(encoding="utf-8")
    assert "not-a-model is a folder without model files, with no transformer/config.json" in log, log  # (after it)
    warnings = [line for line in log.splitlines() if line.startswith("warning: ")]
    assert not any(f"pid {st.pid}" in line or "/runs/job" in line for line in warnings), warnings
