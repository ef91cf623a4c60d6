"""Background training jobs: `python -m npedit train ...` in its own session, tracked through files.

A job lives in its run folder:
    job.json      how it was started (pid, device, arguments, start time): written before the process starts
    job.pid       the job's pid, written by the job itself first thing (its record if the app dies before job.json
                  has the pid)
    train.log     its stdout and stderr
    exit_code     written by the job's wrapper (job_wrapper.py) when training exits (absent: still running, or
                  killed); 128 + N for a trainer killed by signal N, as a shell says
    cancelled     written when the user cancels it
    status.json   the last state observed (for readers that do not poll the process)
and the trainer's own config.yaml, metrics.jsonl, samples/, checkpoints/, pipeline/ and critic/.
One job at a time per device: `<runs_root>/.locks/<device>.lock` names the run that holds it; it is checked, taken
and freed by one thread or process at a time (an flock on `<device>.turn` beside it: visitors' starts and polls run
at once).
The process is never a child of a Gradio event: closing the browser (or the app) leaves it running.
POSIX: the job is its own session and process group, stopped with SIGTERM then SIGKILL to the group. Windows (no
process groups to signal): a new process group with no console window, stopped by terminating its process tree.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import yaml

from npedit.config import read_yaml
from npedit.files import RUN_LOCK, write_atomic
from npedit.processes import MAIN, other_trainers, sees, typed
from npedit.training.checkpoint import checkpoint_step, latest_checkpoint, latest_readable

LOCK_DIR = ".locks"
STARTING_GRACE_S = 30.0  # a lock younger than this whose run has no job.json yet is still starting
# records its own pid (job.pid: the app may die before job.json has it) and the exit status, even when the app is gone
_WRAPPER = Path(__file__).with_name("job_wrapper.py")
_WINDOWS = os.name == "nt"

_TQDM = re.compile(r"(?:warmup|npedit|sft|critic):\s+\d+%\|[^|]*\|\s*(\d+)/(\d+) \[")  # the trainer's progress bar
_SECRETS = ("NPEDIT_TRAIN_TOKEN",)  # the app's training token: a job has no use for it, so it does not get it
_CHILDREN: dict[int, subprocess.Popen] = {}  # jobs started by this process (polled to reap them)
# the pids of jobs started here that have exited and been reaped: on Windows the wrapper is the whole job, and once
# its Popen is dropped psutil may be refused a look at the pid (read as running) while the pid lingers
_ENDED: set[int] = set()
_MAIN = MAIN  # the code of `python -m npedit` a job runs with `-c` (npedit.processes)


class JobBusy(RuntimeError):
    """The device already runs a job; the message names it and says what to do."""


@dataclass
class JobStatus:
    """What a run folder says about its job right now."""

    run_dir: str
    state: str  # "not started", "running", "cancelling", "finished", "failed", "cancelled", "external"
    message: str = ""
    step: int = 0
    max_steps: int | None = None
    eta_s: float | None = None
    elapsed_s: float | None = None
    resumable: bool = False
    checkpoint: str | None = None
    pipeline: str | None = None
    latest_sample: str | None = None
    last_metrics: dict = field(default_factory=dict)
    device: str | None = None
    pid: int | None = None

    @property
    def active(self) -> bool:
        """Whether the job's process still runs."""
        return self.state in ("running", "cancelling")

    def to_dict(self) -> dict:
        """The status as JSON-ready data."""
        return asdict(self)


def device_name() -> str:
    """The device a new job trains on: the first GPU when there is one, else the CPU."""
    import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=1))  # whole or not at all, no partial temporary left on a full disk


def _job_pid(run_dir: Path, job: dict) -> int | None:
    """The job's pid: from job.json, else from job.pid, which the job writes itself (an app killed between starting
    the process and recording its pid in job.json left only that)."""
    if job.get("pid"):
        return job["pid"]
    try:
        return int((run_dir / "job.pid").read_text(encoding="utf-8"))
    except (OSError, ValueError):  # not written yet (or half: a few bytes)
        return None


