"""DEQ spectral normalisation: N(W) is the largest singular value of W.

W is viewed as a matrix (output rows x everything else) and sigma = u^T W v, with u, v
from power iteration kept in buffers (`<name>_u`, `<name>_v`) across calls, so one
iteration per reset (`sn_n_power_iters`) tracks a slowly changing W. The first reset after
`apply_norm` (and `apply_norm` itself) iterates until sigma has converged, so N(W) is
accurate from the first forward, not only after many training steps.

The scale follows TorchDEQ 0.1.0 (and its checkpoints): g is learnable, one value per
output row (eq. 15 of the TorchDEQ paper: W_eff = W o g / sigma row-wise), shaped
(out, 1, ...) like weight norm's, and it starts at `norm_target_norm` — so W_eff starts as
target_norm * W / sigma, a matrix of spectral norm target_norm, not W itself. That start is
the point of spectral norm in a DEQ (an f with bounded Lipschitz constant from step 0, e.g. IGNN with
`--norm_clip`); g then learns per-row gains as weight norm's does. With `norm_no_scale`
the factor is target_norm / sigma, a scalar.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from core.norm.base import DEQNorm

__all__ = ["SpectralNorm"]

_EPS = 1e-12
_CONVERGE_TOL = 1e-7  # relative change of sigma between checks, on the first reset
_CONVERGE_CHECK = 10  # iterations between convergence checks (each check syncs the host)
_CONVERGE_MAX = 5000


def _as_matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows = the output dimension `dim`, columns = all the others."""
    if dim != 0:
        weight = weight.movedim(dim, 0)
    return weight.reshape(weight.shape[0], -1)


class SpectralNorm(DEQNorm):
    """Spectral normalisation by persistent power iteration, with TorchDEQ's per-row scale."""

    _source_suffix = "_orig"

    def __init__(self, names, dims, config):
        super().__init__(names, dims, config)
        self.n_power_iters = int(config.sn_n_power_iters)
        self._converge_pending = True  # the first reset_norm converges too (weights may be re-initialised)

    def _attach_extra(self, module, name, dim, weight):
        rows, cols = _as_matrix(weight, dim).shape
        with torch.no_grad():
            u = F.normalize(weight.new_empty(rows).normal_(), dim=0, eps=_EPS)
            v = F.normalize(weight.new_empty(cols).normal_(), dim=0, eps=_EPS)
        module.register_buffer(name + "_u", u)
        module.register_buffer(name + "_v", v)

    def _detach_extra(self, module, name):
        del module._buffers[name + "_u"]
        del module._buffers[name + "_v"]

    def _initial_scale(self, module, name, dim, weight):
        shape = [1] * weight.dim()
        shape[dim] = weight.shape[dim]
        return torch.full(shape, self.target_norm, dtype=weight.dtype, device=weight.device)

    def reset(self, module, first=False):
        super().reset(module, first=first or self._converge_pending)
        if not first:
            self._converge_pending = False

    def _norm_of(self, module, name, dim, weight, first, update):
        matrix = _as_matrix(weight, dim)
        u, v = module._buffers[name + "_u"], module._buffers[name + "_v"]
        with torch.no_grad():
            detached = matrix.detach()
            if first:
                _power_iterate_to_convergence(detached, u, v)
            elif module.training and update:
                for _ in range(self.n_power_iters):
                    _power_step(detached, u, v)
        # u, v are updated in place at every reset: use copies in the graph.
        return torch.dot(u.clone(), torch.mv(matrix, v.clone()))


def _power_step(matrix: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    """One power-iteration step on W^T W, in place on the unit vectors u and v."""
    v.copy_(F.normalize(torch.mv(matrix.t(), u), dim=0, eps=_EPS))
    u.copy_(F.normalize(torch.mv(matrix, v), dim=0, eps=_EPS))


def _power_iterate_to_convergence(matrix: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    """Iterate until sigma changes by less than _CONVERGE_TOL (relative) over a check."""
    sigma = torch.dot(u, torch.mv(matrix, v))
    for _ in range(0, _CONVERGE_MAX, _CONVERGE_CHECK):
        for _ in range(_CONVERGE_CHECK):
            _power_step(matrix, u, v)
        new_sigma = torch.dot(u, torch.mv(matrix, v))
        if abs(float(new_sigma - sigma)) <= _CONVERGE_TOL * abs(float(new_sigma)):
            return
        sigma = new_sigma
