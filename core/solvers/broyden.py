"""Limited-memory Broyden's method ("good" Broyden) for g(x) = f(x) - x = 0, compact form.

With the last n <= m steps s_i = x_{i+1} - x_i and residual changes y_i = g(x_{i+1}) - g(x_i)
as the columns of S and Y, good Broyden started from the Jacobian estimate B_0 = -I is,
in the compact form of Byrd, Nocedal and Schnabel (1994),

    B = -I + (Y + S) N^{-1} S^T,    N_ij = s_i . s_j if i <= j (in time order) else 0,

and by the Woodbury identity the quasi-Newton step -B^{-1} g is

    g + P M^{-1} (S^T g),     P = Y + S,     M = N - S^T P   (n x n).

The columns of P are p_i = f(x_{i+1}) - f(x_i), so the ring stores S and P (not Y): each
step reads the ring three times (S with s, p and g stacked; P with s; P for the step).

S, P live in a preallocated ring of m slots (default 20): when it is full the oldest pair
is overwritten, so memory is O(m B D) whatever `max_iter` is, and the estimate is exactly
good Broyden built from the last m pairs (dropping a pair from TorchDEQ's rank-one sum
instead leaves the later pairs inconsistent, and the iteration can blow up). The loop
keeps K = -M = S^T P - N and computes the step as g - P K^{-1} (S^T g), one `baddbmm`.
K is kept one row and column per step: the newest pair's column is s_i . p - s_i . s
(every other pair is older) and its row s . p_j, so no mask or Gram rebuild runs per
step; the entries between the other pairs do not change, and a dropped pair's row and
column are overwritten by the new pair's. K is solved per sample with `linalg.solve_ex`
(no error check, no host sync); non-finite coefficients (a singular K, e.g. after a zero
step of a frozen sample) are zeroed, so that sample takes the plain fixed-point step g.
There is no line search: one `func` call per step. States in float16/bfloat16 are
iterated in float32 (only `func` sees the state dtype).
"""
from __future__ import annotations

import torch

from .problem import FixedPointProblem
from . import workspace
from .registry import register_solver
from .stat import finite_on_host, is_narrow, row_mix

__all__ = ["broyden"]


def broyden(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None,
            return_final=False, m=20, LBFGS_thres=None, sync_free=False,
            batch_independent=False, whole_state=False, **kwargs):
    """Limited-memory Broyden's method for z = f(z); one `func` call per step.

    Step k evaluates g at x_k (x_1 = x0) and returns x_k (as TorchDEQ), whose residuals
    are ||f(x_k) - x_k|| and ||f(x_k) - x_k|| / (||f(x_k)|| + 1e-9).

    Args:
        m: number of (s, y) pairs kept (>= 1), oldest dropped when full.
        LBFGS_thres: TorchDEQ's name for m; when given it sets m.
        Other arguments as `core.solvers.fixed_point_iter`.

    Returns:
        (z, states_at_indexing, info) as `fixed_point_iter`.
    """
    p = FixedPointProblem("broyden", func, x0, max_iter, tol, stop_mode, indexing,
                          return_final, sync_free, batch_independent, whole_state, kwargs)
    if LBFGS_thres is not None:
        m = LBFGS_thres
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"broyden: m (number of stored pairs) must be an int >= 1, got {m!r}")

    tracker = p.tracker()
    sdt, wdt, want = p.stat_dtype, p.work_dtype, p.want
    low_precision = wdt != p.dtype
    captured = p.start_captures(p.z0)

    batch, dim = p.z0.shape
    device = p.z0.device
    with (workspace.lend((2, batch, m, dim), wdt, device) as pairs,
          workspace.lend((batch, 3, dim), wdt, device) as stage,
          workspace.lend((batch, 1, dim), wdt, device) as step_out):
        ring = _PairRing(pairs, stage, step_out, sync_free=p.sync_free)
        x = p.z0.to(wdt)
        x_prev = fx_prev = step = None
        for k in range(1, p.max_iter + 1):
            if step is not None:
                x = tracker.freeze(x + step, x)  # a new tensor: the tracker may keep it as best
            if low_precision:
                x_state = x.to(p.dtype)
                x = x_state.to(wdt)
                fx = p.call(x_state, tracker).to(wdt)
            else:
                x_state = x
                fx = p.call(x, tracker)
            g = ring.residual(fx, x)
            abs_out, norm_out = tracker.outputs(k)
            tracker.observe(k, x_state, torch.linalg.vector_norm(g, dim=1, dtype=sdt, out=abs_out),
                            torch.linalg.vector_norm(fx, dim=1, dtype=sdt, out=norm_out))
            if k in want:
                captured[k] = tracker.best
            if tracker.done or k == p.max_iter:
                break
            if x_prev is None:
                step = g  # no pairs yet: B = -I, a plain fixed-point step
            else:
                step = ring.add_and_step(x, x_prev, fx, fx_prev, g)
            x_prev, fx_prev = x, fx
    return p.result(tracker, captured)


