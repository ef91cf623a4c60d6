"""An editor folder as it is shared on the Hugging Face Hub: no path of the trainer's machine, a model card saying how
to load it, and the upload (`python -m npedit export RUN --push owner/name`)."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path

from . import assets
from .folders import looks_local

# the fields of a training config (and of an export's training_config.json) that name files of the trainer's machine
PATH_KEYS = (("output_dir",), ("model", "base"), ("model", "student"), ("judge", "path"), ("data", "train"),
             ("exported_from",), ("base",))
LOCAL = "local:"  # a local folder or file, named by its last component only: it exists on the trainer's machine only
TEXT_SUFFIXES = {".json", ".md", ".txt", ".yaml", ".yml", ".jinja", ".csv", ".jsonl"}
TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{30,}\b")  # a Hugging Face access token


def is_hub_id(value: str) -> bool:
    """Whether `value` names a hub repo ("owner/name") rather than a file of this machine."""
    return bool(value) and not looks_local(value) and not Path(value).expanduser().exists()


def portable(value: str) -> str:
    """A reference to a model or data as it may be published: a hub id or "shapes" as it is, a bundled model relative
    to the workbench (`assets/shapes/teacher`, which any clone has), any other local path as `local:<its name>`:
    named, never required (no loader takes it for a folder or hub id)."""
    if not value or value == "shapes" or value.startswith(LOCAL) or is_hub_id(value):
        return value
    path = Path(value).expanduser().resolve()
    for root, name in ((assets.ASSETS_DIR, "assets"), (assets.CONFIGS_DIR, "configs")):
        if path.is_relative_to(root.resolve()):
            return f"{name}/{path.relative_to(root.resolve()).as_posix()}"
    return LOCAL + path.name


def shareable_config(config: dict, keys: tuple[tuple[str, ...], ...] = PATH_KEYS) -> dict:
    """A copy of a training config (`to_dict` form, plus an export's own keys) with the paths at `keys` `portable`."""
    out = copy.deepcopy(config)
    for keys in keys:
        holder = out
        for key in keys[:-1]:
            holder = holder.get(key, {}) if isinstance(holder, dict) else {}
        if isinstance(holder, dict) and isinstance(holder.get(keys[-1]), str):
            holder[keys[-1]] = portable(holder[keys[-1]])
    return out


CARD_KEYS = ("stage", "step", "model.base", "model.student", "judge.path", "data.train", "data.resolution",
             "data.batch_size", "optim.lr", "loss.lambda_dmd", "loss.lambda_vlm", "loss.lambda_target",
             "loss.lambda_target_pixels", "model.lora_rank", "sampler.num_steps", "sampler.shift")


def training_section(config: dict) -> str:
    """The card's "Training" section: the settings a reader asks first, from a (shareable) training config."""
    lines = []
    for key in CARD_KEYS:
        value = config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value not in (None, ""):
            lines.append(f"{key}: {value}")
    return ("## Training\n\nThe run's settings (all of them: `training_config.json`; `local:NAME` is a folder or file "
            "of the trainer's machine, named only):\n\n```yaml\n" + "\n".join(lines) + "\n```")


def metrics_section(report: dict) -> str:
    """The card's "Evaluation" section from a `python -m npedit eval shapes` report (its JSON): the per-category
    table of the exact Shapes-world benchmark and what it ran on. ValueError for a `--baseline teacher` report: its
    figures are the teacher's, not an editor's."""
    from .shapes.evaluate import markdown_table

    meta = report.get("meta", {})
    if meta.get("baseline"):
        raise ValueError(f"the report is of --baseline {meta['baseline']} (the teacher's SDEdit edits), not of an "
                         "editor: give the report of `eval shapes --model` on this editor")
    cases = f"{meta.get('n', '?')} {meta.get('cases', 'held-out')} Shapes-world cases, seed {meta.get('seed', '?')}"
    # best-of-N figures are not what one call of the editor gives: the card says so
    candidates = meta.get("candidates") or 1
    picked = f", each output the best of {candidates} samples picked by the judge" if candidates > 1 else ""
    refine = meta.get("refine") or {}
    if refine.get("steps"):  # nor are judge-refined ones (`--refine K`, a test-time mode)
        picked += (f", {'each sample' if candidates > 1 else 'each output'} then refined by the judge for "
                   f"{refine['steps']} steps at test time (`--refine {refine['steps']}`)")
    return (f"## Evaluation\n\nThe exact Shapes-world benchmark (`python -m npedit eval shapes`), {cases}, "
            f"{meta.get('steps', 4)} steps{picked}; scored against the true edit (the score asks no judge):\n\n"
            + markdown_table(report["summary"]))


def private_traces(folder: str | os.PathLike, paths: tuple[str, ...] = ()) -> list[str]:
    """"FILE: what" for each text file of `folder` that holds a path of this machine (its home folder or one of
    `paths`) or something shaped like a Hugging Face token; what must not be published by mistake."""
    needles = {str(Path.home()): "the home folder"}
    needles.update({str(Path(p).expanduser().resolve()): "a local path" for p in paths if p})
    needles = {k: v for k, v in needles.items() if k not in ("/", "")}
    found = []
    for file in sorted(Path(folder).rglob("*")):
        if not file.is_file() or file.suffix.lower() not in TEXT_SUFFIXES:
            continue
        text = file.read_text(encoding="utf-8", errors="replace")
        rel = file.relative_to(folder).as_posix()
        # a path as a whole component: /root is in "/root/x" or "/root", not in "/rootfs/x"
        found += [f"{rel}: {what} ({needle})" for needle, what in needles.items()
                  if re.search(re.escape(needle) + r"(?![^\\/\"'\s,)\]}])", text)]
        if TOKEN.search(text):
            found.append(f"{rel}: a Hugging Face token (hf_...)")
    return found


def push(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None) -> str:
    """Upload an editor folder to the hub model repo `repo_id` (created when missing) with `upload_folder`; returns
    the commit's URL. The login is the hub client's own (`hf auth login` or HF_TOKEN)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                             commit_message=message or f"Upload NP-Edit editor ({Path(folder).name})")
    return str(getattr(info, "commit_url", info))
