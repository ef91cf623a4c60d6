"""Other `npedit train` processes on this machine, read from the process table, and the device each may train on:
the app refuses a Start on a device one trains on (workbench.jobs.outside_trainer), and `python -m npedit train`
warns when it would share its device with one (`sharing_warning`).

A trainer's device is read from its CUDA_VISIBLE_DEVICES (unset: it sees every GPU); on a CPU every trainer shares
the cores. Processes of this trainer's own launch (its `accelerate launch` / torchrun launcher and that launcher's
other ranks, an app job's wrapper) are not others.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass

import psutil

# `python -m npedit`, less the folder it runs in on sys.path: `-m` (and `-c`) put it first, so a run folder (or the
# cwd a job.json names) holding npedit/, yaml.py, torch/, ... would run its own code in place of ours (`-P` does
# this from Python 3.11 only). The app's jobs run `python -c MAIN train ...`.
MAIN = ("import sys; sys.path[0] == '' and sys.path.pop(0); import runpy; "
        "runpy.run_module('npedit', run_name='__main__', alter_sys=True)")
SHOWN_CHARS = 120  # a command line named in a warning: its start and its end (where output_dir usually is)


@dataclass(frozen=True)
class Trainer:
    """Another `npedit train` process: its pid, command line, environment (None: not readable, another user's) and
    ancestors."""

    pid: int
    cmdline: list[str]
    env: dict | None
    ancestors: tuple[int, ...] = ()  # its parent, its parent's parent, ... (those the process table names)

    @property
    def visible(self) -> str | None:
        """Its CUDA_VISIBLE_DEVICES; None when unset or unreadable (it may see every GPU)."""
        return self.env.get("CUDA_VISIBLE_DEVICES") if self.env else None


def trains(cmdline: list[str]) -> bool:
    """Whether a command line runs `npedit train`: `python -m npedit train`, `accelerate launch -m npedit train`, the
    `npedit` script's `train`, or an app job's `python -c <MAIN> train`."""
    return any(nxt == "train" and (arg == MAIN or script_name(arg) == "npedit")
               for arg, nxt in zip(cmdline, cmdline[1:]))


def script_name(arg: str) -> str:
    """A program's name less its folder and `.exe`, at either separator (C:\\env\\Scripts\\npedit.exe: npedit)."""
    return re.split(r"[\\/]", arg)[-1].lower().removesuffix(".exe")


def listing():
    """The process table, each process's pid, parent pid and command line read (None where the system refuses it)."""
    return psutil.process_iter(["pid", "ppid", "cmdline"])


def sees(visible: str | None, device: str) -> bool:
    """Whether a trainer whose CUDA_VISIBLE_DEVICES is `visible` (None: unset or unreadable) may train on `device`:
    on a CPU device any trainer does; unset, it sees every GPU; a GPU named by UUID (either side) is counted."""
    if not device.startswith("cuda:") or visible is None:
        return True
    index = device.split(":", 1)[1]
    entries = [v.strip() for v in visible.split(",") if v.strip()]  # "" hides every GPU: a CPU trainer
    return any(v == index or not v.isdigit() or not index.isdigit() for v in entries)


def other_trainers(me: int | None = None) -> list[Trainer]:
    """The `npedit train` processes other than process `me` (default this one) and the processes of its launch: its
    ancestors that train (a launcher, an app job's wrapper) and their descendants (the launch's other ranks)."""
    me = os.getpid() if me is None else me
    table = list(listing())
    parent = {p.pid: p.info.get("ppid") for p in table}
    lines = {p.pid: p.info.get("cmdline") or [] for p in table}
    # its ancestors that train and what they started are its launch; its own children are others (an app's jobs)
    launch = {pid for pid in _ancestors(me, parent) if trains(lines.get(pid, []))}
    own_job = os.environ.get("NPEDIT_PID_FILE")  # an app job: its wrapper shares it
    found = []
    for proc in table:
        above = _ancestors(proc.pid, parent)
        if proc.pid == me or proc.pid in launch or not trains(lines[proc.pid]) or launch & set(above):
            continue
        try:
            env = proc.environ()
        except psutil.NoSuchProcess:
            continue
        except (psutil.AccessDenied, OSError):  # another user's: on which device it trains is not known, so counted
            env = None
        if own_job and env and env.get("NPEDIT_PID_FILE") == own_job:
            continue
        found.append(Trainer(proc.pid, lines[proc.pid], env, tuple(above)))
    return found


def _ancestors(pid: int, parent: dict[int, int | None]) -> list[int]:
    """`pid`'s parent, its parent's parent, ... as far as `parent` (pid -> parent pid) knows them."""
    chain, seen = [], {pid}
    while (pid := parent.get(pid)) and pid not in seen:  # (a reused pid may make a loop on Windows)
        chain.append(pid)
        seen.add(pid)
    return chain


def launch_devices(env: dict, gpus: bool) -> list[str]:
    """The devices this machine's processes of this launch train on, as `sees` names them (physical "cuda:N", or a
    GPU's UUID after "cuda:"; "cpu"): accelerate's, one GPU per local rank (LOCAL_WORLD_SIZE, default 1), counted in
    CUDA_VISIBLE_DEVICES when set; the CPU when `gpus` is False or ACCELERATE_USE_CPU is on."""
    if not gpus or env.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return ["cpu"]
    ranks = int(env.get("LOCAL_WORLD_SIZE") or 1)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [f"cuda:{r}" for r in range(ranks)]
    return [f"cuda:{v.strip()}" for v in visible.split(",")[:ranks] if v.strip()]


def typed(command: list[str]) -> str:
    """A command as one would type it in this OS's shell (cmd.exe quotes as list2cmdline does, not as sh)."""
    return subprocess.list2cmdline(command) if os.name == "nt" else shlex.join(command)


def shown(cmdline: list[str], chars: int = SHOWN_CHARS) -> str:
    """A trainer's command line, typed, an app job's `-c MAIN` as `-m npedit`, its middle cut to `chars`."""
    if MAIN in cmdline:
        at = cmdline.index(MAIN)  # (a job's wrapper: `python -I job_wrapper.py python -c MAIN train ...`)
        cmdline = [*cmdline[max(at - 2, 0):at - 1], "-m", "npedit", *cmdline[at + 1:]]  # from the python of `-c`
    text = typed(cmdline)
    if len(text) <= chars:
        return text
    head = (chars - 5) // 2
    return f"{text[:head]} ... {text[len(text) - (chars - 5 - head):]}"


def sharing_warning(devices: list[str], me: int | None = None) -> str | None:
    """One line naming the other `npedit train` processes that may train on one of `devices` (this launch's), saying
    that they share it and what to do; None when there is none."""
    found = [t for t in other_trainers(me) if any(sees(t.visible, d) for d in devices)]
    pids = {t.pid for t in found}
    # a launch or an app job counts once: its outermost process (a launcher, a job's wrapper), not each rank
    named = [t for t in found if not pids & set(t.ancestors)]
    if not named:
        return None
    procs = "; ".join(f"pid {t.pid}{' (an app job)' if t.env and t.env.get('NPEDIT_PID_FILE') else ''}: "
                      f"{shown(t.cmdline)}" for t in named)
    it = "it" if len(named) == 1 else "them"
    who = "another npedit train" if len(named) == 1 else f"{len(named)} other npedit trains"
    stop = f"wait for {it} to end or stop {it}" + (" (an app job: Cancel in the app's Train tab)" if any(
        t.env and t.env.get("NPEDIT_PID_FILE") for t in named) else "")
    if any(d.startswith("cuda:") for d in devices):
        gpus = ", ".join(f"GPU {d[5:]}" if d[5:].isdigit() else d[5:]  # (a UUID names itself: GPU-8f2a...)
                         for d in devices if any(sees(t.visible, d) for t in named))
        return (f"warning: {who} may train on {gpus} ({procs}): this run will share the GPU with {it}, both slower, "
                f"and its memory may run out; to avoid that, {stop}, or start this run on another GPU with "
                "CUDA_VISIBLE_DEVICES=N")
    runs = "runs" if len(named) == 1 else "run"
    return (f"warning: {who} {runs} on this machine ({procs}): training on the CPU, this run will share its cores with "
            f"{it}, both slower; to avoid that, {stop}")
