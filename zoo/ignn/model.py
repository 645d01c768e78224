"""Implicit graph neural networks (IGNN, Gu et al. 2020) on `core`, and a GCN baseline.

The implicit graph layer (zoo ignn/nodeclassification/layers.py of the TorchDEQ zoo,
specs in zoo/ignn/README.md) maps node features U (n x p) to the equilibrium

    Z = ReLU(A^T Z W^T + A^T U Omega_1^T + U Omega_2^T)          (n x m, nodes first)

which is the reference's ``X = ReLU(W X A + Omega_1 U A + Omega_2 U)`` written for
node-major tensors (X = Z^T). A is sparse (a ``torch.sparse`` COO tensor; no dense n x n
matrix is ever formed). Before each forward the weight W that the layer uses is
projected onto ``||W||_inf <= kappa / rho(A)`` (max row sum of |W|), which makes the map a
contraction for every graph; rho(A) is computed once per graph (`spectral_radius`, cached
by the data loader). `core`'s spectral norm (with clipping) is registered on W, Omega_1
and Omega_2 (`deq.norm_type=spectral_norm deq.norm_clip=true`), so the TorchDEQ zoo's key
names (``W_orig``, ``W_g``, ``W_u``, ``W_v``, ...) are ours too.

The whole graph (a batch of graphs is one disconnected graph) is one coupled state, so
the solvers run with ``whole_state=True``: convergence is judged over the graph, not per
node. `IGNN` stacks implicit layers (`SIZES`): ``ppi`` is the TorchDEQ zoo's PPI model,
``chains`` the IGNN paper's one-layer model for the chains benchmark. `GCN` is PyG's
``GCNConv`` stacked ``num_layers`` times.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import DEQConfig
from core.deq import get_deq
from core.norm import apply_norm, register_norm_module, reset_norm

KAPPA = 0.98  # the TorchDEQ zoo's PPI value


# --------------------------------------------------------------------------- graph maths
def sparse_adjacency(adj_index: torch.Tensor, adj_weight: Optional[torch.Tensor], num_nodes: int,
                     dtype: torch.dtype = torch.float32, transpose: bool = True) -> torch.Tensor:
    """A (or A^T, what the node-major product needs) as a coalesced sparse COO tensor."""
    if adj_weight is None:
        adj_weight = torch.ones(adj_index.shape[1], device=adj_index.device)
    index = adj_index.flip(0) if transpose else adj_index
    return torch.sparse_coo_tensor(index, adj_weight.to(dtype), (num_nodes, num_nodes),
                                   check_invariants=False).coalesce()


def spectral_radius(adj_index: torch.Tensor, adj_weight: Optional[torch.Tensor], num_nodes: int) -> float:
    """rho(|A|), the largest |eigenvalue| of the (absolute) adjacency, by ARPACK on CPU.

    A disconnected graph's radius is the largest of its components', which is why a batch
    of graphs needs no new computation (the loader keeps one value per graph). Graphs of
    fewer than 16 nodes use a dense eigen-solve.
    """
    import scipy.sparse as sp
    import scipy.sparse.linalg as spla

    rows, cols = adj_index.detach().cpu().numpy()
    vals = (np.ones(len(rows)) if adj_weight is None else np.abs(adj_weight.detach().cpu().double().numpy()))
    mat = sp.coo_matrix((vals, (rows, cols)), shape=(num_nodes, num_nodes)).tocsr()
    if num_nodes < 16 or mat.nnz == 0:
        return float(np.abs(np.linalg.eigvals(mat.toarray())).max()) if mat.nnz else 0.0
    symmetric = abs(mat - mat.T).sum() <= 1e-9 * max(abs(mat).sum(), 1.0)
    # the Perron root of a non-negative matrix is real, positive and of largest modulus
    if symmetric:
        values = spla.eigsh(mat, k=1, which="LA", tol=1e-10, return_eigenvectors=False)
    else:
        values = spla.eigs(mat, k=1, which="LM", tol=1e-10, return_eigenvectors=False)
    return float(np.abs(values).max())


def project_inf_norm(weight: torch.Tensor, radius: torch.Tensor | float) -> torch.Tensor:
    """The Euclidean projection of `weight` onto ``{W : ||W||_inf <= radius}``.

    ||W||_inf is the largest row sum of |W|, so each row whose l1 norm exceeds `radius`
    is projected onto the l1 ball (soft thresholding |w| - theta at the threshold found by
    sorting, Duchi et al. 2008) and the other rows are left alone. Differentiable, on the
    weight's device, without host synchronisation.
    """
    mag = weight.abs()
    width = weight.shape[1]
    radius = torch.as_tensor(radius, dtype=weight.dtype, device=weight.device)
    sorted_mag = mag.sort(dim=1, descending=True).values
    excess = sorted_mag.cumsum(dim=1) - radius
    ranks = torch.arange(1, width + 1, device=weight.device, dtype=weight.dtype)
    support = (sorted_mag * ranks > excess).sum(dim=1, keepdim=True).clamp(min=1)
    theta = (excess.gather(1, support - 1) / support.to(weight.dtype)).clamp(min=0)
    theta = torch.where(mag.sum(dim=1, keepdim=True) > radius, theta, torch.zeros_like(theta))
    return weight.sign() * (mag - theta).clamp(min=0)


def stack_infos(infos: Sequence[dict]) -> dict:
    """One DEQ info for several implicit layers: each layer's solve is one "sample"."""
    if len(infos) == 1:
        return infos[0]
    out = {key: torch.cat([i[key].reshape(-1) for i in infos])
           for key in ("abs_lowest", "rel_lowest", "nstep") if all(key in i for i in infos)}
    for count in ("nfe", "n_fallback"):
        if all(count in i for i in infos):
            out[count] = sum(i[count] for i in infos)
    return out


