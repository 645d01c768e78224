"""Solver statistics, best-iterate tracking, per-sample early exit and the safety net.

Every solver with statistics feeds `ConvergenceTracker.observe` once per step with the
state it would return at that step and that state's residuals. The tracker keeps, per
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

Eager mode does one small host synchronisation per step (three counts), used to stop when
no sample is active, to skip masking work while every sample is active and to skip the
best-state select when every sample improved. Sync-free mode
never reads a tensor value on the host: masks are applied with `torch.where`, shapes are
static, and the solver runs all `max_iter` steps, so `torch.compile(fullgraph=True)` and
CUDA graphs can capture it.
"""
from __future__ import annotations

import torch

__all__ = ["SolverStat", "ConvergenceTracker", "solver_stat_from_final_step", "residuals"]

INIT_RESIDUAL = 1e8
DIVERGENCE_FACTOR = 1e3
REL_EPS = 1e-9


class SolverStat(dict):
    """A dict of solver statistics; missing TorchDEQ keys default to TorchDEQ's -1 tensors.

    Keys: `abs_lowest`, `rel_lowest`, `nstep` (B,); `abs_trace`, `rel_trace` (B, N);
    `sradius` (set by the DEQ module); ours: `nfe` (int, number of `func` calls) and
    `n_fallback` (0-dim tensor, samples frozen by the safety net).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key in ("abs_lowest", "rel_lowest", "nstep", "sradius"):
            self.setdefault(key, torch.tensor([-1.0]))
        for key in ("abs_trace", "rel_trace"):
            self.setdefault(key, torch.tensor([[-1.0]]))


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics dtype: float64 for float64 states, float32 otherwise (as TorchDEQ)."""
    return torch.promote_types(dtype, torch.float32)


def residuals(fz: torch.Tensor, diff: torch.Tensor, dtype: torch.dtype):
    """Per-row absolute ||diff|| and relative ||diff|| / (||fz|| + 1e-9), in `dtype`."""
    abs_res = torch.linalg.vector_norm(diff, dim=1, dtype=dtype)
    rel_res = abs_res / (torch.linalg.vector_norm(fz, dim=1, dtype=dtype) + REL_EPS)
    return abs_res, rel_res


def row_dots(v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, D) . (B, n, D) -> (B, n), as a row-vector product: on CPU, bmm(v^T, R^T) is ~10x
    faster than bmm(R, v) for these shapes (measured, B=16, n=10, D=8192)."""
    return torch.bmm(v.unsqueeze(1), rows.transpose(1, 2)).squeeze(1)


# Below this row width, a batch of (1, n) x (n, D) products is slower through bmm (one
# tiny GEMM per sample) than as a broadcast multiply and sum (measured on CPU: B=512,
# n=4..8, D=32: bmm 190-310 us, multiply-sum 80-100 us; at D=64 bmm wins).
_NARROW_ROWS = 32


def row_mix(weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, n) weights . (B, n, D) rows -> (B, D): per sample, sum_i weights_i rows_i."""
    if rows.shape[2] <= _NARROW_ROWS:
        return (weights.unsqueeze(2) * rows).sum(dim=1)
    return torch.bmm(weights.unsqueeze(1), rows).squeeze(1)


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
    abs_res, rel_res = residuals(fz2, fz2 - z2, stat_dtype(z2.dtype))
    return SolverStat(
        abs_lowest=abs_res,
        rel_lowest=rel_res,
        abs_trace=abs_res.unsqueeze(1),
        rel_trace=rel_res.unsqueeze(1),
        nstep=torch.full_like(abs_res, float(nstep)),
    )


