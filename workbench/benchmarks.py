"""Compare Shapes-world benchmark reports (`python -m npedit eval shapes` JSON files) across variants.

    python -m workbench.benchmarks runs/shapes/eval --chart docs/shapes_benchmark.png --table docs/shapes_benchmark.md
    python -m workbench.benchmarks runs/shapes/eval --only npedit-1000 "gpu-*-b512" --chart docs/shapes_headline.png

    python -m workbench.benchmarks runs/new-eval --extend docs/shapes_benchmark.md --table docs/shapes_benchmark.md

    python -m workbench.benchmarks runs/shapes/eval --paired old new --paired old-seed1 new-seed1
    python -m workbench.benchmarks runs/shapes/eval --by-objects new new-seed1 new-seed2
    python -m workbench.benchmarks runs/shapes/eval --by-form new new-seed1 new-seed2
    python -m workbench.benchmarks runs/shapes/eval --curve control=ctrl mixture=mix --baseline start=bundled --form shape --chart curve.png

`--only` keeps the variants whose names match the given names or shell patterns, in the order given.
`--paired A B` compares two variants (names, or paths of .json reports) case by case on the same benchmark cases (same n and seed): how often
each is right where the other is wrong, McNemar's z and the exact two-sided sign-test p; several `--paired`
(e.g. one per seed) are also pooled.
`--by-objects` pools the reports named (names or .json paths; e.g. one per seed) into one table: exact per category
by the number of objects in the reference scene. `--by-form` likewise pools exact of the object edits (remove,
replace, recolor, resize) by how the instruction names the object: alone in its scene, or among others by its shape
(`the circle`), colour and shape (`the red circle`) or shape and cell (`the circle at the top left`).
`--curve LABEL=PREFIX ...` draws learning curves: the reports named PREFIX<step> or PREFIX<step>-seed<k> (one
per checkpoint and seed) are pooled per step into exact with a 95% interval (Wilson), one line per series; with
`--form` (lone, shape, "colour shape", "shape cell") a second panel shows exact of the object edits named that way;
`--baseline LABEL=NAME` adds the reports NAME or NAME-seed<k> as a dashed level (e.g. the model fine-tuned from).
`--extend` starts from a table this command wrote earlier (whose reports may be gone, e.g. on another
machine): the reports' variants are added to it, or replace its rows of the same name.
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import math
import os
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from npedit.shapes import CATEGORIES, FORM_GROUPS, METRICS, by_form, by_objects, held_out_cases, reference_form  # noqa: E402
from npedit.files import write_atomic  # noqa: E402
from npedit.shapes.scoring import form_group  # noqa: E402


def load_reports(directory: str | os.PathLike) -> pd.DataFrame:
    """One row per report: overall metrics, per-category exact, n and seed."""
    rows = []
    for f in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # e.g. a report cut short: the others still make a table
            print(f"warning: skipped {f}: not a readable JSON report ({exc})", file=sys.stderr)
            continue
        if not isinstance(data, dict) or "summary" not in data:
            continue
        s = data["summary"]
        row = {"variant": f.stem, **{m: s["overall"][m] for m in METRICS}, "n": s["overall"]["count"],
               "seed": data.get("meta", {}).get("seed")}
        row.update({f"exact_{c}": s[c]["exact"] for c in CATEGORIES if c in s})
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no benchmark reports (*.json from `python -m npedit eval shapes`) in {directory}")
    return pd.DataFrame(rows).set_index("variant")


def select(table: pd.DataFrame, patterns: list[str]) -> pd.DataFrame:
    """The rows whose variant name matches one of `patterns` (names or shell patterns), in pattern order."""
    names: list[str] = []
    for pattern in patterns:
        hits = [n for n in table.index if fnmatch.fnmatchcase(n, pattern) and n not in names]
        if not hits and not any(fnmatch.fnmatchcase(n, pattern) for n in table.index):
            raise ValueError(f"no variant matches {pattern!r}; variants: {', '.join(table.index)}")
        names += hits
    return table.loc[names]


def read_markdown(path: str | os.PathLike) -> pd.DataFrame:
    """A table written by `to_markdown` (or `--table`), back as the frame `load_reports` returns."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2 or not set(lines[1].replace("|", "")) <= set("-: "):
        raise ValueError(f"{path} is not a Markdown table written by --table")
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    if header[0] != "variant" or not set(METRICS) <= set(header):
        raise ValueError(f"{path}: expected a benchmark table with columns variant, {', '.join(METRICS)}")
    rows = []
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        if len(cells) != len(header):
            raise ValueError(f"{path}: row {cells[0]!r} has {len(cells)} cells, the header {len(header)}")
        try:
            rows.append({"variant": cells[0], **{h: float(v) for h, v in zip(header[1:], cells[1:])}})
        except ValueError:
            raise ValueError(f"{path}: row {cells[0]!r} holds a cell that is not a number") from None
    table = pd.DataFrame(rows, columns=header).set_index("variant")
    for c in ("n", "seed"):
        if c in table:
            table[c] = table[c].astype("Int64")
    return table


