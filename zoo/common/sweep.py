"""The test-time solver-budget sweep every project's evaluate.py offers.

A row is one test-time budget: ``{"iterations": k, <metric>: .., "abs_residual": ..,
"rel_residual": .., "nfe": ..}``. `sweep_rows` evaluates a callable per budget,
`format_sweep` prints the rows as a table and `save_sweep` writes ``nfe_sweep.json`` and
``nfe_sweep.png`` (the metric and the mean relative residual against the budget);
`report_sweep` does both in a run's main process::

    rows = sweep_rows(cfg.eval.sweep_iterations, lambda k: evaluate(model, f_max_iter=k))
    report_sweep(rows, run, metric="top1", metric_label="top-1 accuracy (%)", title="MDEQ")
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

RESIDUAL_COLUMNS = ("abs_residual", "rel_residual")


def residual_summary(info: Mapping[str, Any]) -> dict[str, float]:
    """Mean final residuals and the evaluations per solve of a DEQ `info` dict."""
    def mean(key: str) -> float:
        value = info.get(key)
        return float(torch.as_tensor(value, dtype=torch.float64).mean()) if value is not None else float("nan")

    return {"abs_residual": mean("abs_lowest"), "rel_residual": mean("rel_lowest"), "nfe": mean("nfe")}


def sweep_rows(budgets: Iterable[int],
               evaluate_budget: Callable[[int], Mapping[str, Any]]) -> list[dict[str, float]]:
    """One row per budget: ``{"iterations": k, **evaluate_budget(k)}`` (floats)."""
    rows = []
    for budget in budgets:
        row = {"iterations": int(budget)}
        row.update({k: float(v) for k, v in evaluate_budget(int(budget)).items()})
        rows.append(row)
    return rows


def format_sweep(rows: Sequence[Mapping[str, float]], columns: Sequence[str]) -> str:
    """The rows as a fixed-width table: iterations, `columns`, then the residuals."""
    names = ["iterations", *columns, *RESIDUAL_COLUMNS]
    widths = [max(len(n), 10) for n in names]
    lines = ["  ".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for row in rows:
        cells = [f"{int(row['iterations']):>{widths[0]}d}"]
        cells += [f"{row[c]:>{w}.4g}" for c, w in zip(columns, widths[1:])]
        cells += [f"{row[c]:>{w}.3e}" for c, w in zip(RESIDUAL_COLUMNS, widths[1 + len(columns):])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def save_sweep(rows: Sequence[Mapping[str, float]], out_dir: Path | str, *, metric: str,
               metric_label: str, title: str) -> tuple[Path, Path]:
    """Writes ``nfe_sweep.json`` and ``nfe_sweep.png`` into `out_dir`; returns both paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    json_path, png_path = out_dir / "nfe_sweep.json", out_dir / "nfe_sweep.png"
    json_path.write_text(json.dumps([dict(r) for r in rows], indent=2))
    its = [r["iterations"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(its, [r[metric] for r in rows], "o-", color="tab:blue")
    ax.set_xlabel("test-time solver iterations")
    ax.set_ylabel(metric_label, color="tab:blue")
    ax2 = ax.twinx()
    ax2.semilogy(its, [r["rel_residual"] for r in rows], "s--", color="tab:red")
    ax2.set_ylabel("mean relative residual", color="tab:red")
    ax.set_title(f"{title}: {metric_label} vs test-time iterations")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def report_sweep(rows: Sequence[Mapping[str, float]], run: Any, *, metric: str, metric_label: str,
                 title: str) -> None:
    """In the main process of `run` (a `zoo.common.Run`): prints the rows with `metric` as
    their column and saves them into ``run.out_dir`` (`save_sweep`)."""
    if run.is_main:
        print(format_sweep(rows, [metric]))
        save_sweep(rows, run.out_dir, metric=metric, metric_label=metric_label, title=title)
