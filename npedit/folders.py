"""What a local checkpoint folder holds, and one clear error when it is not what a command needs.

Used wherever a path from a user is loaded (the CLI, `NPEditPipeline.from_pretrained`, the app), so that a
wrong folder gets a sentence naming what it is and what to pass instead, not a library's traceback.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import struct
import threading
from pathlib import Path

EDITOR_KIND = "an NPEditPipeline (editor) folder"


class CheckpointError(ValueError):
    """A model path that is missing, of the wrong kind or unreadable; the message says what it is."""


class BaseNotFound(FileNotFoundError):
    """An adapter folder's base model or starting student is not where its npedit_lora.json says (moved, or a copy
    of it incomplete); the message says how to point it there. The CLI prints it as one line, as a CheckpointError."""


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


def cached_snapshot(repo_id: str, revision: str | None = None) -> Path | None:
    """The local Hugging Face cache's snapshot folder of model repo `repo_id` at `revision` (a branch or tag its refs/
    name, or a full commit hash; default "main"), what the hub client itself reads when it cannot reach the hub; None
    when the cache holds none. Reads no network."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    repo = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    revision = revision or "main"
    ref = repo / "refs" / revision
    try:
        # a ref (main, a tag, a branch with a slash) names its commit; a commit hash is the snapshot's own name
        commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    except (OSError, UnicodeDecodeError):
        return None
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        return None  # not a ref the cache holds, nor a commit (a short hash or a typo): no snapshot to pick
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


# Exceptions (by class name, across the hub client's transports: requests before 1.0, httpx or httpx2 after) that mean
# no connection was made at all, so no retry of the same request can succeed soon; any other failure (an HTTP status,
# a read timeout) leaves the decision to the hub client, unchanged.
NO_CONNECTION = ("OfflineModeIsEnabled", "ConnectError", "ConnectTimeout", "ConnectionError", "ProxyError")


# How long one answer of the hub's endpoint stands: every loader a hub id passes through calls `locate` (a run's start
# several, the app's judge check every edit), and a request to an endpoint that drops packets waits HF_HUB_ETAG_TIMEOUT
HUB_ANSWER_S = 30.0
_HUB_ANSWERS: dict[str, tuple[float, str | None]] = {}  # endpoint -> (time asked, `hub_unreachable`'s answer)


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached now ("HF_HUB_OFFLINE is set", "ConnectError: ..."), from one request to its
    endpoint without retries (the hub client's own session, proxies and HF_ENDPOINT; its HF_HUB_ETAG_TIMEOUT, the wait
    after which it too falls back to its cache), asked again only after HUB_ANSWER_S; None when it answers, whatever
    the HTTP status."""
    import time

    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    endpoint = constants.ENDPOINT
    asked = _HUB_ANSWERS.get(endpoint)
    if asked is not None and time.monotonic() - asked[0] < HUB_ANSWER_S:
        return asked[1]
    why = None
    try:
        get_session().head(endpoint, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as exc:  # sorted by class name: which transport library raises varies with the hub's version
        if any(k.__name__ in NO_CONNECTION for k in type(exc).__mro__):
            why = f"{type(exc).__name__}: {exc}"
    _HUB_ANSWERS[endpoint] = (time.monotonic(), why)
    return why


def not_found(path: str | os.PathLike, hub: str, kind: str = "folder", revision: str | None = None) -> CheckpointError:
    """The one-line error for `path`, shaped like a hub id, that is no folder here, not in the hub cache (at
    `revision`, when one is asked for) and that the hub did not give (`hub` says why): what was looked for, where,
    and what to do."""
    from huggingface_hub import constants

    text = str(path)
    at, flag = (f" at revision {revision!r}", f" --revision {revision}") if revision else ("", "")
    return CheckpointError(
        f"cannot find {text!r}{at} locally or on the hub: no folder {Path(text).absolute()}, no repo {text}{at} in the "
        f"Hugging Face cache ({constants.HF_HUB_CACHE}), and the hub {hub}; pass a local {kind}, or download the repo "
        f"where there is a network (`hf download {text}{flag}`, into the cache HF_HOME names)")


def found_nowhere(path: str | os.PathLike, exc: Exception, kind: str = "folder") -> CheckpointError:
    """The error for a path shaped like a hub id ("editors/x") that is no folder here and that the hub did not give
    (no such repo, private, or unreachable): one line instead of the library's OSError."""
    return not_found(path, f"did not give it ({type(exc).__name__}; a private or gated repo needs `hf auth login`)",
                     kind)