class _PairRing:
    """The last m pairs (s_i, p_i) per sample, the matrix K = -M, and the Broyden step.

    Works in three lent buffers: `pairs` (2, B, m, D) holds S and P by slot; in eager mode
    `stage` (B, 3, D) holds the newest s, p and g, so one product reads the ring of S for
    all three, and `step_out` (B, 1, D) receives the step. Sync-free mode writes none of
    them with `out=` (torch.compile rejects it for strided views) and stacks s, p, g
    instead. On CPU a view costs as much as a small kernel, so the views each step reads
    are made once per (slot, size) and kept.
    """

    def __init__(self, pairs, stage, step_out, sync_free=False):
        batch, self.m = pairs.shape[1], pairs.shape[2]
        self.sync_free = sync_free
        # Only the first min(count, m) slots are ever read, all written first: no zero fill.
        self.pairs = pairs
        self.s, self.p = pairs.unbind(0)
        self.stage = stage
        self.stage_rows = stage.unbind(1)  # s, p, g: (B, D) each
        self.stage_sp = stage[:, :2].transpose(0, 1)  # (2, B, D), as a slot of `pairs`
        self.step_out = step_out
        self.step_flat = step_out.squeeze(1)
        self.g_row = stage[:, 2:3]
        self.system = pairs.new_zeros(batch, self.m, self.m)  # K, by slot
        self.zero = pairs.new_zeros(())
        self.count = 0  # pairs added so far (host int: the loop's step count, never a sync)
        self._views: dict[tuple[int, int], tuple] = {}

    def residual(self, fx, x) -> torch.Tensor:
        """g = f(x) - x (in eager mode written into the stage, for the next step's product)."""
        if self.sync_free:
            return fx - x
        return torch.sub(fx, x, out=self.stage_rows[2])

    def _slot_views(self, slot: int, n: int) -> tuple:
        views = self._views.get((slot, n))
        if views is None:
            s_hist, p_hist = self.s[:, :n], self.p[:, :n]
            views = (self.pairs[:, :, slot], s_hist.transpose(1, 2), p_hist,
                     p_hist.transpose(1, 2), self.system[:, slot:slot + 1, :n],
                     self.system.transpose(1, 2)[:, slot:slot + 1, :n], self.system[:, :n, :n],
                     self.s[:, slot:slot + 1])
            self._views[(slot, n)] = views
        return views

    def add_and_step(self, x, x_prev, fx, fx_prev, g) -> torch.Tensor:
        """Store s = x - x_prev, p = f(x) - f(x_prev) over the oldest slot; return -B^{-1} g.

        The dots of s, p and g with every stored s come from one product (the ring of S is
        read once); the row and column of K for the new slot are written in place.
        """
        slot = self.count % self.m
        self.count += 1
        n = min(self.count, self.m)
        pair, s_hist_t, p_hist, p_hist_t, k_row, k_column, k_n, s_row = self._slot_views(slot, n)
        if self.sync_free:
            s, p = x - x_prev, fx - fx_prev
            self.s[:, slot] = s
            self.p[:, slot] = p
            stage = torch.stack((s, p, g), dim=1)
            s_row = s.unsqueeze(1)
        else:
            stage = self.stage
            torch.sub(x, x_prev, out=self.stage_rows[0])
            torch.sub(fx, fx_prev, out=self.stage_rows[1])
            pair.copy_(self.stage_sp)  # s and p into the ring: one copy
        with_s = torch.bmm(stage, s_hist_t)  # (B, 3, n): s_i . s, s_i . p, s_i . g
        ss, ps, gs = with_s.split(1, dim=1)
        if self.sync_free:
            self.system[:, slot:slot + 1, :n] = torch.bmm(s_row, p_hist_t)
            self.system.transpose(1, 2)[:, slot:slot + 1, :n] = ps - ss
        else:
            k_row.copy_(torch.bmm(s_row, p_hist_t))  # s . p_j (bmm into a strided out= is 2x slower)
            torch.sub(ps, ss, out=k_column)  # s_i . p - s_i . s, the diagonal too
        coeffs = torch.linalg.solve_ex(k_n, gs.transpose(1, 2))[0].transpose(1, 2)  # (B, 1, n)
        if not finite_on_host(coeffs):
            # Finite iff their sum is, and x - x == 0 iff x is finite: fewer ops than
            # isfinite + all.
            total = coeffs.sum(dim=2, keepdim=True)
            coeffs = torch.where((total - total) == self.zero, coeffs, self.zero)
        g_row = g.unsqueeze(1) if self.sync_free else self.g_row
        if is_narrow(p_hist):
            return torch.sub(g_row, row_mix(coeffs, p_hist)).squeeze(1)
        if self.sync_free:
            return torch.baddbmm(g_row, coeffs, p_hist, alpha=-1.0).squeeze(1)
        torch.baddbmm(g_row, coeffs, p_hist, alpha=-1.0, out=self.step_out)
        return self.step_flat


register_solver("broyden", broyden)
