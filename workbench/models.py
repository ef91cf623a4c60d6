"""Which editor, judge, teacher and critic to use; load them once; say clearly what is missing or wrong.

Paths come from flags, else the NPEDIT_MODEL / NPEDIT_JUDGE / NPEDIT_TEACHER / NPEDIT_CRITIC
environment variables, else the bundled Shapes-world defaults of `npedit.assets`. Nothing here
loads weights at import or construction time: the app must start even when every model is absent.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from npedit import assets
from npedit.config import LossConfig
from npedit.folders import CheckpointError, check_editor_folder, describe, looks_local, what_is
from npedit.domain import read_domain

ENV = {"model": "NPEDIT_MODEL", "judge": "NPEDIT_JUDGE", "teacher": "NPEDIT_TEACHER", "critic": "NPEDIT_CRITIC"}
FLAGS = {"model": "--model", "judge": "--judge", "teacher": "--teacher", "critic": "--critic"}
SHAPES_ABILITIES = ("add, remove, replace, recolor or resize a circle, square or triangle, or change the background "
                    "(e.g. \"make the red circle blue\", \"add a small green square at the top left\")")


class ModelError(ValueError):
    """A model that is missing, of the wrong kind or unloadable; the message says what to pass instead."""


def _bundled(kind: str) -> Path:
    return {"model": assets.DEFAULT_MODEL, "judge": assets.DEFAULT_JUDGE, "teacher": assets.DEFAULT_TEACHER,
            "critic": assets.DEFAULT_CRITIC}[kind]


# ---- checking paths ------------------------------------------------------------------------

def check_editor(path: str | None) -> str:
    """The editor path if it can be an NPEditPipeline, else ModelError saying what to pass."""
    if not path:
        raise ModelError(
            f"No editor: the bundled Shapes-world editor is not in {assets.DEFAULT_MODEL} (it may not be trained yet). "
            f"Start the app with --model DIR_OR_ID (an NPEditPipeline folder such as runs/<name>/pipeline, "
            f"or a hub id) "
            f"or set {ENV['model']}; or train one in the Train tab.")
    try:  # the sizes are checked by the load itself (NPEditPipeline.from_pretrained), not on every look or edit
        check_editor_folder(path, sizes=False)
    except CheckpointError as exc:
        raise ModelError(f"{exc}: pass {FLAGS['model']} one.") from None
    return str(path)


def check_judge(path: str | None) -> str:
    """The judge path if its config names a supported VLM family, else ModelError saying what to pass."""
    from npedit.judges import JUDGES, read_model_type

    if not path:
        raise ModelError(f"No judge: the bundled Shapes-world judge is not in {assets.DEFAULT_JUDGE}. "
                         f"Start the app with {FLAGS['judge']} DIR_OR_ID (a LLaVA-OneVision, Qwen2.5-VL or "
                         f"InternVL3-hf folder or hub id) or set {ENV['judge']}.")
    if looks_local(str(path)) and not Path(path).is_dir():
        raise ModelError(f"judge folder not found: {path}; pass {FLAGS['judge']} DIR_OR_ID")
    model_type = read_model_type(path)
    if model_type not in JUDGES:
        kind = what_is(path) if Path(path).is_dir() else "not readable offline"
        raise ModelError(f"{path} is {kind}: a judge must be one of these VLM families: {', '.join(sorted(JUDGES))} "
                         f"(pass {FLAGS['judge']}).")
    return str(path)


def _steps_note(cfg: dict) -> str:
    """How far an editor's last training run went: the step it was exported at when recorded (exports and runs
    since then), else the run's limits (max_steps is only a cap when max_minutes ended the run)."""
    if cfg.get("step") is not None:
        return f"exported at step {cfg['step']}"
    if cfg.get("max_minutes"):
        return f"up to {cfg.get('max_steps')} steps or {cfg['max_minutes']:g} minutes"
    return f"{cfg.get('max_steps')} steps"


def _transformer_summary(path: Path) -> str:
    """`ClassName, N parameters` of a saved transformer, read from file headers only."""
    cfg_file = path / "transformer" / "config.json"
    if not cfg_file.is_file():
        return ""
    name = json.loads(cfg_file.read_text(encoding="utf-8")).get("_class_name", "transformer")
    try:
        from safetensors import safe_open

        n = 0
        for f in (path / "transformer").glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as st:
                n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        return f"{name}, {n / 1e6:.1f}M parameters" if n else name
    except Exception:  # a summary is best effort; loading reports real problems
        return name


