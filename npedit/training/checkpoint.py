"""Full training state on disk without pickle: weights and optimiser tensors as safetensors, the rest as JSON."""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..files import rename_over
from ..config import read_yaml

STEP_PREFIX = "step_"


class WriteError(OSError):
    """A checkpoint or a run's editor not written (a full or read-only disk); the message says what is kept."""


def optimizer_state_to_files(optimizer: torch.optim.Optimizer, stem: Path) -> None:
    """Write `stem`.safetensors (state tensors) and `stem`.json (param groups, scalars)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, val in state.items():
            name = f"{pid}.{key}"
            if isinstance(val, torch.Tensor):
                tensors[name] = val.detach().cpu().contiguous()
            else:
                scalars[name] = val
    save_file(tensors, str(stem) + ".safetensors")
    Path(str(stem) + ".json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}),
                                         encoding="utf-8")


def optimizer_state_from_files(optimizer: torch.optim.Optimizer, stem: Path) -> None:
    """Inverse of `optimizer_state_to_files`."""
    meta = json.loads(Path(str(stem) + ".json").read_text(encoding="utf-8"))
    state: dict = {}
    for name, val in list(load_file(str(stem) + ".safetensors").items()) + list(meta["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = val
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_state_to_files(stem: Path, generators: dict[str, torch.Generator]) -> None:
    """Save Python, NumPy, torch (CPU and CUDA) and named generator states."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    for name, gen in generators.items():
        tensors[f"gen.{name}"] = gen.get_state()
    np_state = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    save_file(tensors, str(stem) + ".safetensors")
    meta = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    Path(str(stem) + ".json").write_text(json.dumps(meta), encoding="utf-8")


def rng_state_from_files(stem: Path, generators: dict[str, torch.Generator]) -> None:
    """Restore what `rng_state_to_files` saved."""
    tensors = load_file(str(stem) + ".safetensors")
    meta = json.loads(Path(str(stem) + ".json").read_text(encoding="utf-8"))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    for name, gen in generators.items():
        if f"gen.{name}" in tensors:
            gen.set_state(tensors[f"gen.{name}"])
    v, st, g = meta["python"]
    random.setstate((v, tuple(st), g))
    n = meta["numpy"]
    np.random.set_state((n[0], tensors["numpy.keys"].numpy().astype(np.uint32), n[1], n[2], n[3]))


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Named tensors to one safetensors file (a LoRA run's adapters)."""
    save_file(tensors, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def load_module_weights(module: torch.nn.Module, folder: Path) -> None:
    """Load (possibly sharded) safetensors weights saved by `save_pretrained` into `module`, strictly."""
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    module.load_state_dict(state, strict=True)


def checkpoint_step(path: Path) -> int | None:
    """The step of a `step_N` checkpoint folder (or of its export, named alike); None for another name."""
    digits = Path(path).name.removeprefix(STEP_PREFIX)
    return int(digits) if Path(path).name.startswith(STEP_PREFIX) and digits.isdigit() else None


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and checkpoint_step(d) is not None
            and (d / "trainer_state.json").is_file()]
    return sorted(dirs, key=checkpoint_step)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def damage(path: Path, use: str = "resume") -> str | None:
    """What in checkpoint folder `path` does not read back (an empty file, a safetensors file shorter than its header
    says, JSON or YAML that does not parse: a crash before the disk had the files, a copy cut off), or what it lacks
    of the files `use` needs (`missing_files`), or None."""
    path = Path(path)
    missing = missing_files(path, use)
    if missing:
        return f"{missing[0]} is missing" + (f" ({len(missing) - 1} more)" if len(missing) > 1 else "")
    for f in sorted(p for p in path.rglob("*") if p.suffix in (".json", ".yaml", ".safetensors") and p.is_file()):
        name = f.relative_to(path).as_posix()
        try:
            if f.stat().st_size == 0:
                return f"{name} is empty"
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt"):  # checks the header against the file's length
                    pass
            elif f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
            else:
                read_yaml(f.read_text(encoding="utf-8"))  # (a YAML bomb is a ValueError)
        except (OSError, ValueError, SafetensorError, yaml.YAMLError) as exc:
            return f"{name}: {exc}"
    return None


STATE_FILE = "trainer_state.json"  # written last: a checkpoint folder without it is incomplete


def earlier_run(run_dir: Path) -> list[str]:
    """What a run left in `run_dir` (metrics, checkpoints, its editor): a new run there would mix with it or replace it."""
    return [name for name in ("metrics.jsonl", "checkpoints", "pipeline") if (Path(run_dir) / name).exists()]


def saved_files(folder: Path) -> list[str]:
    """The files of a checkpoint folder being written, as trainer_state.json lists them (relative, POSIX)."""
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


def _needed(name: str, use: str) -> bool:
    """Whether a checkpoint file `name` is one that `use` reads: an export, the networks' weights (its config falls
    back to the run's); a resume, also the optimisers (the RNG state and the config copy are optional to it)."""
    if use == "export":
        return name.startswith(("student/", "critic/"))
    return not (name == "config.yaml" or name.startswith("rng_"))


def missing_files(path: Path, use: str = "resume") -> list[str]:
    """What checkpoint `path` lacks of the files `use` ("resume" or "export") reads (a copy cut off, a file deleted):
    of those its trainer_state.json lists; for a checkpoint saved before it listed them, the twin of a half-present
    optimizer pair (for a resume) and the weights of a network folder."""
    try:
        listed = json.loads((path / STATE_FILE).read_text(encoding="utf-8")).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None  # (damage says what is wrong with the file itself)
    if isinstance(listed, list):
        return [name for name in listed if isinstance(name, str) and _needed(name, use) and not (path / name).is_file()]
    missing = []
    pairs = [*path.glob("optimizer_*.json"), *path.glob("optimizer_*.safetensors")] if use == "resume" else []
    for f in sorted(pairs):
        twin = f.with_suffix(".safetensors" if f.suffix == ".json" else ".json")
        if not twin.is_file() and twin.name not in missing:
            missing.append(twin.name)
    for net in ("student", "critic"):
        if (path / net).is_dir() and not list((path / net).glob("*.safetensors")):
            missing.append(f"{net}/ weights (.safetensors)")
    return missing


def incomplete_dirs(root: Path) -> list[Path]:
    """`step_N` folders under `root` without trainer_state.json (a copy cut off before it, the last file a save
    writes), oldest first."""
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and checkpoint_step(d) is not None
                   and not (d / STATE_FILE).is_file()), key=checkpoint_step)


