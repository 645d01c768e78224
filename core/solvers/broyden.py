"""Limited-memory Broyden's method ("good" Broyden) for g(x) = f(x) - x = 0, compact form.

With the last n <= m steps s_i = x_{i+1} - x_i and residual changes y_i = g(x_{i+1}) - g(x_i)
as the columns of S and Y, good Broyden started from the Jacobian estimate B_0 = -I is,
in the compact form of Byrd, Nocedal and Schnabel (1994),

    B = -I + (Y + S) N^{-1} S^T,    N_ij = s_i . s_j if i <= j (in time order) else 0,

and by the Woodbury identity the quasi-Newton step -B^{-1} g is

    g + P M^{-1} (S^T g),     P = Y + S,     M = N - S^T P   (n x n).

The columns of P are p_i = f(x_{i+1}) - f(x_i), so the ring stores S and P (not Y). The
loop keeps K = -M = S^T P - N and computes the step as g - P K^{-1} (S^T g). K gains one
row and column per step: the newest pair's column is s_i . p - s_i . s (every other pair
is older) and its row s . p_j; the entries between the other pairs do not change. K is
solved per sample by numpy's LU on its memory for batches up to 64 on CPU, else with
`linalg.solve_ex` (no error check, no host sync); non-finite coefficients (a singular
K) are zeroed, so that sample takes the plain fixed-point step g.

Memory is a ring of m + 1 slots of (s, p) rows, interleaved, so that each step reads it
twice (one product, then P for the step) and copies nothing into it:

- the step is computed where the next s goes (s_i is the step x_{i+1} - x_i itself), and
  g is written into that row first (the step overwrites it);
- the newest s, p and g are then three consecutive rows, and one product of them with
  the slots in use gives every dot the step needs (S^T s, S^T p, S^T g and s . P);
- the slot after the newest pair is a spare that holds g: once the ring is full it is
  the oldest pair, dropped. Its row of K is set to the unit row and its entry of S^T g
  to 0, so its coefficient is exactly 0 and the rest is the system of the other m pairs:
  exactly good Broyden built from the last m pairs, whatever `max_iter` is (dropping a
  pair from TorchDEQ's rank-one sum instead leaves the later pairs inconsistent, and
  the iteration can blow up).

A frozen sample (converged or caught by the safety net) does not move, but its stored s
is still the step it was offered: its coefficients are never used. States in
float16/bfloat16 are iterated in float32 (only `func` sees the state dtype), and there
s is the difference of the rounded states, not the step. There is no line search: one
`func` call per step.

Under torch.compile (no autograd, on CPU by default) steps 2..max_iter are one
`torch.while_loop` that stops when no sample is active (`FixedPointProblem.while_active`):
the ring slot is a tensor there, the ring and K are written in place, and one opaque
operator that reads the number of slots in use on the host forms the products with the
ring, solves K and mixes the step over those slots only, as the eager loop does, the
spare masked once the ring is full (`_PairRing.add_and_step_at`, `_ring_step`).
"""
from __future__ import annotations

import torch

from .problem import FixedPointProblem
from . import workspace
from .registry import register_solver
from .stat import finite_on_host, host_solve, is_narrow, row_mix, solve_small, solves_on_host

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
                          return_final, sync_free, batch_independent, whole_state, kwargs,
                          complex_ok=False)
    if LBFGS_thres is not None:
        m = LBFGS_thres
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"broyden: m (number of stored pairs) must be an int >= 1, got {m!r}")

    p.differentiable = False
    tracker = p.tracker()
    wdt = p.work_dtype
    captured = p.start_captures(p.z0)

    batch, dim = p.z0.shape
    device = p.z0.device
    build = lambda: _PairRing(m, batch, dim, wdt, device)  # noqa: E731
    if p.traced:  # no `with` around the loop: dynamo cannot resume a graph break inside one
        tracker, nfe = _iterate(p, tracker, captured, build())
    else:
        with workspace.reuse(("broyden", m, batch, dim, wdt, device),
                             _PairRing.nbytes(m, batch, dim, wdt), device, build) as ring:
            tracker, nfe = _iterate(p, tracker, captured, ring)
    return p.result(tracker, captured, nfe)


