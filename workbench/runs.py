"""Scan run folders (the trainer's config.yaml, metrics.jsonl, samples/, pipeline/) into pandas tables."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import yaml

from npedit.adapters import is_adapter_folder
from npedit.config import flatten, read_yaml
from npedit.images import ImageError, load_image
from npedit.training.checkpoint import checkpoint_step, latest_checkpoint

from .jobs import job_status, read_metrics_rows

# Config entries shown in the runs table, as (column, dotted key).
CONFIG_COLUMNS = (("stage", "stage"), ("max_steps", "max_steps"), ("lr", "optim.lr"), ("λ_dmd", "loss.lambda_dmd"),
                  ("λ_vlm", "loss.lambda_vlm"), ("critic_steps", "critic_steps"), ("batch", "data.batch_size"),
                  ("accum", "gradient_accumulation_steps"), ("data", "data.train"))
# Columns that mean something only in some stages (blank elsewhere: a warm-up has no DMD weight to show).
STAGE_ONLY = {"λ_dmd": ("npedit",), "λ_vlm": ("npedit",), "critic_steps": ("npedit",)}
# Final metrics shown when a run logged them.
METRIC_COLUMNS = ("student_loss", "dmd_loss", "vlm_loss", "vlm_p_expected", "critic_fm_loss", "fm_loss")


def _short(x):
    """A metric rounded to 4 significant digits for tables (None stays None)."""
    return None if x is None else float(f"{x:.4g}")


def is_run(path: Path) -> bool:
    """A folder the trainer or the workbench wrote a run into."""
    return path.is_dir() and any((path / f).exists() for f in ("config.yaml", "job.json", "metrics.jsonl"))


def find_runs(root: str | os.PathLike, depth: int = 2) -> list[Path]:
    """Run folders under `root`, also one level down (e.g. runs/shapes/npedit); hidden folders skipped; newest first."""
    root = Path(root)
    found, level = [], [root] if root.is_dir() else []
    for _ in range(depth):
        children = [c for p in level for c in p.iterdir() if c.is_dir() and not c.name.startswith(".")]
        found += [c for c in children if is_run(c)]
        level = [c for c in children if not is_run(c)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def run_name(run: Path, root: str | os.PathLike) -> str:
    """The run's path relative to the runs folder (its name in tables and menus)."""
    return str(Path(run).relative_to(root)) if Path(run).is_relative_to(root) else Path(run).name