def _job_alive(run_dir: Path, job: dict) -> bool:
    """Whether the job's process still runs; one recorded but with no pid anywhere yet is still starting for a while
    (job.json is written before the process starts)."""
    pid = _job_pid(run_dir, job)
    if pid is None:
        return time.time() - job.get("started", 0) < STARTING_GRACE_S
    return _alive(pid, run_dir)


def _alive(pid: int | None, run_dir: Path) -> bool:
    """Whether the job still runs: on POSIX a live member of its process group (wrapper + trainer), on Windows its
    wrapper; a pid now taken by another program (its command line does not name the run folder) is no job."""
    if not pid:
        return False
    child = _CHILDREN.get(pid)
    if child is not None:  # started here
        if child.poll() is None:  # not exited (poll also reaps it)
            return True
        _forget(pid)  # exited and reaped: nothing left to poll
    if _WINDOWS and pid in _ENDED:  # the wrapper is the whole job there, and it ended
        return False
    if not _WINDOWS:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        cmdline = Path(f"/proc/{pid}/cmdline")
        if cmdline.is_file():  # the leader still exists: make sure the pid was not reused by another program
            try:
                return str(run_dir) in cmdline.read_bytes().decode(errors="replace")
            except OSError:
                return True
        if Path("/proc/self").is_dir():  # Linux, the leader gone: the group above still has a member
            return True
    try:  # no /proc (Windows, macOS): the same check through psutil
        return str(run_dir) in " ".join(psutil.Process(pid).cmdline())
    except psutil.ZombieProcess:  # exited, not yet reaped (Linux reads a zombie's cmdline as empty: not the job)
        return False
    except psutil.NoSuchProcess:  # POSIX: the group outlives its leader; Windows: the wrapper is the job
        return not _WINDOWS
    except (psutil.AccessDenied, OSError):
        return True


# ---- the device lock -------------------------------------------------------------------------

def _lock_path(runs_root: Path, device: str) -> Path:
    return runs_root / LOCK_DIR / (device.replace(":", "_") + ".lock")


def _reap() -> None:
    """Wait for the jobs started here that have exited and forget them: each stayed a zombie process until a status
    read polled it (a job that finished with no tab open, for as long as none was), and its Popen in `_CHILDREN` for
    good (every job that was not cancelled)."""
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            _forget(pid)


def _forget(pid: int) -> None:
    """Drop the Popen of a job started here that has exited (and been reaped), remembering that it ended."""
    _CHILDREN.pop(pid, None)
    _ENDED.add(pid)


def active_job(runs_root: str | os.PathLike, device: str | None = None) -> Path | None:
    """The run folder whose job holds `device` (default: this machine's training device), or None."""
    _reap()  # (asked on every page load and before every start)
    lock = _lock_path(Path(runs_root), device or device_name())
    data = _read_json(lock)
    if not data:
        return None
    run = Path(data["run_dir"])
    job = _read_json(run / "job.json")
    if job is None:
        starting = time.time() - data.get("time", 0) < STARTING_GRACE_S
        return run if starting else None
    return run if _job_alive(run, job) else None


@contextmanager
def _lock_turn(runs_root: Path, device: str):
    """Take the device lock's turn: its check, removal when stale and creation happen for one thread or process at a
    time (two starts both found a stale lock, and one removed the lock the other had just made: two jobs on one
    device; a poll freeing an ended run's lock could likewise remove a new start's)."""
    guard = _lock_path(runs_root, device).with_suffix(".turn")
    guard.parent.mkdir(parents=True, exist_ok=True)
    with open(guard, "ab") as f:  # each call its own open file, so threads of one process wait for each other too
        if os.name == "nt":  # no flock there: a lock on the file's first byte, freed before the file closes
            import msvcrt
            f.seek(0)
            while True:
                try:
                    msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)  # (it gives up after 10 s of tries: wait on)
                    break
                except OSError:
                    continue
            try:
                yield
            finally:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX)  # (released as the file closes, also when the process dies)
            yield


