#!/usr/bin/env python
"""Print the paper's tables with our reproduced numbers beside the reported ones.

    python scripts/compare_tables.py                      # every results.json under outputs/
    python scripts/compare_tables.py outputs/mdeq runs/x  # these folders (or results.json files)
    python scripts/compare_tables.py --table table3 --png table3.png

The tables (all rows) are data in ``configs/paper_tables.yaml``. A run's ``results.json``
names the row it reproduces in its ``reported:`` block (``table``, ``row``, and
``metrics``: column metric -> key of the run's metrics); runs of one row (seeds) are
summarised with the statistic the table uses: median and best where the paper reports
those, else mean ± std. Each numeric column is printed as paper value, ours, and the
difference (ours - paper); each of our cells says how many runs it holds (n=..).
Rows from other codebases are reported-only; reproducible rows without a run say "no run
yet". Runs that name no paper row are listed at the end.
Only runs with ``status: completed`` count unless ``--include-evaluated`` is given.

A run counts for its paper row only when it ran its experiment's recipe: its
command-line overrides (``overrides`` in results.json) change nothing but the seed and
options that cannot change a result (zoo/common/config_keys.py). A per-rank
``train.batch_size`` under torchrun whose global batch (x ranks) is the experiment's is
the recipe too. Other runs (a 3-step smoke run, another preset) are grouped by what they
changed and listed apart, unless ``--include-modified`` counts them for their row.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from zoo.common.config_keys import NON_RESULT_KEYS, matches, override_key  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TABLES = REPO_ROOT / "configs" / "paper_tables.yaml"
NO_RUN = "no run yet"
REPORTED_ONLY = "reported only"


# ----------------------------------------------------------------------------- input
def load_tables(path: Path | str = DEFAULT_TABLES) -> dict[str, dict[str, Any]]:
    """The paper tables: ``{table id: {title, project, columns, rows}}``."""
    with open(path) as f:
        tables = yaml.safe_load(f)
    for table_id, table in tables.items():
        ids = [row["id"] for row in table["rows"]]
        if len(ids) != len(set(ids)):
            raise ValueError(f"{path}: {table_id} has duplicate row ids")
    return tables


def find_results(paths: Iterable[Path | str]) -> list[Path]:
    """``results.json`` files: given files, or every one under given folders."""
    found: dict[Path, Path] = {}  # resolved -> as given: a run seen through `latest` counts once
    for path in map(Path, paths):
        candidates = [path] if path.is_file() else sorted(path.rglob("results.json")) if path.is_dir() else []
        for candidate in candidates:
            found.setdefault(candidate.resolve(), candidate)
    return list(found.values())


def load_results(paths: Iterable[Path | str], statuses: tuple[str, ...] = ("completed",)) -> list[dict[str, Any]]:
    """The runs to compare (unreadable files are skipped with a warning on stderr)."""
    runs = []
    for path in find_results(paths):
        try:
            run = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            print(f"warning: skipping {path}: {err}", file=sys.stderr)
            continue
        if run.get("status", "completed") in statuses:
            run["_path"] = str(path)
            runs.append(run)
    return runs


def _experiment_batch(project: str, experiment: str) -> Any:
    """``train.batch_size`` of an experiment as composed from configs/ (None when it cannot be)."""
    try:
        from zoo.common.hydra_main import compose

        return compose(project, [f"+experiment={experiment}"]).train.batch_size
    except Exception:
        return None


def modifications(run: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The overrides by which a run left its experiment's recipe, as sorted (key, value) pairs.

    The seed, `NON_RESULT_KEYS` and ``+experiment`` do not count; neither does a per-rank
    ``train.batch_size`` that times ``world_size`` is the experiment's batch.
    """
    changed = {}
    for item in run.get("overrides") or []:
        key = override_key(str(item))
        value = str(item).split("=", 1)[1] if "=" in str(item) else ""
        if key in ("experiment", "seed") or key.startswith("hydra") or matches(key, NON_RESULT_KEYS):
            continue
        changed[key] = value
    if "train.batch_size" in changed and int(run.get("world_size") or 1) > 1:
        try:
            global_batch = int(changed["train.batch_size"]) * int(run["world_size"])
        except ValueError:
            global_batch = None
        if global_batch is not None and global_batch == _experiment_batch(str(run.get("project")),
                                                                         str(run.get("experiment"))):
            del changed["train.batch_size"]
    return tuple(sorted(changed.items()))


def describe_modifications(mods: tuple[tuple[str, str], ...]) -> str:
    return " ".join(f"{k}={v}" for k, v in mods) or "(the recipe)"


def _reported_entries(run: dict[str, Any]) -> list[dict[str, Any]]:
    reported = run.get("reported")
    if not reported:
        return []
    entries = reported if isinstance(reported, list) else [reported]
    return [e for e in entries if isinstance(e, dict) and e.get("table") and e.get("row")]


