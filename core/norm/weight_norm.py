"""DEQ weight normalisation: N(W) is the L2 norm of each output row of W.

W_eff[i] = W[i] * min(t, g[i] / ||W[i]||) (TorchDEQ paper, eqs. 13 and 16). g starts at
||W[i]||, so that W_eff = W when the norm is applied; with `norm_no_scale` every row is
rescaled to `norm_target_norm` instead. Trainable tensors: `<name>_v` (W) and `<name>_g`,
shaped like TorchDEQ's (g is (out, 1, ..., 1), or (1, out, 1, ...) for transposed convs).
"""
from __future__ import annotations

import torch

from core.norm.base import DEQNorm

__all__ = ["WeightNorm", "row_norm"]

_EPS = 1e-12  # keeps an all-zero row finite (its W_eff stays zero)


def row_norm(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """L2 norm over every dimension except `dim` (the output rows), kept broadcastable."""
    dim = dim % weight.dim()
    others = [d for d in range(weight.dim()) if d != dim]
    return torch.linalg.vector_norm(weight, dim=others, keepdim=True)


class WeightNorm(DEQNorm):
    """Weight normalisation over output rows, with learnable scale and optional clipping."""

    _source_suffix = "_v"

    def _norm_of(self, module, name, dim, weight, first, update):
        return row_norm(weight, dim).clamp_min(_EPS)

    def _initial_scale(self, module, name, dim, weight):
        return row_norm(weight, dim).clone()
