"""IGNN training-step time and peak memory on synthetic PPI-sized graphs.

    python benchmarks/ignn_steps.py                                  # PPI size, the ppi recipe (PG)
    python benchmarks/ignn_steps.py --ift                            # the ppi_ift recipe
    python benchmarks/ignn_steps.py --nodes 400 --hidden 64 --steps 5   # a reduced size for a CPU

Builds the `ppi` model (5 implicit layers of 4h, 2h, 2h, h, 121 with h = --hidden, spectral
norm with clip, kappa 0.98; fixed-point iteration 40 steps, tol 1e-3, 5-step phantom
gradient with tau 0.5, or IFT) on a random graph of --nodes nodes and --degree neighbours
per node (a PPI training graph has about 2,245 nodes and 28 neighbours on average: the
defaults), 50 features and 121 labels, and runs Adam 5e-3 steps of BCE with logits. It
needs neither PPI nor Hydra. Prints one JSON line: seconds per training step after a
warm-up, evaluation forward time, peak memory, solver statistics.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch_geometric.data import Data

from zoo.common import peak_memory_mb
from zoo.ignn.data import with_adjacency
from zoo.ignn.model import IGNN, count_parameters


def random_graph(nodes: int, degree: int, seed: int = 0) -> Data:
    """An undirected random graph with about `degree` neighbours per node, PPI's features and labels."""
    g = torch.Generator().manual_seed(seed)
    src = torch.arange(nodes).repeat_interleave(max(degree // 2, 1))
    dst = torch.randint(0, nodes, (len(src),), generator=g)
    keep = src != dst
    edges = torch.stack([src[keep], dst[keep]])
    edges = torch.unique(torch.cat([edges, edges.flip(0)], dim=1), dim=1)
    graph = Data(x=torch.randn(nodes, 50, generator=g), edge_index=edges,
                 y=(torch.rand(nodes, 121, generator=g) < 0.3).float())
    return with_adjacency(graph, "raw")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2245)
    p.add_argument("--degree", type=int, default=28)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--ift", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    h = a.hidden
    deq = {"f_solver": "fixed_point_iter", "f_max_iter": 40, "f_tol": 1e-3, "norm_type": "spectral_norm",
           "norm_clip": True, **({"ift": True, "b_max_iter": 40} if a.ift else {"grad": 5, "tau": 0.5})}
    widths = [4 * h, 2 * h, 2 * h, h]  # h = 256: SIZES["ppi"]
    model = IGNN(50, 121, "ppi", deq=deq, widths=widths).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    graph = random_graph(a.nodes, a.degree).to(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, nfe = None, []
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            sync()
            t0 = time.perf_counter()
        logits, info = model(graph)
        loss = F.binary_cross_entropy_with_logits(logits, graph.y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        nfe.append(float(info["nfe"]))
    sync()
    step_s = (time.perf_counter() - t0) / a.steps
    model.eval()
    with torch.no_grad():
        sync()
        t1 = time.perf_counter()
        _, info = model(graph)
        sync()
        eval_s = time.perf_counter() - t1
    print(json.dumps({
        "device": str(device), "nodes": a.nodes, "edges": int(graph.edge_index.shape[1]),
        "rho": float(graph.rho), "widths": widths + [121], "params": count_parameters(model),
        "backward": "ift" if a.ift else "pg5", "step_s": round(step_s, 4), "eval_forward_s": round(eval_s, 4),
        "peak_memory_mb": round(peak_memory_mb(device), 1), "loss": float(loss),
        "nfe_per_step_all_layers": sum(nfe[a.warmup:]) / a.steps,
        "eval_abs_residual_per_layer": [float(v) for v in info["abs_lowest"]],
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
