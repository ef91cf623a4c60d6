"""Matplotlib figures for the app: per-step panel of an edit, the judge's gradient maps, loss curves, bar charts.

Figures are built with `matplotlib.figure.Figure` (no pyplot global state), so they are safe to
make from several threads and are freed when dropped.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
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


def loss_curves(runs: Mapping[str, pd.DataFrame], keys: Sequence[str], smooth: int = 1) -> Figure:
    """One panel per metric key, one line per run (metrics.jsonl frames with a "step" column); steps whose value is
    infinite are red crosses along the panel's top, left out of the line and its smoothing."""
    keys = list(keys) or ["student_loss"]
    cols = min(2, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.2 * rows), dpi=100, layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, key in zip(axes, keys):
        plotted = False
        flagged = False
        for name, df in runs.items():
            if df is None or df.empty or key not in df:
                continue
            series = df[["step", key]].dropna()  # NaN: the metric was not logged at that step
            if series.empty:
                continue
            finite = np.isfinite(series[key].to_numpy(dtype=float))
            if not finite.all():  # an infinite value would vanish from the line (or hide in a rolling mean)
                ax.plot(series["step"][~finite], np.full((~finite).sum(), 0.97), "x", color="#c44e52",
                        transform=ax.get_xaxis_transform(), label=None if flagged else "not finite", clip_on=False)
                flagged = True
                series = series[finite]
            y = series[key].rolling(max(1, smooth), min_periods=1).mean()
            ax.plot(series["step"], y, label=name, linewidth=1.5, marker="." if len(series) < 30 else None)
            plotted = True
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if plotted:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in axes[len(keys):]:
        ax.axis("off")
    return fig


def bar_chart(values: Mapping[str, float], title: str, ylabel: str = "") -> Figure:
    """A bar per entry (e.g. one metric's final value per run)."""
    fig = Figure(figsize=(max(4.0, 1.1 * len(values) + 2), 3.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    names = list(values)
    heights = [float(values[k]) if values[k] is not None else np.nan for k in names]
    ax.bar(range(len(names)), heights, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    if not names:
        ax.text(0.5, 0.5, "no runs selected", ha="center", va="center", transform=ax.transAxes, color="gray")
    return fig


def message_figure(text: str) -> Figure:
    """A small figure that only says `text` (e.g. why a plot is empty)."""
    fig = Figure(figsize=(5, 1.2), dpi=100)
    fig.text(0.02, 0.5, text, va="center", fontsize=10, color="gray", wrap=True)
    return fig