def outside_trainer(runs_root: str | os.PathLike, device: str) -> str | None:
    """A line naming an `npedit train` process on `device` that no job of `runs_root` is (one started from a shell, or
    by an app on another runs folder), which the device lock does not see; None when there is none. Read from the
    process table at a start, not at polls: 3.9 ms for 81 processes on a 2-core CPU."""
    root = Path(runs_root).resolve()
    for other in other_trainers():
        pid_file = other.env.get("NPEDIT_PID_FILE") if other.env else None
        if pid_file and Path(pid_file).resolve().is_relative_to(root):
            continue  # a job of these runs: the lock's business (a stale lock is freed by its job's liveness)
        if sees(other.visible, device):
            return f"pid {other.pid}: {typed(other.cmdline)[:300]}"
    return None


def _take(runs_root: Path, device: str, run_dir: Path) -> Path:
    lock = _lock_path(runs_root, device)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = active_job(runs_root, device)
            if holder is not None and holder != run_dir:
                raise JobBusy(f"{device} is busy with run '{holder.name}' ({holder}). One job runs per device: "
                              "wait for it to finish or cancel it, then start again.") from None
            lock.unlink(missing_ok=True)  # stale: its job has ended
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"run_dir": str(run_dir), "time": time.time()}, f)
        return lock
    raise JobBusy(f"could not take the lock {lock}; another start is in progress")


def _release(runs_root: Path, device: str, run_dir: Path) -> None:
    lock = _lock_path(runs_root, device)
    if not lock.is_file():
        return
    with _lock_turn(runs_root, device):
        data = _read_json(lock)
        if data and Path(data["run_dir"]) == run_dir:
            lock.unlink(missing_ok=True)


# ---- start, status, cancel -------------------------------------------------------------------

def _repo_root() -> str:
    import npedit

    return str(Path(npedit.__file__).resolve().parent.parent)


def _detached() -> dict:
    """Popen options that start a job apart from the app's terminal, so that closing it (or Ctrl-C there) leaves the
    job running: its own session on POSIX; on Windows its own process group and a console of its own, unseen."""
    if _WINDOWS:
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW}
    return {"start_new_session": True}