def _iterate(p: FixedPointProblem, tracker, captured: dict, ring: "_PairRing"):
    """Broyden's loop: feeds `tracker` and `captured` (states at `indexing`). Returns the
    tracker holding the result and the number of `func` calls (None: counted by `p`)."""
    sdt, wdt, want = p.norm_dtype, p.work_dtype, p.want
    low_precision = wdt != p.dtype
    ring.start(p.sync_free)
    x = p.z0.to(wdt)
    x_prev = fx_prev = step = None
    peel = p.early_exit_loop  # step 1 here (it may set dropout masks), the rest in a while loop
    for k in range(1, (min(p.max_iter, 1) if peel else p.max_iter) + 1):
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
            step = g  # no pairs yet: B = -I, a plain fixed-point step (and s of pair 0)
        else:
            step = ring.add_and_step(fx, fx_prev, (x, x_prev) if low_precision else None)
        x_prev, fx_prev = x, fx
    if peel and p.max_iter > 1:  # step 1's step is g, already s_0 in row 0
        # the pair before step 2 is a dummy, never read (`_step`)
        state = (x, g, fx, torch.zeros_like(fx)) + ((torch.zeros_like(x),) if low_precision else ())
        return p.while_active(tracker, captured, state,
                              lambda k, t, state: _step(p, t, k, state, ring))
    return tracker, None


def _step(p: FixedPointProblem, t, k, state: tuple, ring: "_PairRing") -> tuple:
    """Step k (a 0-dim tensor) of a compiled solve's while loop: the Broyden step from step
    k - 1's iterate x, residual g, f(x) and pair p = f(x) - f(x_prev) (and s = x - x_prev in
    low precision), as `_iterate` computes it after step k - 1, then step k's `func` call.
    The ring's memory and K are written in place (`_PairRing.add_and_step_at`). The step
    comes first in the body, as Anderson's mixing does, so that the iteration that ends the
    loop does not solve for a step nobody takes (computed last, one ring step of the 11 of
    a tanh32 solve was wasted).

    At k = 2 no pair is stored yet: `add_and_step_at` with count -1 uses no slot and
    returns g (the dummy pair it writes into the last slot is rewritten before that slot
    is read)."""
    wdt = p.work_dtype
    low_precision = wdt != p.dtype
    x_prev, g_prev, fx_prev, p_new = state[:4]
    step = ring.add_and_step_at(k - 3, g_prev, p_new, state[4] if low_precision else None)
    x = t.freeze(x_prev + step, x_prev)
    if low_precision:
        x_state = x.to(p.dtype)
        x = x_state.to(wdt)
        fx = p.call_pure(x_state).to(wdt)
    else:
        x_state = x
        fx = p.call_pure(x)
    g = fx - x
    t.observe(k, x_state, torch.linalg.vector_norm(g, dim=1, dtype=p.norm_dtype),
              torch.linalg.vector_norm(fx, dim=1, dtype=p.norm_dtype))
    return (x, g, fx, fx - fx_prev) + ((x - x_prev,) if low_precision else ())


