"""A training job's wrapper, the same on every OS: `python -I job_wrapper.py COMMAND...` writes its own pid to the file
NPEDIT_PID_FILE, runs COMMAND and, once it ends, writes its exit status to NPEDIT_EXIT_FILE; its own exit status is the
same. The app may be gone by then: these two files are how workbench.jobs follows the job.

Standard library only, and run with `-I`: neither the folder it runs in (a run folder) nor its own folder is on
its sys.path, so nothing there can stand in for a module it imports.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys


def exit_status(returncode: int) -> int:
    """COMMAND's exit status as a POSIX shell's `$?` gives it: 128 + N for one killed by signal N (Popen's -N)."""
    return 128 - returncode if returncode < 0 else returncode


def _write(path: str, value: int) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{value}\n")


def main(argv: list[str]) -> int:
    """Record this process's pid, run `argv` (its stdout and stderr are this process's), record its exit status."""
    _write(os.environ["NPEDIT_PID_FILE"], os.getpid())
    try:
        child = subprocess.Popen(argv)
    except OSError as exc:  # the status a shell gives a command it cannot run
        print(f"npedit-job: cannot run {argv[0]}: {exc}", file=sys.stderr, flush=True)
        code = 127
    else:
        if os.name != "nt":
            # A cancel sends SIGTERM to the whole group. Dying at once would orphan the trainer to whoever adopts
            # orphans: with the app as a container's PID 1, the app, which never reaps it, so the job read as running
            # for good. So wait for the trainer and record how it ended (a handler, not SIG_IGN: no child inherits it).
            signal.signal(signal.SIGTERM, lambda signum, frame: None)
        code = exit_status(child.wait())
    _write(os.environ["NPEDIT_EXIT_FILE"], code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
