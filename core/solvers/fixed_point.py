"""Fixed-point iteration z <- z + tau (f(z) - z), with and without statistics."""
from __future__ import annotations

import torch

from .problem import FixedPointProblem, check_tau
from .registry import register_solver
from .stat import solver_stat_from_final_step

__all__ = ["fixed_point_iter", "simple_fixed_point_iter"]


def fixed_point_iter(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None,
                     return_final=False, tau=1.0, sync_free=False, batch_independent=False,
                     whole_state=False, **kwargs):
    """Damped fixed-point iteration with per-sample statistics and early exit.

    Step k evaluates f once at the current state z and moves to z + tau (f(z) - z); that
    new state is the one step k returns, and its residuals are ||f(z) - z|| (abs) and
    ||f(z) - z|| / (||f(z)|| + 1e-9) (rel). (TorchDEQ measures the damped step instead,
    i.e. tau times ours.) One `func` call per step.

    Args:
        func: maps a state (tensor or tuple/list of tensors, dim 0 = batch) to the same.
        x0: initial state.
        max_iter: number of steps at most (>= 0).
        tol: a sample stops once its `stop_mode` residual is below tol (> 0).
        stop_mode: 'abs' or 'rel'.
        indexing: step numbers at which to return the best state so far.
        return_final: run all steps and return the last state instead of the best.
        tau: damping (> 0); 1 is plain iteration.
        sync_free: no host synchronisation (fixed `max_iter` steps, masks), compile-able;
            under torch.compile / torch.export it is on by itself.
        check_every: with sync_free in eager mode, read on the host every `check_every`
            steps whether a sample is still active and stop if none is; 0 or None: never
            (the whole budget, as CUDA graphs need). Under torch.compile (no autograd,
            not with return_final) fixed_point_iter, anderson and broyden stop when
            converged, in a `torch.while_loop` (`FixedPointProblem.while_active`), unless
            check_every=0; None means: on CPU yes, on other devices the whole budget.
            There check_every=N runs N steps in each iteration of the loop (one
            convergence test per N steps; `nfe` counts the steps run after the stop).
        batch_independent: eager only (masking under torch.compile, with a warning):
            converged samples leave later `func` calls, so
            `func` must treat rows independently; if it has a `rows` keyword it is given
            the indices (into x0's batch) of the rows it receives, else it must not depend
            on a row's position (no per-sample tensors captured by a closure).
        whole_state: the whole state is one sample (coupled systems).

    Returns:
        (z, states_at_indexing, info): the best state (the structure of x0), one state per
        entry of `indexing`, and a `SolverStat` (see `core.solvers.stat`).
    """
    p = FixedPointProblem("fixed_point_iter", func, x0, max_iter, tol, stop_mode, indexing,
                          return_final, sync_free, batch_independent, whole_state, kwargs)
    check_tau("fixed_point_iter", tau)
    tracker = p.tracker()
    sdt, want = p.norm_dtype, p.want
    captured = p.start_captures(p.z0)
    z = p.z0
    z_next = None
    peel = p.early_exit_loop  # step 1 here (it may set dropout masks), the rest in a while loop
    for k in range(1, (min(p.max_iter, 1) if peel else p.max_iter) + 1):
        if z_next is not None:
            z = tracker.freeze(z_next, z)
        fz = p.call(z, tracker)
        diff = fz - z
        z_next = fz if tau == 1.0 else torch.add(z, diff, alpha=tau)
        abs_out, norm_out = tracker.outputs(k)
        tracker.observe(k, z_next, torch.linalg.vector_norm(diff, dim=1, dtype=sdt, out=abs_out),
                        torch.linalg.vector_norm(fz, dim=1, dtype=sdt, out=norm_out))
        if k in want:
            captured[k] = tracker.best
        if tracker.done:
            break
    if peel and p.max_iter > 1:
        tracker, nfe = p.while_active(tracker, captured, (tracker.freeze(z_next, z),),
                                      lambda k, t, state: _step(p, t, k, state[0], tau))
        return p.result(tracker, captured, nfe)
    return p.result(tracker, captured)


def _step(p: FixedPointProblem, t, k, z, tau):
    """Step k (a 0-dim tensor) of a compiled solve's while loop, from the iterate z."""
    sdt = p.norm_dtype
    fz = p.call_pure(z)
    diff = fz - z
    z_next = fz if tau == 1.0 else torch.add(z, diff, alpha=tau)
    t.observe(k, z_next, torch.linalg.vector_norm(diff, dim=1, dtype=sdt),
              torch.linalg.vector_norm(fz, dim=1, dtype=sdt))
    return (t.freeze(z_next, z),)


def simple_fixed_point_iter(func, x0, max_iter=50, tol=1e-3, stop_mode="abs", indexing=None,
                            return_final=False, tau=1.0, sync_free=False,
                            batch_independent=False, whole_state=False, **kwargs):
    """Fixed-point iteration without per-step statistics: always `max_iter` steps.

    The cheapest solver: no residuals, no best-state tracking, no host synchronisation,
    and a tuple/list state is never packed into a matrix. `tol`, `stop_mode`,
    `return_final`, `sync_free`, `batch_independent` and `check_every` are accepted (so configs can switch
    solvers) and have no effect. `info` reports the residual of the last step
    (`solver_stat_from_final_step`, traces of one column, `nstep` = max_iter), plus `nfe`
    and `n_fallback` = 0. `states_at_indexing` holds the state after each listed step.
    """
    p = FixedPointProblem("simple_fixed_point_iter", func, x0, max_iter, tol, stop_mode,
                          indexing, return_final, sync_free, batch_independent, whole_state,
                          kwargs)
    check_tau("simple_fixed_point_iter", tau)
    layout = p.layout
    want = p.want
    captured = p.start_captures(x0)
    z = fz = x0
    for k in range(1, p.max_iter + 1):
        z = fz
        out = func(z)
        layout.flatten(out, rows=layout.rows, what="simple_fixed_point_iter: func")
        fz = out if tau == 1.0 else _damp(z, out, tau)
        if k in want:
            captured[k] = fz
    if p.max_iter == 0:
        info = solver_stat_from_final_step(p.z0, p.z0, 0)
    elif layout.whole_state:
        info = solver_stat_from_final_step(layout.flatten(z, what="z"),
                                           layout.flatten(fz, what="z"), p.max_iter)
    else:
        info = solver_stat_from_final_step(z, fz, p.max_iter)
    info["nfe"] = torch.full((), p.max_iter, dtype=torch.long, device=p.z0.device)
    info["n_fallback"] = torch.zeros((), dtype=torch.long, device=p.z0.device)
    states = [captured.get(i, fz) for i in p.indexing]
    return fz, states, info


def _damp(z, fz, tau):
    if torch.is_tensor(z):
        return torch.lerp(z, fz, tau)
    return type(z)(torch.lerp(a, b, tau) for a, b in zip(z, fz))


register_solver("fixed_point_iter", fixed_point_iter)
register_solver("simple_fixed_point_iter", simple_fixed_point_iter)
