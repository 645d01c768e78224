"""Per-sample spectral radius of J_f(z0) by power iteration on vector-Jacobian products."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["power_method"]

State = Union[torch.Tensor, Sequence[torch.Tensor]]


def _per_sample(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate a state's tensors into one (B, D) matrix."""
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def power_method(f0: State, z0: State, n_iters: int = 100,
                 tol: Optional[float] = None) -> Tuple[State, torch.Tensor]:
    """Estimate the dominant eigenvector and |eigenvalue| of J = d f0 / d z0, per sample.

    Iterates v <- J^T v / ||J^T v|| (one vector-Jacobian product per step, no Jacobian is
    formed) and reads the eigenvalue as the Rayleigh quotient <J^T v, v> / <v, v>. The
    samples of a batch are independent (each row of z0 has its own Jacobian block).
    Like TorchDEQ's, the vectors are real: a complex dominant pair is not resolved.

    Args:
        f0: f(z0) (tensor or tuple of tensors, batch first), computed with z0 requiring grad.
        z0: the input of f.
        n_iters: maximum number of iterations (TorchDEQ's fixed count by default).
        tol: if given, stop once every sample's |eigenvalue| moved by at most
            tol * |eigenvalue| in one iteration (one host sync per iteration).

    Returns:
        (eigenvector with z0's structure, |eigenvalue| of shape (B,)).
    """
    f0s = (f0,) if torch.is_tensor(f0) else tuple(f0)
    z0s = (z0,) if torch.is_tensor(z0) else tuple(z0)
    if not all(z.requires_grad for z in z0s):
        raise ValueError("power_method: z0 must require grad and f0 must be computed from it")
    vector = [torch.randn_like(f) for f in f0s]
    value = None
    for _ in range(n_iters):
        vjp = torch.autograd.grad(f0s, z0s, vector, retain_graph=True, allow_unused=True)
        vjp = [torch.zeros_like(z) if g is None else g for g, z in zip(vjp, z0s)]
        flat_vjp, flat_v = _per_sample(vjp), _per_sample(vector)
        new_value = (flat_vjp * flat_v).sum(1) / (flat_v * flat_v).sum(1)
        norms = flat_vjp.norm(dim=1, keepdim=True).clamp_min(torch.finfo(flat_vjp.dtype).tiny)
        vector = [g / norms.view(-1, *([1] * (g.dim() - 1))) for g in vjp]
        converged = (tol is not None and value is not None
                     and bool(((new_value.abs() - value.abs()).abs() <= tol * new_value.abs()).all()))
        value = new_value
        if converged:
            break
    eigvec = vector[0] if torch.is_tensor(z0) else tuple(vector)
    return eigvec, value.abs()