def start_job(run_dir: str | os.PathLike, train_args: list[str] = (), *, runs_root: str | os.PathLike | None = None,
              device: str | None = None, resume: bool = False) -> JobStatus:
    """Launch `python -m npedit train ARGS output_dir=RUN_DIR` in the background, from the current folder (relative
    paths in ARGS and in a --config file mean what they mean to that command typed here); returns its first status.

    With `resume=True` the run's previous arguments are reused with `--resume` (continue from its
    newest checkpoint). Raises JobBusy when the device already runs a job, ValueError for a used folder (or a resume
    of a run that finished all its steps).
    """
    run_dir = Path(run_dir).resolve()
    runs_root = Path(runs_root).resolve() if runs_root else run_dir.parent
    device = device or device_name()
    previous = _read_json(run_dir / "job.json")
    if previous and _job_alive(run_dir, previous):
        raise JobBusy(f"run '{run_dir.name}' is already running")
    if resume:
        if previous is None:  # (a run typed in a shell: the workbench does not know the command it ran)
            saved = latest_readable(run_dir / "checkpoints")[0]  # (what the resume would load)
            if saved is None:
                raise ValueError(f"{run_dir} was not started by the workbench and holds no checkpoint; nothing to "
                                 "resume")
            own = run_dir / "config.yaml"  # (deleted: the checkpoint's copy, as the Runs table reads it)
            config = shlex.quote(str(own if own.is_file() or not (saved / "config.yaml").is_file()
                                     else saved / "config.yaml"))
            folder = shlex.quote(f"output_dir={run_dir}")
            raise ValueError(f"{run_dir} was not started by the workbench, so it does not know the command; continue "
                             f"it from {saved.name} in a shell: python -m npedit train --config {config} --resume "
                             f"{folder}")
        done = job_status(run_dir)
        saved = checkpoint_step(Path(done.checkpoint)) if done.checkpoint else None  # where --resume would start
        if done.state == "finished" and done.max_steps and saved is not None and saved >= done.max_steps:
            raise ValueError(f"run '{run_dir.name}' finished all its {done.max_steps} steps: nothing to resume "
                             "(start a new run from its editor to train on)")
        train_args = previous["args"]
    elif previous is not None or (run_dir / "metrics.jsonl").exists():
        raise ValueError(f"run folder {run_dir} is already used: pick another run name (or resume it)")
    args = [a for a in train_args if not a.startswith("output_dir=")] + [f"output_dir={run_dir}"]
    # relative paths (--config, those in it, overrides) mean what they mean to the command typed here; a resume runs
    # where its job first ran (a job recorded without that: in its run folder, as jobs once all did)
    cwd = Path(previous.get("cwd") or run_dir) if resume else Path.cwd()
    cwd = cwd if cwd.is_dir() else run_dir
    command = [sys.executable, "-c", _MAIN, "train", *args, *(["--resume"] if resume else [])]
    # recorded before the process starts, its pid filled in after: an app killed in between leaves a job that
    # job.pid names, not a trainer running untracked (holding the device while the lock reads as free)
    job = {"pid": None, "device": device, "args": list(args), "command": command, "started": time.time(),
           "resume": resume, "runs_root": str(runs_root), "cwd": str(cwd)}
    # the check, the device and job.json in one turn: two Resume clicks on a stopped run (two tabs, a double click)
    # both found it stopped, and both started a trainer in it
    with _lock_turn(runs_root, device):
        now = _read_json(run_dir / "job.json")
        if now and now != previous and _job_alive(run_dir, now):
            raise JobBusy(f"run '{run_dir.name}' is already running")
        outside = outside_trainer(runs_root, device)
        if outside:  # a trainer typed in a shell takes no device lock: the app saw the device free and started a second
            raise JobBusy(f"{device} is busy with a trainer started outside this app ({outside}). One job runs per "
                          "device: wait for it to finish or stop it, then start again.")
        lock = _take(runs_root, device, run_dir)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in ("exit_code", "cancelled", "job.pid"):
                (run_dir / name).unlink(missing_ok=True)
            _write_json(run_dir / "job.json", job)
        except Exception:  # (job.json is written whole or not at all: as it was)
            lock.unlink(missing_ok=True)  # ours, taken in this turn (`_release` would wait for the turn)
            raise
    try:
        # PYTHONIOENCODING: the log is read as UTF-8; a Windows trainer would otherwise print to it in the ANSI code
        # page (cp1252), which cannot write most non-Latin instructions and stops the trainer with an error
        env = {**{k: v for k, v in os.environ.items() if k not in _SECRETS},
               "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONIOENCODING": "utf-8",
               "NPEDIT_EXIT_FILE": str(run_dir / "exit_code"), "NPEDIT_PID_FILE": str(run_dir / "job.pid"),
               "PYTHONPATH": os.pathsep.join(p for p in (_repo_root(), os.environ.get("PYTHONPATH")) if p),
               "CUDA_VISIBLE_DEVICES": device.split(":")[1] if device.startswith("cuda:") else ""}
        with open(run_dir / "train.log", "ab") as log:
            # the command as one would type it (`_MAIN` is `-m npedit` less the folder it runs in on sys.path)
            shell_line = [sys.executable, "-m", "npedit", *command[3:]]
            log.write(f"\n$ {typed(shell_line)}\n".encode())
            log.flush()
            proc = subprocess.Popen([sys.executable, "-I", str(_WRAPPER), *command], cwd=cwd, env=env,
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **_detached())
    except Exception:  # nothing started: the folder reads as before (a new run's is free to start again)
        if previous is None:
            (run_dir / "job.json").unlink(missing_ok=True)
        else:
            _write_json(run_dir / "job.json", previous)
        _release(runs_root, device, run_dir)
        raise
    _CHILDREN[proc.pid] = proc
    _ENDED.discard(proc.pid)  # (a pid the system gave again)
    _write_json(run_dir / "job.json", {**job, "pid": proc.pid})
    status = job_status(run_dir)
    _write_json(run_dir / "status.json", status.to_dict())
    return status


