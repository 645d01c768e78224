"""Train an IGNN (or the GCN baseline): ``python -m zoo.ignn.train +experiment=<name> [overrides]``.

Experiments (configs/ignn/experiment/): ``ppi`` and ``ppi_ift`` (Table 2's TorchDEQ rows,
phantom gradient and IFT), ``ppi_gcn`` (Table 2's GCN row), and the offline chains
benchmark: ``chains`` (IGNN, with a 2-layer GCN trained and scored in the same run as the
baseline) and ``chains_gcn`` (the GCN alone). PPI is multi-label (BCE with logits,
prediction = logit > 0, micro- and macro-F1 pooled over the split's nodes); chains is
2-class (cross-entropy on the training nodes, accuracy overall and by distance from the
chain's head). The run directory gets the resolved config, metrics.jsonl, checkpoints
and results.json (zoo.common.Run); chains also writes ``accuracy_by_distance.png``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from zoo.common import Run, build_optimizer, build_scheduler, zoo_main
from zoo.ignn.data import GraphSplits, build_datasets
from zoo.ignn.model import GCN, IGNN, count_parameters, stack_infos

PPI_DIMS = (50, 121)  # PPI: node features, labels


# ------------------------------------------------------------------------------ models
def data_dims(data: Any) -> tuple[int, int]:
    """(node features, classes) of ``cfg.data``, known without reading the data."""
    if str(data.name) == "ppi":
        return PPI_DIMS
    return int(data.num_features), int(data.get("num_classes", 2))


def build_model(cfg: DictConfig, model_cfg: Any = None) -> torch.nn.Module:
    """The model of ``model_cfg`` (default ``cfg.model``): an IGNN or a GCN."""
    m = model_cfg if model_cfg is not None else cfg.model
    in_features, num_classes = data_dims(cfg.data)
    name = str(m.name)
    if name == "ignn":
        return IGNN(in_features, num_classes, size=str(m.size), deq=cfg.deq, kappa=float(m.kappa),
                    dropout=float(m.get("dropout", 0.0)), widths=m.get("widths"))
    if name == "gcn":
        return GCN(in_features, num_classes, hidden=int(m.hidden), num_layers=int(m.num_layers),
                   dropout=float(m.get("dropout", 0.0)))
    raise ValueError(f"model.name={name!r}: choose ignn or gcn")


def optimizer_options(optim: Any) -> dict:
    """``cfg.optim`` without null entries (an experiment nulls options of another optimiser)."""
    return {k: v for k, v in OmegaConf.to_container(optim, resolve=True).items() if v is not None}


# ----------------------------------------------------------------------------- metrics
def f1_counts(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-label (TP, FP, FN) of multi-label predictions ``logits > 0``: a 3 x L tensor."""
    pred, true = logits > 0, target > 0.5
    return torch.stack([(pred & true).sum(0), (pred & ~true).sum(0), (~pred & true).sum(0)]).double()


def f1_scores(counts: torch.Tensor) -> dict[str, float]:
    """Micro-F1 (TP, FP, FN pooled over labels) and macro-F1 (mean of per-label F1; a label
    with no true and no predicted positive scores 0, as scikit-learn), in %."""
    tp, fp, fn = counts
    micro = 2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1)
    per_label = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.zeros_like(tp))
    return {"micro_f1": float(100 * micro), "macro_f1": float(100 * per_label.mean())}


