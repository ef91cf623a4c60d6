"""Frozen VLM judges: the protocol, the questions, and `load_judge` picking the adapter of a checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import PretrainedConfig

from npedit.edit_types import EDIT_TYPES, edit_type_name
from npedit.folders import CheckpointError, locate, looks_local, what_is
from npedit.judges.base import Judge, JudgeOutput, Question
from npedit.judges.internvl import InternVLJudge
from npedit.judges.llava_onevision import LlavaOnevisionJudge
from npedit.judges.qwen2_5_vl import Qwen25VLJudge
from npedit.judges.questions import (
    change_question,
    change_questions,
    contains_question,
    edit_question,
    free_question,
    identity_question,
    keep_questions,
    kept_question,
    questions_quoting,
    removal_identity_question,
    training_questions,
)

# config.json model_type -> adapter class; one entry per VLM family.
JUDGES: dict[str, type[Judge]] = {
    "internvl": InternVLJudge,
    "llava_onevision": LlavaOnevisionJudge,
    "qwen2_5_vl": Qwen25VLJudge,
}


# Checkpoints of a supported family in another format: what to load instead.
HINTS = {
    "internvl_chat": " (this is InternVL's remote-code format; load its transformers conversion, the repo of the same "
                     "name ending in -hf, e.g. OpenGVLab/InternVL3-14B-hf)",
    "qwen2_vl": " (Qwen2-VL; its successor Qwen2.5-VL is supported, e.g. Qwen/Qwen2.5-VL-7B-Instruct)",
}


def read_model_type(path_or_id: str | os.PathLike) -> str | None:
    """model_type from a folder's config.json (or a hub id's; offline, its cached snapshot's); None when there is none
    to read (offline, a hub id not in the cache is None at once, not after the hub client's retries)."""
    try:
        path_or_id = locate(path_or_id)
    except CheckpointError:
        return None
    local = Path(path_or_id)
    if local.is_dir():
        file = local / "config.json"
        return json.loads(file.read_text(encoding="utf-8")).get("model_type") if file.is_file() else None
    if looks_local(path_or_id):  # a missing local folder ("runs/x" beside runs/): nothing the hub could have
        return None
    try:
        config, _ = PretrainedConfig.get_config_dict(str(path_or_id))
    except (OSError, ValueError):
        return None
    return config.get("model_type")


def judge_class(path_or_id: str | os.PathLike) -> type[Judge]:
    """The adapter class for a judge folder or hub id, from its config's model_type (read, not loaded); ValueError
    naming the supported families (and what to load instead, for a known other format) otherwise."""
    model_type = read_model_type(path_or_id)
    if model_type not in JUDGES:
        found = f"model_type {model_type!r}" if model_type is not None else (
            what_is(path_or_id) if looks_local(path_or_id) else "no readable config.json")
        supported = ", ".join(sorted(JUDGES))
        hint = HINTS.get(model_type, "")
        raise CheckpointError(f"cannot load a judge from {str(path_or_id)!r} ({found}); supported judge types: "
                              f"{supported}{hint}")
    return JUDGES[model_type]


def load_judge(path_or_id: str | os.PathLike, **kwargs) -> Judge:
    """Load a judge from a folder or hub id (offline, a hub id's cached snapshot: `folders.locate`), choosing the
    adapter from its config's model_type. Its dtype is `torch_dtype=` or, as `NPEditPipeline.from_pretrained`
    names it, `dtype=`: a torch dtype or its name ("bfloat16")."""
    from ..devices import as_torch_dtype

    dtype = kwargs.pop("dtype", None)
    if dtype is not None:
        if kwargs.get("torch_dtype") is not None and as_torch_dtype(kwargs["torch_dtype"]) != as_torch_dtype(dtype):
            raise ValueError(f"two dtypes for the judge: dtype={dtype} and torch_dtype={kwargs['torch_dtype']}")
        kwargs["torch_dtype"] = dtype
    if kwargs.get("torch_dtype") is not None:
        kwargs["torch_dtype"] = as_torch_dtype(kwargs["torch_dtype"])
    path_or_id = locate(path_or_id, "judge folder")
    return judge_class(path_or_id).from_pretrained(path_or_id, **kwargs)


__all__ = [
    "EDIT_TYPES",
    "change_question",
    "change_questions",
    "InternVLJudge",
    "JUDGES",
    "Judge",
    "JudgeOutput",
    "LlavaOnevisionJudge",
    "Question",
    "Qwen25VLJudge",
    "contains_question",
    "edit_question",
    "edit_type_name",
    "free_question",
    "judge_class",
    "identity_question",
    "keep_questions",
    "kept_question",
    "load_judge",
    "questions_quoting",
    "read_model_type",
    "removal_identity_question",
    "training_questions",
]