def _column_metrics(table: dict[str, Any]) -> list[str]:
    """The logical metrics of a table's numeric columns, in column order, without repeats."""
    out: list[str] = []
    for col in table["columns"]:
        if not col.get("text"):
            metric = col.get("metric", col["key"])
            if metric not in out:
                out.append(metric)
    return out


def _metric_map(entry: dict[str, Any], table: dict[str, Any]) -> dict[str, str]:
    """Column metric -> results.json metric key, from a ``reported:`` entry."""
    mapping = dict(entry.get("metrics") or {})
    if entry.get("metric") and not mapping:
        mapping[_column_metrics(table)[0]] = entry["metric"]
    return mapping


# ----------------------------------------------------------------------------- statistics
def _number(value: Any) -> float | None:
    """A float from a number or from the leading number of a string ("0.17 ± 0.09", "+60%")."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    match = re.match(r"\s*([+-]?\d+(?:\.\d+)?)", str(value))
    return float(match.group(1)) if match else None


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}"


@dataclass
class Cell:
    """One numeric column of one row: the paper value, ours, and the difference."""

    paper: str
    ours: str = ""
    diff: str = ""


@dataclass
class RowSummary:
    id: str
    name: str
    status: str                                 # "N runs" | NO_RUN | REPORTED_ONLY
    texts: dict[str, str] = field(default_factory=dict)
    cells: dict[str, Cell] = field(default_factory=dict)


def _statistic(values: list[float], stat: str, better: str) -> tuple[float, str]:
    """(value for the difference, printed text) of our runs' values."""
    if stat == "median":
        value = statistics.median(values)
        return value, _fmt(value)
    if stat == "best":
        value = min(values) if better == "lower" else max(values)
        return value, _fmt(value)
    value = statistics.fmean(values)
    if len(values) > 1:
        return value, f"{_fmt(value)} ± {_fmt(statistics.stdev(values), 2)}"
    return value, _fmt(value)


def summarise(tables: dict[str, dict[str, Any]], runs: list[dict[str, Any]], include_modified: bool = False
              ) -> tuple[dict[str, list[RowSummary]], list[dict[str, Any]]]:
    """Per table, one `RowSummary` per paper row; plus the runs that count for no row
    (they name none, or they changed the recipe and `include_modified` is off)."""
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    unmatched = []
    for run in runs:
        matched = False
        if modifications(run) and not include_modified:
            unmatched.append(run)
            continue
        for entry in _reported_entries(run):
            table = tables.get(entry["table"])
            if table is None or entry["row"] not in {r["id"] for r in table["rows"]}:
                print(f"warning: {run['_path']} names {entry['table']}/{entry['row']}, "
                      f"which is not in the paper tables", file=sys.stderr)
                continue
            matched = True
            counts[(entry["table"], entry["row"])] += 1
            for metric, key in _metric_map(entry, table).items():
                value = _number(run.get("metrics", {}).get(key))
                if value is not None:
                    values[(entry["table"], entry["row"], metric)].append(value)
        if not matched:
            unmatched.append(run)

    out: dict[str, list[RowSummary]] = {}
    for table_id, table in tables.items():
        rows = []
        for row in table["rows"]:
            n = counts.get((table_id, row["id"]), 0)
            status = f"{n} run{'s' * (n != 1)}" if n else (NO_RUN if row.get("reproduce") else REPORTED_ONLY)
            summary = RowSummary(id=row["id"], name=row["name"], status=status)
            for col in table["columns"]:
                reported = row.get("values", {}).get(col["key"])
                if col.get("text"):
                    summary.texts[col["key"]] = "" if reported is None else str(reported)
                    continue
                unit = col.get("unit", "")
                if reported is None:
                    cell = Cell(paper="-")
                else:
                    cell = Cell(paper=str(reported) if isinstance(reported, str) else f"{reported}{unit}")
                ours = values.get((table_id, row["id"], col.get("metric", col["key"])))
                if ours:
                    value, cell.ours = _statistic(ours, col.get("stat", "mean"), col.get("better", "higher"))
                    cell.ours += f" (n={len(ours)})"
                    paper = _number(reported)
                    cell.diff = f"{value - paper:+.3g}" if paper is not None else ""
                summary.cells[col["key"]] = cell
            rows.append(summary)
        out[table_id] = rows
    return out, unmatched