def _config_value(run_dir: Path, job: dict, key: str, cast):
    """A top-level config value of the run: its saved config.yaml, else the job's `key=value` argument."""
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        try:
            return cast(read_yaml(cfg.read_text(encoding="utf-8")).get(key))
        except (ValueError, TypeError, AttributeError, yaml.YAMLError):
            pass
    for arg in reversed(job.get("args", [])):
        if arg.startswith(f"{key}="):
            try:
                return cast(arg.split("=", 1)[1])
            except ValueError:
                return None
    return None


def _max_steps(run_dir: Path, job: dict) -> int | None:
    return _config_value(run_dir, job, "max_steps", int)


def read_metrics_rows(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl, skipping a line still being written or damaged (bytes that are not UTF-8: one such
    line failed the whole Runs table, every run's)."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_bytes().splitlines():
            try:
                row = json.loads(line.decode("utf-8"))
            except ValueError:  # (UnicodeDecodeError is one)
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def log_tail(run_dir: str | os.PathLike, lines: int = 20, max_bytes: int = 65536) -> str:
    """The last lines of the job's log, progress-bar redraws collapsed."""
    path = Path(run_dir) / "train.log"
    if not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - max_bytes))
        text = f.read().decode(errors="replace")
    kept = [seg.split("\r")[-1] for seg in text.split("\n")]
    kept = [line for line in kept if line.strip()]
    return "\n".join(kept[-lines:])


def _last_error(run_dir: Path) -> str:
    tail = log_tail(run_dir, lines=40).splitlines()
    errors = [line for line in tail if "Error" in line or line.startswith("error:")]
    return errors[-1].strip() if errors else (tail[-1].strip() if tail else "")


def _lock_holder(run_dir: Path) -> int | None:
    """The pid of a live process holding `run_dir`'s run lock (a trainer writing there: `npedit.files.run_lock`),
    seen by the lock file being open in it; None when there is none, or it cannot be told."""
    lock = run_dir / RUN_LOCK
    try:
        pid = int(lock.read_text(encoding="utf-8").strip())
        proc = psutil.Process(pid)
        held = any(Path(f.path) == lock.resolve() for f in proc.open_files())
    except (OSError, ValueError, psutil.Error):  # no lock file, no such process, or not ours to look into
        return None
    return pid if held else None


def _own_trainer(holder: int, run_dir: Path, job: dict) -> bool:
    """Whether the process `holder` is the job's own trainer: a child of its wrapper, or one with its pid file."""
    try:
        proc = psutil.Process(holder)
        if _job_pid(run_dir, job) in {parent.pid for parent in proc.parents()}:
            return True
        return proc.environ().get("NPEDIT_PID_FILE") == str(run_dir / "job.pid")
    except (psutil.Error, OSError):
        return False


def _trained_outside(run_dir: Path, st: JobStatus, job: dict) -> bool:
    """Mark `st` "external" when a trainer that is not the job's holds the run (one typed in a shell: `npedit train
    ... --resume`, also after the job finished, or on a run never started here), naming its pid; True if so."""
    holder = _lock_holder(run_dir)
    if holder is None or (job and _own_trainer(holder, run_dir, job)):
        return False
    was = {"cancelled": " (the job was cancelled)", "failed": " (the job failed)",
           "finished": " (after the job finished)"}.get(st.state, "") if job else ""
    st.state = "external"
    st.message = (f"trained outside the workbench by pid {holder}{was}: step {st.step}"
                  + (f"/{st.max_steps}" if st.max_steps else ""))
    return True


