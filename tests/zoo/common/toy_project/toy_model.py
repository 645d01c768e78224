"""A tiny DEQ classifier on synthetic data: the example project the zoo/common tests run.

z* = tanh(W z* + U x) solved by `core.deq.get_deq`, a dropout + linear head, trained on
a fixed synthetic 3-class problem. Small enough for a few CPU steps in a test; it has
dropout so that an exact resume must restore the RNG state.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from core.config import DEQConfig
from core.deq import get_deq
from zoo.common import require_files


class ToyDEQ(nn.Module):
    def __init__(self, deq_cfg, d_in: int = 4, d_hidden: int = 16, n_classes: int = 3, dropout: float = 0.1):
        super().__init__()
        self.inject = nn.Linear(d_in, d_hidden)
        self.f = nn.Linear(d_hidden, d_hidden, bias=False)
        with torch.no_grad():
            self.f.weight.mul_(0.5)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(d_hidden, n_classes)
        self.deq = get_deq(deq_cfg)

    def forward(self, x):
        u = self.inject(x)
        z_out, info = self.deq(lambda z: torch.tanh(self.f(z) + u), torch.zeros_like(u))
        return self.head(self.drop(z_out[-1])), info


def build_model(cfg) -> ToyDEQ:
    deq_cfg = DEQConfig.from_any(cfg.get("deq"))
    return ToyDEQ(deq_cfg, d_hidden=int(cfg.model.hidden), dropout=float(cfg.model.dropout))


def load_data(data_cfg) -> TensorDataset:
    """Synthetic data (labels from a fixed linear map), or ``<data.root>/toy.npz`` when set."""
    if data_cfg.get("root"):
        root = require_files(data_cfg.root, ["toy.npz"],
                             layout="<root>/toy.npz with arrays x (N, 4) float32, y (N,) int64")
        arrays = np.load(root / "toy.npz")
        return TensorDataset(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]))
    g = torch.Generator().manual_seed(int(data_cfg.seed))
    x = torch.randn(int(data_cfg.n), 4, generator=g)
    w = torch.randn(4, 3, generator=g)
    return TensorDataset(x, (x @ w).argmax(dim=1))


@torch.no_grad()
def evaluate(model, dataset, device) -> dict:
    """Accuracy and loss over the whole dataset, plus the DEQ info of the last batch."""
    x, y = dataset.tensors
    logits, info = model(x.to(device))
    loss = nn.functional.cross_entropy(logits, y.to(device))
    accuracy = (logits.argmax(1) == y.to(device)).float().mean()
    return {"eval/accuracy": float(accuracy), "eval/loss": float(loss), "deq_info": info}
