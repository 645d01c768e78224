"""Graphs for IGNN: PPI (PyG's class on the raw files) and the offline chains benchmark.

`build_datasets(cfg.data)` returns `GraphSplits`: lists of PyG ``Data`` graphs for
train / val / test. Every graph carries, besides PyG's ``x``, ``edge_index`` and ``y``,
the adjacency the implicit layers use (``adj_index``, ``adj_weight``, after
``data.adjacency``) and its spectral radius ``rho`` (computed once per graph here; a
batch of graphs is one disconnected graph whose radius is the largest of its graphs').

- PPI (``data.name=ppi``): ``torch_geometric.datasets.PPI(root=data.root)`` with the raw
  files of ppi.zip already in ``<root>/raw/`` (nothing is downloaded). 20 / 2 / 2 graphs,
  50 features, 121 labels; the adjacency is the raw edge list with weight 1 (as upstream).
- chains (``data.name=chains``): the IGNN paper's synthetic benchmark, generated from
  ``data.seed``: 2 classes x ``data.num_chains`` chains of ``data.chain_length`` nodes,
  ``data.num_features``-d features that are the class one-hot on the first node of each
  chain and zero (plus ``data.noise`` uniform noise) elsewhere; random node splits of
  ``data.num_train`` / ``num_val`` / ``num_test`` nodes. One graph; its masks say which
  nodes each split scores, and ``dist`` is a node's distance from its chain's head.

`write_ppi_raw(root, ...)` writes a small PPI-format raw folder (the four files per split)
for the tests.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from zoo.common import require_files
from zoo.ignn.model import spectral_radius

PPI_SPLITS = {"train": "train", "val": "valid", "test": "test"}  # PyG split -> raw file prefix
PPI_RAW_FILES = [f"raw/{prefix}_{part}" for prefix in PPI_SPLITS.values()
                 for part in ("graph.json", "feats.npy", "labels.npy", "graph_id.npy")]
PPI_LAYOUT = ("the raw files of ppi.zip (https://data.dgl.ai/dataset/ppi.zip) under <root>/raw/:\n"
              "  <root>/raw/{train,valid,test}_{graph.json,feats.npy,labels.npy,graph_id.npy}\n"
              "(PyG writes <root>/processed/ on first use). Set data.root=/path/to/PPI, or run the "
              "offline experiment: +experiment=chains")
ADJACENCIES = ("raw", "sym", "aug_sym")


@dataclass
class GraphSplits:
    """The graphs of each split and what the model needs to know about them."""

    train: list
    val: list
    test: list
    num_features: int
    num_classes: int
    multilabel: bool
    # chains: the one graph all three splits score (masks train_mask / val_mask / test_mask)
    transductive: bool = False
    info: dict = field(default_factory=dict)


def normalised_adjacency(edge_index: torch.Tensor, num_nodes: int, mode: str
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weight) of A: ``raw`` (weight 1), ``sym`` (D^-1/2 A D^-1/2) or ``aug_sym``
    (D^-1/2 (A + I) D^-1/2, self-loops added, as Kipf & Welling's GCN)."""
    if mode not in ADJACENCIES:
        raise ValueError(f"data.adjacency={mode!r}: choose one of {', '.join(ADJACENCIES)}")
    index = edge_index
    if mode == "aug_sym":
        loops = torch.arange(num_nodes, dtype=edge_index.dtype).repeat(2, 1)
        index = torch.cat([edge_index[:, edge_index[0] != edge_index[1]], loops], dim=1)
    weight = torch.ones(index.shape[1])
    if mode != "raw":
        degree = torch.zeros(num_nodes).index_add_(0, index[0], weight)
        inv_sqrt = degree.clamp(min=1e-12).rsqrt()
        weight = inv_sqrt[index[0]] * weight * inv_sqrt[index[1]]
    return index, weight


def with_adjacency(graph, mode: str):
    """`graph` with ``adj_index``, ``adj_weight`` and ``rho`` (its spectral radius) set."""
    index, weight = normalised_adjacency(graph.edge_index, graph.num_nodes, mode)
    graph.adj_index, graph.adj_weight = index, weight
    graph.rho = torch.tensor([spectral_radius(index, weight, graph.num_nodes)])
    return graph


# ------------------------------------------------------------------------------- PPI
def load_ppi(cfg: Any) -> GraphSplits:
    """PPI through PyG's class, the raw files under ``data.root/raw``."""
    root = require_files(cfg.get("root"), PPI_RAW_FILES, PPI_LAYOUT)
    from torch_geometric.datasets import PPI

    mode = str(cfg.get("adjacency") or "raw")
    splits = {}
    for split in PPI_SPLITS:
        dataset = PPI(root=str(root), split=split)
        splits[split] = [with_adjacency(dataset[i], mode) for i in range(len(dataset))]
    first = splits["train"][0]
    return GraphSplits(splits["train"], splits["val"], splits["test"], num_features=first.x.shape[1],
                       num_classes=first.y.shape[1], multilabel=True,
                       info={"graphs": {k: len(v) for k, v in splits.items()},
                             "nodes": {k: sum(g.num_nodes for g in v) for k, v in splits.items()}})


