"""Anderson acceleration with a preallocated ring of the last m iterates.

Each step mixes the last n = min(k - 1, m) evaluations: with residuals g_i = f(x_i) - x_i,
weights alpha minimise ||sum_i alpha_i g_i|| subject to sum_i alpha_i = 1, and the next
iterate is sum_i alpha_i f(x_i) - (1 - tau) sum_i alpha_i g_i (tau = 1: undamped).

The weights come from the small system (G G^T + reg) w = 1, alpha = w / sum(w), solved
without error checks (`solve_ex` for small histories, `cholesky_ex` for larger), so a
singular history never raises and never synchronises with the host. reg adds lam ||g_i||^2 to each
diagonal entry: relative to the history's scale (TorchDEQ's lam is absolute, so it
dominates once the residuals are small); a failed or non-finite solve falls back to the
plain fixed-point step for that sample. The Gram matrix is kept up to date one row per step (O(m B D)
instead of recomputing O(m^2 B D)), and states in float16/bfloat16 are iterated in float32
(only `func` sees the state dtype), so the least-squares solve runs in float32.
"""
from __future__ import annotations

import torch

from .problem import FixedPointProblem
from .registry import register_solver
from . import workspace
from .stat import row_dots, row_mix, stat_dtype

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
    # The history, and two buffers the mixed iterates alternate in (func gets one while
    # the other holds the previous iterate, which a frozen sample keeps).
    with (workspace.lend((2, batch, m, dim), wdt, p.z0.device) as history,
          workspace.lend((2, batch, dim), wdt, p.z0.device) as iterates):
        hist_f, hist_g = history.unbind(0)  # f(x_i) and g_i = f(x_i) - x_i
        mixer = _Mixer(batch, m, lam, wdt, p.z0.device, unrolled=p.sync_free)
        x = p.z0.to(wdt)
        for k in range(1, p.max_iter + 1):
            if k > 1:
                n = min(k - 1, m)
                alpha = mixer.weights(n, (k - 2) % m)
                x_mix = row_mix(alpha, hist_f[:, :n], out=None if p.sync_free else iterates[k % 2])
                if tau != 1.0:
                    x_mix = x_mix.add_(row_mix(alpha, hist_g[:, :n]), alpha=tau - 1.0)
                x = tracker.freeze(x_mix, x)
            if low_precision:
                x_state = x.to(p.dtype)
                fx_state = p.call(x_state, tracker)
                x = x_state.to(wdt)
                fx = fx_state.to(wdt)
            else:
                fx_state = fx = p.call(x, tracker)
            slot = (k - 1) % m
            hist_f[:, slot] = fx
            if p.sync_free:  # torch.compile rejects `out=` into a strided view
                g = fx - x
                hist_g[:, slot] = g
            else:
                g = torch.sub(fx, x, out=hist_g[:, slot])
            dots = row_dots(g, hist_g[:, :min(k, m)])
            mixer.add(slot, dots)
            # ||g||^2 is the new diagonal entry of the Gram matrix: no separate pass over g.
            tracker.observe(k, fx_state, dots[:, slot].sqrt(),
                            torch.linalg.vector_norm(fx, dim=1, dtype=sdt))
            if k in want:
                captured[k] = tracker.best
            if tracker.done:
                break
    return p.result(tracker, captured)