# ------------------------------------------------------------------------------ layers
class ImplicitGraph(nn.Module):
    """One implicit graph layer, p -> m features per node (see the module docstring).

    Parameters W (m x m), Omega_1 and Omega_2 (m x p), in the reference's orientation
    (output rows first), initialised uniform(-1/sqrt(m), 1/sqrt(m)). The reference also
    has a ``bias`` (m x 1) that its forward never uses: it is not here (zoo.ignn.convert
    drops it from TorchDEQ checkpoints).
    """

    def __init__(self, in_features: int, out_features: int, kappa: float = KAPPA):
        super().__init__()
        self.in_features, self.out_features, self.kappa = in_features, out_features, float(kappa)
        self.W = nn.Parameter(torch.empty(out_features, out_features))
        self.Omega_1 = nn.Parameter(torch.empty(out_features, in_features))
        self.Omega_2 = nn.Parameter(torch.empty(out_features, in_features))
        bound = 1.0 / math.sqrt(out_features)
        for p in (self.W, self.Omega_1, self.Omega_2):
            nn.init.uniform_(p, -bound, bound)

    def projected_weight(self, rho: torch.Tensor | float) -> torch.Tensor:
        """The W the forward uses: the (normalised) W projected onto ||W||_inf <= kappa / rho."""
        return project_inf_norm(self.W, self.kappa / rho)

    def forward(self, u: torch.Tensor, adj_t: torch.Tensor, rho: torch.Tensor | float, deq: nn.Module,
                solver_kwargs: Optional[dict] = None) -> tuple[torch.Tensor, dict]:
        """(Z*, info) for node features `u` (n x p) and the sparse A^T `adj_t`.

        The caller runs `reset_norm` on the layer once per model forward."""
        weight = self.projected_weight(rho)
        injection = torch.sparse.mm(adj_t, u @ self.Omega_1.t()) + u @ self.Omega_2.t()

        def f(z):
            return F.relu(torch.sparse.mm(adj_t, z @ weight.t()) + injection)

        z_out, info = deq(f, torch.zeros_like(injection), solver_kwargs=solver_kwargs)
        return z_out[-1], info


for _norm in ("spectral_norm", "weight_norm"):
    register_norm_module(ImplicitGraph, _norm, names=("W", "Omega_1", "Omega_2"), dims=(0, 0, 0))


# ------------------------------------------------------------------------------ models
@dataclass(frozen=True)
class IGNNSize:
    """Widths of an IGNN: the implicit layers, and how their outputs are combined.

    ``skip=True`` (PPI): one more implicit layer of width num_classes closes the stack, and
    after layer i the output is ``Z*_i + proj_i(x_{i-1})`` with ELU between layers.
    ``skip=False`` (chains): ELU between the implicit layers, then a linear ``decoder``.
    """

    widths: tuple[int, ...]
    skip: bool


SIZES: dict[str, IGNNSize] = {
    # TorchDEQ zoo models_PPI.py: hidden 256 -> 4h, 2h, 2h, h, then n_class
    "ppi": IGNNSize((1024, 512, 512, 256), skip=True),
    # IGNN paper chains model: one implicit layer of 16 features and a linear classifier
    "chains": IGNNSize((16,), skip=False),
}


