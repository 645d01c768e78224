"""The offline demo's second half: accuracy against test-time solver iterations.

``make demo`` trains the digits MDEQ (``python -m zoo.mdeq.train +experiment=digits``),
then runs ``python -m zoo.mdeq.demo``: it loads the newest checkpoint of the latest
digits run, evaluates it with test-time budgets of 1 to 30 solver iterations, prints the
top-1 accuracy and the mean residual for each, and saves ``nfe_sweep.json`` and
``nfe_sweep.png`` in that run's directory. ``--run DIR`` picks another run.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from omegaconf import OmegaConf

from zoo.common import load_checkpoint
from zoo.mdeq.data import build_datasets
from zoo.common.sweep import format_sweep, save_sweep
from zoo.mdeq.evaluate import iteration_sweep
from zoo.mdeq.train import build_model

DEFAULT_RUN = Path(os.environ.get("ZOO_OUTPUTS", "outputs")) / "mdeq" / "digits" / "latest"


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="run directory (default: %(default)s)")
    parser.add_argument("--iterations", type=int, nargs="+", default=None,
                        help="test-time budgets (default: the run's eval.sweep_iterations)")
    args = parser.parse_args(argv)
    if not (args.run / "config.yaml").is_file():
        raise SystemExit(f"no run at {args.run}: train one first with "
                         "`python -m zoo.mdeq.train +experiment=digits`")
    cfg = OmegaConf.load(args.run / "config.yaml")
    if cfg.train.get("cpu_threads"):
        torch.set_num_threads(int(cfg.train.cpu_threads))
    splits = build_datasets(cfg.data)
    model = build_model(cfg, splits)
    model.load_state_dict(load_checkpoint(args.run, map_location="cpu")["model"])
    budgets = args.iterations or list(cfg.eval.sweep_iterations)
    rows = iteration_sweep(model, splits.test, torch.device("cpu"), budgets, cfg.train.eval_batch_size)
    print(f"MDEQ on digits ({args.run.resolve()}): accuracy vs test-time solver iterations "
          f"(trained with {cfg.deq.f_solver}, {cfg.deq.f_max_iter} iterations)")
    print(format_sweep(rows, ["top1"]))
    json_path, png_path = save_sweep(rows, args.run, metric="top1", metric_label="top-1 accuracy (%)",
                                     title="MDEQ digits")
    print(f"saved {json_path} and {png_path}")
    return rows


if __name__ == "__main__":
    main()
