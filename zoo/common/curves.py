"""The training-curve PNG of a run: loss and test metric against step, from ``metrics.jsonl``."""
from __future__ import annotations

from pathlib import Path

from zoo.common.console import LOSS_KEYS
from zoo.common.logger import read_metrics

EVAL_PREFIXES = ("test/", "val/", "valid/")


def plot_training_curve(metrics_path: Path | str, png_path: Path | str, title: str = "",
                        main_metric: str | None = None) -> Path | None:
    """Writes `png_path` (loss on the left axis, the main test metric on the right).

    `main_metric` defaults to the first ``test/*`` (or ``val/*``) key logged. Returns None
    when there is nothing to plot.
    """
    records = read_metrics(metrics_path) if Path(metrics_path).is_file() else []
    loss_key = next((k for k in LOSS_KEYS if any(k in r for r in records)), None)
    if main_metric is None:
        main_metric = next((k for r in records for k in r if k.startswith(EVAL_PREFIXES)
                            and isinstance(r[k], (int, float))), None)
    if loss_key is None and main_metric is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    if loss_key is not None:
        pts = [(r["step"], r[loss_key]) for r in records if isinstance(r.get(loss_key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", label=loss_key)
        ax.set_ylabel(loss_key, color="tab:blue")
        if pts and min(p[1] for p in pts) > 0:
            ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    if main_metric is not None:
        pts = [(r["step"], r[main_metric]) for r in records if isinstance(r.get(main_metric), (int, float))]
        ax2 = ax.twinx()
        ax2.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="tab:red", label=main_metric)
        ax2.set_ylabel(main_metric, color="tab:red")
    ax.set_title(title or "training curve")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return Path(png_path)