def locate(path: str | os.PathLike, kind: str = "folder", revision: str | None = None) -> str:
    """Where to load `path` from: itself when it is local (`looks_local`) or when the hub answers (the hub client then
    loads it as it always did); when the hub cannot be reached (`hub_unreachable`), a hub id's cached snapshot folder
    at `revision` (default main), or else at once `not_found` (the hub client would retry for ~23 s before failing
    the same way)."""
    text = str(path)
    if looks_local(text):
        return text
    why = hub_unreachable()
    if why is None:
        return text
    snapshot = cached_snapshot(text, revision)
    if snapshot is None:
        raise not_found(text, f"cannot be reached ({why})", kind, revision)
    return str(snapshot)


# weights saved as pickles (not a trainer's training_args.bin, optimizer.bin or rng_state.pth)
PICKLED_WEIGHTS = re.compile(r"((diffusion_)?pytorch_model|model)[\w.-]*\.bin|(?!(optimizer|scheduler|rng_state|"
                             r"training_args))[\w.-]*\.(pt|pth|ckpt)")


def pickled_note(folder: Path) -> str:
    """" (a pickle .bin is not read)" when `folder` holds weights saved as pickles (`PICKLED_WEIGHTS`), else ""."""
    folder = Path(folder)
    found = folder.is_dir() and any(PICKLED_WEIGHTS.fullmatch(f.name) for f in folder.iterdir())
    return " (a pickle .bin is not read)" if found else ""


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
            from npedit.judges import JUDGES  # here: the judges import this module

            # a judge's type names it as one; another (a plain CLIP, a text model) is none of what loads here
            role = "a judge/VLM, not an editor" if cfg["model_type"] in JUDGES else "neither an editor nor a judge"
            return f"a transformers model of type {cfg['model_type']!r} ({role})"
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
    if any(PICKLED_WEIGHTS.fullmatch(f.name) for f in p.iterdir()):
        return "a folder whose weights are pickles (.bin/.pt), which are never read here: safetensors only"
    return "a folder without model files"


def describe(path: str | os.PathLike) -> str:
    """A sentence's start saying what a local path holds: "P does not exist", "P is a training run folder; ..."."""
    kind = what_is(Path(path).expanduser())
    return f"{path} {kind if kind.startswith(('does', 'is')) else 'is ' + kind}"


def check_editor_folder(path: str | os.PathLike, dtype=None, sizes: bool = True, device=None,
                        revision: str | None = None) -> None:
    """CheckpointError unless a local `path` is an editor (NPEditPipeline or adapter) folder with every component its
    model_index.json lists, each (with `sizes`; it builds them on the meta device, tens of ms: for a load, not for a
    look) of a size its weights and the memory a load for `device` uses (`memory_limits`) allow, and all of them
    together within that memory (`check_pipeline_size`, at `dtype`); a hub id is size-checked on its cached snapshot
    (at `revision`), where there is one."""
    if looks_local(path) and what_is(Path(path).expanduser()) != EDITOR_KIND:
        raise CheckpointError(f"{describe(path)}: an editor is an NPEditPipeline folder (it holds model_index.json), "
                              "a LoRA export of one, or a hub id")
    missing = missing_components(Path(path).expanduser()) if looks_local(path) else []
    if missing:
        raise CheckpointError(f"{path} is an incomplete editor folder: {'; '.join(missing)}")
    folder = Path(path).expanduser() if looks_local(path) else cached_snapshot(str(path), revision)
    if folder is not None:
        problem = latent_space_problem(folder)
        if problem:
            raise CheckpointError(f"{path}: {problem}")
    if sizes and folder is not None:
        check_pipeline_size(folder, dtype, device)