def extend(table: pd.DataFrame, reports: pd.DataFrame) -> pd.DataFrame:
    """`table` with the variants of `reports` added (or replacing its rows of the same name), in the order
    `load_reports` lists a folder (by report file name)."""
    kept = table.drop(index=[n for n in reports.index if n in table.index])
    return pd.concat([kept, reports]).sort_index(key=lambda names: names.map(lambda n: f"{n}.json"))


def pipe_table(columns: list[str], rows: list[list[str]]) -> str:
    """Cells already formatted as text -> a Markdown pipe table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def to_markdown(table: pd.DataFrame) -> str:
    """The table as a Markdown pipe table (3 decimals)."""
    rows = [[str(name), *(str(int(v)) if c in ("n", "seed") and pd.notna(v) else f"{v:.3f}" for c, v in row.items())]
            for name, row in table.iterrows()]
    return pipe_table([table.index.name or "variant", *table.columns], rows)


def comparison_chart(table: pd.DataFrame, metrics=METRICS, horizontal: bool | None = None) -> plt.Figure:
    """Grouped bars: one group per variant, one bar per metric. Beyond 10 variants, or with long names,
    the bars lie horizontally, one row per variant (a wide figure of many columns shrinks to nothing on a
    page, and long names under columns collide)."""
    if horizontal is None:
        horizontal = len(table) > 10 or max(len(str(n)) for n in table.index) > 24
    width = 0.8 / len(metrics)
    pos = np.arange(len(table))
    if horizontal:
        longest = max(len(str(n)) for n in table.index)  # the labels' width (8-point text) beside 5.5 in of bars
        fig, ax = plt.subplots(figsize=(max(8.0, 5.5 + 0.075 * longest), max(3.6, 0.42 * len(table) + 1.2)))
        for i, m in enumerate(metrics):
            ax.barh(pos + i * width - 0.4 + width / 2, table[m].values, width, label=m)
        ax.set_yticks(pos, table.index, fontsize=8)
        ax.set_ylim(len(table) - 0.5, -0.5)  # first variant on top, as in the table; no empty margins
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of held-out edits")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(ncols=len(metrics), fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
        ax.set_title("Shapes-world benchmark (exact scoring, no judge)", pad=22)
    else:
        fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(table)), 3.6))
        for i, m in enumerate(metrics):
            ax.bar(pos + i * width - 0.4 + width / 2, table[m].values, width, label=m)
        ax.set_xticks(pos, table.index, rotation=20, ha="right")
        ax.set_ylim(0, 1.15)  # room for the legend above the bars
        ax.set_ylabel("share of held-out edits")
        ax.legend(ncols=len(metrics), fontsize=8, loc="upper left")
        ax.set_title("Shapes-world benchmark (exact scoring, no judge)")
    fig.tight_layout()
    return fig


PAIRED_METRICS = ("exact", "followed", "preserved")  # the per-case 0/1 metrics


def case_rows(directory: str | os.PathLike, variant: str) -> tuple[dict, list[dict]]:
    """The meta and per-case rows of one report: `<directory>/<variant>.json`, or `variant` itself if it names
    a .json file (a report kept elsewhere)."""
    path = Path(variant) if variant.endswith(".json") else Path(directory) / f"{variant}.json"
    if not path.is_file():
        raise FileNotFoundError(f"no report {path} (variants are the *.json names in {directory})")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not data.get("rows"):
        raise ValueError(f"{path} has no per-case rows")
    return data.get("meta", {}), data["rows"]


def _sign_test_p(b: int, c: int) -> float:
    """Exact two-sided p of b successes against c under p = 1/2 (McNemar's exact test)."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired(directory: str | os.PathLike, pairs: list[tuple[str, str]], metric: str = "exact") -> pd.DataFrame:
    """Case-by-case comparison of variant B against variant A on the same cases, one row per pair and, for
    several pairs, a pooled row: both rates, how often only A or only B is right, McNemar z, sign-test p."""
    if metric not in PAIRED_METRICS:
        raise ValueError(f"--metric must be one of {', '.join(PAIRED_METRICS)} (per-case 0/1), got {metric!r}")
    rows, pooled = [], {"n": 0, "a": 0, "b": 0, "only_a": 0, "only_b": 0}
    for name_a, name_b in pairs:
        (meta_a, rows_a), (meta_b, rows_b) = case_rows(directory, name_a), case_rows(directory, name_b)
        ids_a, ids_b = [r["id"] for r in rows_a], [r["id"] for r in rows_b]
        # --train-pool reports share their ids ("train-000000", ...) whatever the pool and training seed
        cases_a, cases_b = meta_a.get("cases", "held-out"), meta_b.get("cases", "held-out")
        if ids_a != ids_b or meta_a.get("seed") != meta_b.get("seed") or cases_a != cases_b:
            raise ValueError(f"{name_a} and {name_b} were not scored on the same cases (n {len(ids_a)} / "
                             f"{len(ids_b)}, seed {meta_a.get('seed')} / {meta_b.get('seed')}, cases {cases_a} / "
                             f"{cases_b})")
        ra = [r[metric] >= 0.5 for r in rows_a]
        rb = [r[metric] >= 0.5 for r in rows_b]
        counts = {"n": len(ra), "a": sum(ra), "b": sum(rb), "only_a": sum(x and not y for x, y in zip(ra, rb)),
                  "only_b": sum(y and not x for x, y in zip(ra, rb))}
        rows.append({"A": Path(name_a).stem, "B": Path(name_b).stem, "seed": meta_a.get("seed"), **counts})
        pooled = {k: pooled[k] + counts[k] for k in pooled}
    if len(pairs) > 1:
        rows.append({"A": "pooled", "B": "", "seed": None, **pooled})
    table = pd.DataFrame(rows)
    table["seed"] = table["seed"].astype("Int64")
    table[f"{metric}_A"] = (table["a"] / table["n"]).round(3)
    table[f"{metric}_B"] = (table["b"] / table["n"]).round(3)
    disc = table["only_a"] + table["only_b"]
    table["z"] = ((table["only_b"] - table["only_a"]) / np.sqrt(disc.where(disc > 0, np.nan))).round(2)
    table["p"] = [round(_sign_test_p(int(x), int(y)), 4) for x, y in zip(table["only_b"], table["only_a"])]
    return table[["A", "B", "seed", "n", f"{metric}_A", f"{metric}_B", "only_a", "only_b", "z", "p"]]


def paired_markdown(table: pd.DataFrame) -> str:
    """A `paired` table as Markdown (empty cells for what a pooled row does not have)."""
    rows = [["" if v is None or pd.isna(v) else str(v) for v in row] for row in table.itertuples(index=False)]
    return pipe_table(list(table.columns), rows)


def rows_with_objects(directory: str | os.PathLike, variant: str) -> list[dict]:
    """The per-case rows of a report, each with "objects" (the reference scene's object count) and "form" (how the
    instruction names the edited object). Reports written before rows carried them get them from their cases,
    regenerated from the report's n and seed."""
    meta, rows = case_rows(directory, variant)
    if all("objects" in r and "form" in r for r in rows):
        return rows
    if meta.get("n") is None or meta.get("seed") is None:
        raise ValueError(f"{variant}: the report names no n and seed to regenerate its cases from")
    cases = {c.id: c for c in held_out_cases(int(meta["n"]), seed=int(meta["seed"]))}
    if any(r["id"] not in cases for r in rows):
        raise ValueError(f"{variant}: its case ids are not those of `eval shapes --n {meta['n']} --seed {meta['seed']}`")
    return [{**r, "objects": len(cases[r["id"]].reference.objects), "form": reference_form(cases[r["id"]])}
            for r in rows]


def objects_split(directory: str | os.PathLike, variants: list[str]) -> str:
    """Exact per category by the reference scene's object count, pooled over the reports named (e.g. seeds)."""
    from npedit.shapes.evaluate import objects_table  # imports torch: only when asked for

    return objects_table(by_objects([r for v in variants for r in rows_with_objects(directory, v)]))


def form_split(directory: str | os.PathLike, variants: list[str]) -> str:
    """Exact of the object edits by how the instruction names the object, pooled over the reports named."""
    from npedit.shapes.evaluate import form_table  # imports torch: only when asked for

    return form_table(by_form([r for v in variants for r in rows_with_objects(directory, v)]))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a share k / n (95% by default)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n)))