def _finished_outside(run_dir: Path, st: JobStatus, job: dict) -> None:
    """Correct `st` of a job that failed or was cancelled when the run went on without it and saved a newer editor
    than the job's end: "finished"; else `st` stays as the job left it."""
    ended = "was cancelled" if st.state == "cancelled" else "failed"
    try:
        saved = (run_dir / "pipeline" / "model_index.json").stat().st_mtime
        end = max([p.stat().st_mtime for p in (run_dir / "exit_code", run_dir / "cancelled") if p.is_file()]
                  + [job.get("started", 0)])
    except OSError:  # (an editor being swapped in by that trainer right now: the next poll tells)
        return
    if st.pipeline and saved > end:
        st.state = "finished"
        st.message = f"finished {st.step} steps outside the workbench (the job {ended}); editor saved to {st.pipeline}"


def job_status(run_dir: str | os.PathLike) -> JobStatus:
    """Read the run folder (and the process table) to say where its job stands."""
    _reap()
    run_dir = Path(run_dir).resolve()
    job = _read_json(run_dir / "job.json") or {}
    rows = read_metrics_rows(run_dir)
    last = rows[-1] if rows else {}
    step = int(last.get("step", 0))
    log = log_tail(run_dir, lines=3)
    bars = _TQDM.findall(log)
    if bars:
        step = max(step, int(bars[-1][0]))
    pipeline = run_dir / "pipeline"
    samples = sorted((run_dir / "samples").glob("step_*.png"))
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    st = JobStatus(run_dir=str(run_dir), state="not started", step=step, max_steps=_max_steps(run_dir, job),
                   last_metrics={k: v for k, v in last.items() if k not in ("step", "time")},
                   pipeline=str(pipeline) if (pipeline / "model_index.json").is_file() else None,
                   latest_sample=str(samples[-1]) if samples else None, checkpoint=str(ckpt) if ckpt else None,
                   device=job.get("device"), pid=_job_pid(run_dir, job))
    started = job.get("started")
    exit_text = (run_dir / "exit_code").read_text(encoding="utf-8").strip() if (run_dir / "exit_code").is_file() else ""
    cancelled = (run_dir / "cancelled").is_file()
    if not job:
        if st.pipeline:
            st.state, st.message = "finished", "finished (not started from the workbench)"
        elif rows or (run_dir / "config.yaml").is_file():
            st.state, st.message = "external", "not started from the workbench; no exported editor (yet)"
        _trained_outside(run_dir, st, job)  # a shell run training now (one that saved an editor before, too)
        return st
    if _job_alive(run_dir, job):
        st.state = "cancelling" if cancelled else "running"
        st.message = f"step {step}/{st.max_steps}" if step else "loading models and data…"
    elif cancelled:
        st.state, st.message = "cancelled", f"cancelled at step {step}"
    elif exit_text == "0" and st.pipeline:
        st.state, st.message = "finished", f"finished {step} steps; editor saved to {st.pipeline}"
    elif not _WINDOWS and exit_text.isdigit() and 128 < int(exit_text) < 128 + signal.NSIG:  # 128 + N: signal N
        sig = int(exit_text) - 128
        why = " (out of memory? the kernel's OOM killer sends it)" if sig == signal.SIGKILL else ""
        st.state, st.message = "failed", f"killed at step {step} by signal {sig} ({signal.strsignal(sig)}){why}"
    elif exit_text:
        st.state, st.message = "failed", f"exited with code {exit_text}: {_last_error(run_dir)}"
    else:
        st.state, st.message = "failed", f"killed halfway at step {step} (the process is gone and left no exit code)"
    # the job is over: a trainer typed in a shell may have taken the run on
    if not st.active and not _trained_outside(run_dir, st, job) and st.state in ("failed", "cancelled"):
        _finished_outside(run_dir, st, job)
    if started:
        ends = [p.stat().st_mtime for p in (run_dir / "exit_code", run_dir / "cancelled", run_dir / "train.log")
                if p.is_file()]
        end = time.time() if st.active or not ends else max(ends)
        st.elapsed_s = max(0.0, end - started)
    if st.active and step and st.max_steps:
        timed = [r for r in rows if "time" in r]
        if len(timed) >= 2 and timed[-1]["step"] > timed[0]["step"]:
            per_step = (timed[-1]["time"] - timed[0]["time"]) / (timed[-1]["step"] - timed[0]["step"])
        else:
            per_step = (time.time() - started) / step if started else None
        st.eta_s = None if per_step is None else max(0.0, per_step * (st.max_steps - step))
        minutes = _config_value(run_dir, job, "max_minutes", float)
        if minutes and started:  # the run also stops at its wall-clock limit (counted from its start here)
            left = max(0.0, 60 * minutes - (time.time() - started))
            st.eta_s = left if st.eta_s is None else min(st.eta_s, left)
    if st.state in ("failed", "cancelled") and ckpt is not None:
        good, damaged = latest_readable(run_dir / "checkpoints")  # what a resume would load (a job has stopped)
        if good is not None:
            st.resumable, st.checkpoint = True, str(good)
            st.message += f"; resumable from {good.name}"
        if damaged:
            st.message += f" ({'; '.join(damaged)}{', passed over' if good is not None else ': nothing to resume'})"
    saved = _read_json(run_dir / "status.json") or {}
    if not st.active and saved.get("state") != st.state:
        _write_json(run_dir / "status.json", st.to_dict())
        _release(Path(job.get("runs_root", run_dir.parent)), job.get("device", ""), run_dir)
    return st