def accuracy_by_distance(pred: torch.Tensor, graph: Any, mask: torch.Tensor, far_from: int
                         ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Accuracy (%) over `mask`, over its nodes ``far_from`` or more hops from their chain's
    head, and one row per distance ``{"distance", "accuracy", "nodes"}``."""
    correct = (pred == graph.y) & mask
    dist = graph.dist
    far = mask & (dist >= far_from)
    metrics = {"acc": float(100 * correct.sum() / mask.sum().clamp(min=1)),
               "acc_far": float(100 * (correct & far).sum() / far.sum().clamp(min=1))}
    rows = []
    for d in range(int(dist.max()) + 1):
        at = mask & (dist == d)
        rows.append({"distance": d, "accuracy": float(100 * (correct & at).sum() / at.sum().clamp(min=1)),
                     "nodes": int(at.sum())})
    return metrics, rows


def stack_batch_infos(infos: Sequence[Optional[dict]]) -> Optional[dict]:
    """The DEQ infos of several evaluation batches as one: per-layer values concatenated,
    NFE per batch averaged."""
    infos = [i for i in infos if i]
    if not infos:
        return None
    out = dict(stack_infos(infos))
    if "nfe" in out:
        out["nfe"] = float(out["nfe"]) / len(infos)
    return out


def batches_of(graphs: list, batch_size: int):
    """PyG batches of consecutive graphs (a batch is one disconnected graph)."""
    from torch_geometric.data import Batch

    return [Batch.from_data_list(graphs[i:i + batch_size]) for i in range(0, len(graphs), batch_size)]


@torch.no_grad()
def evaluate_split(model: torch.nn.Module, splits: GraphSplits, split: str, device: torch.device,
                   batch_size: int = 2, solver_kwargs: Optional[dict] = None, far_from: int = 3
                   ) -> tuple[dict[str, float], Optional[dict], Optional[list]]:
    """Metrics of `split` (``val``/``test``; chains also ``train``): (metrics, deq info, rows).

    PPI: micro-/macro-F1 over all nodes of the split's graphs (eval batches of
    `batch_size` graphs). Chains: accuracy of the split's masked nodes, ``acc_far`` and the
    per-distance rows (None for PPI).
    """
    was_training = model.training
    model.eval()
    try:
        if splits.transductive:
            graph = splits.test[0].to(device)
            logits, info = model(graph, solver_kwargs=solver_kwargs)
            metrics, rows = accuracy_by_distance(logits.argmax(1), graph, graph[f"{split}_mask"], far_from)
            return metrics, info, rows
        counts, infos = None, []
        for batch in batches_of(getattr(splits, split), batch_size):
            batch = batch.to(device)
            logits, info = model(batch, solver_kwargs=solver_kwargs)
            c = f1_counts(logits, batch.y)
            counts = c if counts is None else counts + c
            infos.append(info)
        return f1_scores(counts), stack_batch_infos(infos), None
    finally:
        model.train(was_training)


def node_loss(logits: torch.Tensor, graph: Any, multilabel: bool) -> torch.Tensor:
    """BCE with logits over every node (PPI), or cross-entropy over the training nodes (chains)."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, graph.y.float())
    mask = graph.train_mask
    return F.cross_entropy(logits[mask], graph.y[mask])


# ------------------------------------------------------------------------------ chains
def train_baseline(cfg: DictConfig, splits: GraphSplits, device: torch.device) -> dict[str, Any]:
    """Trains ``cfg.baseline`` (a model block plus epochs / lr / weight_decay) on the chains
    graph and scores it like the main model: its metrics, rows and parameter count."""
    b = cfg.baseline
    torch.manual_seed(int(cfg.seed))
    model = build_model(cfg, b).to(device)
    optimizer = build_optimizer(model, {"name": "adam", "lr": float(b.lr),
                                        "weight_decay": float(b.get("weight_decay", 0.0))})
    graph = splits.train[0].to(device)
    model.train()
    for _ in range(int(b.epochs)):
        logits, _ = model(graph)
        loss = node_loss(logits, graph, splits.multilabel)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    far_from = int(cfg.eval.far_from)
    test, _, rows = evaluate_split(model, splits, "test", device, far_from=far_from)
    val, _, _ = evaluate_split(model, splits, "val", device, far_from=far_from)
    return {"model": str(b.name), "num_layers": int(b.get("num_layers", 0)), "params": count_parameters(model),
            "metrics": {**{f"test/{k}": v for k, v in test.items()}, "val/acc": val["acc"],
                        "train/loss": float(loss.detach())},
            "accuracy_by_distance": rows}