def get_size(size: str | IGNNSize, widths: Optional[Sequence[int]] = None) -> IGNNSize:
    """A named size, its widths optionally replaced."""
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"model.size={size!r}: choose one of {sorted(SIZES)}")
        size = SIZES[size]
    return IGNNSize(tuple(int(w) for w in widths), size.skip) if widths else size


def deq_for_graphs(deq: Any) -> DEQConfig:
    """`deq` as a DEQConfig whose forward and backward solvers treat the graph as one state."""
    config = DEQConfig.from_any(deq)
    for option in ("f_solver_kwargs", "b_solver_kwargs"):
        kwargs = dict(getattr(config, option) or {})
        if kwargs.get("whole_state") is False:
            raise ValueError(f"deq.{option}.whole_state=false: an IGNN's graph is one coupled state; "
                             "leave whole_state true")
        kwargs["whole_state"] = True
        setattr(config, option, kwargs)
    return config


class IGNN(nn.Module):
    """A stack of implicit graph layers (`SIZES`) on one (possibly batched) graph.

    `forward(graph, solver_kwargs=None)` returns ``(logits, info)``: logits n x num_classes,
    info the solver statistics of all layers (`stack_infos`).
    """

    def __init__(self, in_features: int, num_classes: int, size: str | IGNNSize = "ppi",
                 deq: Any = None, kappa: float = KAPPA, dropout: float = 0.0,
                 widths: Optional[Sequence[int]] = None):
        super().__init__()
        self.size = size = get_size(size, widths)
        widths = list(size.widths) + ([num_classes] if size.skip else [])
        dims = [in_features] + widths
        self.ignn = nn.ModuleList(ImplicitGraph(p, m, kappa) for p, m in zip(dims[:-1], dims[1:]))
        self.proj = nn.ModuleList(nn.Linear(p, m) for p, m in zip(dims[:-1], dims[1:])) if size.skip else None
        self.decoder = None if size.skip else nn.Linear(widths[-1], num_classes)
        self.dropout = float(dropout)
        self.deq_config = deq_for_graphs(deq)
        for layer in self.ignn:
            apply_norm(layer, args=self.deq_config)
        self.deq = get_deq(self.deq_config)

    def forward(self, graph: Any, solver_kwargs: Optional[dict] = None) -> tuple[torch.Tensor, dict]:
        """Logits of every node of `graph` (a PyG Data or Batch with ``x``, ``adj_index``,
        ``adj_weight`` and ``rho``: zoo.ignn.data) and the solver statistics."""
        x = graph.x
        adj_t = sparse_adjacency(graph.adj_index, graph.adj_weight, x.shape[0], x.dtype)
        rho = graph.rho.max().to(x.dtype)  # a batch is one disconnected graph: its largest component's radius
        infos = []
        for layer in self.ignn:
            reset_norm(layer)
        last = len(self.ignn) - 1
        for i, layer in enumerate(self.ignn):
            z, info = layer(x, adj_t, rho, self.deq, solver_kwargs)
            infos.append(info)
            if self.proj is not None:
                z = z + self.proj[i](x)
            x = F.elu(z) if i < last or self.decoder is not None else z
        if self.decoder is not None:
            x = self.decoder(F.dropout(x, self.dropout, self.training))
        return x, stack_infos(infos)


class GCN(nn.Module):
    """``num_layers`` PyG GCNConv layers (symmetric normalisation with self-loops), ReLU and
    dropout between them. `forward(graph, solver_kwargs=None)` reads ``x`` and the raw
    ``edge_index`` and returns ``(logits, None)`` (solver_kwargs is ignored)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 16, num_layers: int = 2,
                 dropout: float = 0.5):
        super().__init__()
        from torch_geometric.nn import GCNConv

        if num_layers < 1:
            raise ValueError(f"model.num_layers={num_layers}: a GCN needs at least one layer")
        dims = [in_features] + [hidden] * (num_layers - 1) + [num_classes]
        self.convs = nn.ModuleList(GCNConv(p, m, cached=False) for p, m in zip(dims[:-1], dims[1:]))
        self.dropout = float(dropout)

    def forward(self, graph: Any, solver_kwargs: Optional[dict] = None) -> tuple[torch.Tensor, None]:
        x, edge_index = graph.x, graph.edge_index
        for i, conv in enumerate(self.convs):
            x = F.dropout(x, self.dropout, self.training)
            x = conv(x, edge_index)
            if i < len(self.convs) - 1:
                x = F.relu(x)
        return x, None


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