def describe_editor(path: str | None, shown: Callable[[str], str] = str) -> str:
    """Markdown: which editor this is and what it can edit (from files only, nothing is loaded); paths appear as
    `shown` gives them (a public app shows no path of its server)."""
    try:
        path = check_editor(path)
    except ModelError as exc:
        return f"**No editor loaded.** {exc}"
    domain = read_domain(path)
    local = Path(path)
    parts = [f"**Editor:** `{shown(path)}`"]
    summary = _transformer_summary(local) if local.is_dir() else "hub id"
    if summary:
        parts.append(f"({summary})")
    if domain.is_shapes:
        parts.append(f"— Shapes-world editor, {domain.resolution}x{domain.resolution}: it can {SHAPES_ABILITIES}. "
                     f"Other sizes are edited at {domain.resolution} px on their longest side (aspect kept, nothing "
                     "cropped) and resized back.")
    else:
        parts.append("— general instruction-based editor: describe the change in words (e.g. \"make the sky pink\").")
    if (local / "training_config.json").is_file():
        cfg = json.loads((local / "training_config.json").read_text(encoding="utf-8"))
        data = cfg.get("data", {}).get("train")
        rank = cfg.get("model", {}).get("lora_rank") or 0
        how = f" with LoRA adapters of rank {rank}, folded into its weights" if rank else ""
        data = shown(data) if isinstance(data, str) else data
        parts.append(f"Last training stage: `{cfg.get('stage')}` on `{data}`{how}, {_steps_note(cfg)}.")
    return " ".join(parts)


# ---- choosing paths --------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelPaths:
    """The models the app was started with; None where none was given and no bundled default exists."""

    model: str | None = None
    judge: str | None = None
    teacher: str | None = None
    critic: str | None = None
    given: tuple[str, ...] = ()  # which of them came from a flag or the environment


def resolve_paths(model=None, judge=None, teacher=None, critic=None, env=None) -> ModelPaths:
    """Flags, else NPEDIT_* environment variables, else the bundled defaults when they exist."""
    env = os.environ if env is None else env
    flags = {"model": model, "judge": judge, "teacher": teacher, "critic": critic}
    out, given = {}, []
    for kind, value in flags.items():
        value = value or env.get(ENV[kind]) or None
        if value:
            given.append(kind)
        elif _bundled(kind).exists():
            value = str(_bundled(kind))
        out[kind] = value
    return ModelPaths(**out, given=tuple(given))


@dataclass(frozen=True)
class Companions:
    """The teacher and critic that belong with an editor (for DMD maps), the loss settings, and why any is missing."""

    teacher: str | None
    critic: str | None
    loss: LossConfig = field(default_factory=LossConfig)
    missing: str | None = None


def companions(editor: str | None, paths: ModelPaths) -> Companions:
    """Teacher and critic for `editor`: its own (its training config; the critic/ inside its folder, or beside a run's
    pipeline/) or the app's."""
    from npedit.trace import own_companions

    teacher, critic, loss = own_companions(editor)

    def pick(kind: str, own: str | None) -> str | None:
        given = getattr(paths, kind) if kind in paths.given else None
        # a critic is fitted to one editor's outputs: the bundled one (the default editor's) is no other editor's
        default = getattr(paths, kind) if kind not in paths.given and kind != "critic" else None
        # Flags win for the editor the app was started with; a run's own teacher/critic win for the others.
        first = (given, own) if editor == paths.model else (own, given)
        return first[0] or first[1] or default

    teacher, critic = pick("teacher", teacher), pick("critic", critic)
    missing = []
    if not teacher:
        missing.append(f"no teacher (pass {FLAGS['teacher']} BASE_DIR or set {ENV['teacher']})")
    if not critic:
        missing.append(f"no critic (pass {FLAGS['critic']} DIR, the critic/ folder saved next to a run's pipeline/, "
                       f"or set {ENV['critic']})")
    return Companions(teacher, critic, loss, "; ".join(missing) or None)


# ---- loading ---------------------------------------------------------------------------------

def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    from npedit.devices import resolve_device

    return str(resolve_device())


def default_dtype(device: str) -> str:
    """bfloat16 on GPU, float32 on CPU."""
    return "bfloat16" if device.startswith("cuda") else "float32"