def plot_accuracy_by_distance(curves: Mapping[str, Sequence[Mapping[str, float]]], path: Path | str,
                              title: str = "chains: test accuracy by distance from the head",
                              marks: Optional[Mapping[str, int]] = None) -> Path:
    """Test accuracy against a node's distance from its chain's head, one line per model;
    `marks` draws a dotted line at each model's receptive field (a GCN's layer count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, rows) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot([r["distance"] for r in rows], [r["accuracy"] for r in rows], "o-", label=label, color=color)
        if marks and label in marks:
            ax.axvline(marks[label] + 0.5, ls=":", color=color, label=f"{label}: receptive field")
    ax.axhline(50.0, ls="--", color="gray", lw=1, label="chance")
    ax.set_xlabel("distance from the chain's head (hops)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def format_distance_table(curves: Mapping[str, Sequence[Mapping[str, float]]]) -> str:
    """The per-distance accuracies of each model as a markdown table."""
    names = list(curves)
    first = next(iter(curves.values()))
    lines = ["| distance | nodes | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for i, row in enumerate(first):
        cells = " | ".join(f"{curves[n][i]['accuracy']:.1f}" for n in names)
        lines.append(f"| {row['distance']} | {row['nodes']} | {cells} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- train
def total_steps(cfg: DictConfig, splits: GraphSplits, world_size: int) -> int:
    """Epochs x optimiser steps per epoch (chains: one full-graph step per epoch)."""
    per_epoch = 1 if splits.transductive else math.ceil(len(splits.train) / (cfg.train.batch_size * world_size))
    return int(cfg.train.epochs) * per_epoch


def graph_batches(run: Run, cfg: DictConfig, splits: GraphSplits):
    """``batches(epoch, start)`` for `Run.fit`: shuffled PPI graphs, or the one chains graph."""
    if splits.transductive:
        graph = splits.train[0]
        return lambda epoch, start=0: [graph] if start == 0 else []
    from torch_geometric.data import Batch

    return run.loader(splits.train, batch_size=int(cfg.train.batch_size), shuffle=True,
                      collate_fn=Batch.from_data_list)


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs one training; returns the final metrics."""
    with Run(cfg, project="ignn") as run:
        if cfg.train.get("cpu_threads") and run.device.type == "cpu":
            torch.set_num_threads(int(cfg.train.cpu_threads))
        splits = build_datasets(cfg.data)  # a missing dataset stops here, before any work
        model = run.wrap(build_model(cfg))
        optimizer = build_optimizer(model, optimizer_options(cfg.optim))
        steps = total_steps(cfg, splits, run.world_size)
        scheduler = build_scheduler(optimizer, cfg.sched, steps)
        far_from = int(cfg.eval.far_from)
        best: dict[str, Any] = {}
        rows_of_last_eval: list = []

        def train_step(batch, step):
            batch = batch.to(run.device)
            with run.autocast():
                logits, info = model(batch)
                loss = node_loss(logits, batch, splits.multilabel)
            run.backward_step(loss, optimizer, model.parameters(), cfg.clip, scheduler)
            return {"train/loss": loss.detach(), "deq_info": info}

        def evaluate(step):
            test, info, rows = evaluate_split(model, splits, "test", run.device, cfg.train.eval_batch_size,
                                              far_from=far_from)
            val, _, _ = evaluate_split(model, splits, "val", run.device, cfg.train.eval_batch_size,
                                       far_from=far_from)
            metrics = {**{f"test/{k}": v for k, v in test.items()}, **{f"val/{k}": v for k, v in val.items()}}
            if not splits.transductive:  # upstream's model selection: the best test epoch; ours: best val
                key = "micro_f1"
                if test[key] > best.get("test", -1.0):
                    best.update(test=test[key], test_step=step)
                if val[key] > best.get("val", -1.0):
                    best.update(val=val[key], test_at_best_val=test[key], val_step=step)
                metrics.update({"test/micro_f1_best": best["test"], "test/micro_f1_at_best_val":
                                best["test_at_best_val"], "best/test_step": best["test_step"],
                                "best/val_step": best["val_step"]})
            rows_of_last_eval[:] = rows or []
            return {**metrics, "deq_info": info}

        out = run.fit(model=model, optimizer=optimizer, scheduler=scheduler, train_step=train_step,
                      batches=graph_batches(run, cfg, splits), total_steps=steps, evaluate=evaluate,
                      eval_every=int(cfg.train.eval_every))
        if out.status != "completed":
            return out.metrics
        extra: dict[str, Any] = {"params": count_parameters(model), "data": splits.info}
        if splits.transductive and cfg.eval.get("by_distance", True):
            name = str(cfg.model.name)
            curves = {name: rows_of_last_eval}
            marks = {name: int(cfg.model.num_layers)} if name == "gcn" else {}
            if cfg.get("baseline"):
                baseline = train_baseline(cfg, splits, run.device)
                extra["baseline"] = baseline
                label = f"{baseline['model']} ({baseline['num_layers']} layers)"
                curves[label] = baseline["accuracy_by_distance"]
                if baseline["model"] == "gcn":
                    marks[label] = baseline["num_layers"]
            extra["accuracy_by_distance"] = {k: v for k, v in curves.items()}
            if run.is_main:
                plot_accuracy_by_distance(curves, run.out_dir / "accuracy_by_distance.png", marks=marks)
                print(format_distance_table(curves))
        run.write_results(out.metrics, deq_stats=out.deq, extra=extra)
        return out.metrics


@zoo_main("ignn")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
