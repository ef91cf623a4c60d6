"""Full training state on disk without pickle: weights and optimiser tensors as safetensors, the rest as JSON."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STEP_PREFIX = "step_"


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
    Path(str(stem) + ".json").write_text(json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}))


def optimizer_state_from_files(optimizer: torch.optim.Optimizer, stem: Path) -> None:
    """Inverse of `optimizer_state_to_files`."""
    meta = json.loads(Path(str(stem) + ".json").read_text())
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
    Path(str(stem) + ".json").write_text(json.dumps(meta))


def rng_state_from_files(stem: Path, generators: dict[str, torch.Generator]) -> None:
    """Restore what `rng_state_to_files` saved."""
    tensors = load_file(str(stem) + ".safetensors")
    meta = json.loads(Path(str(stem) + ".json").read_text())
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


def _discard(folder: Path) -> None:
    """Delete a checkpoint folder so that no part of it is ever seen as one: renamed first (atomic), then removed;
    a run killed during the removal leaves a `.trash_*` folder, which the next `finalize` removes."""
    trash = folder.with_name(f".trash_{folder.name}")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def finalize(tmp: Path, final: Path, keep: int) -> None:
    """Atomically publish a checkpoint written to `tmp` and prune old ones beyond `keep`."""
    for stale in final.parent.glob(".trash_*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final.exists():
        _discard(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(final.parent)[:-keep] if keep > 0 else []:
        _discard(old)