# ----------------------------------------------------------------------------- output
def table_grid(table: dict[str, Any], rows: list[RowSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of one table (shared by markdown and PNG)."""
    header = ["Method"]
    for col in table["columns"]:
        if col.get("text"):
            header.append(col["name"])
        else:
            stat = col.get("stat", "mean")
            shown = "mean ± std" if stat == "mean" else stat
            header += [f"{col['name']} (paper)", f"{col['name']} (ours, {shown})", "Δ"]
    header.append("Runs")
    grid = []
    for row in rows:
        line = [row.name]
        for col in table["columns"]:
            if col.get("text"):
                line.append(row.texts.get(col["key"], ""))
            else:
                cell = row.cells[col["key"]]
                line += [cell.paper, cell.ours or ("" if row.status == REPORTED_ONLY else "-"), cell.diff]
        line.append(row.status)
        grid.append(line)
    return header, grid


def to_markdown(table: dict[str, Any], rows: list[RowSummary]) -> str:
    header, grid = table_grid(table, rows)
    lines = [f"### {table['title']}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in grid]
    return "\n".join(lines)


def unmatched_markdown(runs: list[dict[str, Any]]) -> str:
    """Runs that count for no paper row (offline experiments, changed recipes), one line per
    experiment and set of changed options: runs of different recipes are never averaged."""
    by_exp: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        key = (str(run.get("project")), str(run.get("experiment")), describe_modifications(modifications(run)))
        by_exp[key].append(run)
    lines = ["### Runs that reproduce no paper row (offline experiments, changed recipes)", "",
             "| Project | Experiment | Changed | Runs | Metrics (mean over runs) |", "|---|---|---|---|---|"]
    for (project, experiment, changed), group in sorted(by_exp.items()):
        keys = sorted({k for r in group for k in r.get("metrics", {}) if not k.startswith("deq/")})
        means = []
        for key in keys:
            vals = [v for r in group if (v := _number(r["metrics"].get(key))) is not None]
            if vals:
                means.append(f"{key}={_fmt(statistics.fmean(vals))}")
        lines.append(f"| {project} | {experiment} | {changed} | {len(group)} | {', '.join(means)} |")
    return "\n".join(lines)


def draw_png(tables: dict[str, dict[str, Any]], summaries: dict[str, list[RowSummary]], path: Path | str) -> Path:
    """All given tables, stacked, in one PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = list(summaries)
    heights = [len(summaries[t]) + 2 for t in ids]
    widths = []  # inches: the longest text of each column at a 7-point font
    for t in ids:
        header, grid = table_grid(tables[t], summaries[t])
        widths.append(sum(max(len(line[c]) for line in [header, *grid]) for c in range(len(header))) * 0.075 + 0.5)
    fig, axes = plt.subplots(len(ids), 1, figsize=(max(6.0, max(widths)), 0.3 * sum(heights) + 0.5 * len(ids)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, table_id in zip(axes[:, 0], ids):
        header, grid = table_grid(tables[table_id], summaries[table_id])
        ax.axis("off")
        ax.set_title(tables[table_id]["title"], fontsize=9, loc="left")
        drawn = ax.table(cellText=grid, colLabels=header, loc="upper left", cellLoc="center")
        drawn.auto_set_font_size(False)
        drawn.set_fontsize(7)
        drawn.auto_set_column_width(list(range(len(header))))
        for (r, c), cell in drawn.get_celld().items():
            if r > 0 and grid[r - 1][-1] not in (NO_RUN, REPORTED_ONLY):
                cell.set_facecolor("#e8f4e8")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="results.json files or folders (default: $ZOO_OUTPUTS or outputs/)")
    parser.add_argument("--tables", default=str(DEFAULT_TABLES), help="paper tables (YAML)")
    parser.add_argument("--table", action="append", help="only this table id (repeatable)")
    parser.add_argument("--png", help="also draw the tables into this PNG file")
    parser.add_argument("--include-evaluated", action="store_true",
                        help="also count results of evaluate.py runs (status: evaluated)")
    parser.add_argument("--include-modified", action="store_true",
                        help="count runs that changed their experiment's recipe for its paper row")
    args = parser.parse_args(argv)

    tables = load_tables(args.tables)
    selected = args.table or list(tables)
    unknown = [t for t in selected if t not in tables]
    if unknown:
        parser.error(f"unknown table(s) {unknown}; the tables are {sorted(tables)}")
    paths = args.paths or [os.environ.get("ZOO_OUTPUTS", "outputs")]
    statuses = ("completed", "evaluated") if args.include_evaluated else ("completed",)
    runs = load_results(paths, statuses)
    summaries, unmatched = summarise(tables, runs, include_modified=args.include_modified)
    summaries = {t: summaries[t] for t in selected}
    print(f"{len(runs)} run(s) from {', '.join(map(str, paths))}\n")
    for table_id, rows in summaries.items():
        print(to_markdown(tables[table_id], rows) + "\n")
    if unmatched:
        print(unmatched_markdown(unmatched) + "\n")
    if args.png:
        print(f"wrote {draw_png(tables, summaries, args.png)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `compare_tables.py | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
