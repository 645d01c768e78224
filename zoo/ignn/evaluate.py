"""Evaluate an IGNN (or GCN) checkpoint: ``python -m zoo.ignn.evaluate ckpt=<path> [overrides]``.

``ckpt`` is a zoo checkpoint (file or run directory), evaluated with the config stored
with it (see zoo/common/evaluation.py for the test-time options the command line may
change: ``deq.eval_f_max_iter``, the forward solver, ``eval.*``, ``data.root``, ...), or,
with ``ckpt_format=torchdeq`` and ``+experiment=ppi``, a state dict saved by the TorchDEQ
zoo's IGNN (``ignn-ppi-{1,2,3}.pth``; zoo.ignn.convert maps its key names).

It reports the test metrics (PPI: micro- and macro-F1; chains: accuracy, ``acc_far`` and,
with ``eval.by_distance``, the accuracy by distance from the chain's head, also drawn as
``accuracy_by_distance.png``). With ``eval.sweep=true`` it measures the metric and the
mean residual for each test-time solver budget in ``eval.sweep_iterations``, saved as
``nfe_sweep.json`` and ``nfe_sweep.png`` in the run directory (IGNN only).
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from zoo.common import evaluate_checkpoint, zoo_main
from zoo.common.sweep import report_sweep, residual_summary, sweep_rows
from zoo.ignn.convert import load_torchdeq_checkpoint
from zoo.ignn.data import build_datasets
from zoo.ignn.train import build_model, evaluate_split, format_distance_table, plot_accuracy_by_distance


def measure(model: torch.nn.Module, run: Any) -> dict[str, Any]:
    """The test metrics of `model` with the options of ``run.cfg`` (the effective config)."""
    cfg = run.cfg
    splits = build_datasets(cfg.data)
    far_from, batch = int(cfg.eval.far_from), int(cfg.train.eval_batch_size)
    metric = "acc" if splits.transductive else "micro_f1"
    test, info, rows = evaluate_split(model, splits, "test", run.device, batch, far_from=far_from)
    out: dict[str, Any] = {f"test/{k}": v for k, v in test.items()}
    if info is not None:
        out["deq_info"] = info
    if rows and cfg.eval.get("by_distance", True):
        curves = {str(cfg.model.name): rows}
        out["accuracy_by_distance"] = curves
        if run.is_main:
            print(format_distance_table(curves))
            plot_accuracy_by_distance(curves, run.out_dir / "accuracy_by_distance.png")
    if cfg.eval.get("sweep") and str(cfg.model.name) == "ignn":
        def at_budget(budget: int) -> dict[str, float]:
            scores, budget_info, _ = evaluate_split(model, splits, "test", run.device, batch,
                                                    solver_kwargs={"f_max_iter": budget}, far_from=far_from)
            return {metric: scores[metric], **residual_summary(budget_info)}

        sweep = sweep_rows(cfg.eval.sweep_iterations, at_budget)
        label = "test accuracy (%)" if metric == "acc" else "test micro-F1 (%)"
        report_sweep(sweep, run, metric=metric, metric_label=label, title=f"IGNN {run.experiment}")
        out["nfe_sweep"] = sweep
    return out


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test metrics of ``cfg.ckpt`` (and the sweep when ``eval.sweep``); writes results.json."""
    fmt = str(cfg.get("ckpt_format", "ours"))
    if fmt not in ("ours", "torchdeq"):
        raise ValueError(f"ckpt_format={fmt!r}: use ours or torchdeq")

    def load_torchdeq(model: torch.nn.Module, run: Any) -> None:
        d = run.cfg.deq  # the experiment's recipe is the checkpoint's: its clip folds the norm
        load_torchdeq_checkpoint(model, str(run.cfg.ckpt), clip=float(d.norm_clip_value) if d.norm_clip else None)

    return evaluate_checkpoint(cfg, "ignn", build_model, measure,
                               load_weights=load_torchdeq if fmt == "torchdeq" else None)


@zoo_main("ignn")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
