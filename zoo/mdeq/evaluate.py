"""Evaluate an MDEQ checkpoint: ``python -m zoo.mdeq.evaluate +experiment=<name> ckpt=<path>``.

``ckpt`` is a zoo checkpoint (file or run directory), evaluated with the config stored
with it (``+experiment`` is optional; see zoo/common/evaluation.py for the test-time
options the command line may change), or, with ``ckpt_format=torchdeq`` and
``+experiment``, a state dict saved by the TorchDEQ zoo's MDEQ (zoo.mdeq.convert maps its
key names). With
``eval.sweep=true`` it also measures accuracy and the mean residual for each test-time
solver budget in ``eval.sweep_iterations`` (the NFE/accuracy trade-off of Table 3's
models), printed and saved as ``nfe_sweep.json`` and ``nfe_sweep.png`` in the run dir.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from zoo.common import evaluate_checkpoint, zoo_main
from zoo.common.sweep import report_sweep, residual_summary, sweep_rows
from zoo.mdeq.convert import load_torchdeq_checkpoint
from zoo.mdeq.data import build_datasets
from zoo.mdeq.train import build_model, evaluate_topk


def iteration_sweep(model: torch.nn.Module, dataset: Dataset, device: torch.device,
                    iterations: Sequence[int], batch_size: int) -> list[dict[str, float]]:
    """Top-1 accuracy and mean final residuals for each test-time solver budget."""
    def at_budget(budget: int) -> dict[str, float]:
        metrics, info = evaluate_topk(model, dataset, device, batch_size, (1,),
                                      solver_kwargs={"f_max_iter": budget})
        return {"top1": metrics["test/top1"], **residual_summary(info)}

    return sweep_rows(iterations, at_budget)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Test metrics of ``cfg.ckpt`` (and the sweep when ``eval.sweep``); writes results.json."""
    fmt = str(cfg.get("ckpt_format", "ours"))
    if fmt not in ("ours", "torchdeq"):
        raise ValueError(f"ckpt_format={fmt!r}: use ours or torchdeq")
    data = {}

    def build(cfg: DictConfig) -> torch.nn.Module:
        data["splits"] = build_datasets(cfg.data)
        return build_model(cfg, data["splits"])

    def measure(model: torch.nn.Module, run) -> dict[str, Any]:
        c, test = run.cfg, data["splits"].test
        metrics, info = evaluate_topk(model, test, run.device, c.train.eval_batch_size, tuple(c.eval.topk),
                                      num_workers=c.data.num_workers)
        out = {**metrics, "deq_info": info}
        if c.eval.get("sweep"):
            rows = iteration_sweep(model, test, run.device, c.eval.sweep_iterations, c.train.eval_batch_size)
            report_sweep(rows, run, metric="top1", metric_label="top-1 accuracy (%)", title=f"MDEQ {run.experiment}")
            out["nfe_sweep"] = rows
        return out

    def load_torchdeq(model: torch.nn.Module, run) -> None:
        load_torchdeq_checkpoint(model, str(run.cfg.ckpt))

    return evaluate_checkpoint(cfg, "mdeq", build, measure,
                               load_weights=load_torchdeq if fmt == "torchdeq" else None)


@zoo_main("mdeq")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
