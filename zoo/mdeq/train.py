"""Train an MDEQ classifier: ``python -m zoo.mdeq.train +experiment=<name> [overrides]``.

Experiments (configs/mdeq/experiment/): ``cifar_tiny``, ``cifar_large``, ``imagenet``
(the TorchDEQ recipes of Table 3) and ``digits`` (offline, CPU minutes). The loss is
TorchDEQ's fixed-point correction, cross-entropy over every state the DEQ returns
(weights ``deq.gamma``^(n-1-k)); the backward (phantom gradient or IFT), the solver and
the norm are the ``deq.*`` options. The run directory gets the resolved config,
metrics.jsonl, checkpoints and results.json (zoo.common.Run).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset

from core.reg.fp_correction import fp_correction
from zoo.common import Run, build_optimizer, build_scheduler, zoo_main
from zoo.mdeq.data import DataSplits, build_datasets
from zoo.mdeq.model import MDEQ, get_size

SIZE_FIELDS = ("channels", "head_channels", "final_channels", "expansion", "num_groups")


def build_model(cfg: DictConfig, splits: DataSplits) -> MDEQ:
    """The MDEQ of ``cfg.model`` (a named size, widths optionally overridden) for `splits`."""
    m = cfg.model
    size = get_size(m.size, **{k: m.get(k) for k in SIZE_FIELDS},
                    in_channels=splits.in_channels, num_classes=splits.num_classes)
    return MDEQ(size, deq=cfg.deq, dropout=float(m.get("dropout", 0.0)),
                norm_filter_out=list(m.get("norm_filter_out") or []))


def optimizer_options(cfg: DictConfig) -> dict:
    """``cfg.optim`` without null entries (an experiment nulls options of another optimiser)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.optim, resolve=True).items() if v is not None}


def classification_loss(logits: Sequence[torch.Tensor], target: torch.Tensor, gamma: float) -> torch.Tensor:
    """Fixed-point correction: cross-entropy on every returned state, the last weighted most."""
    return fp_correction(F.cross_entropy, (list(logits), target), gamma=gamma)


@torch.no_grad()
def evaluate_topk(model: torch.nn.Module, dataset: Dataset, device: torch.device, batch_size: int,
                  topk: Sequence[int] = (1,), solver_kwargs: Optional[dict] = None,
                  num_workers: int = 0) -> tuple[dict[str, float], dict[str, Any]]:
    """Top-k accuracy (%) of the last DEQ state over `dataset`, and the solver statistics.

    Under torchrun each rank evaluates every world_size-th sample and the counts are
    summed, so the result is over the whole set exactly once. Returns
    ``({"test/top1": ..}, info)`` where `info` holds the per-sample residuals and steps.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    loader = DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    correct = torch.zeros(len(topk) + 1, dtype=torch.float64, device=device)  # last: count
    abs_res, rel_res, nstep, nfe = [], [], [], []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits, info = model(x, solver_kwargs=solver_kwargs)
        ranked = logits[-1].topk(max(topk), dim=1).indices
        hits = ranked == y[:, None]
        for i, k in enumerate(topk):
            correct[i] += hits[:, :k].any(dim=1).sum()
        correct[-1] += len(y)
        abs_res.append(info["abs_lowest"].detach().flatten().float())
        rel_res.append(info["rel_lowest"].detach().flatten().float())
        nstep.append(info["nstep"].detach().flatten().float())
        nfe.append(float(info.get("nfe", 0)))
    model.train(was_training)
    if world > 1:
        dist.all_reduce(correct)
    metrics = {f"test/top{k}": float(100.0 * correct[i] / correct[-1]) for i, k in enumerate(topk)}
    info = {"abs_lowest": torch.cat(abs_res), "rel_lowest": torch.cat(rel_res),
            "nstep": torch.cat(nstep), "nfe": sum(nfe) / max(len(nfe), 1)}
    return metrics, info


def total_steps(cfg: DictConfig, train_size: int, world_size: int) -> int:
    """``train.steps``, or epochs x optimiser steps per epoch on this many processes."""
    if cfg.train.get("steps"):
        return int(cfg.train.steps)
    per_epoch = math.ceil(train_size / (cfg.train.batch_size * world_size))
    return int(cfg.train.epochs) * per_epoch


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs one training; returns the final test metrics."""
    with Run(cfg, project="mdeq") as run:
        splits = build_datasets(cfg.data)  # a missing dataset stops here, before any work
        model = run.wrap(build_model(cfg, splits))
        optimizer = build_optimizer(model, optimizer_options(cfg))
        steps = total_steps(cfg, len(splits.train), run.world_size)
        scheduler = build_scheduler(optimizer, cfg.sched, steps)
        batches = run.loader(splits.train, batch_size=cfg.train.batch_size, shuffle=True,
                             num_workers=cfg.data.num_workers,
                             pin_memory=run.device.type == "cuda")
        gamma = float(cfg.deq.gamma)
        topk = tuple(cfg.eval.topk)

        def train_step(batch, step):
            x, y = (t.to(run.device, non_blocking=True) for t in batch)
            with run.autocast():
                logits, info = model(x)
                loss = classification_loss(logits, y, gamma)
            run.backward_step(loss, optimizer, model.parameters(), cfg.clip, scheduler)
            top1 = (logits[-1].argmax(dim=1) == y).float().mean() * 100
            return {"train/loss": loss.detach(), "train/top1": top1, "deq_info": info}

        def evaluate(step):
            metrics, info = evaluate_topk(model, splits.test, run.device, cfg.train.eval_batch_size,
                                          topk, num_workers=cfg.data.num_workers)
            return {**metrics, "deq_info": info}

        out = run.fit(model=model, optimizer=optimizer, scheduler=scheduler, train_step=train_step,
                      batches=batches, total_steps=steps, evaluate=evaluate,
                      eval_every=cfg.train.eval_every)
        if out.status == "completed":
            run.write_results(out.metrics, deq_stats=out.deq,
                              extra={"params": sum(p.numel() for p in model.parameters())})
        return out.metrics


@zoo_main("mdeq")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