def read_config(run: str | os.PathLike) -> dict:
    """The run's resolved config (config.yaml; deleted or damaged: the copy its newest checkpoint keeps), or {} when
    the trainer has not written one yet."""
    def read(path: Path) -> dict | None:
        try:
            data = read_yaml(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (OSError, yaml.YAMLError, ValueError):  # also a YAML bomb (npedit.config.read_yaml)
            return None
        return data if isinstance(data, dict) else None

    own = read(Path(run) / "config.yaml")
    if own is not None:
        return own
    saved = latest_checkpoint(Path(run) / "checkpoints")  # (scanned only when the run's own does not read)
    return (read(saved / "config.yaml") if saved else None) or {}


def read_metrics(run: str | os.PathLike) -> pd.DataFrame:
    """metrics.jsonl as a DataFrame (one row per logged step; empty when none yet)."""
    return pd.DataFrame(read_metrics_rows(Path(run)))


def metric_keys(frames: dict[str, pd.DataFrame]) -> list[str]:
    """The metric columns found in any of `frames`: the main losses first, then other losses, then the rest."""
    keys = {c for df in frames.values() for c in df.columns if c not in ("step", "time")}
    rank = {k: i for i, k in enumerate(METRIC_COLUMNS)}
    return sorted(keys, key=lambda k: (rank.get(k, len(rank)), not k.endswith("loss"), k))


def runs_table(root: str | os.PathLike) -> pd.DataFrame:
    """One row per run: name, status, progress, the last logged metrics, the main config entries and its editor."""
    rows = []
    for run in find_runs(root):
        cfg = flatten(read_config(run))
        st = job_status(run)
        row = {"run": run_name(run, root), "status": st.state, "step": st.step, "skipped": skipped_updates(st)}
        row.update({m: _short(st.last_metrics.get(m)) for m in METRIC_COLUMNS})
        row.update({col: cfg.get(key) for col, key in CONFIG_COLUMNS
                    if col not in STAGE_ONLY or cfg.get("stage") in STAGE_ONLY[col]})
        if row["max_steps"] is None:
            row["max_steps"] = st.max_steps
        row["editor"] = st.pipeline or ""
        rows.append(row)
    # the metrics first: they are what runs are compared by, and a table wider than the page shows its left part
    # (no "path" column: a run's folder is the runs folder / its name)
    columns = ["run", "status", "step", "skipped", *METRIC_COLUMNS, *[c for c, _ in CONFIG_COLUMNS], "editor"]
    df = pd.DataFrame(rows, columns=columns)
    if not df.empty:
        df["skipped"] = df["skipped"].astype("Int64")
    return df.dropna(axis=1, how="all") if not df.empty else df


def skipped_updates(status) -> int | None:
    """Updates a run skipped so far (student and critic: a loss or gradient that was not finite, or exploded), from
    its last logged row; None for a run that logs no count (a Shapes stage, or none logged yet)."""
    counts = [status.last_metrics[k] for k in ("skipped_student", "skipped_critic") if k in status.last_metrics]
    return int(sum(counts)) if counts else None


def compare(runs: list[str | os.PathLike], root: str | os.PathLike = "/") -> pd.DataFrame:
    """Each run's status, step and last metrics, then the config entries that differ between `runs`; one column per
    run (named from `root`)."""
    runs = [Path(r) for r in runs]
    names = {r: run_name(r, root) for r in runs}
    configs = {names[r]: flatten(read_config(r)) for r in runs}
    keys = sorted({k for c in configs.values() for k in c})
    known = [c for c in configs.values() if c] or list(configs.values())  # a run with no config.yaml (yet) says nothing
    differing = [k for k in keys if len({repr(c.get(k)) for c in known}) > 1 and k != "output_dir"]
    table = {}
    for r in runs:
        st = job_status(r)
        table[names[r]] = {"status": st.state, "step": st.step, "skipped": skipped_updates(st)}
        table[names[r]].update({m: _short(st.last_metrics[m]) for m in METRIC_COLUMNS if m in st.last_metrics})
        table[names[r]].update({k: configs[names[r]].get(k) for k in differing})
    # progress and metrics first: what runs are compared by, above however many differing keys
    metrics = [m for m in METRIC_COLUMNS if any(m in row for row in table.values())]
    df = pd.DataFrame(table).reindex(["status", "step", "skipped", *metrics, *differing])
    if df.loc["skipped"].isna().all():  # (runs that log no count)
        df = df.drop(index="skipped")
    label = "key"
    while label in df.columns:  # a run named "key" (reset_index refused the name: "cannot insert key")
        label = f"{label} "
    df.index.name = label
    return df.reset_index()


def samples(run: str | os.PathLike) -> list[tuple[str, str]]:
    """(path, caption) of the run's sample grids, newest first."""
    files = sorted((Path(run) / "samples").glob("step_*.png"), reverse=True)
    return [(str(f), f"step {int(f.stem.split('_')[-1])}") for f in files]


def no_samples_reason(run: str | os.PathLike) -> str:
    """Why a run has no sample grid to show, from its config's `sample_every`, its step and whether it goes on."""
    st = job_status(run)
    every, step = flatten(read_config(run)).get("sample_every"), st.step
    if every == 0:
        return "this run writes no sample grids: it was started with `sample_every=0`."
    if not isinstance(every, int):  # no config.yaml yet (a job still starting), or a run of another trainer
        return "this run has written no sample grid yet."
    if st.state in ("finished", "failed", "cancelled") and step < every:  # (it never reached the first grid)
        return (f"this run wrote no sample grid: it {'ended' if st.state == 'finished' else 'stopped'} at step "
                f"{step}, before the first (the trainer writes one every {every} steps, `sample_every`).")
    return (f"this run has written no sample grid yet: the trainer writes one every {every} steps (`sample_every`), "
            f"the first at step {every}; the run is at step {step}.")


_WHOLE_MAX = 4096
_WHOLE: dict[tuple[str, int, int], bool] = {}  # (path, mtime, size) -> it decodes whole: once per file, not per tick


def whole_grid(paths: Iterable[str]) -> str | None:
    """The first of `paths` (a run's sample grids, newest first) whose image decodes in full, else None: a grid cut
    short (by a kill or a full disk, in a run of a version that wrote grids in place) or unreadable is passed over."""
    for path in map(str, paths):
        try:
            info = os.stat(path)
        except OSError:  # gone since it was listed (a resume drops the grids after its checkpoint)
            continue
        key = (path, info.st_mtime_ns, info.st_size)
        if key not in _WHOLE:
            if len(_WHOLE) >= _WHOLE_MAX:  # an app up for weeks sees every grid of every run: keep the newest half
                for old in list(_WHOLE)[:_WHOLE_MAX // 2]:
                    del _WHOLE[old]
            try:
                load_image(path)
                _WHOLE[key] = True
            except ImageError:
                _WHOLE[key] = False
        if _WHOLE[key]:
            return path
    return None


def finished_editors(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(label, path) of every exported editor under `root`, newest run first: run/pipeline (the end of a run),
    then its checkpoint exports (run/exports/step_N, `python -m npedit export`, and step_N-lora, adapters alone),
    latest step first."""
    out = []
    for run in find_runs(root):
        pipe = run / "pipeline"
        if (pipe / "model_index.json").is_file():
            out.append((f"run: {run_name(run, root)}", str(pipe)))
        exports = run / "exports"
        for d in sorted(exports.iterdir() if exports.is_dir() else [], key=lambda d: d.name, reverse=True):
            adapters = is_adapter_folder(d)  # `npedit export --adapters`: step_N-lora
            if not adapters and not (d / "model_index.json").is_file():
                continue
            step = checkpoint_step(Path(d.name.removesuffix("-lora")))
            label = d.name if step is None else f"step {step}" + (", LoRA adapters" if adapters else "")
            out.append((f"run: {run_name(run, root)} ({label})", str(d)))
    return out


def export_newest(run: str | os.PathLike, name: str) -> str:
    """Export a run's newest checkpoint (`npedit export`) and say where it went, as the app's Runs tab shows it:
    an editor (`RUN/exports/step_N`), and for a LoRA run also its adapters alone (`step_N-lora`); a critic run's
    export is a critic."""
    from npedit.adapters import adapter_size, export_adapters
    from npedit.training.export import export_checkpoint, find_checkpoint

    out = export_checkpoint(run)
    if Path(out).name == "critic":  # a critic run (stage critic) trains a critic, not an editor
        return (f"Exported **{name}**'s newest checkpoint to `{out}`: a critic, for DMD maps; start the app with "
                f"`--critic {out}` or copy it into its editor's folder as `critic/`.")
    message = f"Exported **{name}**'s newest checkpoint to `{out}`: pick it in the Edit tab's model list (↻)."
    if (find_checkpoint(run) / "student_adapters.safetensors").is_file():
        adapters = export_adapters(run)
        message += (f" Its LoRA adapters alone ({adapter_size(adapters) / 2**20:.2f} MiB; they load with the base "
                    f"model the run names): `{adapters}`.")
    return message