def write_ppi_raw(root: str | Path, graphs: Sequence[int] = (2, 1, 1), nodes: int = 12,
                  edges_per_node: int = 2, num_features: int = 50, num_labels: int = 121,
                  seed: int = 0) -> Path:
    """Writes ``root/raw/{train,valid,test}_*`` in ppi.zip's formats; returns root.

    Per split (graphs[i] graphs of `nodes` nodes each): ``_graph.json`` (networkx
    node-link, undirected, contiguous node ids, every graph a ring plus random chords, so
    each has edges), ``_feats.npy`` float (N, num_features), ``_labels.npy`` int 0/1
    (N, num_labels) and ``_graph_id.npy`` int (N,), graph ids numbered on from 1 across
    the splits as in the real files.
    """
    rng = np.random.default_rng(seed)
    raw = Path(root) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    next_id = 1
    for prefix, count in zip(PPI_SPLITS.values(), graphs):
        links, graph_ids = [], []
        for g in range(count):
            base = g * nodes
            for i in range(nodes):
                links.append({"source": base + i, "target": base + (i + 1) % nodes})
                for j in rng.choice(nodes, size=edges_per_node - 1, replace=False):
                    if j != i:
                        links.append({"source": base + i, "target": base + int(j)})
            graph_ids += [next_id] * nodes
            next_id += 1
        n = count * nodes
        doc = {"directed": False, "multigraph": False, "graph": {},
               "nodes": [{"id": i} for i in range(n)], "links": links}
        (raw / f"{prefix}_graph.json").write_text(json.dumps(doc))
        np.save(raw / f"{prefix}_feats.npy", rng.standard_normal((n, num_features)).astype(np.float32))
        np.save(raw / f"{prefix}_labels.npy", (rng.random((n, num_labels)) < 0.3).astype(np.int64))
        np.save(raw / f"{prefix}_graph_id.npy", np.asarray(graph_ids, dtype=np.int64))
    return Path(root)


# ---------------------------------------------------------------------------- chains
def make_chains(num_chains: int = 20, chain_length: int = 10, num_classes: int = 2,
                num_features: int = 100, num_train: int = 20, num_val: int = 100, num_test: int = 200,
                noise: float = 0.0, seed: int = 0):
    """The chains graph (a PyG ``Data``): class c's chains carry one-hot c on their head only.

    Node ``(c * num_chains + k) * chain_length + d`` is node d of chain k of class c;
    ``y`` is the class, ``dist`` = d, and the split masks are disjoint random node sets.
    """
    from torch_geometric.data import Data

    if num_features < num_classes:
        raise ValueError(f"data.num_features={num_features} < {num_classes} classes: the one-hot needs room")
    n = num_classes * num_chains * chain_length
    if num_train + num_val + num_test > n:
        raise ValueError(f"data.num_train+num_val+num_test={num_train + num_val + num_test} exceeds the "
                         f"{n} nodes of {num_classes}x{num_chains} chains of length {chain_length}")
    rng = np.random.default_rng(seed)
    feats = rng.uniform(-noise, noise, size=(num_classes, num_chains, chain_length, num_features))
    feats[:, :, 0, :num_classes] += np.eye(num_classes)[:, None, :]
    labels = np.repeat(np.arange(num_classes), num_chains * chain_length)
    dist = np.tile(np.arange(chain_length), num_classes * num_chains)
    heads = np.arange(0, n, chain_length)
    src = (heads[:, None] + np.arange(chain_length - 1)[None, :]).ravel()
    edge_index = np.concatenate([np.stack([src, src + 1]), np.stack([src + 1, src])], axis=1)
    order = rng.permutation(n)
    masks = []
    for start, size in ((0, num_train), (num_train, num_val), (num_train + num_val, num_test)):
        mask = np.zeros(n, dtype=bool)
        mask[order[start:start + size]] = True
        masks.append(torch.from_numpy(mask))
    return Data(x=torch.tensor(feats.reshape(n, num_features), dtype=torch.float32),
                edge_index=torch.from_numpy(edge_index).long(), y=torch.from_numpy(labels).long(),
                dist=torch.from_numpy(dist).long(), train_mask=masks[0], val_mask=masks[1],
                test_mask=masks[2])


def load_chains(cfg: Any) -> GraphSplits:
    graph = make_chains(int(cfg.num_chains), int(cfg.chain_length), int(cfg.get("num_classes", 2)),
                        int(cfg.num_features), int(cfg.num_train), int(cfg.num_val), int(cfg.num_test),
                        float(cfg.get("noise", 0.0)), int(cfg.seed))
    graph = with_adjacency(graph, str(cfg.get("adjacency") or "aug_sym"))
    return GraphSplits([graph], [graph], [graph], num_features=graph.x.shape[1],
                       num_classes=int(cfg.get("num_classes", 2)), multilabel=False, transductive=True,
                       info={"nodes": graph.num_nodes, "rho": float(graph.rho)})


def build_datasets(cfg: Any) -> GraphSplits:
    """The splits of ``cfg.data`` (``name``: ppi | chains)."""
    name = str(cfg.name)
    if name == "ppi":
        return load_ppi(cfg)
    if name == "chains":
        return load_chains(cfg)
    raise ValueError(f"data.name={name!r}: choose ppi or chains")


__all__ = ["GraphSplits", "build_datasets", "load_chains", "load_ppi", "make_chains",
           "normalised_adjacency", "with_adjacency", "write_ppi_raw"]