def _parse_series(specs: list[str], option: str) -> dict[str, str]:
    """["label=prefix", ...] -> {label: prefix}; a bare "prefix" is its own label."""
    out: dict[str, str] = {}
    for spec in specs:
        label, _, prefix = spec.partition("=") if "=" in spec else (spec, "", spec)
        if not prefix or not label:
            raise ValueError(f"{option} takes LABEL=PREFIX, got {spec!r}")
        out[label] = prefix
    return out


def _exact_share(rows: list[dict], key: str = "") -> dict:
    """{key}n, {key}exact, {key}lo, {key}hi: the share of `rows` exactly right and its 95% Wilson interval."""
    right = sum(r["exact"] >= 0.5 for r in rows)
    lo, hi = wilson(right, len(rows))
    exact = right / len(rows) if rows else float("nan")
    return {f"{key}n": len(rows), f"{key}exact": exact, f"{key}lo": lo, f"{key}hi": hi}


def _pooled_point(directory, names: list[str], form: str | None) -> dict:
    """Exact (and exact of the object edits named by `form`) pooled over the reports `names`."""
    rows = [r for name in names for r in (rows_with_objects(directory, name) if form else case_rows(directory, name)[1])]
    point = {"reports": len(names), **_exact_share(rows)}
    if form:
        point.update(_exact_share([r for r in rows if form_group(r) == form], "form_"))
    return point


