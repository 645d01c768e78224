"""Anderson acceleration with a preallocated ring of the last m iterates.

Each step mixes the last n = min(k - 1, m) evaluations: with residuals g_i = f(x_i) - x_i,
weights alpha minimise ||sum_i alpha_i g_i|| subject to sum_i alpha_i = 1, and the next
iterate is sum_i alpha_i f(x_i) - (1 - tau) sum_i alpha_i g_i (tau = 1: undamped).

The weights solve the bordered system [[0, 1^T], [1, G G^T + reg]] [nu; alpha] = [1; 0]
(`solve_ex`; for histories longer than 8, (G G^T + reg) w = 1 by `cholesky_ex` and
alpha = w / sum(w)), without error checks, so a singular history never raises and
never synchronises with the host. reg adds lam ||g_i||^2 to each
diagonal entry: relative to the history's scale (TorchDEQ's lam is absolute, so it
dominates once the residuals are small); a failed or non-finite solve falls back to the
plain fixed-point step for that sample. The Gram matrix is kept up to date one row per step (O(m B D)
instead of recomputing O(m^2 B D)), and states in float16/bfloat16 are iterated in float32
(only `func` sees the state dtype), so the least-squares solve runs in float32. Complex
states (complex64/complex128) use the Hermitian Gram matrix G_ij = g_i^H g_j, and the
weights are complex.

Under torch.compile (no autograd, on CPU by default) steps 2..max_iter are one
`torch.while_loop` that stops when no sample is active (`FixedPointProblem.while_active`):
its body mixes the whole history, the entries not filled yet being zeros with a weight
of exactly 0, and writes the ring slot (a tensor) in place with `index_copy_`.
"""
from __future__ import annotations

import torch

from .problem import FixedPointProblem, check_tau
from .registry import register_solver
from . import workspace
from .stat import finite_on_host, host_solve, real_dtype, row_mix, solves_on_host

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
    check_tau("anderson", tau)

    p.differentiable = False
    tracker = p.tracker()
    wdt = p.work_dtype
    captured = p.start_captures(p.z0)

    batch, dim = p.z0.shape
    device = p.z0.device
    key = ("anderson", m, lam, batch, dim, wdt, device, p.sync_free)

    def build():
        return (_History(m, batch, dim, wdt, device, p.sync_free, zeroed=p.early_exit_loop),
                _Mixer(batch, m, lam, wdt, device, unrolled=p.sync_free))

    if p.traced:  # no `with` around the loop: dynamo cannot resume a graph break inside one
        tracker, nfe = _iterate(p, tracker, captured, *build(), m, tau)
    else:
        with workspace.reuse(key, _History.nbytes(m, batch, dim, wdt), device, build) as kept:
            tracker, nfe = _iterate(p, tracker, captured, *kept, m, tau)
    return p.result(tracker, captured, nfe)


def _iterate(p: FixedPointProblem, tracker, captured: dict, ring: "_History", mixer: "_Mixer",
             m: int, tau: float):
    """Anderson's loop: feeds `tracker` and `captured` (states at `indexing`). Returns the
    tracker holding the result and the number of `func` calls (None: counted by `p`)."""
    sdt, wdt, want = p.norm_dtype, p.work_dtype, p.want
    low_precision = wdt != p.dtype
    iterate_memory = ring.iterates_address
    x = p.z0.to(wdt)
    peel = p.early_exit_loop  # step 1 here (it may set dropout masks), the rest in a while loop
    for k in range(1, (min(p.max_iter, 1) if peel else p.max_iter) + 1):
        if k > 1:
            n = min(k - 1, m)
            alpha = mixer.weights(n, (k - 2) % m)
            x_mix = ring.mix(alpha, k % 2)
            if tau != 1.0:
                x_mix = x_mix.add_(ring.mix(alpha, None, residuals=True), alpha=tau - 1.0)
            x = tracker.freeze(x_mix, x)
        if low_precision:
            x_state = x.to(p.dtype)
            fx_state = p.call(x_state, tracker)
            x = x_state.to(wdt)
            fx = fx_state.to(wdt)
        else:
            fx_state = fx = p.call(x, tracker)
            if iterate_memory and fx.untyped_storage().data_ptr() == iterate_memory:
                # func returned (a view of) its input, an iterate buffer: the tracker
                # may keep fx as the best state, so it must not be overwritten later
                fx_state = fx = fx.clone()
        slot = (k - 1) % m
        dots = ring.store(slot, fx, x, min(k, m))
        mixer.add(slot, dots)
        # ||g||^2 is the new diagonal entry of the Gram matrix: no separate pass over g.
        tracker.observe(k, fx_state, dots.select(2, slot).real,
                        torch.linalg.vector_norm(fx, dim=1, dtype=sdt,
                                                 out=tracker.outputs(k)[1]), squared=True)
        if k in want:
            captured[k] = tracker.best
        if tracker.done:
            break
    if peel and p.max_iter > 1:
        return p.while_active(tracker, captured, (x,),
                              lambda k, t, state: _step(p, t, k, state, ring, mixer, m, tau))
    return tracker, None


