"""Backward passes of a DEQ: implicit differentiation (IFT) and phantom gradients.

A DEQ's forward solve runs without autograd; the functions here attach a gradient to the
solved state. Each takes `func`, the DEQ map in the solvers' single-argument convention
(a state is a tensor or a tuple of tensors, first dimension = batch, and `func` returns
the same structure), and a detached state `z`, and returns a list of states that carry
the gradient. They build graphs only when autograd is on (under `torch.no_grad()` the
states come back plain):

- `ift_grad`: one call z_out = f(z*) that keeps its graph, wrapped in an autograd.Function
  whose backward solves g = g J_f(z*) + dL/dz_out with the backward solver, one
  vector-Jacobian product per solver step (J is never formed), and then sends g through
  f's graph to f's inputs and parameters: dL/dtheta = g df/dtheta.
- `hook_ift_grad`: the same linear solve, run from a tensor hook on z_out.
- `phantom_grad`: `steps` damped steps z <- tau f(z) + (1 - tau) z that keep their graph
  (TorchDEQ's phantom gradient; unrolled BPTT is f_max_iter=0, grad=K, tau=1).

`backward_factory` builds one of these as a functor `(func, z, writer=None) -> list`,
which is what the DEQ module applies to each sampled state.
"""
from __future__ import annotations

import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import autograd

from core.utils.flatten import pack, unpack

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]

__all__ = ["backward_factory", "ift_grad", "hook_ift_grad", "phantom_grad", "damped_step", "make_pair",
           "state_tensors", "detach_state"]


# ----------------------------------------------------------------------------- states
def state_tensors(z: State) -> Tuple[torch.Tensor, ...]:
    """The tensors of a state (a tensor, or a tuple/list of tensors), as a tuple."""
    return (z,) if torch.is_tensor(z) else tuple(z)


def _like(z: State, tensors: Sequence[torch.Tensor]) -> State:
    """`tensors` in the structure of `z` (a tensor or a tuple)."""
    return tensors[0] if torch.is_tensor(z) else tuple(tensors)


def detach_state(z: State, requires_grad: bool = False) -> State:
    """A detached copy-free view of `z`, optionally a fresh autograd leaf."""
    return _like(z, [t.detach().requires_grad_(requires_grad) for t in state_tensors(z)])


# ------------------------------------------------------------------------ linear solve
def _solve_adjoint(fz, z, grad_out, b_solver, b_solver_kwargs, writer):
    """Solve g = g J_f(z) + grad_out for g (tuples of tensors), by VJPs through fz's graph."""

    def vjp(g: Tuple[torch.Tensor, ...]) -> Tuple[torch.Tensor, ...]:
        jg = autograd.grad(fz, z, g, retain_graph=True, allow_unused=True)
        return tuple(gz + (torch.zeros_like(zz) if j is None else j) for j, gz, zz in zip(jg, grad_out, z))

    single = len(fz) == 1
    func = (lambda g: vjp((g,))[0]) if single else (lambda g: vjp(tuple(g)))
    g0 = torch.zeros_like(grad_out[0]) if single else tuple(torch.zeros_like(g) for g in grad_out)
    g_star, _, info = b_solver(func, g0, **b_solver_kwargs)
    _check_backward(info, b_solver_kwargs)
    if writer is not None:
        writer(info)
    return (g_star,) if single else tuple(g_star)


def _check_backward(info: dict, b_solver_kwargs: dict) -> None:
    """Flag (info['b_converged'], per sample) and warn when the backward solve misses b_tol."""
    mode, tol = b_solver_kwargs.get("stop_mode", "abs"), b_solver_kwargs.get("tol")
    lowest = info.get(f"{mode}_lowest")
    if tol is None or not torch.is_tensor(lowest):
        return
    info["b_converged"] = lowest <= tol
    # The check needs a host sync; a sync-free solver keeps only the flag.
    if not b_solver_kwargs.get("sync_free", False) and not bool(info["b_converged"].all()):
        # A constant message, so Python shows it once per run instead of once per step.
        warnings.warn(f"DEQ backward solve did not reach b_tol={tol:g} ({mode}) for some samples "
                      "(see info['b_converged'] in backward_writer); raise b_max_iter or change b_solver",
                      RuntimeWarning, stacklevel=2)


# ------------------------------------------------------------------------------ IFT
class _IFT(autograd.Function):
    """Identity on f(z*) forward; backward replaces dL/df(z*) by the implicit adjoint g.

    Inputs after `spec` are the tensors of fz = f(z*), built with autograd on from the
    leaf z* (spec.z). The backward returns g for them, and autograd then carries g
    through fz's graph to f's parameters and inputs.
    """

    @staticmethod
    def forward(ctx, spec, *fz):
        ctx.spec = spec
        return tuple(t.view_as(t) for t in fz)

    @staticmethod
    @autograd.function.once_differentiable
    def backward(ctx, *grad_out):
        spec = ctx.spec
        g = _solve_adjoint(spec.fz, spec.z, grad_out, spec.b_solver, spec.b_solver_kwargs, spec.writer)
        return (None, *g)


