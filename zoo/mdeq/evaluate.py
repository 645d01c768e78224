"""Evaluate an MDEQ checkpoint: ``python -m zoo.mdeq.evaluate +experiment=<name> ckpt=<path>``.

``ckpt`` is a zoo checkpoint (file or run directory) or, with ``ckpt_format=torchdeq``, a
state dict saved by the TorchDEQ zoo's MDEQ (zoo.mdeq.convert maps its key names). With
``eval.sweep=true`` it also measures accuracy and the mean residual for each test-time
solver budget in ``eval.sweep_iterations`` (the NFE/accuracy trade-off of Table 3's
models), printed and saved as ``nfe_sweep.json`` and ``nfe_sweep.png`` in the run dir.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from zoo.common import Run, zoo_main
from zoo.mdeq.convert import load_torchdeq_checkpoint
from zoo.mdeq.data import build_datasets
from zoo.mdeq.train import build_model, evaluate_topk


def iteration_sweep(model: torch.nn.Module, dataset: Dataset, device: torch.device,
                    iterations: Sequence[int], batch_size: int) -> list[dict[str, float]]:
    """Top-1 accuracy and mean final residuals for each test-time solver budget."""
    rows = []
    for budget in iterations:
        metrics, info = evaluate_topk(model, dataset, device, batch_size, (1,),
                                      solver_kwargs={"f_max_iter": int(budget)})
        rows.append({"iterations": int(budget), "top1": metrics["test/top1"],
                     "abs_residual": float(info["abs_lowest"].mean()),
                     "rel_residual": float(info["rel_lowest"].mean()),
                     "nfe": float(info["nfe"])})
    return rows


def format_sweep(rows: Sequence[dict[str, float]]) -> str:
    """The sweep as a fixed-width table."""
    lines = [f"{'iterations':>10}  {'top-1 %':>8}  {'abs residual':>12}  {'rel residual':>12}"]
    lines += [f"{r['iterations']:>10d}  {r['top1']:>8.2f}  {r['abs_residual']:>12.3e}  "
              f"{r['rel_residual']:>12.3e}" for r in rows]
    return "\n".join(lines)


def save_sweep(rows: Sequence[dict[str, float]], out_dir: Path | str,
               title: str = "MDEQ") -> tuple[Path, Path]:
    """Writes ``nfe_sweep.json`` and ``nfe_sweep.png`` (accuracy and residual vs budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    json_path, png_path = out_dir / "nfe_sweep.json", out_dir / "nfe_sweep.png"
    json_path.write_text(json.dumps(list(rows), indent=2))
    its = [r["iterations"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(its, [r["top1"] for r in rows], "o-", color="tab:blue")
    ax.set_xlabel("test-time solver iterations")
    ax.set_ylabel("top-1 accuracy (%)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.semilogy(its, [r["rel_residual"] for r in rows], "s--", color="tab:red")
    ax2.set_ylabel("mean relative residual", color="tab:red")
    ax.set_title(f"{title}: accuracy vs test-time iterations")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return json_path, png_path


def load_weights(run: Run, model: torch.nn.Module, cfg: DictConfig) -> None:
    """Loads ``cfg.ckpt`` in the format ``cfg.ckpt_format`` names."""
    fmt = str(cfg.get("ckpt_format", "ours"))
    if fmt == "torchdeq":
        if not cfg.get("ckpt"):
            raise ValueError("ckpt is not set: pass ckpt=<TorchDEQ MDEQ state dict>")
        load_torchdeq_checkpoint(model, str(cfg.ckpt))
    elif fmt == "ours":
        run.load_model(model)
    else:
        raise ValueError(f"ckpt_format={fmt!r}: use ours or torchdeq")


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test metrics of ``cfg.ckpt`` (and the sweep when ``eval.sweep``); writes results.json."""
    with Run(cfg, project="mdeq", mode="eval") as run:
        splits = build_datasets(cfg.data)
        model = build_model(cfg, splits).to(run.device)
        load_weights(run, model, cfg)
        metrics, info = evaluate_topk(model, splits.test, run.device, cfg.train.eval_batch_size,
                                      tuple(cfg.eval.topk), num_workers=cfg.data.num_workers)
        extra = {}
        if cfg.eval.get("sweep"):
            rows = iteration_sweep(model, splits.test, run.device, cfg.eval.sweep_iterations,
                                   cfg.train.eval_batch_size)
            if run.is_main:
                print(format_sweep(rows))
                save_sweep(rows, run.out_dir, title=f"MDEQ {run.experiment}")
            extra["nfe_sweep"] = rows
        run.write_results({**metrics, "deq_info": info}, checkpoint=str(cfg.get("ckpt")), extra=extra)
        return metrics


@zoo_main("mdeq")
def main(cfg: DictConfig) -> None:
    print(evaluate(cfg))


if __name__ == "__main__":
    main()
