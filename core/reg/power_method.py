"""Per-sample spectral radius of J_f(z0) by restarted Arnoldi on vector-Jacobian products."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["power_method"]

State = Union[torch.Tensor, Sequence[torch.Tensor]]

# Krylov vectors per Arnoldi cycle (one vector-Jacobian product each).
KRYLOV_SIZE = 8


def _per_sample(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate a state's tensors into one (B, D) matrix."""
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def _split(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list:
    """A (B, D) matrix back into tensors shaped like `like`."""
    sizes = [t[0].numel() if t.dim() else 1 for t in like]
    return [part.reshape(t.shape) for part, t in zip(flat.split(sizes, dim=1), like)]


def power_method(f0: State, z0: State, n_iters: int = 100,
                 tol: Optional[float] = None) -> Tuple[State, torch.Tensor]:
    """Estimate the dominant eigenvector and |eigenvalue| of J = d f0 / d z0, per sample.

    TorchDEQ's power iteration v <- J^T v / ||J^T v|| oscillates when the dominant
    eigenvalues have equal modulus (a complex pair, or a negative one with its mirror),
    and its Rayleigh quotient then misses the radius. This runs restarted Arnoldi instead:
    cycles of `KRYLOV_SIZE` vector-Jacobian products build an orthonormal Krylov basis of
    J^T per sample (the samples of a batch are independent: each row of z0 has its own
    Jacobian block, so one product serves the batch), the eigenvalues of the small
    Hessenberg matrix (Ritz values) estimate J's, and the next cycle starts from the
    real and imaginary parts of the dominant Ritz vector. No Jacobian is formed; the
    cost is `n_iters` products, as power iteration.

    Args:
        f0: f(z0) (tensor or tuple of tensors, batch first), computed with z0 requiring grad.
        z0: the input of f.
        n_iters: number of vector-Jacobian products (TorchDEQ's count by default).
        tol: if given, stop after a cycle in which every sample's |eigenvalue| moved by
            at most tol * |eigenvalue| (one host sync per cycle).

    Returns:
        (unit vector with z0's structure spanning the dominant eigenspace with its
        partner, |eigenvalue| of shape (B,)).
    """
    f0s = (f0,) if torch.is_tensor(f0) else tuple(f0)
    z0s = (z0,) if torch.is_tensor(z0) else tuple(z0)
    if not all(z.requires_grad for z in z0s):
        raise ValueError("power_method: z0 must require grad and f0 must be computed from it")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"power_method: n_iters must be an int >= 1, got {n_iters!r}")

    def jt(v: torch.Tensor) -> torch.Tensor:  # J^T v for every sample, (B, D)
        grads = torch.autograd.grad(f0s, z0s, _split(v, f0s), retain_graph=True,
                                    allow_unused=True)
        return _per_sample([torch.zeros_like(z) if g is None else g for g, z in zip(grads, z0s)])

    v = _per_sample([torch.randn_like(f) for f in f0s])
    v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
    # An orthogonalised product this small relative to the product is rounding: the basis
    # spans an invariant subspace, and the next vector is 0 (else the Ritz values of the
    # rest would be noise).
    breakdown = 100 * torch.finfo(v.dtype).eps
    value, left = None, n_iters
    while left > 0:
        size = min(KRYLOV_SIZE, left)
        left -= size
        basis = [v]
        hess = v.new_zeros(v.shape[0], size + 1, size)
        for j in range(size):
            w = jt(basis[j])
            scale = w.norm(dim=1)
            stacked = torch.stack(basis, dim=1)  # (B, j + 1, D)
            for _ in range(2):  # classical Gram-Schmidt, twice (stable to rounding)
                h = torch.bmm(stacked, w.unsqueeze(2)).squeeze(2)  # (B, j + 1)
                w = w - torch.bmm(h.unsqueeze(1), stacked).squeeze(1)
                hess[:, :j + 1, j] += h
            norm = w.norm(dim=1)
            hess[:, j + 1, j] = norm
            keep = norm > breakdown * scale
            basis.append(torch.where(keep[:, None], w / norm.clamp_min(torch.finfo(w.dtype).tiny)[:, None],
                                     torch.zeros_like(w)))
        ritz, vectors = torch.linalg.eig(hess[:, :size])  # (B, size), (B, size, size)
        modulus = ritz.abs()
        top = modulus.argmax(dim=1)
        new_value = modulus.gather(1, top[:, None]).squeeze(1)
        coeffs = vectors.gather(2, top[:, None, None].expand(-1, size, 1)).squeeze(2)  # (B, size)
        ritz_vector = torch.bmm(coeffs.unsqueeze(1),
                                torch.stack(basis[:size], dim=1).to(coeffs.dtype)).squeeze(1)
        # Re and Im of the dominant Ritz vector span its (real) invariant plane.
        restart = ritz_vector.real + ritz_vector.imag
        v = restart / restart.norm(dim=1, keepdim=True).clamp_min(torch.finfo(v.dtype).tiny)
        converged = (tol is not None and value is not None
                     and bool(((new_value - value).abs() <= tol * new_value).all()))
        value = new_value
        if converged:
            break
    vector = _split(v, z0s)
    eigvec = vector[0] if torch.is_tensor(z0) else tuple(vector)
    return eigvec, value.to(v.dtype)