class _Mixer:
    """The regularised Gram matrix of the residual history and the mixing weights.

    The diagonal is stored already regularised, ||g_i||^2 (1 + lam) + a tiny floor (so
    an all-zero history stays positive definite): regularisation relative to each
    residual's scale, at no cost per step.

    `unrolled` (sync-free mode) solves with `_spd_solve_unrolled` instead of LAPACK/MAGMA:
    on CUDA, the batched `cholesky_solve` cannot be captured in a CUDA graph (measured:
    "operation not permitted when stream is capturing"), and the unrolled solve compiles
    into a few fused kernels.
    """

    def __init__(self, batch, m, lam, dtype, device, unrolled=False):
        self.unrolled = unrolled
        self.gram = torch.zeros(batch, m, m, dtype=dtype, device=device)
        self.scale = 1.0 + lam
        self.floor = torch.finfo(dtype).tiny ** 0.5
        self.ones = torch.ones(batch, m, 1, dtype=dtype, device=device)
        self.eye = torch.eye(m, dtype=dtype, device=device)

    def add(self, slot: int, row: torch.Tensor) -> None:
        """Entry `slot` of the history changed; `row` (B, n) are its dots with entries 0..n-1."""
        n = row.shape[1]
        self.gram[:, slot, :n] = row
        self.gram[:, :n, slot] = row
        self.gram[:, slot, slot] = row[:, slot] * self.scale + self.floor

    def weights(self, n: int, newest: int) -> torch.Tensor:
        """alpha (B, n), summing to 1, minimising ||sum_i alpha_i g_i||; never raises.

        Solves (G G^T + reg) w = 1 and sets alpha = w / sum(w); a sample whose
        factorisation fails or whose weights are not finite gets the plain fixed-point
        weights (1 on the newest entry).
        """
        if n == 1:
            return self.ones[:, :1, 0]
        gram = self.gram[:, :n, :n]
        if self.unrolled:
            w = _spd_solve_unrolled(gram, self.ones[:, :n, 0], self.floor)
            failed = None
        else:
            w, failed = _spd_solve_ex(gram, self.ones[:, :n])
        alpha = w / w.sum(dim=1, keepdim=True)
        # The weights are finite iff their sum is (a NaN or inf entry makes it NaN or inf),
        # and x - x == 0 iff x is finite: two ops on (B, 1) instead of isfinite + all.
        total = alpha.sum(dim=1, keepdim=True)
        good = (total - total) == 0
        if failed is not None:
            good = good & ~failed.unsqueeze(1)
        return torch.where(good, alpha, self.eye[newest, :n])  # row `newest`: plain weights


# Up to this size, a batched LU solve (`solve_ex`, one call) is faster on CPU than
# `cholesky_ex` + `cholesky_solve` (measured, B=512: n=2..6: 110-215 us vs 195-290 us);
# for larger n Cholesky wins (n=20: 1.9 ms vs 3.7 ms).
_LU_MAX_N = 8


def _spd_solve_ex(a: torch.Tensor, b: torch.Tensor):
    """Solve a x = b for a batch of SPD matrices without error checks.

    Returns (x (B, n), failed): `failed` (B,) flags a failed Cholesky factorisation (its
    output can be finite garbage), or is None for the LU solve, whose only failure, an
    exactly zero pivot, divides by zero and so shows in x as inf or NaN.
    """
    if a.shape[-1] <= _LU_MAX_N:
        return torch.linalg.solve_ex(a, b)[0].squeeze(2), None
    chol, info = torch.linalg.cholesky_ex(a)
    return torch.cholesky_solve(b, chol).squeeze(2), info != 0


def _spd_solve_unrolled(a: torch.Tensor, b: torch.Tensor, floor: float) -> torch.Tensor:
    """Solve a x = b for a batch of small SPD matrices (B, n, n) with plain tensor ops.

    A Cholesky factorisation unrolled over the n columns, then the two triangular solves;
    a pivot below `floor` is raised to it, so the solve never fails. Capturable in CUDA
    graphs and fusible by torch.compile (n is a Python int).
    """
    n = a.shape[-1]
    chol = torch.zeros_like(a)
    for j in range(n):
        col = a[:, j:, j] - (chol[:, j:, :j] * chol[:, j:j + 1, :j]).sum(dim=2)
        head = col[:, :1].clamp_min(floor)
        chol[:, j:, j] = torch.cat((head, col[:, 1:]), dim=1) / head.sqrt()
    y = []
    for i in range(n):  # chol y = b
        acc = b[:, i]
        for k in range(i):
            acc = acc - chol[:, i, k] * y[k]
        y.append(acc / chol[:, i, i])
    x = [None] * n
    for i in reversed(range(n)):  # chol^T x = y
        acc = y[i]
        for k in range(i + 1, n):
            acc = acc - chol[:, k, i] * x[k]
        x[i] = acc / chol[:, i, i]
    return torch.stack(x, dim=1)


register_solver("anderson", anderson)