def latent_space_problem(folder: Path) -> str | None:
    """What says that `folder`'s vae/ makes latents its transformer/ cannot take (another channel count: a VAE of
    another latent space copied in), or None. The edit failed at its first step with a convolution's shape error."""
    vae, transformer = folder / "vae" / "config.json", folder / "transformer" / "config.json"
    if not (vae.is_file() and transformer.is_file()):
        return None
    made, config = _read_json(vae).get("latent_channels"), _read_json(transformer)
    taken = config.get("in_channels")
    if "latent_channels" in config:  # a VAE in transformer/: the class check names that
        return None
    if not isinstance(made, int) or not isinstance(taken, int) or made == taken:
        return None
    return (f"its VAE (vae/) makes latents of {made} channels and its transformer takes {taken}: the VAE is of another "
            "latent space; put back the VAE the editor was trained with (`python -m npedit swap-vae` checks a new one)")


def check_pipeline_size(folder: Path, dtype=None, device=None) -> int:
    """`check_model_size` on each model an editor folder lists whose weights are all there (a hub cache snapshot may
    hold part of them), then CheckpointError when those models together need more than the memory a load for
    `device` uses (`memory_limits`) at `dtype` (each alone may fit where all of them, loaded at once, do not); returns
    their elements."""
    counts = {component.name: check_model_size(component, model_class, dtype, device)
              for component, model_class in model_components(folder) if weights_complete(component)}
    per_element = element_bytes(dtype)
    total = sum(counts.values())
    for memory, where in memory_limits(device):
        if total * per_element > memory:
            parts = ", ".join(f"{name} {human_size(n * per_element)}" for name, n in counts.items())
            raise CheckpointError(f"{folder}: its models need {human_size(total * per_element)} together in "
                                  f"{dtype_name(dtype)} ({parts}), more than the {human_size(memory)} {where}")
    return total


def missing_components(path: Path) -> list[str]:
    """What an NPEditPipeline folder lacks of the components its model_index.json lists (`component_problem`)."""
    if not (path / "model_index.json").is_file():
        return []
    missing = []
    for name, entry in _read_json(path / "model_index.json").items():
        if name.startswith("_") or not isinstance(entry, list) or None in entry:
            continue
        problem = component_problem(path / name, name, f"model_index.json lists {entry[-1]} there")
        if problem:
            missing.append(problem)
    return missing


# What a tokenizer's vocabulary may be stored in besides a BPE vocab.json + merges.txt pair
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer.model")


def component_problem(folder: Path, name: str, why: str | None = None) -> str | None:
    """What the component folder `name` (tokenizer*, text_encoder*, transformer, vae, scheduler) of an editor or a
    base model lacks to load, or None: the folder (`why` it is expected), its config (a tokenizer's
    tokenizer_config.json, which names its pad and special tokens), a tokenizer's vocabulary, or, for a model,
    safetensors weights that load (`weights_problem`: weights are never read from pickle .bin files)."""
    config = ("scheduler_config.json" if name == "scheduler" else
              "tokenizer_config.json" if name.startswith("tokenizer") else "config.json")
    if not folder.is_dir():
        return f"no {name}/" + (f" ({why})" if why else "")
    if not (folder / config).is_file():
        return f"no {config} in {name}/"
    if name.startswith("tokenizer"):
        return tokenizer_problem(folder, f"{name}/")
    if name in ("transformer", "vae") or name.startswith("text_encoder"):
        return weights_problem(folder, f"{name}/")
    return None


