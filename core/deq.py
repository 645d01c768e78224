"""The DEQ module: a fixed-point solve plus the graph that makes it trainable.

`get_deq(args=None, **kw)` builds one of two graphs (TorchDEQ's names and meaning):

- `sliced` (default): the solve runs in slices (`n_states` equal slices, or the segments
  between the `indexing` steps) without autograd; after each slice a gradient functor
  (phantom gradient, or IFT for the last one when `ift`/`hook_ift`) is applied and the
  next slice resumes from its output. `info` covers the whole solve (TorchDEQ reports
  only the last slice).
- `indexing`: one solve that also returns the states at the `indexing` steps; a gradient
  functor is attached beside the solve to each of them and to the best state.

`z_out, info = deq(f, z_init, solver_kwargs=None, sradius_mode=False,
backward_writer=None)`: `f(z)` for a tensor state, `f(*zs)` returning a tuple for a
list/tuple state; `z_out` is a list of states (the last is the best estimate).

In evaluation mode the solve uses the eval budget and returns `[z*]`; if autograd is on
and f depends on something that requires grad (parameters, the input: inversion and
attacks), the configured backward is attached to z* as in training, so the output is
differentiable (TorchDEQ returns a detached one). Under `torch.no_grad()` nothing is
attached.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from core.config import DEQConfig
from core.grad import State, state_tensors, backward_factory, detach_state, make_pair
from core.solvers import get_solver
from core.solvers.stat import solver_stat_from_final_step
from core.utils.tracing import tracing

__all__ = ["DEQBase", "DEQSliced", "DEQIndexing", "get_deq", "register_deq", "reset_deq"]

# Call-time solver_kwargs keys that override the module's budget / tolerance / stop mode.
_BUDGET_KEYS = ("f_max_iter", "max_iter")
_TOL_KEYS = ("f_tol", "tol")
_STOP_KEYS = ("f_stop_mode", "stop_mode")


def _solver(name: str, option: str) -> Callable:
    """The registered solver `name`; ValueError naming the option and the registered solvers."""
    try:
        return get_solver(name)
    except ValueError as err:
        raise ValueError(f"deq.{option}: {err}") from None


class _UserFunc:
    """f in the solvers' convention: one argument with the structure of the state.

    A tensor state calls `f(z)`; a list/tuple state calls `f(*zs)` and expects a
    list/tuple back (TorchDEQ's convention), handled as a tuple inside. With `record`
    on, the last call's (z, f(z)) is kept: the statistics of a call that ran no solver
    come from it, without an extra call of f.
    """

    __slots__ = ("func", "multi", "record", "last")

    def __init__(self, func: Callable, multi: bool):
        self.func, self.multi = func, multi
        self.record, self.last = False, None

    def __call__(self, z: State) -> State:
        fz = self.func(z) if not self.multi else tuple(self.func(*z))
        if self.record:
            self.last = (z, fz)
        return fz

    def to_user(self, z: State):
        return list(z) if self.multi else z


class DEQBase(nn.Module):
    """Options, solvers and gradient functors shared by the two graphs.

    Every option is read once, here, through `DEQConfig.from_any(args, **kwargs)` and
    validated; the forward only looks up attributes.
    """

    def __init__(self, args: Any = None, **kwargs: Any):
        super().__init__()
        cfg = DEQConfig.from_any(args, **kwargs)
        self.args = cfg
        self.f_solver = _solver(cfg.f_solver, "f_solver")
        self.b_solver = _solver(cfg.b_solver, "b_solver")
        self.no_stat = cfg.stat_off()
        self.f_max_iter, self.b_max_iter = cfg.f_max_iter, cfg.b_max_iter
        self.f_tol, self.b_tol = cfg.f_tol, cfg.b_tol
        self.f_stop_mode, self.b_stop_mode = cfg.f_stop_mode, cfg.b_stop_mode
        self.eval_f_max_iter = cfg.eval_max_iter()
        self.f_solver_kwargs = dict(cfg.f_solver_kwargs)
        self.ift = bool(cfg.ift or cfg.hook_ift)
        self.indexing = self._compute_f_iter(self.f_max_iter)
        grads = make_pair(self.indexing, cfg.grad_list())
        sup = dict(tau=float(cfg.tau), sup_gap=cfg.sup_gap, sup_loc=cfg.sup_loc)
        self.produce_grad = [backward_factory(grad_type=g, **sup) for g in grads]
        if self.ift:
            b_kwargs = dict(cfg.b_solver_kwargs, max_iter=cfg.b_max_iter, tol=cfg.b_tol, stop_mode=cfg.b_stop_mode)
            self.produce_grad[-1] = backward_factory("ift", hook_ift=cfg.hook_ift, b_solver=self.b_solver,
                                                     b_solver_kwargs=b_kwargs)

    # ------------------------------------------------------------------ subclass hooks
    def _compute_f_iter(self, f_max_iter: int) -> List[int]:
        raise NotImplementedError

    def _train_graph(self, func, z0, budget, solver_kwargs, writer):
        raise NotImplementedError

    # ------------------------------------------------------------------------ helpers
    def _solve(self, func, z0, max_iter, solver_kwargs, indexing=None):
        """The forward solver without autograd; (z*, states at indexing, info)."""
        with torch.no_grad():
            return self.f_solver(func, z0, max_iter=max_iter, indexing=indexing, **solver_kwargs)

    def _call_options(self, solver_kwargs: Optional[Dict[str, Any]], training: bool):
        """(budget, kwargs for the solver) for one call; solver_kwargs override the module."""
        kwargs = dict(self.f_solver_kwargs, tol=self.f_tol, stop_mode=self.f_stop_mode)
        budget = self.f_max_iter if training else self.eval_f_max_iter
        for key, value in (solver_kwargs or {}).items():
            if key in _BUDGET_KEYS:
                budget = int(value)
            elif key in _TOL_KEYS:
                kwargs["tol"] = value
            elif key in _STOP_KEYS:
                kwargs["stop_mode"] = value
            else:
                kwargs[key] = value
        return budget, kwargs

    def _sradius(self, func, z: State) -> torch.Tensor:
        """Per-sample spectral radius of J_f(z*) by the power method (100 iterations)."""
        from core.reg import power_method

        z = detach_state(z, requires_grad=True)
        with torch.enable_grad():
            fz = func(z)
        _, sradius = power_method(fz, z, n_iters=100)
        return sradius

    # ------------------------------------------------------------------------ forward
    def forward(self, func: Callable, z_init, solver_kwargs: Optional[Dict[str, Any]] = None,
                sradius_mode: bool = False, backward_writer: Optional[Callable] = None, **kwargs):
        """Solve z = f(z) from z_init; return (list of states, solver info)."""
        if kwargs:
            raise TypeError(f"unknown DEQ forward argument(s): {', '.join(kwargs)}")
        multi = not torch.is_tensor(z_init)
        f = _UserFunc(func, multi)
        z0 = detach_state(tuple(z_init) if multi else z_init)
        budget, kw = self._call_options(solver_kwargs, self.training)
        if self.training:
            z_out, info = self._train_graph(f, z0, budget, kw, backward_writer)
        else:
            z_out, info = self._eval_graph(f, z0, budget, kw, backward_writer)
        if sradius_mode:
            info["sradius"] = self._sradius(f, detach_state(z_out[-1]))
        return [f.to_user(z) for z in z_out], info

    def _eval_graph(self, func, z0, budget, solver_kwargs, writer):
        if budget > 0:
            z_star, _, info = self._solve(func, z0, budget, solver_kwargs)
        else:
            z_star, info = z0, None
            func.record = True
        z_out = [z_star]
        if torch.is_grad_enabled():
            attached = self.produce_grad[-1](func, z_star, writer=writer)
            if _depends_on_grad(attached[-1], z_star, func):
                z_out = [attached[-1]]
        return z_out, info if info is not None else _no_solve_info(func, z_star)


class DEQSliced(DEQBase):
    """Solve in slices; a gradient functor after each slice, the next slice resumes from it."""

    def _compute_f_iter(self, f_max_iter: int) -> List[int]:
        """Slice lengths: n_states equal slices, or the segments between the indexing steps."""
        n_states = self.args.n_states
        if n_states > 1:
            return [f_max_iter // n_states] * n_states
        steps = [0, *(self.args.indexing or []), f_max_iter]
        return [b - a for a, b in zip(steps[:-1], steps[1:])]

    def _train_graph(self, func, z0, budget, solver_kwargs, writer):
        slices = self.indexing if budget == self.f_max_iter else self._compute_f_iter(budget)
        z, z_out, infos, lengths = z0, [], [], []
        func.record = not any(slices)
        for length, produce_grad in zip(slices, self.produce_grad):
            if length > 0:
                z, _, info = self._solve(func, detach_state(z), length, solver_kwargs)
                infos.append(info)
                lengths.append(length)
            z_out += produce_grad(func, detach_state(z), writer=writer)
            z = z_out[-1]
        if not infos:
            return z_out, _no_solve_info(func, z)
        return z_out, merge_infos(infos, lengths, solver_kwargs["stop_mode"])


class DEQIndexing(DEQBase):
    """One solve; gradient functors attached beside it at the indexing steps and at z*."""

    def _compute_f_iter(self, f_max_iter: int) -> List[int]:
        """Steps at which states are sampled; the last is the whole budget (the best state)."""
        n_states = self.args.n_states
        if n_states > 1:
            n = max(min(f_max_iter, n_states), 1)
            delta = f_max_iter // n
            return [f_max_iter - (n - k - 1) * delta for k in range(n)]
        return [*(self.args.indexing or []), f_max_iter]

    def _train_graph(self, func, z0, budget, solver_kwargs, writer):
        indexing = self.indexing if budget == self.f_max_iter else self._compute_f_iter(budget)
        if budget > 0:
            # The last sampled state is the solver's best, not the state at step `budget`.
            z_star, states, info = self._solve(func, z0, budget, solver_kwargs, indexing=indexing[:-1] or None)
        else:
            z_star, states, info = z0, [z0] * (len(indexing) - 1), None
            func.record = True
        z_out = []
        for z, produce_grad in zip([*(states or []), z_star], self.produce_grad):
            z_out += produce_grad(func, detach_state(z), writer=writer)
        return z_out, info if info is not None else _no_solve_info(func, z_star)


# --------------------------------------------------------------------------- info
def merge_infos(infos: Sequence[dict], lengths: Sequence[int], stop_mode: str = "abs") -> dict:
    """One info for consecutive solves of `lengths` steps (the slices of one sliced solve).

    Traces are concatenated, lowest residuals are the lowest over the slices, `nstep` is
    the step of the whole solve (slice offset + step in the slice) at which the lowest
    `stop_mode` residual was first reached, and `nfe` / `n_fallback` are summed.
    """
    if len(infos) == 1:
        return infos[0]
    merged = type(infos[-1])(infos[-1])  # keeps SolverStat
    key = f"{stop_mode}_lowest"
    best, offset = infos[0], 0
    lowest, nstep = best[key], best["nstep"]
    abs_lowest, rel_lowest = best["abs_lowest"], best["rel_lowest"]
    for info, length in zip(infos[1:], lengths[:-1]):
        offset += length
        better = info[key] < lowest
        lowest = torch.where(better, info[key], lowest)
        nstep = torch.where(better, info["nstep"] + offset, nstep)
        abs_lowest = torch.where(better, info["abs_lowest"], abs_lowest)
        rel_lowest = torch.where(better, info["rel_lowest"], rel_lowest)
    merged.update(abs_lowest=abs_lowest, rel_lowest=rel_lowest, nstep=nstep,
                  abs_trace=torch.cat([i["abs_trace"] for i in infos], dim=-1),
                  rel_trace=torch.cat([i["rel_trace"] for i in infos], dim=-1))
    for count in ("nfe", "n_fallback"):
        if all(count in i for i in infos):
            merged[count] = sum(i[count] for i in infos)
    return merged


def _no_solve_info(func: _UserFunc, z: State) -> dict:
    """Statistics of a call that ran no solver (budget 0): the residual of f's last step.

    That is the unrolled step that made the output (z_{K-1}, f(z_{K-1})), or one extra
    call f(z) when f was not called at all (evaluation under no_grad).
    """
    z_last, fz = func.last if func.last is not None else (z, None)
    func.record, func.last = False, None
    with torch.no_grad():
        fz = func(detach_state(z_last)) if fz is None else fz
        info = solver_stat_from_final_step(detach_state(z_last), detach_state(fz))
    info.update(nfe=0, n_fallback=torch.zeros((), dtype=torch.long, device=info["abs_lowest"].device))
    return info


def _depends_on_grad(out: State, z_star: State, func: Optional[Callable] = None) -> bool:
    """Does out's graph reach a leaf requiring grad other than (a detached alias of) z*?

    Used in evaluation mode: the IFT graph always reaches its own leaf z*, which does not
    count; any other leaf (a parameter of f, an input) means the caller wants gradients.
    Under a trace (torch.compile, fullgraph too) autograd nodes cannot be walked; there
    `f(z*)` from a detached z* answers instead: it requires grad exactly when f reaches
    such a leaf, which the trace knows as a constant (the recorded last call is kept).
    """
    if tracing() and func is not None:
        last = func.last
        probe = func(detach_state(z_star))
        func.last = last
        return any(t.requires_grad for t in state_tensors(probe))
    own = {t.data_ptr() for t in state_tensors(z_star)}
    stack = [t.grad_fn for t in state_tensors(out) if t.grad_fn is not None]
    stack += [t for t in state_tensors(out) if t.requires_grad and t.grad_fn is None]
    seen = set()
    while stack:
        node = stack.pop()
        if torch.is_tensor(node):
            if node.data_ptr() not in own:
                return True
            continue
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            if variable.data_ptr() not in own:
                return True
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return False


# ------------------------------------------------------------------------ registry
_CORES: Dict[str, type] = {"sliced": DEQSliced, "indexing": DEQIndexing}


def register_deq(deq_type: str, core: type) -> None:
    """Make `get_deq(core=deq_type)` build `core` (a DEQBase subclass).

    The name is also added to the `core` values that DEQConfig.validate accepts.
    """
    from core import config

    _CORES[deq_type] = core
    if deq_type not in config.CORES:
        config.CORES = (*config.CORES, deq_type)


def get_deq(args: Any = None, **kwargs: Any) -> DEQBase:
    """The DEQ module named by the `core` option ('sliced' by default), from args and/or kwargs."""
    cfg = DEQConfig.from_any(args, **kwargs)
    if cfg.core not in _CORES:
        raise ValueError(f"deq.core={cfg.core!r} is not registered; choose one of {', '.join(_CORES)}")
    return _CORES[cfg.core](cfg)


def reset_deq(model: nn.Module) -> None:
    """Reset the DEQ weight norms and variational-dropout masks of `model` (once per forward)."""
    from core.norm import reset_norm
    from core.utils.dropout import reset_dropout

    reset_norm(model)
    reset_dropout(model)
