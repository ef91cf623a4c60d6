"""Matplotlib figures for the app: per-step panel of an edit, a refinement's judge loss, the judge's gradient maps,
loss curves, bar charts.

Figures are built with `matplotlib.figure.Figure` (no pyplot global state), so they are safe to
make from several threads and are freed when dropped.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from .inspect import EditTrace

CMAP = "magma"


def _fmt(p: float | None) -> str:
    return "—" if p is None else f"{p:.3f}"


def steps_figure(trace: EditTrace) -> Figure:
    """One column per sampling step: x0 with the judge's P(edit done) and identity P(Yes) under it, then the DMD map
    of that x0 (shared colour bar)."""
    n = len(trace.steps)
    maps = [s.dmd_map for s in trace.steps if s.dmd_map is not None]
    rows = 2 if maps else 1
    notes = [f"No P(Yes): {trace.judge_note}" for _ in [0] if trace.judge_note]
    notes += [f"No DMD maps: {trace.dmd_note or 'teacher/critic missing'}" for _ in [0] if not maps]
    fig = Figure(figsize=(2.2 * n + (1.0 if maps else 0.2), 3.2 * rows + 0.35 * len(notes)), dpi=100,
                 layout="constrained")
    axes = fig.subplots(rows, n, squeeze=False)
    vmax = max(max(float(m.max()) for m in maps), 1e-8) if maps else 1.0
    shown = None
    for j, s in enumerate(trace.steps):
        top = axes[0, j]
        top.imshow(np.asarray(s.x0), interpolation="nearest")
        top.set_title(f"step {s.step + 1}  t={s.t:.3f}", fontsize=10)
        top.set_xlabel(f"P(edit done) {_fmt(s.p_edit)}\nidentity P(Yes) {_fmt(s.p_identity)}", fontsize=9)
        top.set_xticks([])
        top.set_yticks([])
        if maps:
            bottom = axes[1, j]
            if s.dmd_map is not None:
                shown = bottom.imshow(s.dmd_map, cmap=CMAP, vmin=0.0, vmax=vmax, interpolation="nearest")
                bottom.set_title(f"DMD map (mean {s.dmd_mean:.3g})", fontsize=9)
            bottom.set_xticks([])
            bottom.set_yticks([])
    if shown is not None:
        cbar = fig.colorbar(shown, ax=list(axes[1, :]), shrink=0.9, location="right")
        cbar.set_label(f"|x0 critic − x0 teacher| (latent) at t={trace.dmd_t:.2f}", fontsize=8)
    if notes:
        fig.suptitle("\n".join(notes), fontsize=9, color="firebrick")
    return fig


PUSH = 0.5  # the nudged view moves the most-pushed pixel by this much (pixels in [0, 1])


def refine_caption(losses: Sequence[float]) -> str:
    """One line on a judge-guided refinement: "judge loss 0.565 -> 0.006 over 20 steps"."""
    n = len(losses) - 1
    return f"judge loss {losses[0]:.3f} -> {losses[-1]:.3f} over {n} step{'' if n == 1 else 's'}"


def refine_figure(losses: Sequence[float]) -> Figure:
    """The judge's loss before each refinement update and after the last (`npedit.refine.Refinement.losses`; step 0
    is the editor's own edit), its `refine_caption` as title."""
    fig = Figure(figsize=(5.0, 2.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.plot(range(len(losses)), losses, marker="o" if len(losses) <= 30 else None, markersize=3)
    ax.set_title(refine_caption(losses), fontsize=10)
    ax.set_xlabel("refinement step (0: the editor's own edit)", fontsize=9)
    ax.set_ylabel("judge loss", fontsize=9)
    ax.set_ylim(bottom=0)  # -log sigmoid: 0 is every answer the expected one for sure
    ax.grid(alpha=0.3)
    return fig


def nudged(image: np.ndarray, grad: np.ndarray, push: float = PUSH) -> np.ndarray:
    """(H, W, 3) in [0, 1]: `image` ((H, W, 3) in [0, 1]) moved along the (3, H, W) `grad`, scaled so that the
    largest change of one channel is `push`: what the gradient asks the image to become."""
    top = float(np.abs(grad).max())
    step = grad.transpose(1, 2, 0) * (push / top) if top > 0 else 0.0
    return np.clip(image + step, 0.0, 1.0)


def answer_gradients_figure(gradients) -> Figure:
    """Where the judge's answers come from: one column for the training signal (the mean over the questions
    NP-Edit trains on), then one per question. Top: the gradient's size per pixel over the edited image (each
    panel scaled to its own maximum); bottom: the edited image nudged along the gradient."""
    image = np.asarray(gradients.image.convert("RGB"), dtype=np.float32) / 255.0
    gray = image.mean(axis=2)
    columns = [("training signal", "NP-Edit's Yes/No loss,\ndescent direction", gradients.training)]
    for q, grad in zip(gradients.questions, gradients.grads):
        p_expected = q["p_yes"] if q["expected"] == "Yes" else 1.0 - q["p_yes"]
        columns.append((q["kind"], f"expected {q['expected']}, P = {p_expected:.3f}", grad))
    n = len(columns)
    fig = Figure(figsize=(2.3 * n + 0.8, 5.0), dpi=100, layout="constrained")
    axes = fig.subplots(2, n, squeeze=False)
    shown = None
    for j, (title, note, grad) in enumerate(columns):
        size = gradients.magnitude(grad)
        top = float(size.max())
        axes[0, j].imshow(gray, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        shown = axes[0, j].imshow(size / top if top > 0 else size, cmap=CMAP, vmin=0.0, vmax=1.0, alpha=0.75,
                                  interpolation="nearest")
        axes[0, j].set_title(title, fontsize=10)
        axes[0, j].set_xlabel(f"{note}\nmax |grad| {top:.3g}", fontsize=8)
        axes[1, j].imshow(nudged(image, grad), interpolation="nearest")
        axes[1, j].set_xlabel(f"nudged (largest change {PUSH})" if top > 0 else "no gradient", fontsize=8)
        for ax in axes[:, j]:
            ax.set_xticks([])
            ax.set_yticks([])
    cbar = fig.colorbar(shown, ax=list(axes[0, :]), shrink=0.9, location="right")
    cbar.set_label("|d log P(expected) / d pixel|, per panel", fontsize=8)
    return fig


def run_colors(names: Sequence[str]) -> dict[str, tuple]:
    """One colour per run, by its place in `names` (tab10, tab20 past ten runs): the same run has the same colour in
    every panel and in the bar chart."""
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def loss_curves(runs: Mapping[str, pd.DataFrame], keys: Sequence[str], smooth: int = 1) -> Figure:
    """One panel per metric key, one line per run (metrics.jsonl frames with a "step" column) in the run's own colour,
    one legend for all panels below them; steps whose value is infinite are red crosses along the panel's top, left
    out of the line and its smoothing."""
    keys = list(keys) or ["student_loss"]
    cols = min(2, len(keys))
    rows = math.ceil(len(keys) / cols)
    colors = run_colors(list(runs))
    fig = Figure(figsize=(5.2 * cols, 3.2 * rows + 0.25 * math.ceil(len(runs) / 4)), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    handles = {}  # label -> a line drawn with it: the figure's one legend (per-panel legends covered the lines)
    for ax, key in zip(axes, keys):
        plotted = False
        for name, df in runs.items():
            if df is None or df.empty or key not in df:
                continue
            series = df[["step", key]].dropna()  # NaN: the metric was not logged at that step
            if series.empty:
                continue
            finite = np.isfinite(series[key].to_numpy(dtype=float))
            if not finite.all():  # an infinite value would vanish from the line (or hide in a rolling mean)
                cross, = ax.plot(series["step"][~finite], np.full((~finite).sum(), 0.97), "x", color="#c44e52",
                                 transform=ax.get_xaxis_transform(), label="not finite", clip_on=False)
                handles.setdefault("not finite", cross)
                series = series[finite]
            y = series[key].rolling(max(1, smooth), min_periods=1).mean()
            line, = ax.plot(series["step"], y, label=name, color=colors[name], linewidth=1.5,
                            marker="." if len(series) < 30 else None)
            handles.setdefault(name, line)
            plotted = True
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not plotted:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in axes[len(keys):]:
        ax.axis("off")
    if handles:
        order = [n for n in (*runs, "not finite") if n in handles]  # the runs in the order given
        silent = [n for n in runs if n not in handles]
        title = f"no values of these metrics: {', '.join(silent)}" if silent else None
        fig.legend([handles[n] for n in order], order, loc="outside lower center", ncols=min(4, len(order)),
                   fontsize=8, frameon=False, title=title, title_fontsize=8)
    return fig


def bar_chart(values: Mapping[str, float | None], title: str, xlabel: str = "") -> Figure:
    """A horizontal bar per entry (e.g. one metric's last value per run), top to bottom in the order given, in the
    entry's `run_colors` colour, its value written beside it ("no value" where it is None or NaN, "not finite" where
    it is infinite: a loss that diverged)."""
    names = list(values)
    colors = run_colors(names)
    fig = Figure(figsize=(4.8, 1.0 + 0.32 * max(len(names), 2)), dpi=100, layout="constrained")
    ax = fig.subplots()
    widths = [float(values[k]) if values[k] is not None else np.nan for k in names]
    ax.barh(range(len(names)), [w if np.isfinite(w) else np.nan for w in widths],  # (no bar for inf: no value to draw)
            color=[colors[k] for k in names])
    ax.set_yticks(range(len(names)), names, fontsize=8)  # horizontal names: readable however many runs
    ax.set_ylim(max(len(names), 1) - 0.5, -0.5)  # first on top; a row without a bar is not autoscaled away
    for i, w in enumerate(widths):
        known = np.isfinite(w)
        label = f" {w:.4g} " if known else " not finite" if np.isinf(w) else " no value"
        ax.text(w if known else 0.0, i, label, va="center",
                ha="right" if known and w < 0 else "left", fontsize=8, color="black" if known else "gray")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.25)  # room for the values written after the longest bar
    if not names:
        ax.text(0.5, 0.5, "no runs selected", ha="center", va="center", transform=ax.transAxes, color="gray")
    return fig


def message_figure(text: str) -> Figure:
    """A small figure that only says `text` (e.g. why a plot is empty)."""
    fig = Figure(figsize=(5, 1.2), dpi=100)
    fig.text(0.02, 0.5, text, va="center", fontsize=10, color="gray", wrap=True)
    return fig