def tokenizer_problem(folder: Path, name: str) -> str | None:
    """What a tokenizer saved in `folder` (called `name`) lacks to load as it was saved, or None: tokenizer_config.json
    (its class, pad and special tokens) or its vocabulary (from the config alone transformers builds a Qwen2Tokenizer
    of the special tokens only, which encodes every prompt to nothing)."""
    if not (folder / "tokenizer_config.json").is_file():
        return f"no tokenizer_config.json in {name}"
    if not any((folder / f).is_file() for f in TOKENIZER_FILES) and not (
            (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        return f"no tokenizer files in {name} ({', '.join(TOKENIZER_FILES)}, or vocab.json and merges.txt)"
    return None


def check_components(path: str | os.PathLike, names: list[str], what: str) -> None:
    """CheckpointError listing what a local folder (`what` it is, e.g. "Z-Image checkpoint") lacks of the components
    `names` (`component_problem`), before a loader reads any of them; a hub id is left to its loader."""
    if not looks_local(path):
        return
    problems = [p for p in (component_problem(Path(path).expanduser() / n, n) for n in names) if p]
    if problems:
        raise CheckpointError(f"{path} is an incomplete {what}: {'; '.join(problems)}")


def model_components(path: Path) -> list[tuple[Path, type]]:
    """(folder, class) of each model (transformer, VAE, text encoders) an editor folder's model_index.json lists, for
    the classes of diffusers, transformers and npedit (the modules a saved editor names)."""
    if not (path / "model_index.json").is_file():
        return []
    found = []
    for name, entry in _read_json(path / "model_index.json").items():
        if not (name in ("transformer", "vae") or name.startswith("text_encoder")) or not isinstance(entry, list):
            continue
        library, class_name = (entry + [None, None])[:2]
        if not isinstance(library, str) or not isinstance(class_name, str):
            continue
        if library in ("diffusers", "transformers") or library.startswith("npedit."):  # never import other modules
            model_class = getattr(importlib.import_module(library), class_name, None)
            if model_class is not None:
                found.append((path / name, model_class))
    return found


# A config may build at most SIZE_FACTOR times the elements its safetensors weights hold, plus SIZE_MARGIN: room for
# buffers that are not saved (position tables), weights tied and saved once, and a student's few added parameters.
SIZE_FACTOR = 2
SIZE_MARGIN = 1 << 22
HEADER_LIMIT = 100 << 20  # bytes of a safetensors JSON header (the safetensors library's own limit)


def stored_numel(folder: str | os.PathLike) -> int:
    """Elements of every tensor in a folder's *.safetensors files, from their headers alone (no tensor data is read);
    CheckpointError for a file that is no safetensors file or whose header claims more than the file holds."""
    total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        size = file.stat().st_size
        try:
            with open(file, "rb") as fh:
                (length,) = struct.unpack("<Q", fh.read(8))
                if length > min(HEADER_LIMIT, size - 8):
                    raise ValueError(f"a header of {length} bytes")
                header = json.loads(fh.read(length))
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                begin, end = entry["data_offsets"]
                numel = math.prod(entry["shape"])
                # no dtype stores an element in under 4 bits: a header claiming more elements than its bytes hold
                # would let a small file pass for large weights
                if not 0 <= begin <= end <= size - 8 - length or numel > 2 * (end - begin) or numel < 0:
                    raise ValueError(f"tensor {name} claims more than the file holds")
                total += numel
        except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
            raise CheckpointError(f"{file} is not a readable safetensors file ({exc})") from None
    return total


MEMINFO = Path("/proc/meminfo")  # Linux's own account; macOS and Windows have none (psutil asks them)


def available_memory() -> int | None:
    """Bytes of memory a new allocation can have now: Linux's MemAvailable, elsewhere (macOS, Windows) psutil's
    `available`; None where the system does not say."""
    try:
        for line in MEMINFO.read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:  # without this a laptop's memory checks (a run's models, a model's size) were silently skipped
        import psutil

        return int(psutil.virtual_memory().available)
    except (ImportError, OSError, RuntimeError):
        return None


def device_memory(device=None) -> tuple[int | None, str]:
    """Bytes free for models on `device` and what they are: GPU memory free now on a CUDA device
    (torch.cuda.mem_get_info), else the RAM available (None where the system does not say)."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device} ({torch.cuda.get_device_name(device)})"
    return available_memory(), "of RAM available"


def memory_limits(device=None) -> list[tuple[int, str]]:
    """The memory a model loaded for `device` must fit, as (bytes, what they are), smallest first: the RAM available,
    since every loader reads the weights there before they move, and on a CUDA device its free memory too."""
    import torch

    limits = [device_memory("cpu")]
    if device is not None and torch.device(device).type == "cuda":
        limits.append(device_memory(device))
    return sorted((n, where) for n, where in limits if n is not None)


def human_size(n: int) -> str:
    """Bytes as "1.5 GiB", "12.0 MiB", "3.0 KiB" or "512 bytes"."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


# a sharded checkpoint's files, NAME-00001-of-00004.safetensors ..., listed by NAME.safetensors.index.json
SHARD = re.compile(r"(.+)-\d{5}-of-\d{5}\.safetensors")


def weights_problem(folder: str | os.PathLike, name: str | None = None) -> str | None:
    """Why `folder`'s safetensors weights cannot load, as a sentence naming it as `name` (default: its path), or
    None: no safetensors file (a pickle .bin is never read), shards without the index that lists them (the loaders
    then ask for one whole file and name the folder above), or files an index lists that are not there (a download
    stopped part way)."""
    folder = Path(folder)
    name = name or str(folder)
    files = sorted(f.name for f in folder.glob("*.safetensors"))
    if not files:
        return f"no safetensors weights in {name}{pickled_note(folder)}"
    indexed = set()
    for index in sorted(folder.glob("*.safetensors.index.json")):
        listed = _read_json(index).get("weight_map", {})
        listed = set(map(str, listed.values())) if isinstance(listed, dict) else set()
        indexed.add(index.name.removesuffix(".index.json"))
        lost = sorted(f for f in listed if not (folder / f).is_file())
        if lost:
            more = ", ..." if len(lost) > 3 else ""
            return (f"{len(lost)} of the {len(listed)} weight files that {name} lists in {index.name} are missing "
                    f"({', '.join(lost[:3])}{more})")
    shards = [m.group(1) for m in map(SHARD.fullmatch, files) if m]
    if shards and len(shards) == len(files) and not indexed:  # shards alone: nothing says how they join
        index = f"{shards[0]}.safetensors.index.json"
        return f"{name} holds weight shards ({files[0]}, ...) but not their index, {index}"
    return None


def check_weights(folder: str | os.PathLike) -> None:
    """CheckpointError with `weights_problem`'s sentence when `folder`'s weights cannot load."""
    problem = weights_problem(folder)
    if problem:
        raise CheckpointError(problem)


def weights_complete(folder: str | os.PathLike) -> bool:
    """Whether `folder`'s safetensors weights load (`weights_problem`): a download into the hub cache stops part way
    (the files it has are whole: the hub client links them in once complete)."""
    return weights_problem(folder) is None


def model_folder(path: str | os.PathLike, subfolder: str | None = None) -> Path | None:
    """The local folder of `path`'s model (its `subfolder`) that a size check reads: the folder itself when it is a
    local one, a hub id's cached snapshot's when its weights are all there (`weights_complete`); None otherwise."""
    if looks_local(path):
        folder = Path(path).expanduser() / (subfolder or "")
        return folder if folder.is_dir() else None
    snapshot = cached_snapshot(str(path))
    folder = snapshot / (subfolder or "") if snapshot is not None else None
    return folder if folder is not None and weights_complete(folder) else None


def check_size(path: str | os.PathLike, model_class: type, dtype=None, subfolder: str | None = None,
               device=None) -> int | None:
    """`check_model_size` on `model_folder(path, subfolder)`, for a local folder or a cached hub id alike; None when
    there is no local copy to read (a hub id not yet downloaded)."""
    folder = model_folder(path, subfolder)
    return check_model_size(folder, model_class, dtype, device) if folder is not None else None


def element_bytes(dtype=None) -> int:
    """Bytes an element of `dtype` takes; 2 (16-bit) when None."""
    import torch

    return torch.empty(0, dtype=dtype).element_size() if dtype is not None else 2


def dtype_name(dtype=None) -> str:
    """"float32", "bfloat16", ... for messages; "16-bit" when None."""
    return str(dtype).removeprefix("torch.") if dtype is not None else "16-bit"


class _TooLarge(Exception):
    """Raised from the registration hooks once a model being built passes its bound."""


def check_model_size(folder: str | os.PathLike, model_class: type, dtype=None, device=None) -> int:
    """CheckpointError unless the `model_class` (a diffusers or transformers model, or a transformers Auto class)
    that `folder`'s config.json describes holds at most SIZE_FACTOR x the elements of the folder's safetensors
    weights (plus SIZE_MARGIN) and fits, at `dtype` (2 bytes an element when None), in the memory a load for
    `device` uses (`memory_limits`: the RAM available; on a CUDA device, its free memory too); builds it on the meta
    device, stopped as soon as it passes, so a config asking for a huge model fails at once. Returns the elements of
    its parameters and buffers."""
    return build_on_meta(folder, model_class, dtype, device)[1]


def build_on_meta(folder: str | os.PathLike, model_class: type, dtype=None, device=None):
    """`check_model_size`'s build, returning the model it built on the meta device (shapes only, no memory) and the
    elements of its parameters and buffers."""
    import torch
    from torch.nn.modules import module as torch_module

    folder = Path(folder)
    other = class_problem(folder, model_class)
    if other:  # (else built as the class named, it failed on a missing attribute or passed as a "larger config")
        raise CheckpointError(f"{folder} holds {other}; expected: {model_class.__name__} (a folder of another "
                              "model in its place?)")
    stored = stored_numel(folder)
    by_weights = SIZE_FACTOR * stored + SIZE_MARGIN
    per_element = element_bytes(dtype)
    limits = memory_limits(device)
    memory, where = limits[0] if limits else (None, "")
    bound = by_weights if memory is None else min(by_weights, memory // per_element)
    if hasattr(model_class, "load_config"):  # a diffusers model
        def build():
            return model_class.from_config(model_class.load_config(str(folder)))
    else:  # transformers: a model class or an Auto class
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(folder))
        build_from = getattr(model_class, "_from_config", None) or model_class.from_config

        def build():
            return build_from(config)
    count, builder = [0], threading.get_ident()

    def counted(module, name, tensor):
        if tensor is not None and threading.get_ident() == builder:  # a model built in another thread is not ours
            count[0] += tensor.numel()
            if count[0] > bound:
                raise _TooLarge

    hooks = [torch_module.register_module_parameter_registration_hook(counted),
             torch_module.register_module_buffer_registration_hook(counted)]
    try:
        with torch.device("meta"):  # shapes only: nothing is allocated
            model = build()
    except _TooLarge:
        asks = f"{folder}: its config.json builds a {model_class.__name__} of more than {count[0]:,} parameters"
        if bound < by_weights:
            raise CheckpointError(f"{asks} ({human_size(count[0] * per_element)} in {dtype_name(dtype)}), more "
                                  f"than the {human_size(memory)} {where}") from None
        raise CheckpointError(f"{asks}, over {SIZE_FACTOR}x the {stored:,} its safetensors weights hold: refusing "
                              "to build it (a config edited to a larger size?)") from None
    finally:
        for hook in hooks:
            hook.remove()
    return model, count[0]


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


def class_problem(folder: Path, model_class: type) -> str | None:
    """What `folder`'s config.json describes when it is another kind of model than `model_class` (a diffusers class,
    or a transformers class or Auto class), in words ("a model of class UNet2DConditionModel", "a transformers gpt2
    model"); None
    when it is that class, a class it derives from or one deriving from it, or when the config does not say."""
    file = folder / "config.json"
    config = _read_json(file) if file.is_file() else {}
    if hasattr(model_class, "load_config"):  # diffusers: the config names its class
        name = config.get("_class_name")
        if not isinstance(name, str) or not name:
            return f"a transformers {config['model_type']} model" if isinstance(config.get("model_type"), str) else None
        related = {c.__name__ for c in (*model_class.__mro__, *_subclasses(model_class))}
        return None if name in related else f"a model of class {name}"
    expected = getattr(getattr(model_class, "config_class", None), "model_type", "")  # ("" for an Auto class)
    found = config.get("model_type")
    # a type's variants load into its class (mt5 and umt5 into T5's), and a whole model's config into its part's
    # (clip's into CLIPTextModel's clip_text_model): only an unrelated type is another model
    related = not isinstance(found, str) or not expected or found.endswith(expected) or expected.startswith(f"{found}_")
    if not related:
        return f"a transformers {found} model"
    if isinstance(config.get("_class_name"), str) and not found:  # a diffusers model where a transformers one goes
        return f"a model of class {config['_class_name']}"
    return None


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file} is not readable JSON ({exc})") from None
    return value if isinstance(value, dict) else {}