def _step(p: FixedPointProblem, t, k, state: tuple, ring: "_History", mixer: "_Mixer", m: int,
          tau: float) -> tuple:
    """Step k (a 0-dim tensor) of a compiled solve's while loop: `_iterate`'s step on the
    carried iterate x, with the whole history every step (the entries not filled yet are
    zero and get weight 0). The history f, g (B, m, D) and the Gram matrix (B, m, m) are
    written in place: a while loop's body may change a tensor made outside it with grad
    mode off (torch 2.14), as the compiled solves run; carried, they were copied whole at
    every step."""
    (x,) = state
    f, g, gram = ring.f, ring.g, mixer.gram
    wdt = p.work_dtype
    alpha = mixer.weights_at(gram, torch.clamp(k - 1, max=m), (k - 2) % m)
    x_mix = row_mix(alpha, f).squeeze(1)
    if tau != 1.0:
        x_mix = torch.add(x_mix, row_mix(alpha, g).squeeze(1), alpha=tau - 1.0)
    x = t.freeze(x_mix, x)
    if wdt != p.dtype:
        x_state = x.to(p.dtype)
        fx_state = p.call_pure(x_state)
        x = x_state.to(wdt)
        fx = fx_state.to(wdt)
    else:
        fx_state = fx = p.call_pure(x)
    slot = ((k - 1) % m).reshape(1)
    dots = _History.store_at(f, g, slot, fx, x)
    mixer.add_at(gram, slot, dots)
    t.observe(k, fx_state, dots.index_select(2, slot).real,
              torch.linalg.vector_norm(fx, dim=1, dtype=p.norm_dtype), squared=True)
    return (x,)


