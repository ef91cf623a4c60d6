"""Files written whole or not at all: a run killed, or a disk filling up, mid-write leaves the previous file (or none).

Every file a run rewrites in place (config.yaml, metrics.jsonl on a resume, sample grids, reports, a job's status) goes
through `write_atomic`; the trainers' checkpoint and model folders are published whole by `training.checkpoint`.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

WINDOWS = os.name == "nt"
# file names that differ only in case name one file: Windows' NTFS and macOS's default APFS (Linux: two files)
CASE_INSENSITIVE = WINDOWS or sys.platform == "darwin"
REPLACE_WAIT_S = 2.0  # how long a rename waits, on Windows, for another program to close the file it replaces
# names Windows keeps for devices, whatever their extension ("con.png" too): no file or folder there can have one
WINDOWS_DEVICE_NAMES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"{port}{i}" for port in ("COM", "LPT")
                                                                   for i in range(1, 10))})

RUN_LOCK = ".npedit-train.lock"  # held by the process training into a run folder (`run_lock`)
_LOCK_BYTE = 2**30  # Windows locks a byte range: one past the pid's bytes, so another process can still read them

# One writer at a time per file within a process: the app's threads (two visitors' Train tabs polling a run that just
# ended) both rewrote status.json through its one temporary name, and one renamed the other's half-written file or
# found it gone. Striped, so that the locks stay few however many files a long run writes.
_WRITING = tuple(threading.Lock() for _ in range(64))


def write_atomic(path: str | os.PathLike, data: bytes | str, sync: bool = True) -> None:
    """Write `data` to `path` through a temporary file beside it, flushed to the disk (unless not `sync`: for files
    that can be made again, whose readers need them whole, not kept through a power cut) and renamed over `path`."""
    path = Path(path)
    # one fixed temporary name per file (each file has one writing process, its threads taking turns): what a killed
    # write left is reused, not piled up; hidden, so that no reader's glob (samples/step_*.png, *.safetensors) takes it
    # for a finished file
    tmp = path.with_name(f".{path.name}.tmp")
    with _WRITING[hash(os.path.abspath(path)) % len(_WRITING)]:
        try:
            with open(tmp, "wb") as f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                if sync:
                    os.fsync(f.fileno())  # a power cut after the rename must not leave `path` empty
            rename_over(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # (a full disk: the partial file would hold the space a retry needs)
            raise


PARTIAL_SUFFIX = ".partial"  # what a report written as it goes is called until it is complete


class ReplacedWhenDone:
    """A text file written as it goes into `path`.partial and renamed over `path` once complete: a run that fails,
    is interrupted or fills the disk midway leaves `path` as it was (a previous run's report), and what it wrote under
    a name that says it is incomplete (opened "w" at the start, `path` was emptied before the first row)."""

    def __init__(self, path: str | os.PathLike, newline: str | None = None):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.file = open(self.partial, "w", encoding="utf-8", newline=newline)

    def write(self, text: str) -> None:
        """Append `text`, flushed: a process killed outright still leaves what it wrote in the partial file."""
        self.file.write(text)
        self.file.flush()

    def close(self, complete: bool = True, keep: bool = True) -> None:
        """Close; `complete`: flushed to the disk and renamed over `path` (when either fails, an OSError of the same
        kind saying that `path` was not replaced and that the complete text is kept in the partial file); else the
        partial file kept when `keep` (it holds rows worth reading), removed when not."""
        if self.file.closed:
            return
        if not complete:
            self.file.close()
            if not keep:
                self.partial.unlink(missing_ok=True)
            return
        flushed = False
        try:
            try:
                os.fsync(self.file.fileno())  # a power cut after the rename must not leave `path` empty
            finally:
                self.file.close()  # (Windows renames no open file)
            flushed = True
            rename_over(self.partial, self.path)
        except OSError as exc:  # (another program holding `path` open on Windows, a full or read-only disk)
            step = f"renaming it over {self.path.name}" if flushed else "flushing it to the disk"
            unsure = "" if flushed else " (written, not confirmed by the disk)"
            raise _reworded(exc, f"{self.path} was not replaced: {step} failed ({exc.strerror or exc}); its complete "
                                 f"text is kept in {self.partial}{unsure}") from exc

    def __enter__(self) -> "ReplacedWhenDone":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(complete=exc_type is None)


def _reworded(exc: OSError, message: str) -> OSError:
    """An OSError of `exc`'s kind (PermissionError stays one) and errno whose text is `message` alone: a caller that
    shows `strerror or exc` shows all of it."""
    try:
        new = type(exc)(message)
    except TypeError:  # a subclass that takes other arguments
        new = OSError(message)
    new.errno = exc.errno
    return new


def rename_over(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """`os.replace(src, dst)`, retried for up to REPLACE_WAIT_S on Windows: there it fails (PermissionError) while any
    program holds `dst` open, even for a moment (the app reading a job's status.json, a virus scanner looking at a
    new file); POSIX replaces an open file at once, so a PermissionError there is final."""
    _while_held_open(lambda: os.replace(src, dst))


# what a file browser leaves in a folder it shows (macOS Finder, Windows Explorer): not the user's own files
OS_LITTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def own_entries(folder: str | os.PathLike) -> list[Path]:
    """The entries of `folder` (sorted), less a file browser's own (`OS_LITTER`, macOS's `._*` twins): a folder made in
    Finder holds a .DS_Store, and "give a new or empty folder" must not refuse it."""
    return sorted(p for p in Path(folder).iterdir() if p.name not in OS_LITTER and not p.name.startswith("._"))


def remove(path: str | os.PathLike) -> bool:
    """Delete `path` if it is there; on Windows, where deleting a file another program holds open fails (the app
    showing a sample grid, a virus scanner), retried for up to REPLACE_WAIT_S. False when it is still there: a caller
    that can go on without (a stale grid, an old download) says so or leaves it for later; POSIX deletes at once."""
    try:
        _while_held_open(lambda: Path(path).unlink(missing_ok=True))
    except PermissionError:
        if not WINDOWS:
            raise
        return False
    return True


def _while_held_open(operation) -> None:
    """`operation()`, tried again while Windows refuses it (PermissionError: a file another program holds open) for up
    to REPLACE_WAIT_S, then its error raised; elsewhere its PermissionError is final at once."""
    deadline = time.monotonic() + REPLACE_WAIT_S
    while True:
        try:
            return operation()
        except PermissionError:
            if not WINDOWS or time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def windows_name_problem(name: str) -> str | None:
    """Why Windows cannot give a file the name `name` (a plain name, no folder), or None: a character it forbids
    (':' even writes a hidden stream of another file), a trailing dot or space (dropped), a device's name."""
    bad = sorted({c for c in name if c in '<>:"|?*' or ord(c) < 32})
    if bad:
        return f"Windows forbids {' '.join(map(repr, bad))} in a file name"
    if name.endswith((".", " ")):
        return "Windows drops a trailing dot or space from a file name"
    if name.split(".")[0].strip().upper() in WINDOWS_DEVICE_NAMES:
        return f"Windows keeps the name {name.split('.')[0]!r} for a device"
    return None