def _stop(pid: int, force: bool) -> None:
    """Send the job its stop (`force`: its kill): SIGTERM (SIGKILL) to its process group on POSIX; on Windows, which
    has no group to signal, terminate the wrapper's process tree, the trainer first so the wrapper still records its
    exit (`force`: the wrapper too). ProcessLookupError when nothing is left."""
    if not _WINDOWS:
        os.killpg(pid, signal.SIGKILL if force else signal.SIGTERM)
        return
    try:
        wrapper = psutil.Process(pid)
        tree = wrapper.children(recursive=True) + ([wrapper] if force else [])
    except psutil.NoSuchProcess:
        raise ProcessLookupError(pid) from None
    for proc in tree:
        try:
            if force:
                proc.kill()
            else:
                proc.terminate()
        except psutil.NoSuchProcess:
            pass


def cancel_job(run_dir: str | os.PathLike, timeout: float = 15.0) -> JobStatus:
    """Stop a running job (`_stop`: SIGTERM to its process group, SIGKILL after `timeout` s) and mark it
    cancelled."""
    run_dir = Path(run_dir).resolve()
    job = _read_json(run_dir / "job.json")
    pid = _job_pid(run_dir, job) if job else None
    if pid is None or not _alive(pid, run_dir):
        return job_status(run_dir)
    (run_dir / "cancelled").write_text(json.dumps({"time": time.time()}), encoding="utf-8")
    for force, wait in ((False, timeout), (True, 5.0)):
        try:
            _stop(pid, force)
        except ProcessLookupError:
            break
        deadline = time.time() + wait
        while time.time() < deadline and _alive(pid, run_dir):
            time.sleep(0.1)
        if not _alive(pid, run_dir):
            break
    _CHILDREN.pop(pid, None)
    return job_status(run_dir)


def list_jobs(runs_root: str | os.PathLike) -> list[JobStatus]:
    """The status of every workbench job under `runs_root`, newest first."""
    root = Path(runs_root)
    runs = [p.parent for p in root.glob("*/job.json")] if root.is_dir() else []
    runs.sort(key=lambda p: (_read_json(p / "job.json") or {}).get("started", 0), reverse=True)
    return [job_status(p) for p in runs]