class _History:
    """The ring of f(x_i) and g_i = f(x_i) - x_i, with every view made once.

    Holds the history f and g, (B, m, D) each, and two buffers the mixed iterates
    alternate in (func gets one while the other holds the previous iterate, which a
    frozen sample keeps). On CPU a tensor view costs as much as a small kernel (2-5 us a
    dispatch), so the slots, prefixes and transposes the loop reads are cut once and
    kept, and the whole object serves solve after solve (`workspace.reuse`): every entry
    a solve reads, it has written first. In eager mode the new entry is written in place
    (`out=`) and the mixed iterate goes into one of the two iterate buffers; sync-free
    mode uses functional ops (torch.compile rejects `out=` into strided views).
    """

    def __init__(self, m: int, batch: int, dim: int, dtype: torch.dtype, device: torch.device,
                 sync_free: bool, zeroed: bool = False):
        iterates = torch.empty(2, batch, 1, dim, dtype=dtype, device=device)
        # Eager mode hands func the iterate buffers (sync-free mode, new tensors).
        self.iterates_address = None if sync_free else iterates.untyped_storage().data_ptr()
        if sync_free:
            # Two tensors of their own, not `unbind` views of one: under a trace (aot_eager,
            # inductor) functionalising the writes through those views pinned the batch
            # size, a recompilation for every new batch size. `zeroed` (a compiled solve's
            # while loop mixes the whole history): the entries not filled yet are zeros.
            new = torch.zeros if zeroed else torch.empty
            self.f = new(batch, m, dim, dtype=dtype, device=device)
            self.g = new(batch, m, dim, dtype=dtype, device=device)
        else:
            history = torch.empty(2, batch, m, dim, dtype=dtype, device=device)
            self.f, self.g = history.unbind(0)  # (B, m, D) each
        self.f_slots, self.g_slots = self.f.unbind(1), self.g.unbind(1)  # (B, D) each
        self.g_rows = self.g.split(1, dim=1)  # (B, 1, D) each
        self.iterate_rows = iterates.unbind(0)  # (B, 1, D) each
        self.iterates = [row.squeeze(1) for row in self.iterate_rows]  # (B, D) each
        self.sync_free = sync_free
        self._prefix: dict[tuple[str, int], torch.Tensor] = {}

    @staticmethod
    def nbytes(m: int, batch: int, dim: int, dtype: torch.dtype) -> int:
        """Memory of the history, the iterates and the mixer's matrix."""
        return (2 * batch * (m + 1) * dim + batch * (m + 1) ** 2) * dtype.itemsize

    def prefix(self, which: str, n: int) -> torch.Tensor:
        """The first n entries: 'f' and 'g' (B, n, D), 'gT' (B, D, n)."""
        key = (which, n)
        view = self._prefix.get(key)
        if view is None:
            view = {"f": self.f, "g": self.g, "gT": self.g}[which][:, :n]
            if which == "gT":
                view = view.transpose(1, 2)
            self._prefix[key] = view
        return view

    def mix(self, alpha: torch.Tensor, parity: int | None, residuals: bool = False):
        """sum_i alpha_i f(x_i) (or g_i), (B, D); alpha (B, 1, n). Eager mode writes it
        into iterate buffer `parity` (None: a new tensor)."""
        rows = self.prefix("g" if residuals else "f", alpha.shape[2])
        if self.sync_free or parity is None:
            return row_mix(alpha, rows).squeeze(1)
        row_mix(alpha, rows, out=self.iterate_rows[parity])
        return self.iterates[parity]

    def store(self, slot: int, fx: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
        """Write f(x) and g = f(x) - x into `slot`; return g's dots with entries 0..n-1
        (B, 1, n)."""
        if self.sync_free:
            g = fx - x
            self.f[:, slot] = fx
            self.g[:, slot] = g
            g_row = g.unsqueeze(1)
        else:
            self.f_slots[slot].copy_(fx)
            torch.sub(fx, x, out=self.g_slots[slot])
            g_row = self.g_rows[slot]
        return torch.bmm(g_row.conj(), self.prefix("gT", n))  # conj: a no-op when real

    @staticmethod
    def store_at(f, g, slot: torch.Tensor, fx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`store` at a tensor `slot` (shape (1,)), in a while loop: writes f(x) and g into
        f and g (B, m, D) in place; returns the new entry's dots with all m entries
        (B, 1, m)."""
        gx = fx - x
        f.index_copy_(1, slot, fx.unsqueeze(1))
        g.index_copy_(1, slot, gx.unsqueeze(1))
        return torch.bmm(gx.unsqueeze(1).conj(), g.transpose(1, 2))


class _Mixer:
    """The regularised Gram matrix of the residual history and the mixing weights.

    G_ij = g_i^H g_j (Hermitian for complex states: the row of a new entry is its dots,
    its column their conjugates).

    In eager mode the Gram matrix G sits inside the bordered matrix H = [[0, 1^T], [1, G]]
    (B, m+1, m+1), whose system H [nu; alpha] = [1; 0] gives the weights summing to 1 in one LU
    solve (no normalisation). Its diagonal is stored already regularised,
    ||g_i||^2 (1 + lam) + a tiny floor (so an all-zero history stays positive definite):
    regularisation relative to each residual's scale, applied to the new row with one
    `addcmul`. The views each step writes and solves are made once per (slot, size).

    `unrolled` (sync-free mode) solves G w = 1 with `_spd_solve_unrolled` instead of
    LAPACK/MAGMA: on CUDA, the batched `cholesky_solve` cannot be captured in a CUDA
    graph (measured: "operation not permitted when stream is capturing"), and the
    unrolled solve compiles into a few fused kernels; G is then kept alone (inside the
    border, the compiled solve measured 2.1x slower). Histories longer than `_LU_MAX_N`
    solve G w = 1 by Cholesky. Both normalise w.
    """

    def __init__(self, batch, m, lam, dtype, device, unrolled=False):
        self.unrolled = unrolled
        self.floor = torch.finfo(real_dtype(dtype)).tiny ** 0.5
        self.complex = dtype.is_complex
        const = _MixerConstants(batch, m, lam, dtype, device, self.floor)
        if unrolled:  # no border: G alone keeps the compiled graph's writes small
            self.bordered = None
            self.gram = torch.zeros(batch, m, m, dtype=dtype, device=device)
        else:
            self.bordered = const.border
            self.gram = self.bordered[:, 1:, 1:]
        self.eye, self.scale, self.shift = const.eye, const.scale, const.shift
        self.ones, self.first, self.zero = const.ones, const.first, const.zero
        self._views: dict[tuple, tuple] = {}
        # numpy views of H and [1; 0] for `host_solve`
        host = not unrolled and solves_on_host(self.bordered)
        self.host = self.bordered.numpy() if host else None
        self.host_first = self.first.numpy() if host else None

    def add(self, slot: int, dots: torch.Tensor) -> None:
        """Entry `slot` of the history changed; `dots` (B, 1, n) are its dots with the
        entries 0..n-1."""
        key = ("row", slot, dots.shape[2])
        views = self._views.get(key)
        if views is None:
            n = dots.shape[2]
            views = (self.gram[:, slot:slot + 1, :n], self.gram.transpose(1, 2)[:, slot:slot + 1, :n],
                     self.scale[slot, :n], self.shift[slot, :n])
            self._views[key] = views
        row, column, scale, shift = views
        entries = torch.addcmul(shift, dots, scale)
        row.copy_(entries)
        column.copy_(entries.conj() if self.complex else entries)

    def add_at(self, gram: torch.Tensor, slot: torch.Tensor, dots: torch.Tensor) -> None:
        """`add` at a tensor `slot` (shape (1,)) with the dots with all m entries
        (B, 1, m), in a while loop (unrolled mode): writes the Gram matrix in place."""
        entries = torch.addcmul(self.shift.index_select(0, slot), dots,
                                self.scale.index_select(0, slot))
        gram.index_copy_(1, slot, entries)
        gram.index_copy_(2, slot, (entries.conj() if self.complex else entries).transpose(1, 2))

    def weights_at(self, gram: torch.Tensor, n: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
        """`weights` in a while loop (unrolled mode): n and newest are 0-dim tensors, and
        the whole Gram matrix (B, m, m) is solved, whose entries not filled yet (n..m-1)
        are zero: with a right-hand side of 0 there their weights are exactly 0, and the
        Cholesky of the filled block is the n x n one plus exact zeros. alpha (B, 1, m)."""
        used = torch.arange(gram.shape[1], device=gram.device) < n
        w = _spd_solve_unrolled(gram, self.ones[..., 0] * used, self.floor).unsqueeze(1)
        alpha = w / w.sum(dim=2, keepdim=True)
        total = alpha.sum(dim=2, keepdim=True)
        good = ((total - total) == self.zero) & (n > 1)  # n = 1: the plain step, as `weights`
        return torch.where(good, alpha, self.eye.index_select(0, newest.reshape(1)))

    def weights(self, n: int, newest: int) -> torch.Tensor:
        """alpha (B, 1, n), summing to 1, minimising ||sum_i alpha_i g_i||; never raises.

        A sample whose factorisation fails or whose weights are not finite gets the
        plain fixed-point weights (1 on the newest entry).
        """
        key = ("solve", n, newest)
        views = self._views.get(key)
        if views is None:
            views = (None if self.unrolled else self.bordered[:, :n + 1, :n + 1],
                     self.first[:, :n + 1], self.gram[:, :n, :n], self.ones[:, :n],
                     self.eye[newest:newest + 1, :n])
            self._views[key] = views
        bordered, first, gram, ones, plain = views
        if n == 1:
            return ones.transpose(1, 2)
        failed = None
        if self.unrolled:
            w = _spd_solve_unrolled(gram, ones[..., 0], self.floor).unsqueeze(1)
            alpha = w / w.sum(dim=2, keepdim=True)
        elif n <= _LU_MAX_N and self.host is not None:
            # Small batches on CPU: numpy's LU on the shared memory of H costs less in
            # place than `solve_ex` and its two views (measured, conv cell: overhead
            # 0.66 -> 0.63). An exactly singular H or non-finite weights go on to the
            # tensor path.
            solution = host_solve(self.host[:, :n + 1, :n + 1], self.host_first[:, :n + 1])
            if solution is not None:
                return torch.from_numpy(solution[:, None, 1:, 0])
            alpha = torch.linalg.solve_ex(bordered, first)[0][:, 1:].transpose(1, 2)
        elif n <= _LU_MAX_N:
            # LU's only failure, an exactly zero pivot (a history singular in floating
            # point, e.g. repeated residuals with lam=0), shows in alpha as inf or NaN.
            alpha = torch.linalg.solve_ex(bordered, first)[0][:, 1:].transpose(1, 2)
            if finite_on_host(alpha):
                return alpha
        else:
            chol, info = torch.linalg.cholesky_ex(gram)
            w = torch.cholesky_solve(ones, chol).transpose(1, 2)
            alpha = w / w.sum(dim=2, keepdim=True)
            failed = (info != 0)[:, None, None]  # its output can then be finite garbage
        # The weights are finite iff their sum is (a NaN or inf entry makes it NaN or inf),
        # and x - x == 0 iff x is finite: two ops on (B, 1, 1) instead of isfinite + all.
        total = alpha.sum(dim=2, keepdim=True)
        good = (total - total) == self.zero
        if failed is not None:
            good = good & ~failed
        return torch.where(good, alpha, plain)  # row `newest` of the identity: plain weights


class _MixerConstants:
    """The tensors a `_Mixer` reads but never writes, for one configuration."""

    def __init__(self, batch, m, lam, dtype, device, floor):
        eye = torch.eye(m + 1, dtype=dtype, device=device)
        self.eye = eye[1:, 1:]
        # Row `slot` of these scales and shifts a new row of dots: (1 + lam) and the
        # floor on the diagonal entry only.
        self.scale = 1.0 + lam * self.eye
        self.shift = floor * self.eye
        self.ones = torch.ones(batch, m, 1, dtype=dtype, device=device)
        self.first = eye[:, :1].expand(batch, m + 1, 1)  # [1; 0]
        self.zero = torch.zeros((), dtype=dtype, device=device)
        # H with G = 0
        self.border = torch.zeros(batch, m + 1, m + 1, dtype=dtype, device=device)
        self.border[:, 0, 1:] = 1.0
        self.border[:, 1:, 0] = 1.0


# Up to this size, a batched LU solve (`solve_ex`, one call) is faster on CPU than
# `cholesky_ex` + `cholesky_solve` (measured, B=512: n=2..6: 110-215 us vs 195-290 us);
# for larger n Cholesky wins (n=20: 1.9 ms vs 3.7 ms).
_LU_MAX_N = 8


def _spd_solve_unrolled(a: torch.Tensor, b: torch.Tensor, floor: float) -> torch.Tensor:
    """Solve a x = b for a batch of small SPD (or Hermitian positive definite) matrices
    (B, n, n) with plain tensor ops.

    A Cholesky factorisation unrolled over the n columns, then the two triangular solves;
    a pivot below `floor` is raised to it, so the solve never fails. Capturable in CUDA
    graphs and fusible by torch.compile (n is a Python int). (`conj` and `real` are
    no-ops on real tensors.)
    """
    n = a.shape[-1]
    chol = torch.zeros_like(a)
    for j in range(n):
        col = a[:, j:, j] - (chol[:, j:, :j] * chol[:, j:j + 1, :j].conj()).sum(dim=2)
        head = col[:, :1].real.clamp_min(floor)
        chol[:, j:, j] = torch.cat((head.to(col.dtype), col[:, 1:]), dim=1) / head.sqrt()
    y = []
    for i in range(n):  # chol y = b
        acc = b[:, i]
        for k in range(i):
            acc = acc - chol[:, i, k] * y[k]
        y.append(acc / chol[:, i, i])
    x = [None] * n
    for i in reversed(range(n)):  # chol^H x = y (its diagonal is real)
        acc = y[i]
        for k in range(i + 1, n):
            acc = acc - chol[:, k, i].conj() * x[k]
        x[i] = acc / chol[:, i, i]
    return torch.stack(x, dim=1)


register_solver("anderson", anderson)
