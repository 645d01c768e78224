"""Evaluate a DEQ-INR checkpoint: ``python -m zoo.deq_inr.evaluate ckpt=<file or run dir> [options]``.

The model is solved from z = 0 (no warm start) with the test-time budget
``deq.eval_f_max_iter`` (default: ``deq.f_max_iter``, 100 for images) on the test
coordinates of the checkpoint's signal, and its PSNR goes to results.json
(``status: evaluated``). Test-time options:

* ``deq.eval_f_max_iter=K`` (and the forward solver ``deq.f_solver``, ``deq.f_tol``);
* ``eval.sweep=true``: PSNR and the mean residual for each budget of
  ``eval.sweep_iterations``, printed and saved as ``nfe_sweep.json`` / ``nfe_sweep.png``;
* ``eval.size=S`` (images): render and score at S x S instead of the training size (the
  target resized to S x S, the whole grid; the model and its input scale are unchanged),
  with the rendering saved as ``render.png``.
"""
from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from zoo.common import evaluate_checkpoint, zoo_main
from zoo.common.sweep import report_sweep, residual_summary, sweep_rows
from zoo.deq_inr.data import build_datasets
from zoo.deq_inr.train import build_model, evaluate_signal


def test_signal(cfg: DictConfig):
    """The signal scored at test time: the training one, or the whole grid at ``eval.size``."""
    size = cfg.eval.get("size")
    if not size or cfg.data.kind != "image":
        return build_datasets(cfg.data)
    data = OmegaConf.merge(cfg.data, {"size": int(size), "protocol": "full"})
    return build_datasets(data)


def measure(model: torch.nn.Module, run: Any) -> dict[str, Any]:
    """Test PSNR (and the sweep) of `model` under the effective config ``run.cfg``."""
    cfg = run.cfg
    signal = test_signal(cfg)
    chunk = int(cfg.eval.batch_coords)
    metrics, pred = evaluate_signal(model, signal, chunk)
    out: dict[str, Any] = dict(metrics)
    if cfg.eval.get("size") and signal.kind == "image" and run.is_main:
        from zoo.deq_inr.plots import reconstruction

        reconstruction(run.out_dir, signal, [("render", pred, metrics["test/psnr"])]).rename(
            run.out_dir / "render.png")
    if cfg.eval.get("sweep"):
        def at_budget(k: int) -> dict[str, float]:
            m, _ = evaluate_signal(model, signal, chunk, solver_kwargs={"f_max_iter": k})
            return {"psnr": m["test/psnr"], **residual_summary(m["deq_info"])}

        rows = sweep_rows(cfg.eval.sweep_iterations, at_budget)
        report_sweep(rows, run, metric="psnr", metric_label="test PSNR (dB)", title=f"DEQ-INR {signal.name}")
        out["nfe_sweep"] = rows
    return out


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Metrics of checkpoint ``cfg.ckpt`` (results.json with ``status: evaluated``)."""
    return evaluate_checkpoint(cfg, "deq_inr", build_model, measure)


@zoo_main("deq_inr")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
