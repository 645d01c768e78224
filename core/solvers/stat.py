"""Solver statistics, best-iterate tracking, per-sample early exit and the safety net.

Every solver with statistics feeds its tracker's `observe` once per step with the state
it would return at that step, that state's absolute residual ||f(z) - z|| and ||f(z)||
(the relative residual is ||f(z) - z|| / (||f(z)|| + 1e-9)). The tracker keeps, per
sample (row):

- the lowest residuals (`abs_lowest`, `rel_lowest`) and the step that reached the lowest
  residual of `stop_mode` (`nstep`, a float tensor as in TorchDEQ);
- the best state (lowest `stop_mode` residual), which the solver returns;
- the residual traces `abs_trace`, `rel_trace` of shape (B, max_iter + 1): entry 0 is
  TorchDEQ's 1e8 placeholder, entry k is the residual of step k, and once a sample has
  stopped its entries repeat its lowest value (TorchDEQ pads the same way, but its length
  depends on the solver; ours is max_iter + 1 for all of them);
- whether the sample is still active. A sample stops when its `stop_mode` residual is
  below `tol` (converged: frozen, statistics stop changing) or when the safety net
  catches it: a residual that is non-finite or above 1e3 x its first residual freezes
  the sample at its best state and counts it in `n_fallback`.

Two trackers keep them. `ConvergenceTracker` (eager mode) keeps the per-sample
bookkeeping on the host in numpy: on CPU the solvers write each step's two (B,) vectors
straight into its trace (`outputs(k)`), elsewhere it copies them to the host, its one
synchronisation per step. A handful of tensor operations per step cost more than the
rest of a small solver's step (5-15 us each on CPU, against about 1 us for numpy on a
few hundred floats). It stops when no sample is active, skips masking while every sample
is active and skips the best-state select when every sample improved; device masks are
made only when some sample has stopped. `SyncFreeTracker` never reads a tensor value on
the host: masks are applied with `torch.where`, shapes are static, and the solver runs
all `max_iter` steps, so `torch.compile(fullgraph=True)` and CUDA graphs can capture it.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["SolverStat", "ConvergenceTracker", "SyncFreeTracker", "solver_stat_from_final_step",
           "residuals", "real_dtype", "norm_dtype"]

INIT_RESIDUAL = 1e8
DIVERGENCE_FACTOR = 1e3
REL_EPS = 1e-9


class SolverStat(dict):
    """A dict of solver statistics; missing TorchDEQ keys default to TorchDEQ's -1 tensors.

    Keys: `abs_lowest`, `rel_lowest`, `nstep` (B,); `abs_trace`, `rel_trace` (B, N);
    `sradius` (set by the DEQ module); ours: `nfe` (number of `func` calls) and
    `n_fallback` (samples frozen by the safety net), 0-dim int64 tensors: every value is a
    tensor, as in TorchDEQ.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key in ("abs_lowest", "rel_lowest", "nstep", "sradius"):
            if key not in self:
                self[key] = torch.from_numpy(np.full(1, -1.0, dtype=np.float32))  # 3x faster
        for key in ("abs_trace", "rel_trace"):
            if key not in self:
                self[key] = torch.from_numpy(np.full((1, 1), -1.0, dtype=np.float32))


def norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The `dtype=` of the residual norms: float64 / complex128 for 64-bit states, float32 /
    complex64 otherwise (`vector_norm` wants a complex dtype for a complex input)."""
    return torch.promote_types(dtype, torch.float32)


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype: float64 for float64 (and complex128) states, float32 otherwise (as
    TorchDEQ); always real."""
    return real_dtype(norm_dtype(dtype))