def learning_curve(directory: str | os.PathLike, series: dict[str, str], form: str | None = None,
                   baseline: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per (series, step): the reports named <prefix><step> or <prefix><step>-seed<k>, pooled. Baseline
    rows (reports <name> or <name>-seed<k>) have no step. Columns: series, step, reports, n, exact, lo, hi (95%
    Wilson interval) and, with `form` (a `FORM_GROUPS` key), form_n, form_exact, form_lo, form_hi."""
    if form is not None and form not in FORM_GROUPS:
        raise ValueError(f"--form must be one of {', '.join(repr(k) for k in FORM_GROUPS)}, got {form!r}")
    names = sorted(f.stem for f in Path(directory).glob("*.json"))
    points = []
    for label, prefix in series.items():
        pattern = re.compile(rf"{re.escape(prefix)}(\d+)(?:-seed\d+)?")
        steps: dict[int, list[str]] = {}
        for name in names:
            m = pattern.fullmatch(name)
            if m:
                steps.setdefault(int(m.group(1)), []).append(name)
        if not steps:
            raise ValueError(f"no report named {prefix}<step> or {prefix}<step>-seed<k> in {directory}")
        points += [{"series": label, "step": step, **_pooled_point(directory, steps[step], form)}
                   for step in sorted(steps)]
    for label, name in (baseline or {}).items():
        pattern = re.compile(rf"{re.escape(name)}(?:-seed\d+)?")
        hits = [n for n in names if pattern.fullmatch(n)]
        if not hits:
            raise ValueError(f"no report named {name} or {name}-seed<k> in {directory}")
        points.append({"series": label, "step": None, **_pooled_point(directory, hits, form)})
    table = pd.DataFrame(points)
    table["step"] = table["step"].astype("Int64")
    return table


def curve_markdown(table: pd.DataFrame, form: str | None = None) -> str:
    """A `learning_curve` table as Markdown: exact with its interval (and the form's) per series and step."""
    columns = ["series", "step", "reports", "n", "exact (95% CI)"]
    if form:
        columns.append(f"{FORM_GROUPS[form]} (n)")
    rows = []
    for r in table.itertuples(index=False):
        cells = [r.series, "" if pd.isna(r.step) else str(r.step), str(r.reports), str(r.n),
                 f"{r.exact:.3f} ({r.lo:.3f}-{r.hi:.3f})"]
        if form:
            cells.append(f"{r.form_exact:.3f} ({r.form_n})")
        rows.append(cells)
    return pipe_table(columns, rows)


def curve_chart(table: pd.DataFrame, form: str | None = None) -> plt.Figure:
    """Exact against training steps, one line per series with its 95% band; baselines as dashed levels. With
    `form`, a second panel for the object edits named that way."""
    panels = [("exact", "lo", "hi", "exact, all held-out edits")]
    if form:
        panels.append(("form_exact", "form_lo", "form_hi", f"exact, object edits named `{FORM_GROUPS[form]}`"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), squeeze=False)
    curves, levels = table[table["step"].notna()], table[table["step"].isna()]
    for ax, (col, lo, hi, title) in zip(axes[0], panels):
        for label, part in curves.groupby("series", sort=False):
            steps = part["step"].astype(float).to_numpy()
            if len(part) == 1:  # one checkpoint: its interval as an error bar (a band needs two)
                y = part[col].to_numpy()
                ax.errorbar(steps, y, yerr=[y - part[lo].to_numpy(), part[hi].to_numpy() - y], fmt="o", capsize=3,
                            label=label)
                continue
            line, = ax.plot(steps, part[col], marker="o", label=label)
            ax.fill_between(steps, part[lo], part[hi], color=line.get_color(), alpha=0.15, linewidth=0)
        for i, r in enumerate(levels.itertuples(index=False)):
            color = f"C{len(curves['series'].unique()) + i}"
            ax.axhline(getattr(r, col), color=color, linestyle="--", label=r.series)
            ax.axhspan(getattr(r, lo), getattr(r, hi), color=color, alpha=0.08, linewidth=0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share exactly right (95% band)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", help="folder of eval JSON reports")
    ap.add_argument("--chart", help="write the bar chart (PNG)")
    ap.add_argument("--table", help="write the comparison table (Markdown)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these variants (names or shell patterns), in this order")
    ap.add_argument("--extend", metavar="TABLE",
                    help="a Markdown table written earlier by --table: add the reports' variants to it (same names replace)")
    modes = ap.add_mutually_exclusive_group()
    modes.add_argument("--paired", nargs=2, action="append", metavar=("A", "B"),
                       help="compare variant B with A case by case (repeat, e.g. per seed; pooled too)")
    ap.add_argument("--metric", default="exact", help="for --paired: exact, followed or preserved (default exact)")
    modes.add_argument("--by-objects", nargs="+", metavar="NAME",
                       help="exact per category by the reference scene's object count, pooled over these reports")
    modes.add_argument("--by-form", nargs="+", metavar="NAME",
                       help="exact of the object edits by how the instruction names the object (alone in its scene, "
                            "or by shape, colour and shape, shape and cell), pooled over these reports")
    modes.add_argument("--curve", nargs="+", metavar="LABEL=PREFIX",
                       help="learning curves: reports PREFIX<step>[-seed<k>] pooled per step, one line per series "
                            "(the chart goes to --chart)")
    ap.add_argument("--baseline", nargs="+", metavar="LABEL=NAME", default=[],
                    help="for --curve: reports NAME[-seed<k>] drawn as a dashed level")
    ap.add_argument("--form", help="for --curve: a second panel for the object edits named this way "
                                   f"({', '.join(FORM_GROUPS)})")
    args = ap.parse_args(argv)
    if args.curve:
        try:
            curve = learning_curve(args.reports, _parse_series(args.curve, "--curve"), args.form,
                                   _parse_series(args.baseline, "--baseline"))
        except (OSError, ValueError) as exc:
            ap.error(str(exc))
        print(curve_markdown(curve, args.form))
        if args.chart:
            save_chart(curve_chart(curve, args.form), args.chart)
        return 0
    if args.baseline or args.form:
        ap.error("--baseline and --form go with --curve")
    if args.by_objects or args.by_form:
        try:
            print(objects_split(args.reports, args.by_objects) if args.by_objects
                  else form_split(args.reports, args.by_form))
        except (OSError, ValueError) as exc:
            ap.error(str(exc))
        return 0
    if args.paired:
        try:
            result = paired(args.reports, [tuple(p) for p in args.paired], args.metric)
        except (OSError, ValueError) as exc:
            ap.error(str(exc))
        print(paired_markdown(result))
        return 0
    try:
        table = load_reports(args.reports)
    except OSError as exc:
        ap.error(str(exc))
    if args.extend:
        try:
            table = extend(read_markdown(args.extend), table)
        except (OSError, ValueError) as exc:
            ap.error(str(exc))
    if args.only:
        try:
            table = select(table, args.only)
        except ValueError as exc:
            ap.error(str(exc))
    md = to_markdown(table)
    print(md)
    if args.table:  # whole or not at all: `--extend t.md --table t.md` rewrites the only copy of the table
        Path(args.table).absolute().parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.table, md + "\n")
    if args.chart:
        save_chart(comparison_chart(table), args.chart)
    return 0


def save_chart(figure, path: str) -> None:
    """Write `figure` to `path` in the format its extension names (PNG without one), whole or not at all."""
    buf = io.BytesIO()
    figure.savefig(buf, format=Path(path).suffix.lstrip(".").lower() or "png", dpi=120, bbox_inches="tight")
    Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)  # (a folder not there yet was a traceback)
    write_atomic(path, buf.getvalue())


if __name__ == "__main__":
    raise SystemExit(main())