class _IFTSpec:
    """What the IFT backward needs: the graph fz = f(z), the solver and the writer."""

    __slots__ = ("fz", "z", "b_solver", "b_solver_kwargs", "writer")

    def __init__(self, fz, z, b_solver, b_solver_kwargs, writer):
        self.fz, self.z = fz, z
        self.b_solver, self.b_solver_kwargs, self.writer = b_solver, b_solver_kwargs, writer


def ift_grad(func: Callable, z: State, b_solver: Callable, b_solver_kwargs: dict,
             writer: Optional[Callable] = None) -> List[State]:
    """[f(z*)] whose gradient is the implicit one: dL/dtheta = g df/dtheta, g = g J + dL/dz."""
    z_leaf = detach_state(z, requires_grad=True)
    fz = func(z_leaf)
    spec = _IFTSpec(state_tensors(fz), state_tensors(z_leaf), b_solver, b_solver_kwargs, writer)
    out = _IFT.apply(spec, *spec.fz)
    return [_like(z, out)]


def hook_ift_grad(func: Callable, z: State, b_solver: Callable, b_solver_kwargs: dict,
                  writer: Optional[Callable] = None) -> List[State]:
    """IFT through a tensor hook on f(z*) (TorchDEQ's `hook_ift`); same gradient as `ift_grad`.

    A tuple state is packed into one (B, D) matrix so that a single hook sees the whole
    gradient; the hook solves for g in the packed space.
    """
    z_leaf = detach_state(z, requires_grad=True)
    fz = state_tensors(func(z_leaf))
    if len(fz) > 1:
        packed, layout = pack(fz)
    else:
        packed, layout = fz[0].view_as(fz[0]), None
    z_tensors = state_tensors(z_leaf)

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad_out = (grad,) if layout is None else tuple(unpack(grad, layout))
        g = _solve_adjoint(fz, z_tensors, grad_out, b_solver, b_solver_kwargs, writer)
        return g[0] if layout is None else layout.flatten(g, what="IFT")

    if packed.requires_grad:
        packed.register_hook(hook)
    return [packed if layout is None else _like(z, unpack(packed, layout))]


# ---------------------------------------------------------------------- phantom gradient
def damped_step(func: Callable, z: State, tau: float) -> State:
    """z <- tau f(z) + (1 - tau) z (just f(z) for tau = 1)."""
    fz = func(z)
    if tau == 1.0:
        return fz
    return _like(z, [tau * f + (1.0 - tau) * t for f, t in zip(state_tensors(fz), state_tensors(z))])


def phantom_grad(func: Callable, z: State, steps: int, tau: float = 1.0, sup_gap: int = -1,
                 sup_loc: Optional[Sequence[int]] = None) -> List[State]:
    """`steps` damped steps from z (graph kept); returns the supervised states.

    With `sup_gap > 0` every `sup_gap`-th state is returned; with `sup_loc` the states at
    those steps plus the last; otherwise only the last (TorchDEQ's rules).
    """
    out = []
    for i in range(1, steps + 1):
        z = damped_step(func, z, tau)
        if (sup_gap > 0 and i % sup_gap == 0) or (sup_gap <= 0 and sup_loc and i in sup_loc):
            out.append(z)
    if sup_gap <= 0 or not out:
        out.append(z)
    return out


# ---------------------------------------------------------------------------- factory
def make_pair(target: Sequence, source: Sequence) -> list:
    """`source` aligned with `target`: itself if lengths match, a single value repeated."""
    if len(source) == len(target):
        return list(source)
    if len(source) == 1:
        return [source[0]] * len(target)
    raise ValueError(f"cannot align {len(source)} values with {len(target)} sampled states")


def backward_factory(grad_type: Union[str, int] = "ift", hook_ift: bool = False,
                     b_solver: Optional[Callable] = None, b_solver_kwargs: Optional[dict] = None,
                     sup_gap: int = -1, sup_loc: Optional[Sequence[int]] = None,
                     tau: float = 1.0) -> Callable:
    """A gradient functor `(func, z, writer=None) -> list of states` for one sampled state.

    `grad_type='ift'` gives implicit differentiation with `b_solver` (called with
    `b_solver_kwargs`: max_iter, tol, stop_mode and solver options), through an
    autograd.Function or, with `hook_ift`, a tensor hook; an int k gives the k-step
    phantom gradient with damping `tau` and supervision `sup_gap` / `sup_loc`.
    """
    if grad_type == "ift":
        if b_solver is None:
            raise ValueError("IFT needs a backward solver (b_solver)")
        kwargs = dict(b_solver_kwargs or {})
        ift = hook_ift_grad if hook_ift else ift_grad
        return lambda func, z, writer=None: ift(func, z, b_solver, kwargs, writer)
    if isinstance(grad_type, bool) or not isinstance(grad_type, int) or grad_type < 0:
        raise ValueError(f"grad_type must be 'ift' or a number of phantom steps >= 0, got {grad_type!r}")
    sup_loc = list(sup_loc or [])
    return lambda func, z, writer=None: phantom_grad(func, z, grad_type, tau, sup_gap, sup_loc)
