"""Evaluate a DEQ-Flow checkpoint: ``python -m zoo.deq_flow.evaluate ckpt=<run dir or file> [options]``.

``ckpt`` is a zoo checkpoint (its stored config is used; the command line may change
test-time options) or, with ``ckpt_format=torchdeq`` and ``+experiment=sintel_eval`` /
``kitti_eval`` (or their ``_h`` versions), a state dict saved by the TorchDEQ zoo's or the
original DEQ-Flow code (zoo/deq_flow/convert.py maps its key names). Test-time options:

- ``deq.eval_f_max_iter=K`` or ``deq.eval_factor=F`` (budget F x deq.f_max_iter; the paper
  reports 1.5 and 3.0), and ``deq.f_solver`` (fixed_point_iter reports residuals);
- ``eval.sets=[sintel_clean,sintel_final,kitti]`` (or val, motorcycle, chairs) under
  ``data.root``;
- ``eval.warm_start=true``: along each Sintel scene, start from the previous pair's fixed
  point (fixed-point reuse);
- ``eval.sweep=true``: AEPE and the mean residual for each budget in
  ``eval.sweep_iterations`` on the first set, saved as ``nfe_sweep.json`` / ``nfe_sweep.png``;
  ``eval.warm_start_check`` and ``eval.examples`` as in training (synthetic runs).
"""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from zoo.common import evaluate_checkpoint, zoo_main
from zoo.deq_flow.convert import load_torchdeq_checkpoint
from zoo.deq_flow.data import build_datasets
from zoo.deq_flow.train import build_model, evaluate_all, final_reports

TEST_TIME_KEYS = ("model.raft_eval_iters",)


def evaluate(model, run) -> dict:
    """Metrics of ``run.cfg.eval.sets`` plus the zero-flow baseline, sweep and warm-start extras."""
    cfg = run.cfg  # train.cpu_threads is applied by zoo.common.Run
    # the training set is not needed (the synthetic one also brings the warm-start sequences)
    data_cfg = cfg.data if str(cfg.data.name) == "synthetic" else OmegaConf.merge(cfg.data, {"name": "none"})
    data = build_datasets(data_cfg, list(cfg.eval.sets))
    out = evaluate_all(model, data, cfg, run.device)
    out.update(final_reports(model, data, cfg, run))
    return out


def load_weights(model, run) -> None:
    """A TorchDEQ zoo / DEQ-Flow state dict (``ckpt_format=torchdeq``)."""
    fmt = str(run.cfg.get("ckpt_format", "ours"))
    if fmt != "torchdeq":
        raise ValueError(f"ckpt_format={fmt!r}: ours or torchdeq")
    load_torchdeq_checkpoint(model, str(run.cfg.ckpt))


def run_evaluation(cfg: DictConfig) -> dict:
    loader = load_weights if str(cfg.get("ckpt_format", "ours")) != "ours" else None
    return evaluate_checkpoint(cfg, "deq_flow", build_model, evaluate, load_weights=loader,
                               test_time_keys=TEST_TIME_KEYS)


@zoo_main("deq_flow")
def main(cfg: DictConfig) -> None:
    run_evaluation(cfg)


if __name__ == "__main__":
    main()