class _PairRing:
    """The last m pairs (s_i, p_i) per sample, the matrix K = -M, and the Broyden step.

    Its `memory` (2(m + 1) + 1, B, D) holds slot j's s_j in row 2j and p_j in row 2j + 1,
    row-major: each row is one contiguous (B, D) block, which the products read with a
    leading dimension of B * D, and the step is written contiguously (into a strided
    output, `baddbmm` loops over the samples, 2x slower). The last row stands in for row 0
    when the newest pair is in the last slot (so that its s, p and g stay consecutive),
    and the step written there is copied to row 0.

    Every row and every entry of K a solve reads, it has written first (the spare's stale
    p only with a coefficient of exactly 0), so nothing is zero-filled and the ring, with
    the views cut from it, serves solve after solve (`workspace.reuse`): on CPU a view
    costs as much as a small kernel. In eager mode the rows are written with `out=`;
    sync-free mode assigns them (torch.compile rejects `out=` on strided views).
    """

    def __init__(self, m, batch, dim, dtype, device):
        self.m, self.slots = m, m + 1
        self.memory = torch.empty(2 * self.slots + 1, batch, dim, dtype=dtype, device=device)
        self.rows = self.memory.unbind(0)  # (B, D) each
        self.system = torch.empty(batch, self.slots, self.slots, dtype=dtype, device=device)  # K
        self.dots = torch.empty(batch * 3 * 2 * self.slots, dtype=dtype, device=device)
        self.unit = torch.eye(self.slots, dtype=dtype, device=device)
        self.others = 1.0 - self.unit  # row j masks out entry j
        self.zero = torch.zeros((), dtype=dtype, device=device)
        self.on_host = solves_on_host(self.system)  # K solved by numpy, sharing its memory
        self._views: dict[tuple[int, int], tuple] = {}
        self.start(sync_free=False)

    @staticmethod
    def nbytes(m: int, batch: int, dim: int, dtype: torch.dtype) -> int:
        slots = m + 1
        return ((2 * slots + 1) * batch * dim + batch * slots * (slots + 6)) * dtype.itemsize

    def start(self, sync_free: bool) -> None:
        """Empty the ring for a new solve."""
        self.sync_free = sync_free
        self.count = 0  # pairs added so far (host int: the loop's step count, never a sync)
        self.g_index = None  # memory row of the current g

    def residual(self, fx, x) -> torch.Tensor:
        """g = f(x) - x, written into the row of the next s (the step overwrites it)."""
        self.g_index = 0 if self.g_index is None else 2 * (self.count % self.slots) + 2
        if self.sync_free:
            g = fx - x
            self.memory[self.g_index] = g
            return g
        return torch.sub(fx, x, out=self.rows[self.g_index])

    def _slot_views(self, slot: int, n: int) -> tuple:
        """Views of the memory, K and the products for the newest pair in `slot` and `n`
        slots in use (numpy views of K and the right-hand side on the host, else None)."""
        views = self._views.get((slot, n))
        if views is None:
            memory, system = self.memory, self.system
            dots = self.dots[:memory.shape[1] * 3 * 2 * n].view(-1, 3, 2 * n)
            views = (memory[2 * slot:2 * slot + 3].transpose(0, 1),  # s, p, g: (B, 3, D)
                     memory[:2 * n].permute(1, 2, 0),  # s_0, p_0, s_1, ...: (B, D, 2n)
                     memory[1:2 * n:2].transpose(0, 1),  # P: (B, n, D)
                     memory[2 * slot + 2].unsqueeze(1),  # g, then the step: (B, 1, D)
                     system[:, slot, :n], system[:, :n, slot], system[:, :n, :n],
                     dots, dots[:, 0, 1::2], dots[:, 1, 0::2], dots[:, 0, 0::2],
                     dots[:, 2, 0::2].unsqueeze(2))
            if self.on_host:
                views += (system.numpy()[:, :n, :n], dots.numpy()[:, 2, 0::2, None])
            else:
                views += (None, None)
            self._views[(slot, n)] = views
        return views

    def add_and_step(self, fx, fx_prev, states=None) -> torch.Tensor:
        """Store p = f(x) - f(x_prev) (and s = x - x_prev if `states` = (x, x_prev) are
        given; else s is the last step, already in place) in the next slot, over the
        oldest pair when full; return the step -B^{-1} g, written where the next s goes."""
        slot = self.count % self.slots
        self.count += 1
        full = self.count > self.m
        n = self.slots if full else self.count
        (stage, ring_t, p_ring, step_row, k_row, k_column, k_n, dots, s_dot_p, p_dot_s,
         s_dot_s, rhs, host_k, host_rhs) = self._slot_views(slot, n)
        spare = (slot + 1) % self.slots
        if self.sync_free:
            self.memory[2 * slot + 1] = fx - fx_prev
            if states is not None:
                self.memory[2 * slot] = states[0] - states[1]
            dots = torch.bmm(stage, ring_t)
            self.system[:, slot, :n] = dots[:, 0, 1::2]
            self.system[:, :n, slot] = dots[:, 1, 0::2] - dots[:, 0, 0::2]
            rhs = dots[:, 2, 0::2].unsqueeze(2)
            if full:
                self.system[:, spare] = self.unit[spare]
                self.system[:, :, spare] = self.unit[spare]
                rhs = rhs * self.others[spare].unsqueeze(1)
        else:
            torch.sub(fx, fx_prev, out=self.rows[2 * slot + 1])
            if states is not None:
                torch.sub(*states, out=self.rows[2 * slot])
            torch.bmm(stage, ring_t, out=dots)  # (B, 3, 2n): [s; p; g] . [s_0, p_0, s_1, ...]
            k_row.copy_(s_dot_p)  # s . p_j
            torch.sub(p_dot_s, s_dot_s, out=k_column)  # s_j . p - s_j . s, the diagonal too
            if full:  # the spare's coefficient is 0, whatever its stale entries
                self.system[:, spare].copy_(self.unit[spare])
                self.system[:, :, spare].copy_(self.unit[spare])
                rhs[:, spare].zero_()
        solution = None if self.sync_free or host_k is None else host_solve(host_k, host_rhs)
        if solution is not None:
            coeffs = torch.from_numpy(solution.reshape(solution.shape[0], 1, -1))  # (B, 1, n)
        else:
            coeffs = torch.linalg.solve_ex(k_n, rhs)[0].transpose(1, 2)
            if not finite_on_host(coeffs):
                # Finite iff their sum is, and x - x == 0 iff x is finite: fewer ops than
                # isfinite + all.
                total = coeffs.sum(dim=2, keepdim=True)
                coeffs = torch.where((total - total) == self.zero, coeffs, self.zero)
        if self.sync_free:
            step = (torch.sub(step_row, row_mix(coeffs, p_ring)) if is_narrow(p_ring)
                    else torch.baddbmm(step_row, coeffs, p_ring, alpha=-1.0)).squeeze(1)
            self.memory[2 * slot + 2] = step
            if slot == self.m:
                self.memory[0] = step
            return step
        if is_narrow(p_ring):
            torch.sub(step_row, row_mix(coeffs, p_ring), out=step_row)
        else:
            step_row.baddbmm_(coeffs, p_ring, alpha=-1.0)
        step = self.rows[2 * slot + 2]
        if slot == self.m:  # the step went to the last row: slot 0's s is row 0
            self.rows[0].copy_(step)
        return step

    def add_and_step_at(self, count: torch.Tensor, g, p_new, s_new=None):
        """`add_and_step` in a compiled solve's while loop: `count` (a 0-dim tensor) pairs
        are stored, g = f(x) - x is this step's residual, p_new = f(x) - f(x_prev) the new
        pair's p and s_new = x - x_prev its s (None: the last step, in place). At count -1
        (before step 2, no pair yet) the step is g: no slot is in use, and the pair written
        into the last slot is rewritten before it is read. Writes the new pair, its row and
        column of K and the step into the memory and K in place, and returns the step.

        In place: a while loop's body may change a tensor made outside it with grad mode
        off (torch 2.14), as the compiled solves run; carried instead, the whole ring
        (2(m + 1) + 1 rows of (B, D)) was copied at every step, and at m = 20 that copy
        cost three times the rest of the step (tanh d=32, batch 512, measured).

        K (B, m + 1, m + 1) has static shape, but one opaque operator (`_ring_step`) forms
        the products with the ring and solves K over the slots in use only, as the eager
        loop does, so the rows and entries not written yet are never read; once the ring
        is full the spare is masked as in `add_and_step`. The g row of the memory is not
        written (only its dots with the masked slot would read it): the step goes there."""
        memory, system = self.memory, self.system
        slot = count % self.slots
        base = 2 * slot
        memory.index_copy_(0, (base + 1).reshape(1), p_new.unsqueeze(0))
        if s_new is not None:
            memory.index_copy_(0, base.reshape(1), s_new.unsqueeze(0))
        else:
            s_new = memory.index_select(0, base.reshape(1)).squeeze(0)
        stage = torch.stack((s_new, p_new, g), dim=1)  # s, p, g: (B, 3, D)
        step, k_row, k_column = _ring_step(stage, memory, system, count)
        index = slot.reshape(1)
        system.index_copy_(1, index, k_row)
        system.index_copy_(2, index, k_column)
        # the step is the next s: row 2 slot + 2, and row 0 too when that is the last row
        # (the same rows twice when it is not: index_copy_ then writes equal values)
        rows = torch.stack((base + 2, torch.where(slot == self.m, 0, base + 2)))
        memory.index_copy_(0, rows, step.unsqueeze(0).expand(2, -1, -1))
        return step