_REAL = {torch.complex32: torch.float16, torch.complex64: torch.float32,
         torch.complex128: torch.float64}


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real counterpart of a complex dtype; a real dtype itself. (`dtype.to_real()`,
    which dynamo cannot trace.)"""
    return _REAL.get(dtype, dtype)


def finite_on_host(t: torch.Tensor) -> bool:
    """True if `t` is a CPU tensor (outside autograd and compilation) whose entries are all
    finite.

    Reading a CPU tensor needs no device synchronisation, and two numpy calls on its few
    entries cost a fraction of the tensor ops and the select of a per-sample check;
    False sends the caller to that check.
    """
    if t.device.type != "cpu" or t.requires_grad or torch.compiler.is_compiling():
        return False
    return _all_finite(t.numpy())


def _all_finite(a: np.ndarray) -> bool:
    return np.count_nonzero(np.isfinite(a)) == a.size


# numpy's batched LU solve beats `solve_ex` up to about this batch (measured, n = 6: B=16
# 34 vs 48 us, B=64 75 vs 61 us isolated; in place after func, B=64 still gains).
HOST_SOLVE_MAX_BATCH = 64


def solves_on_host(t: torch.Tensor) -> bool:
    """Whether the small systems in `t` (B, n, n), a CPU tensor outside autograd, go to
    `host_solve` (numpy shares its memory): batches up to `HOST_SOLVE_MAX_BATCH`, never
    under torch.compile (dynamo would trace numpy as functional ops on a copy)."""
    return (t.device.type == "cpu" and t.shape[0] <= HOST_SOLVE_MAX_BATCH and not t.requires_grad
            and not torch.compiler.is_compiling())


def host_solve(a: np.ndarray, b: np.ndarray) -> np.ndarray | None:
    """numpy's batched LU solve of a x = b (a (B, n, n), b (B, n, 1)); None if some a is
    exactly singular or x is not finite (the caller's tensor path then handles it)."""
    try:
        x = np.linalg.solve(a, b)
    except np.linalg.LinAlgError:
        return None
    return x if _all_finite(x) else None


def solve_small(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x of the small systems a x = b (a (B, n, n), b (B, n, 1)) as the eager solvers solve
    them: numpy's LU up to `HOST_SOLVE_MAX_BATCH` on CPU, else `solve_ex` (no error check,
    no host sync); non-finite entries of x are the caller's to handle. For an opaque
    operator's body, which runs eagerly inside a compiled graph."""
    solution = host_solve(a.numpy(), b.numpy()) if solves_on_host(a) else None
    return torch.from_numpy(solution) if solution is not None else torch.linalg.solve_ex(a, b)[0]


def residuals(fz: torch.Tensor, diff: torch.Tensor, dtype: torch.dtype):
    """Per-row absolute ||diff|| and relative ||diff|| / (||fz|| + 1e-9), computed in `dtype`
    (a `norm_dtype`; the results are real)."""
    abs_res = torch.linalg.vector_norm(diff, dim=1, dtype=dtype)
    rel_res = abs_res / (torch.linalg.vector_norm(fz, dim=1, dtype=dtype) + REL_EPS)
    return abs_res, rel_res


# Below this row width, a batch of (1, n) x (n, D) products is slower through bmm (one
# tiny GEMM per sample) than as a broadcast multiply and sum (measured on CPU: B=512,
# n=4..8, D=32: bmm 190-310 us, multiply-sum 80-100 us; at D=64 bmm wins).
_NARROW_ROWS = 32


def is_narrow(rows: torch.Tensor) -> bool:
    """Whether (B, n, D) rows are mixed by multiply-sum rather than `bmm` (D <= 32)."""
    return rows.shape[2] <= _NARROW_ROWS


def row_mix(weights: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None
            ) -> torch.Tensor:
    """(B, 1, n) weights . (B, n, D) rows -> (B, 1, D): per sample, sum_i weights_i rows_i.

    `out`, a contiguous (B, 1, D) tensor, receives the result (no allocation).
    """
    if is_narrow(rows):
        return torch.sum(weights.transpose(1, 2) * rows, dim=1, keepdim=True, out=out)
    return torch.bmm(weights, rows, out=out)


def solver_stat_from_final_step(z, fz, nstep=0) -> SolverStat:
    """Statistics from a final pair (z, f(z)) only, as TorchDEQ's function of that name.

    `z` and `fz` are tensors (dim 0 = batch) or tuples/lists of tensors (flattened per
    sample and concatenated). Traces have one column; `nstep` is `nstep` for every sample.
    """
    if not torch.is_tensor(z):
        z = torch.cat([t.flatten(start_dim=1) for t in z], dim=1)
        fz = torch.cat([t.flatten(start_dim=1) for t in fz], dim=1)
    z2 = z.flatten(start_dim=1) if z.dim() >= 2 else z.reshape(z.numel(), 1)
    fz2 = fz.flatten(start_dim=1) if fz.dim() >= 2 else fz.reshape(fz.numel(), 1)
    abs_res, rel_res = residuals(fz2, fz2 - z2, norm_dtype(z2.dtype))
    return SolverStat(
        abs_lowest=abs_res,
        rel_lowest=rel_res,
        abs_trace=abs_res.unsqueeze(1),
        rel_trace=rel_res.unsqueeze(1),
        nstep=torch.full_like(abs_res, float(nstep)),
    )


class ConvergenceTracker:
    """Per-sample statistics, best state, early exit and safety net of one eager solve.

    `z0` is the packed initial state (B, D); it is the best state until a step improves
    on it. `observe(k, state, abs_res, fx_norm)` records step k (1-based). `return_final`
    makes the last state of each sample its returned one and disables the convergence
    exit (the safety net still freezes diverging samples). The bookkeeping lives on the
    host (numpy); `info()` moves it to the state's device.

    Traces and lowest values keep (||f(z) - z||, ||f(z)||) pairs; relative residuals are
    divided out once, in `info()` (and per step only with stop_mode 'rel'). A norm of -1
    marks "no step yet", whose relative residual is the 1e8 placeholder. After a step in
    which every sample improved, the lowest values are that step's trace rows, referenced
    (`_all_step`) rather than copied until a later step changes them per sample.
    """

    def __init__(self, z0: torch.Tensor, max_iter: int, tol: float, stop_mode: str,
                 return_final: bool = False):
        batch = z0.shape[0]
        self.batch = batch
        self.device = z0.device
        self.host_dtype = np.float64 if stat_dtype(z0.dtype) == torch.float64 else np.float32
        self.max_iter = max_iter
        self.tol = tol
        self.rel_mode = stop_mode == "rel"
        self.return_final = return_final
        self.best = z0
        # Row 0: ||f(z) - z||, row 1: ||f(z)||, at each sample's best step.
        self.lowest = np.empty((2, batch), dtype=self.host_dtype)
        self.lowest[0], self.lowest[1] = INIT_RESIDUAL, -1.0
        # The stop-mode residual at the best step (row 0 of `lowest` in 'abs' mode).
        self.lowest_stop = (np.full(batch, INIT_RESIDUAL, dtype=self.host_dtype)
                            if self.rel_mode else self.lowest[0])
        self.lowest_step = np.zeros(batch, dtype=self.host_dtype)
        self._all_step = 0  # > 0: every sample's lowest values are those of this step
        # Step-major (max_iter + 1, 2, batch): step k's pair of rows is one block. On CPU
        # a tensor shares its memory, so the solver's norms are written straight into it
        # (`outputs`): no conversion per step.
        # One more row at the end receives the lowest values in `info()`.
        self.trace = np.empty((max_iter + 2, 2, batch), dtype=self.host_dtype)
        self.trace[0] = self.lowest
        self._trace_tensor = torch.from_numpy(self.trace) if self.device.type == "cpu" else None
        self._outputs = (None, None, None)  # (k, views) of the last `outputs(k)`
        self.active = np.ones(batch, dtype=bool)
        self.caught = np.zeros(batch, dtype=bool)
        self.limit = None  # 1e3 x first residual, set at step 1
        self.steps = 0
        self.nfe = 0
        self.n_active = batch
        self._active_mask = None  # `active` on the device, made when first needed

    @property
    def done(self) -> bool:
        """True when no sample is active."""
        return self.n_active == 0

    @property
    def all_active(self) -> bool:
        """True when every sample is still active."""
        return self.n_active == self.batch

    def active_rows(self) -> torch.Tensor:
        """Indices of the active rows, on the device."""
        return torch.from_numpy(np.flatnonzero(self.active)).to(self.device)

    def freeze(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """`new` for active rows, `old` for stopped ones (no copy while all are active)."""
        if self.all_active:
            return new
        if self._active_mask is None:
            self._active_mask = torch.from_numpy(self.active).to(self.device).unsqueeze(1)
        return torch.where(self._active_mask, new, old)

    def outputs(self, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Where step k's residual and norm may be written (`out=`): on CPU, the trace
        itself; elsewhere (None, None)."""
        if self._trace_tensor is None or torch.is_grad_enabled():  # out= has no autograd
            return None, None
        views = self._trace_tensor[k].unbind(0)
        self._outputs = (k, *views)
        return views

    def observe(self, k: int, state: torch.Tensor, abs_res: torch.Tensor,
                fx_norm: torch.Tensor, squared: bool = False) -> None:
        """Record step k: `state` (B, D) is what this step would return, `abs_res` its
        residual ||f(z) - z|| (its square if `squared`) and `fx_norm` ||f(z)|| per row
        ((B,) or (B, 1)), possibly already written to `outputs(k)`."""
        new = self.trace[k]
        if self._trace_tensor is None:
            new[:] = torch.stack((abs_res.reshape(-1), fx_norm.reshape(-1))).cpu().numpy()
        else:
            step, abs_view, norm_view = self._outputs
            if step != k:
                abs_view, norm_view = self._trace_tensor[k].unbind(0)
            if abs_res is not abs_view:
                abs_view.copy_(abs_res.detach().reshape(-1))
            if fx_norm is not norm_view:
                norm_view.copy_(fx_norm.detach().reshape(-1))
        abs_res = new[0]
        if squared:
            np.sqrt(abs_res, out=abs_res)
        stop_res = abs_res
        if self.limit is None or self.rel_mode:
            with np.errstate(all="ignore"):  # NaN and inf residuals are caught below
                if self.limit is None:  # -1 for a non-finite first residual: caught at once
                    self.limit = np.where(np.isfinite(abs_res), DIVERGENCE_FACTOR * abs_res, -1.0)
                if self.rel_mode:
                    stop_res = abs_res / (new[1] + REL_EPS)
        self.steps = k
        active, all_active = self.active, self.all_active
        if all_active and not self.return_final:
            # The common step, in four host ops: every sample below its safety limit and
            # its lowest residual (NaN fails), and none converged.
            if (np.count_nonzero(stop_res < np.minimum(self.limit, self.lowest_stop)) == self.batch
                    and np.minimum.reduce(stop_res) >= self.tol):
                self.lowest, self.lowest_stop, self._all_step = new, stop_res, k
                self.best = state
                return
        self._own_lowest()
        ok = abs_res <= self.limit  # False for NaN and inf too
        if not all_active:
            ok &= active
        if self.return_final:
            improved = still_active = ok
        else:
            improved = ok & (stop_res < self.lowest_stop)
            still_active = ok & (stop_res >= self.tol)
        if not all_active:  # stopped samples repeat their lowest values
            np.copyto(new, self.lowest, where=~active)
        if np.count_nonzero(ok) < self.n_active:
            self.caught |= active & ~ok
        n_active = np.count_nonzero(still_active)
        if n_active != self.n_active:
            self.n_active = n_active
            self.active = still_active
            self._active_mask = None
        n_improved = np.count_nonzero(improved)
        if n_improved == self.batch:
            self.lowest, self._all_step = new, k
            self.lowest_stop = stop_res if self.rel_mode else new[0]
            self.best = state
        elif n_improved:
            np.copyto(self.lowest, new, where=improved)
            if self.rel_mode:
                np.copyto(self.lowest_stop, stop_res, where=improved)
            self.lowest_step[improved] = k
            mask = torch.from_numpy(improved).to(self.device).unsqueeze(1)
            self.best = torch.where(mask, state, self.best)

    def _own_lowest(self) -> None:
        """Make the lowest values arrays of their own again (they may be a step's arrays)."""
        if self._all_step:
            self.lowest = self.lowest.copy()
            self.lowest_stop = self.lowest_stop.copy() if self.rel_mode else self.lowest[0]
            self.lowest_step = np.full(self.batch, self._all_step, dtype=self.host_dtype)
            self._all_step = 0

    def info(self) -> SolverStat:
        """The statistics of the solve so far; pads traces after an early exit."""
        self._own_lowest()
        # Stopped samples repeat their lowest values; the last row is the lowest values.
        pairs = self.trace  # (max_iter + 2, 2, batch), step-major: contiguous rows
        pairs[self.steps + 1:] = self.lowest
        # Absolute and relative residuals; a norm < 0 (no step yet): 1e8.
        residual = np.empty_like(pairs)
        residual[:, 0] = pairs[:, 0]
        with np.errstate(all="ignore"):
            np.divide(pairs[:, 0], pairs[:, 1] + REL_EPS, out=residual[:, 1])
        np.copyto(residual[:, 1], INIT_RESIDUAL, where=pairs[:, 1] < 0)
        parts = (residual[-1, 0], residual[-1, 1], residual[:-1, 0].T,
                 residual[:-1, 1].T, self.lowest_step)  # numpy views: no tensor ops
        parts = [torch.from_numpy(part) for part in parts]
        parts.append(torch.from_numpy(np.array([np.count_nonzero(self.caught), self.nfe],
                                               dtype=np.int64)))
        if self.device.type != "cpu":
            parts = [part.to(self.device) for part in parts]
        n_fallback, nfe = parts[5].unbind(0)
        return SolverStat(
            abs_lowest=parts[0], rel_lowest=parts[1], abs_trace=parts[2], rel_trace=parts[3],
            nstep=parts[4], nfe=nfe, n_fallback=n_fallback,
        )


class SyncFreeTracker:
    """`ConvergenceTracker` without host synchronisation, for sync-free solves.

    Everything stays on the state's device; masks apply with `torch.where` and shapes are
    static. `all_active` is always False; `done` is False too, so the solver runs all
    `max_iter` steps, unless `check_every` > 0: then every `check_every` steps `done`
    reads on the host whether any sample is still active (one synchronisation; eager
    sync-free solves only), and a finished solve pads its traces as the eager tracker does.
    A compiled solve stops instead in a `torch.while_loop` that carries `carry()` and
    tests `active` (`FixedPointProblem.while_active`).
    """

    all_active = False

    def __init__(self, z0: torch.Tensor, max_iter: int, tol: float, stop_mode: str,
                 return_final: bool = False, check_every: int = 0):
        batch = z0.shape[0]
        sdt = stat_dtype(z0.dtype)
        device = z0.device
        self.batch = batch
        self.tol = tol
        self.stop_row = 0 if stop_mode == "abs" else 1
        self.return_final = return_final
        self.best = z0
        # Row 0: absolute, row 1: relative residuals (one tensor, so one op updates both).
        self.lowest = torch.full((2, batch), INIT_RESIDUAL, dtype=sdt, device=device)
        self.lowest_step = torch.zeros(batch, dtype=sdt, device=device)
        self.trace = torch.full((max_iter + 1, 2, batch), INIT_RESIDUAL, dtype=sdt, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.caught = torch.zeros(batch, dtype=torch.bool, device=device)
        self.limit = None
        self.steps = 0
        self.nfe = 0
        self.max_iter = max_iter
        self.check_every = check_every if not return_final else 0

    @property
    def done(self) -> bool:
        """False, except at a check step (every `check_every`) with no sample active."""
        if not self.check_every or self.steps % self.check_every:
            return False
        return not bool(self.active.any())

    def freeze(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """`new` for active rows, `old` for stopped ones."""
        return torch.where(self.active.unsqueeze(1), new, old)

    @staticmethod
    def outputs(k: int) -> tuple[None, None]:
        """No preset outputs: the step's norms are new tensors."""
        return None, None

    # The tensors a `torch.while_loop` carries from one step to the next (`carry`/`load`);
    # `limit`, fixed after step 1, is read by the loop's body as a constant. The trace is
    # not carried: the loop's body writes its row in place (`observe`), where a carried
    # trace would be copied whole at every step (with the default 40 steps and batch 512,
    # a sixth of a compiled training step of the small tanh layer, measured). Nor are
    # `lowest_step` and `caught`: `settle` reads them off the trace after the loop (two
    # fewer tensors to allocate and update a step: about a tenth of the compiled tanh
    # d=32 inference solve, measured; `compile_step.py --ladder` prices each duty). The
    # other three must stay carried: written in place like the trace, with nothing but `k`
    # and the iterate left as the loop's outputs, inductor (torch 2.14) removed the whole
    # loop from the graph as unused and returned step 1's state (tanh d=32: 1.4 from
    # eager's fixed point; aot_eager kept it and was exact).
    CARRIED = ("best", "lowest", "active")

    def carry(self) -> tuple:
        """The tracker's changing tensors, for a `torch.while_loop` (after step 1)."""
        return tuple(getattr(self, name) for name in self.CARRIED)

    def load(self, tensors, k) -> None:
        """Take the tensors `carry` gave (inside or after a while loop) at step `k` (a
        0-dim tensor)."""
        for name, tensor in zip(self.CARRIED, tensors):
            setattr(self, name, tensor)
        self.steps = k

    def replica(self, tensors, k) -> "SyncFreeTracker":
        """A new tracker with this one's options and the carried `tensors` at step `k`: a
        while loop's body may change only objects it made."""
        twin = SyncFreeTracker.__new__(SyncFreeTracker)
        for name in ("batch", "tol", "stop_row", "return_final", "max_iter", "check_every", "nfe",
                     "limit", "trace", "lowest_step", "caught"):
            setattr(twin, name, getattr(self, name))
        twin.load(tensors, k)
        return twin

    def settle(self, first: int) -> None:
        """After a while loop whose steps `first`..`steps` (`steps` a 0-dim tensor) were
        observed in the loop: `lowest_step` and `caught` from the trace, as `observe`
        would have updated them step by step.

        A sample's trace row is its residuals while it is active, else its lowest ones,
        which passed the divergence limit. So it was caught in the loop iff some row of
        those steps fails the limit (NaN included), and its lowest stop residual, strictly
        lower than every earlier one, first appears in the trace at the step that gave it
        (rows of later steps may repeat it); none below INIT_RESIDUAL: never improved."""
        trace, steps = self.trace, self.steps
        index = torch.arange(trace.shape[0], device=trace.device).unsqueeze(1)
        observed = (index >= first) & (index <= steps)
        failed = ~(trace[:, 0] <= self.limit) & observed
        self.caught = self.caught | failed.any(dim=0)
        lowest = self.lowest[self.stop_row]
        hits = (trace[:, self.stop_row] == lowest) & (index <= steps)
        step = torch.where(hits, index, trace.shape[0]).amin(dim=0).to(self.lowest_step.dtype)
        self.lowest_step = torch.where(lowest < INIT_RESIDUAL, step, self.lowest_step)

    def observe(self, k, state: torch.Tensor, abs_res: torch.Tensor,
                fx_norm: torch.Tensor, squared: bool = False) -> None:
        """Record step k, as `ConvergenceTracker.observe`. `k` may be a 0-dim tensor (in a
        while loop): its trace row is then written in place, and `lowest_step` and `caught`
        are left to `settle` after the loop. A while loop's body may change a tensor made
        outside it only with grad mode off (torch 2.14), as the compiled solves run."""
        active = self.active
        abs_res, fx_norm = abs_res.reshape(-1), fx_norm.reshape(-1)
        if squared:
            abs_res = abs_res.sqrt()
        rel_res = abs_res / (fx_norm + REL_EPS)
        if self.limit is None:
            self.limit = torch.where(torch.isfinite(abs_res), DIVERGENCE_FACTOR * abs_res, -1.0)
        stop_res = rel_res if self.stop_row else abs_res
        ok = (abs_res <= self.limit) & active
        if self.return_final:
            improved = still_active = ok
        else:
            improved = ok & (stop_res < self.lowest[self.stop_row])
            still_active = ok & (stop_res >= self.tol)
        new = torch.stack((abs_res, rel_res))
        row = torch.where(active, new, self.lowest)
        if torch.is_tensor(k):
            self.trace.index_copy_(0, k.reshape(1), row.unsqueeze(0))
        else:
            self.trace[k] = row
            self.caught = self.caught | (active & ~ok)
            self.lowest_step = torch.where(improved, float(k), self.lowest_step)
        self.active = still_active
        self.steps = k
        self.lowest = torch.where(improved, new, self.lowest)
        self.best = torch.where(improved.unsqueeze(1), state, self.best)

    def info(self) -> SolverStat:
        """The statistics of the solve; after an early exit the traces repeat the lowest values."""
        trace = self.trace
        if torch.is_tensor(self.steps):  # after a while loop: pad past the last step
            after = torch.arange(self.max_iter + 1, device=trace.device) > self.steps
            trace = torch.where(after[:, None, None], self.lowest, trace)
        elif self.steps < self.max_iter:
            trace = torch.cat((trace[:self.steps + 1],
                               self.lowest.expand(self.max_iter - self.steps, *self.lowest.shape)))
        trace = trace.permute(1, 2, 0)  # (2, batch, max_iter + 1)
        nfe = (self.nfe if torch.is_tensor(self.nfe)
               else torch.full((), self.nfe, dtype=torch.long, device=self.lowest.device))
        return SolverStat(
            abs_lowest=self.lowest[0],
            rel_lowest=self.lowest[1],
            abs_trace=trace[0],
            rel_trace=trace[1],
            nstep=self.lowest_step,
            nfe=nfe,
            n_fallback=self.caught.sum(),
        )
