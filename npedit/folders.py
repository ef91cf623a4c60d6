"""What a local checkpoint folder holds, and one clear error when it is not what a command needs.

Used wherever a path from a user is loaded (the CLI, `NPEditPipeline.from_pretrained`, the app), so that a
wrong folder gets a sentence naming what it is and what to pass instead, not a library's traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

EDITOR_KIND = "an NPEditPipeline (editor) folder"


class CheckpointError(ValueError):
    """A model path that is missing, of the wrong kind or unreadable; the message says what it is."""


def looks_local(path: str | os.PathLike) -> bool:
    """Whether `path` names a local folder rather than a hub id ("owner/name"): it exists, it starts like a path
    (".", "/", "~"), it has more or fewer than one slash, or its first component is a folder here ("runs/x" beside
    a runs/ folder) and the hub cache holds no repo of that name. Decided without the network, so a missing local
    folder is reported at once instead of after the hub client's retries (~23 s offline)."""
    text = str(path)
    if Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return True
    return Path(text.split("/")[0]).is_dir() and not in_hub_cache(text)


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds a model repo `repo_id` (some files of it); reads no network."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")).is_dir()


def found_nowhere(path: str | os.PathLike, exc: Exception, kind: str = "folder") -> CheckpointError:
    """The error for a path shaped like a hub id ("editors/x") that is no folder here and that the hub did not give
    (offline, or no such repo): one line instead of the library's OSError."""
    return CheckpointError(f"cannot find {str(path)!r} locally or on the hub ({type(exc).__name__}); pass a local "
                           f"{kind}")


def what_is(path: str | os.PathLike) -> str:
    """A short description of what a local folder holds, e.g. "does not exist", "a training run folder; its editor
    is RUN/pipeline", EDITOR_KIND (for error messages)."""
    from .adapters import is_adapter_folder

    p = Path(path)
    if not p.exists():
        return "does not exist"
    if not p.is_dir():
        return "is a file, not a folder"
    if is_adapter_folder(p):  # LoRA adapters plus the base they name: loads as an editor
        return EDITOR_KIND
    if (p / "model_index.json").is_file():
        cls = _read_json(p / "model_index.json").get("_class_name")
        return EDITOR_KIND if cls == "NPEditPipeline" else f"a diffusers pipeline of class {cls}"
    if (p / "config.json").is_file():
        cfg = _read_json(p / "config.json")
        if "model_type" in cfg:
            return f"a transformers model of type {cfg['model_type']!r} (a judge/VLM, not an editor)"
        if "_class_name" in cfg:
            return f"a bare transformer ({cfg['_class_name']}), e.g. a critic: not a full editor"
    if (p / "transformer" / "config.json").is_file():
        return "a text-to-image base model (a teacher: transformer/, vae/, text_encoder/), not an editor"
    if (p / "trainer_state.json").is_file() and p.parent.name == "checkpoints":
        step = p.name.removeprefix("step_").lstrip("0") or "0"
        return (f"a training checkpoint, not an editor: `python -m npedit export {p.parent.parent} --step {step}` "
                "makes one of it")
    if (p / "config.yaml").is_file() or (p / "job.json").is_file():
        hint = f"; its editor is {p / 'pipeline'}" if (p / "pipeline" / "model_index.json").is_file() else \
            " that has not exported an editor yet"
        return f"a training run folder{hint}"
    return "a folder without model files"


def describe(path: str | os.PathLike) -> str:
    """A sentence's start saying what a local path holds: "P does not exist", "P is a training run folder; ..."."""
    kind = what_is(Path(path).expanduser())
    return f"{path} {kind if kind.startswith(('does', 'is')) else 'is ' + kind}"


def check_editor_folder(path: str | os.PathLike) -> None:
    """CheckpointError unless a local `path` is an editor (NPEditPipeline or adapter) folder with every component its
    model_index.json lists; hub ids pass."""
    if looks_local(path) and what_is(Path(path).expanduser()) != EDITOR_KIND:
        raise CheckpointError(f"{describe(path)}: an editor is an NPEditPipeline folder (it holds model_index.json), "
                              "a LoRA export of one, or a hub id")
    missing = missing_components(Path(path).expanduser()) if looks_local(path) else []
    if missing:
        raise CheckpointError(f"{path} is an incomplete editor folder: {'; '.join(missing)}")


def missing_components(path: Path) -> list[str]:
    """What an NPEditPipeline folder lacks of the components its model_index.json lists: a component's folder, its
    config (or a tokenizer's tokenizer_config.json), or the safetensors weights of a model (weights are never read
    from pickle .bin files)."""
    if not (path / "model_index.json").is_file():
        return []
    missing = []
    for name, entry in _read_json(path / "model_index.json").items():
        if name.startswith("_") or not isinstance(entry, list) or None in entry:
            continue
        folder = path / name
        config = ("scheduler_config.json" if name == "scheduler" else
                  "tokenizer_config.json" if name.startswith("tokenizer") else "config.json")
        if not folder.is_dir():
            missing.append(f"no {name}/ (model_index.json lists {entry[-1]} there)")
        elif not (folder / config).is_file():
            missing.append(f"no {config} in {name}/")
        elif name in ("transformer", "vae") or name.startswith("text_encoder"):
            if not any(folder.glob("*.safetensors")):
                pickled = " (a pickle .bin is not read)" if any(folder.glob("*.bin")) else ""
                missing.append(f"no safetensors weights in {name}/{pickled}")
    return missing


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is not readable JSON ({exc})") from None
    return value if isinstance(value, dict) else {}