class ConvergenceTracker:
    """Per-sample statistics, best state, early exit and safety net of one solve.

    `z0` is the packed initial state (B, D); it is the best state until a step improves
    on it. `observe(k, state, abs_res, rel_res)` records step k (1-based). `return_final`
    makes the last state of each sample its returned one and disables the convergence
    exit (the safety net still freezes diverging samples).
    """

    def __init__(self, z0: torch.Tensor, max_iter: int, tol: float, stop_mode: str,
                 return_final: bool = False, sync_free: bool = False):
        batch = z0.shape[0]
        sdt = stat_dtype(z0.dtype)
        device = z0.device
        self.batch = batch
        self.tol = tol
        self.use_abs = stop_mode == "abs"
        self.return_final = return_final
        self.sync_free = sync_free
        self.best = z0
        # Row 0: absolute, row 1: relative residuals (one tensor, so one op updates both);
        # `lowest_stop` is the row of `stop_mode`, kept as its own view (no select per step).
        self.lowest = torch.full((2, batch), INIT_RESIDUAL, dtype=sdt, device=device)
        self.lowest_stop = self.lowest[0 if self.use_abs else 1]
        # Step of each sample's lowest residual; after a step where every sample improved
        # it is the host int `all_step` instead (no fill per step), made a tensor on demand.
        self._lowest_step = None
        self.all_step = 0
        # Step-major (max_iter + 1, 2, batch): step k's residuals are one contiguous block,
        # which the eager step writes directly (info() returns (batch, steps) views).
        self.trace = torch.full((max_iter + 1, 2, batch), INIT_RESIDUAL, dtype=sdt, device=device)
        self.active = torch.ones(batch, dtype=torch.bool, device=device)
        self.caught = torch.zeros(batch, dtype=torch.bool, device=device)
        self.limit = None  # 1e3 x first residual, set at step 1
        self.steps = 0
        self.nfe = 0
        # Host-side view of `active`, refreshed by the one sync per eager step.
        self.n_active = batch

    @property
    def done(self) -> bool:
        """True when no sample is active (eager only; sync-free never stops early)."""
        return not self.sync_free and self.n_active == 0

    @property
    def all_active(self) -> bool:
        """True when the host knows that every sample is still active (never in sync-free)."""
        return not self.sync_free and self.n_active == self.batch

    def active_rows(self) -> torch.Tensor:
        """Indices of the active rows (eager only: a host sync)."""
        return self.active.nonzero().squeeze(1)

    def freeze(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """`new` for active rows, `old` for stopped ones (no copy while all are active)."""
        if self.all_active:
            return new
        return torch.where(self.active.unsqueeze(1), new, old)

    @property
    def lowest_step(self) -> torch.Tensor:
        """Per-sample step of the lowest `stop_mode` residual (float, as TorchDEQ's nstep)."""
        if self._lowest_step is None:
            return self.lowest.new_full((self.batch,), float(self.all_step))
        return self._lowest_step

    def observe(self, k: int, state: torch.Tensor, abs_res: torch.Tensor,
                rel_res: torch.Tensor) -> None:
        """Record step k: `state` (B, D) is what this step would return, with its residuals."""
        active = self.active
        all_active = self.all_active
        if self.limit is None:  # -1 for a non-finite first residual: caught at once
            self.limit = torch.where(torch.isfinite(abs_res), DIVERGENCE_FACTOR * abs_res, -1.0)
        stop_res = abs_res if self.use_abs else rel_res
        ok = abs_res <= self.limit  # False for NaN and inf too
        if not all_active:
            ok = ok & active
        if self.return_final:
            improved = still_active = ok
        else:
            improved = ok & (stop_res < self.lowest_stop)
            still_active = ok & (stop_res >= self.tol)
        if all_active and not self.sync_free and not abs_res.requires_grad:  # no copy
            new = torch.stack((abs_res, rel_res), out=self.trace[k])
        else:  # stopped samples repeat their lowest values (unchanged by this step)
            new = torch.stack((abs_res, rel_res))
            self.trace[k] = new if all_active else torch.where(active, new, self.lowest)
        self.active = still_active
        self.steps = k
        if self.sync_free:
            self.caught = self.caught | (active & ~ok)
            self._update_lowest(k, state, new, improved)
            return
        # The one host sync of the step: three counts.
        n_active, n_improved, n_ok = torch.stack((still_active, improved, ok)).sum(dim=1).tolist()
        if n_ok < self.n_active:
            self.caught = self.caught | (active & ~ok)
        self.n_active = n_active
        if n_improved == self.batch:
            self.lowest = new
            self.lowest_stop = stop_res
            self._lowest_step = None
            self.all_step = k
            self.best = state
        elif n_improved:
            self._update_lowest(k, state, new, improved)

    def _update_lowest(self, k, state, new, improved) -> None:
        self.lowest = torch.where(improved, new, self.lowest)
        self.lowest_stop = self.lowest[0 if self.use_abs else 1]
        self._lowest_step = torch.where(improved, float(k), self.lowest_step)
        self.best = torch.where(improved.unsqueeze(1), state, self.best)

    def info(self) -> SolverStat:
        """The statistics of the solve so far; pads traces after an early exit."""
        if self.steps + 1 < self.trace.shape[0]:
            self.trace[self.steps + 1:] = self.lowest
        trace = self.trace.permute(1, 2, 0)  # (2, batch, max_iter + 1)
        return SolverStat(
            abs_lowest=self.lowest[0],
            rel_lowest=self.lowest[1],
            abs_trace=trace[0],
            rel_trace=trace[1],
            nstep=self.lowest_step,
            nfe=self.nfe,
            n_fallback=self.caught.sum(),
        )
