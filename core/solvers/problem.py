"""The fixed-point problem a solver works on: checked arguments, packed state, wrapped func.

`FixedPointProblem` does what every solver needs before its loop: it validates the
common arguments (ValueError saying what to change), rejects unknown keywords (see
`registry.check_options`), packs `x0` into a (B, D) matrix (`core.utils.flatten`), and
wraps `func` so the solver calls it on rows. The wrapper checks that `func` keeps the
state's structure, shape and dtype, counts calls, and with `batch_independent` passes
only the active rows to `func`.
"""
from __future__ import annotations

import inspect

import torch

from core.utils.flatten import StateLayout

from .registry import check_options
from .stat import ConvergenceTracker, SyncFreeTracker, stat_dtype

__all__ = ["FixedPointProblem", "check_tau"]


def _accepts_rows(func) -> bool:
    """Whether func takes a `rows` keyword (the batch rows it is given, for batch_independent)."""
    try:
        return "rows" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        return False

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class FixedPointProblem:
    """Validated inputs of one solve.

    Attributes: `layout` (how the state packs into rows), `z0` (B, D) packed initial state
    in the state dtype, `work_dtype` (float32 for float16/bfloat16 states so that solver
    algebra runs in float32, else the state dtype), and the common options.
    """

    def __init__(self, name: str, func, x0, max_iter, tol, stop_mode, indexing, return_final,
                 sync_free, batch_independent, whole_state, extra: dict):
        check_options(name, extra)
        if not callable(func):
            raise ValueError(f"{name}: func must be callable, got {type(func).__name__}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
            raise ValueError(f"{name}: max_iter must be an int >= 0, got {max_iter!r}")
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not tol > 0:
            raise ValueError(f"{name}: tol must be a number > 0, got {tol!r}")
        if stop_mode not in ("abs", "rel"):
            raise ValueError(f"{name}: stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
        if indexing is not None and (
                isinstance(indexing, (str, bytes)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indexing)):
            raise ValueError(
                f"{name}: indexing must be None or a list of step numbers (ints >= 0), "
                f"got {indexing!r}")
        if sync_free and batch_independent:
            raise ValueError(
                f"{name}: sync_free=True needs static shapes and batch_independent=True drops "
                "rows; set one of them to False")
        self.name = name
        self.func = func
        self.max_iter = max_iter
        self.tol = float(tol)
        self.stop_mode = stop_mode
        self.indexing = list(indexing) if indexing else []
        self.return_final = bool(return_final)
        self.sync_free = bool(sync_free)
        self.batch_independent = bool(batch_independent)
        self.pass_rows = self.batch_independent and _accepts_rows(func)
        self.layout = StateLayout.of(x0, whole_state=bool(whole_state))
        self.z0 = self.layout.flatten(x0, what="x0")
        self.dtype = self.z0.dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"{name}: x0 must be floating point, got {self.dtype}")
        self.work_dtype = torch.float32 if self.dtype in _LOW_PRECISION else self.dtype
        self.stat_dtype = stat_dtype(self.dtype)
        self.want = frozenset(self.indexing)  # steps whose best state is captured
        self.nfe = 0
        # False for solvers that write func's outputs into buffers in place (Anderson
        # and Broyden): autograd cannot follow them.
        self.differentiable = True

    def start_captures(self, state) -> dict:
        """The captured states before step 1: `state` at step 0 if `indexing` lists it."""
        return {0: state} if 0 in self.want else {}

    def tracker(self) -> ConvergenceTracker | SyncFreeTracker:
        """A fresh tracker for this problem's statistics, best state and early exit."""
        kind = SyncFreeTracker if self.sync_free else ConvergenceTracker
        return kind(self.z0, self.max_iter, self.tol, self.stop_mode, self.return_final)

    def call(self, z: torch.Tensor, tracker: ConvergenceTracker | None = None) -> torch.Tensor:
        """func on the rows of z (B, D), in the state dtype; returns f(z) as (B, D).

        With `batch_independent` and some rows stopped, only the active rows go through
        `func`; the stopped rows of the result are copies of their input rows. A `func`
        with a `rows` keyword is told which rows of the batch it gets (a LongTensor, or
        None for all), so it can index its per-sample inputs (the injection of a DEQ).
        """
        self.nfe += 1
        if (self.batch_independent and tracker is not None and not tracker.all_active):
            rows = tracker.active_rows()
            out = z.clone()
            if rows.numel():
                out.index_copy_(0, rows, self._call_rows(z.index_select(0, rows), rows))
            return out
        return self._call_rows(z, None)

    def _call_rows(self, z: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        state = self.layout.unflatten(z)
        out = self.func(state, rows=rows) if self.pass_rows else self.func(state)
        out = self.layout.flatten(out, rows=z.shape[0], what=f"{self.name}: func")
        if self.nfe == 1 and not self.differentiable and out.requires_grad:
            raise RuntimeError(
                f"{self.name}: func's output requires grad, but {self.name} writes it into its "
                "history in place, which autograd cannot follow; run the solve under "
                "torch.no_grad() (a DEQ does, and differentiates the fixed point instead) or "
                "use fixed_point_iter to backpropagate through the iterations")
        return out

    def unpack(self, z: torch.Tensor):
        """A (B, D) matrix back into the structure of x0."""
        return self.layout.unflatten(z)

    def result(self, tracker: ConvergenceTracker, captured: dict[int, torch.Tensor]):
        """The solver's return value: (best state, states at `indexing`, info with nfe)."""
        tracker.nfe = self.nfe
        return self.unpack(tracker.best), self.states_at(captured, tracker.best), tracker.info()

    def states_at(self, captured: dict[int, torch.Tensor], final: torch.Tensor) -> list:
        """One state per entry of `indexing`: captured at that step, else the final best."""
        return [self.unpack(captured.get(i, final)) for i in self.indexing]


def check_tau(name: str, tau) -> None:
    """ValueError unless the damping `tau` is a number > 0."""
    if not isinstance(tau, (int, float)) or isinstance(tau, bool) or not tau > 0:
        raise ValueError(f"{name}: tau (damping) must be a number > 0, got {tau!r}")