def image_bytes(image, fmt: str = "PNG", **options) -> bytes:
    """A PIL image encoded as a file's bytes in PIL's format `fmt` (options: PIL's, e.g. quality)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def png_bytes(image) -> bytes:
    """A PIL image encoded as a PNG file's bytes."""
    return image_bytes(image, "PNG")


def write_png(path: str | os.PathLike, image, sync: bool = True) -> None:
    """Write a PIL image as a PNG file, whole or not at all (`write_atomic`): the app shows a run's newest grid."""
    write_atomic(path, png_bytes(image), sync)


class FolderBusy(RuntimeError):
    """Another process holds a folder's `run_lock`."""


@contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[Path]:
    """Hold `folder`/RUN_LOCK for one process at a time while the block runs (the system frees it when the process
    ends, however it ends), its pid written there; FolderBusy naming the holder's pid when another process holds it.
    A folder this creates and leaves holding only the lock is removed again."""
    folder = Path(folder)
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / RUN_LOCK
    f = open(path, "a+b")  # (never truncated on opening: the holder's pid stays readable)
    locked = False
    try:
        locked = _lock(f)
        if not locked:
            f.seek(0)
            holder = f.read(32).decode(errors="replace").strip()
            raise FolderBusy(f"{folder} is in use by another process{f' (pid {holder})' if holder.isdigit() else ''}")
        f.truncate(0)
        f.write(str(os.getpid()).encode())
        f.flush()
        yield path
    finally:
        if locked and WINDOWS:  # (POSIX frees it as the file closes; Windows leaves the order to the system)
            import msvcrt
            f.seek(_LOCK_BYTE)
            msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        f.close()
        try:  # tidying must not replace the error that ended the block (Windows: another process holds the file)
            if made and [p.name for p in folder.iterdir()] == [RUN_LOCK] and remove(path) is not False:
                folder.rmdir()
        except OSError:
            pass


def _lock(f) -> bool:
    """Take an exclusive lock on the open file `f` without waiting: False when another process holds it."""
    if WINDOWS:
        import msvcrt
        f.seek(_LOCK_BYTE)
        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