# A compiled solve's shapes are static, but the ring's slots fill one a step: reading the
# whole ring (2(m + 1) rows of (B, D)) at every step, where eager mode reads the 2n rows in
# use, made the compiled conv cell's Broyden 3x slower than eager (the products are bound
# by memory traffic), and so did solving the whole (m + 1, m + 1) K while a few slots were
# in use. This opaque operator reads on the host how many slots are in use, as the eager
# loop knows it, and touches only those. One operator for the products, the solve and the
# mix, where there were three: fewer kernels in the loop body (3 fused kernels and 1
# operator a step, against 5 and 3), though no faster beyond the noise (measured on tanh32).

@torch.library.custom_op("core::broyden_ring_step", mutates_args=())
def _ring_step(stage: torch.Tensor, memory: torch.Tensor, system: torch.Tensor,
               count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Broyden step of a compiled solve with `count` (a 0-dim tensor) + 1 pairs stored.

    `stage` (B, 3, D) is [s; p; g]: the newest pair, already in slot `count` % slots of the
    ring `memory` (rows of (B, D) as `_PairRing`'s), and this step's residual; `system` is
    K before that pair. Returns (step, K's new row (B, 1, slots), its new column (B,
    slots, 1)), the row and column zero past the slots in use. Reads only the slots in use
    (count + 1, all of them once full, the spare then masked); at count -1 (no pair yet)
    the step is g."""
    batch, slots = system.shape[0], system.shape[1]
    pairs = int(count) + 1
    k_row = stage.new_zeros(batch, 1, slots)
    k_column = stage.new_zeros(batch, slots, 1)
    g = stage[:, 2]
    if pairs <= 0:
        return g.clone(), k_row, k_column
    slot, n = (pairs - 1) % slots, min(pairs, slots)
    dots = torch.bmm(stage, memory[:2 * n].permute(1, 2, 0))  # (B, 3, 2n): [s; p; g] . [s_0, p_0, ...]
    k_row[:, 0, :n] = dots[:, 0, 1::2]  # s . p_j
    k_column[:, :n, 0] = dots[:, 1, 0::2] - dots[:, 0, 0::2]  # s_j . p - s_j . s, the diagonal too
    k = system[:, :n, :n].clone()
    k[:, slot] = k_row[:, 0, :n]
    k[:, :, slot] = k_column[:, :n, 0]
    rhs = dots[:, 2, 0::2].unsqueeze(2)  # S^T g
    if pairs >= slots:  # full: the spare's coefficient is 0, whatever its stale entries
        spare = (slot + 1) % slots
        k[:, spare], k[:, :, spare], k[:, spare, spare] = 0.0, 0.0, 1.0
        rhs = rhs.clone()
        rhs[:, spare] = 0.0
    coeffs = solve_small(k, rhs).transpose(1, 2)  # (B, 1, n)
    if not finite_on_host(coeffs):  # a singular K: that sample takes the plain step g
        total = coeffs.sum(dim=2, keepdim=True)
        coeffs = torch.where((total - total) == 0.0, coeffs, 0.0)
    return g - row_mix(coeffs, memory[1:2 * n:2].transpose(0, 1)).squeeze(1), k_row, k_column


@_ring_step.register_fake
def _ring_step_shape(stage, memory, system, count):
    batch, slots = system.shape[0], system.shape[1]
    return (stage.new_empty(batch, stage.shape[2]), stage.new_empty(batch, 1, slots),
            stage.new_empty(batch, slots, 1))


register_solver("broyden", broyden)