def latest_readable(root: Path) -> tuple[Path | None, list[str]]:
    """The newest complete checkpoint under `root` whose files all read back, and a line on each newer one that does
    not or is incomplete (passed over)."""
    damaged = []
    newest = checkpoint_dirs(root)
    for path in reversed(incomplete_dirs(root)):
        if not newest or checkpoint_step(path) > checkpoint_step(newest[-1]):
            damaged.append(f"{path.name} is incomplete (no {STATE_FILE}, the file a save writes last: a copy cut off?)")
    for path in reversed(newest):
        why = damage(path)
        if why is None:
            return path, damaged
        damaged.append(f"{path.name} is damaged ({why})")
    return None, damaged


def writing(tmp: Path):
    """Around writing checkpoint folder `tmp`: when a write fails (a full or read-only disk), remove the partial
    folder (it would hold the space a retry needs) and raise a `WriteError` naming the newest complete checkpoint."""
    # (what is kept is looked up once the write failed: the save may have pruned older checkpoints by then)
    return _stopped_on_disk_error(f"checkpoint {tmp.name.removeprefix('.tmp_')} in {tmp.parent}",
                                  lambda: what_is_kept(tmp.parent), discard=tmp)


def disk_error(exc: BaseException) -> OSError | None:
    """`exc` as an OSError when it says a write failed on the disk's side (full, read-only, a file size limit), else
    None: safetensors (the weights of checkpoints and editors) reports those as a SafetensorError ("I/O error")."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, SafetensorError) and "I/O error" in str(exc):
        return OSError(str(exc))
    return None


def disk_writes(what: str | os.PathLike, kept: str):
    """Around writing `what` outside a checkpoint (a stage's model folder, report or grid): a write that fails on the
    disk's side (`disk_error`) stops the run with a one-line `WriteError` saying what is `kept` and what to do."""
    return _stopped_on_disk_error(what, lambda: kept)


@contextmanager
def _stopped_on_disk_error(what: str | os.PathLike, kept: Callable[[], str], discard: Path | None = None):
    """What `writing` and `disk_writes` share: an error on the disk's side (`disk_error`) inside becomes the one line
    `WriteError("could not write WHAT (ERROR); KEPT")`, `kept()` called once the partial folder `discard` (if any) is
    removed; a WriteError from inside (it already says what is kept) passes as it is, any other error unchanged."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        disk = disk_error(exc)
        if disk is None:
            raise
        if discard is not None:
            shutil.rmtree(discard, ignore_errors=True)
        if isinstance(exc, WriteError):
            raise
        raise WriteError(f"could not write {what} ({disk}); {kept()}") from None


def what_is_kept(root: Path) -> str:
    """After a write under a run failed: what its checkpoints folder `root` still holds, and what to do."""
    newest = latest_checkpoint(Path(root))
    kept = f"the newest complete checkpoint, {newest.name}, is untouched" if newest else "no checkpoint was saved"
    return f"{kept}: free space (or make the folder writable), then resume the run (--resume)"


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder so that no part of it is ever seen as one: renamed first (atomic), then removed;
    a run killed during the removal leaves a `.trash_*` folder, which the next `finalize` removes."""
    trash = folder.with_name(f".trash_{folder.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    rename_over(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def publishing(final: Path):
    """Yield a temporary folder beside `final` to write a whole folder into (an exported editor or critic); it replaces
    `final` only once written, so a run killed or failing midway leaves the previous `final` (or none), never half of
    one that loaders would take for complete."""
    final = Path(final)
    tmp = final.with_name(f".tmp_{final.name}")
    for stale in (tmp, final.with_name(f".trash_{final.name}")):  # what a killed export left
        shutil.rmtree(stale, ignore_errors=True)
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        disk = disk_error(exc)
        if disk is not None and disk is not exc:  # (callers name what is kept for an OSError, whoever wrote the file)
            raise disk from None
        raise
    _replace(tmp, final)


def _sync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk (a folder where the system cannot: skipped)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some systems and file systems refuse it for folders
        pass
    finally:
        os.close(fd)


def _new_file_mode(folder: Path) -> int | None:
    """The permissions a new file gets in `folder` under this process's umask (0o644 under the usual 022), probed
    with a file made there and removed (reading the umask means setting it, which other threads would see); None on
    Windows, which has no such bits, or when the probe cannot be made."""
    if os.name == "nt":
        return None
    probe = folder.parent / f".mode_probe_{os.getpid()}"  # beside the folder: nothing of it is ever published
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    except OSError:
        return None
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)
        try:
            probe.unlink()
        except OSError:  # (a file system that lets a file be made but not removed: the publish still goes on)
            pass


def _readable_as_others(path: Path, mode: int | None) -> None:
    """Give a file written owner-only (0o600: safetensors' `save_file` since 0.8 writes weights so) the permissions
    the umask gives new files, so an editor exported on a shared machine is readable by the others the umask lets
    read (an app or a colleague running as another user); other modes, and links, stay as they are."""
    if mode is None or mode == 0o600 or path.is_symlink():
        return
    try:
        if path.stat().st_mode & 0o777 == 0o600:
            path.chmod(mode)
    except OSError:  # (a file system that keeps no such bits)
        pass


def _replace(tmp: Path, final: Path) -> None:
    """Put the finished folder `tmp` in the place of `final`, its files flushed to the disk first, so that a power cut
    after the rename cannot leave a published folder with empty files. An old `final` is renamed away, the new one
    renamed in, and only then the old one deleted (minutes for a large model): a run killed during the deletion leaves
    the new folder and a `.trash_*` one, which the next save or export removes."""
    shared = _new_file_mode(tmp)
    for folder, _, files in os.walk(tmp):
        for name in files:
            _readable_as_others(Path(folder, name), shared)
            _sync(Path(folder, name))
        _sync(Path(folder))
    trash = final.with_name(f".trash_{final.name}")
    if final.exists():
        shutil.rmtree(trash, ignore_errors=True)
        rename_over(final, trash)
    rename_over(tmp, final)
    _sync(final.parent)
    shutil.rmtree(trash, ignore_errors=True)


def finalize(tmp: Path, final: Path, keep: int) -> None:
    """Atomically publish a checkpoint written to `tmp`, remove what killed saves left (`.tmp_*`, `.trash_*`) and prune
    the checkpoints older than it beyond `keep` (counting it). A newer one (damaged, passed over by the resume) is no
    reason to prune the checkpoint just written."""
    for stale in [*final.parent.glob(".trash_*"), *final.parent.glob(".tmp_*")]:
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    _replace(tmp, final)
    older = [d for d in checkpoint_dirs(final.parent) if checkpoint_step(d) < checkpoint_step(final)]
    for old in older[:max(0, len(older) - keep + 1)] if keep > 0 else []:
        _discard(old)