class ModelSet:
    """Loads the editor, judge, teacher and critic on first use and keeps them (thread-safe)."""

    def __init__(self, paths: ModelPaths, device: str | None = None, dtype: str | None = None, keep: int = 2,
                 judge_max_pixels: int | None = None, revision: str | None = None):
        self.paths = paths
        self.revision = revision or None  # of the app's editor, when it is a hub id (its runs' editors are folders)
        self.device = default_device() if device in (None, "auto") else device
        self.dtype = default_dtype(self.device) if dtype in (None, "auto") else dtype
        self.keep = keep
        self.judge_max_pixels = judge_max_pixels or None  # the app's judge: at most this many pixels per image
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.RLock()

    def _torch_dtype(self):
        from npedit.devices import as_torch_dtype

        return as_torch_dtype(self.dtype)

    def _cached(self, key: tuple[str, str], load):
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            value = load()
            self._cache[key] = value
            same_kind = [k for k in self._cache if k[0] == key[0]]
            for old in same_kind[:-self.keep]:
                del self._cache[old]
            return value

    def editor(self, path: str | None = None):
        """The NPEditPipeline at `path` (default: the app's editor)."""
        path = check_editor(path or self.paths.model)

        def load():
            from npedit.pipeline import NPEditPipeline

            try:
                revision = self.revision if path == self.paths.model and not looks_local(path) else None
                pipe = NPEditPipeline.from_pretrained(path, dtype=self._torch_dtype(), device=self.device,
                                                      revision=revision)
            except Exception as exc:  # diffusers raises many types; the user needs one clear line
                raise ModelError(f"cannot load the editor {path}: {type(exc).__name__}: {exc}") from exc
            pipe.set_progress_bar_config(disable=True)
            return pipe

        return self._cached(("editor", path), load)

    def judge(self, path: str | None = None):
        """The judge at `path` (default: the app's judge), capped at `judge_max_pixels` per image when set."""
        path = check_judge(path or self.paths.judge)
        extra = {"max_pixels": self.judge_max_pixels} if self.judge_max_pixels else {}

        def load():
            from npedit.judges import load_judge

            try:
                return load_judge(path, torch_dtype=self._torch_dtype(), device=self.device, **extra)
            except ImportError as exc:  # a missing package: npedit's one line names the judge and the package already
                raise ModelError(str(exc) if str(path) in str(exc) else f"cannot load the judge {path}: {exc}") from exc
            except Exception as exc:
                raise ModelError(f"cannot load the judge {path}: {type(exc).__name__}: {exc}") from exc

        return self._cached(("judge", path), load)

    def transformer(self, role: str, path: str, pipe):
        """A teacher or critic transformer of the editor's family (sharing the editor's text encoder and VAE)."""
        from npedit.backbones import detect_family
        from npedit.trace import load_companion

        def load():
            try:
                family = detect_family(path)
            except (FileNotFoundError, ValueError) as exc:
                raise ModelError(f"the {role} {describe(path)}: {exc}") from None
            if family != pipe.family:
                raise ModelError(f"the {role} {path} is a {family} model but the editor is {pipe.family}; "
                                 f"pass {FLAGS[role]} a {pipe.family} checkpoint")
            try:
                return load_companion(role, path, pipe, self._torch_dtype())
            except Exception as exc:
                raise ModelError(f"cannot load the {role} {path}: {type(exc).__name__}: {exc}") from exc

        return self._cached((role, f"{path}|{pipe.family}"), load)

    def inspectors(self, editor: str | None, pipe) -> tuple:
        """(judge, teacher, critic, loss, judge_note, dmd_note) for tracing an edit; a missing one comes with why."""
        judge = teacher = critic = None
        judge_note = dmd_note = None
        try:
            judge = self.judge()
        except ModelError as exc:
            judge_note = str(exc)
        comp = companions(editor or self.paths.model, self.paths)
        if comp.missing:
            dmd_note = comp.missing
        else:
            try:
                teacher = self.transformer("teacher", comp.teacher, pipe)
                critic = self.transformer("critic", comp.critic, pipe)
            except ModelError as exc:
                teacher = critic = None
                dmd_note = str(exc)
        return judge, teacher, critic, comp.loss, judge_note, dmd_note

    def status(self, editor: str | None = None, shown: Callable[[str], str] = str) -> str:
        """Markdown lines: the editor and what it can edit, then the judge, teacher and critic in use (or missing);
        paths appear as `shown` gives them."""
        editor = editor or self.paths.model
        lines = [describe_editor(editor, shown)]
        try:
            cap = f" (at most {self.judge_max_pixels:,} pixels per image)" if self.judge_max_pixels else ""
            lines.append(f"**Judge:** `{shown(check_judge(self.paths.judge))}`{cap}")
        except ModelError as exc:
            lines.append(f"**Judge:** none. {exc}")
        comp = companions(editor, self.paths)
        if comp.missing:
            lines.append(f"**DMD maps:** off: {comp.missing}.")
        else:
            lines.append(f"**Teacher:** `{shown(comp.teacher)}` · **Critic:** `{shown(comp.critic)}`")
        lines.append(f"Device: {self.device} ({self.dtype}); models load on first use.")
        return "\n\n".join(lines)
