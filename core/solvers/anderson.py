"""Anderson acceleration with a preallocated ring of the last m iterates.

Each step mixes the last n = min(k - 1, m) evaluations: with residuals g_i = f(x_i) - x_i,
weights alpha minimise ||sum_i alpha_i g_i|| subject to sum_i alpha_i = 1, and the next
iterate is sum_i alpha_i f(x_i) - (1 - tau) sum_i alpha_i g_i (tau = 1: undamped).

The weights come from the small system (G G^T + reg I) w = 1, alpha = w / sum(w), solved
by a Cholesky factorisation without error checks (`cholesky_ex`), so a singular history
never raises and never synchronises with the host. `reg = lam * mean(diag(G G^T))` is
relative to the history's scale (TorchDEQ's lam is absolute, so it dominates once the
residuals are small); a failed or non-finite solve falls back to the plain fixed-point
step for that sample. The Gram matrix is kept up to date one row per step (O(m B D)
instead of recomputing O(m^2 B D)), and states in float16/bfloat16 are iterated in float32
(only `func` sees the state dtype), so the least-squares solve runs in float32.
"""
from __future__ import annotations

import torch

from .problem import FixedPointProblem
from .registry import register_solver
from .stat import residuals, stat_dtype

__all__ = ["anderson"]


def anderson(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None,
             return_final=False, m=6, lam=1e-4, tau=1.0, sync_free=False,
             batch_independent=False, whole_state=False, **kwargs):
    """Anderson acceleration for z = f(z); one `func` call per step.

    Step k evaluates f at the mixed iterate x_k (x_1 = x0) and returns f(x_k) (as TorchDEQ),
    whose residuals are ||f(x_k) - x_k|| and ||f(x_k) - x_k|| / (||f(x_k)|| + 1e-9).

    Args:
        m: history size (>= 1); lam: regularisation relative to the history scale (>= 0);
        tau: damping (> 0). Other arguments as `core.solvers.fixed_point_iter`.

    Returns:
        (z, states_at_indexing, info) as `fixed_point_iter`.
    """
    p = FixedPointProblem("anderson", func, x0, max_iter, tol, stop_mode, indexing,
                          return_final, sync_free, batch_independent, whole_state, kwargs)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"anderson: m (history size) must be an int >= 1, got {m!r}")
    if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not lam >= 0:
        raise ValueError(f"anderson: lam (regularisation) must be a number >= 0, got {lam!r}")
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau > 0:
        raise ValueError(f"anderson: tau (damping) must be a number > 0, got {tau!r}")

    tracker = p.tracker()
    sdt = stat_dtype(p.dtype)
    wdt = p.work_dtype
    low_precision = wdt != p.dtype
    want = set(p.indexing)
    captured = {0: p.z0} if 0 in want else {}

    batch, dim = p.z0.shape
    hist_f = p.z0.new_empty((batch, m, dim), dtype=wdt)  # f(x_i)
    hist_g = p.z0.new_empty((batch, m, dim), dtype=wdt)  # g_i = f(x_i) - x_i
    gram = p.z0.new_zeros((batch, m, m), dtype=wdt)  # g_i . g_j
    x = p.z0.to(wdt)
    for k in range(1, p.max_iter + 1):
        if k > 1:
            n = min(k - 1, m)
            alpha = _mixing_weights(gram[:, :n, :n], lam, (k - 2) % m)
            x_mix = torch.bmm(alpha.unsqueeze(1), hist_f[:, :n]).squeeze(1)
            if tau != 1.0:
                x_mix = torch.baddbmm(x_mix.unsqueeze(1), alpha.unsqueeze(1), hist_g[:, :n],
                                      alpha=tau - 1.0).squeeze(1)
            x = tracker.freeze(x_mix, x)
        if low_precision:
            x_state = x.to(p.dtype)
            fx_state = p.call(x_state, tracker)
            x = x_state.to(wdt)
            fx = fx_state.to(wdt)
        else:
            fx_state = fx = p.call(x, tracker)
        g = fx - x
        slot = (k - 1) % m
        hist_f[:, slot] = fx
        hist_g[:, slot] = g
        n = min(k, m)
        row = torch.bmm(hist_g[:, :n], g.unsqueeze(2)).squeeze(2)
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        abs_res, rel_res = residuals(fx, g, sdt)
        tracker.observe(k, fx_state, abs_res, rel_res)
        if k in want:
            captured[k] = tracker.best
        if tracker.done:
            break
    tracker.nfe = p.nfe
    return p.unpack(tracker.best), p.states_at(captured, tracker.best), tracker.info()


def _mixing_weights(gram: torch.Tensor, lam: float, newest: int) -> torch.Tensor:
    """Weights alpha (B, n), summing to 1, minimising ||sum alpha_i g_i||; never raises.

    Solves (G G^T + reg I) w = 1 with reg = lam * mean diagonal (+ a tiny floor so an
    all-zero history stays positive definite); a sample whose solve fails or is not finite
    gets the plain fixed-point weights (1 on the newest entry).
    """
    n = gram.shape[-1]
    if n == 1:
        return torch.ones_like(gram[:, :, 0])
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1)
    reg = lam * scale + torch.finfo(gram.dtype).tiny ** 0.5
    system = gram + reg.view(-1, 1, 1) * eye
    chol, info = torch.linalg.cholesky_ex(system)
    ones = torch.ones_like(gram[:, :, :1])
    w = torch.cholesky_solve(ones, chol).squeeze(2)
    alpha = w / w.sum(dim=1, keepdim=True)
    good = (info == 0) & torch.isfinite(alpha).all(dim=1)
    plain = torch.zeros(n, dtype=gram.dtype, device=gram.device)
    plain[newest] = 1.0
    return torch.where(good.unsqueeze(1), alpha, plain)


register_solver("anderson", anderson)
