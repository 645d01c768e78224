"""Jacobian regularisation (TorchDEQ paper eq. 17-18) and its training-loop helper.

`jac_reg(f0, z0)` is the Hutchinson estimate of ||J_f(z0)||_F^2 / d, averaged over the
batch: for v ~ N(0, I), E ||v^T J||^2 = ||J||_F^2. With `create_graph=True` its gradient
reaches f's parameters (and, when z0 is itself a function of them, flows through z0 too).

`jac_loss(args, f, z, step)` is what a training step adds for the "IFT + JR" recipe of
the DEQ repository (locuslab/deq): with probability `jac_loss_freq` per step, the weighted
estimate at the equilibrium, with f evaluated at a detached copy of z* so that the
regulariser shapes f's Jacobian there without back-propagating through the solver.
`jac_incremental = N > 0` follows that repository exactly: its training loops add 0.1 to
`jac_loss_weight` after every N steps (only when the weight and the frequency are
positive), so step s (0-based) uses weight + 0.1 * (s // N).
"""
from __future__ import annotations

import random
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import torch

from core.config import DEQConfig

__all__ = ["jac_reg", "jac_loss", "jac_loss_weight"]

State = Union[torch.Tensor, Sequence[torch.Tensor]]


def _as_tuple(x: State) -> Tuple[torch.Tensor, ...]:
    return (x,) if torch.is_tensor(x) else tuple(x)


def jac_reg(f0: State, z0: State, vecs: int = 1, create_graph: bool = True) -> torch.Tensor:
    """Hutchinson estimate of ||J||_F^2 / d (batch mean), J = d f0 / d z0.

    Args:
        f0: f(z0), a tensor or a tuple of tensors (batch first).
        z0: the input f was evaluated at; it must require grad and f0 must be computed
            from it. To regularise at a point that does not require grad (an evaluation
            output, a detached z*), use `z0 = z.detach().requires_grad_()` and
            `f0 = f(z0)` (as `jac_loss` does): f0 cannot be re-attached after the fact.
        vecs: number of Gaussian probe vectors (the estimate's variance falls as 1/vecs).
        create_graph: keep the graph so that the estimate can be trained on.

    Returns:
        A 0-dim tensor: sum over probes of ||v^T J||^2 / vecs / numel(z0).
    """
    f0s, z0s = _as_tuple(f0), _as_tuple(z0)
    if not all(z.requires_grad for z in z0s):
        raise ValueError("jac_reg: z0 does not require grad, so f0 = f(z0) has no Jacobian to estimate. "
                         "Evaluate f at z0 = z.detach().requires_grad_() (see core.reg.jac_loss).")
    if vecs < 1:
        raise ValueError(f"jac_reg: vecs must be >= 1, got {vecs}")
    numel = sum(z.numel() for z in z0s)
    squares = []
    for _ in range(vecs):
        probes = [torch.randn_like(f) for f in f0s]
        vjps = torch.autograd.grad(f0s, z0s, probes, retain_graph=True, create_graph=create_graph,
                                   allow_unused=True)
        squares.extend(g.square().sum() for g in vjps if g is not None)
    total = torch.stack(squares).sum() if squares else z0s[0].new_zeros(())
    return total / vecs / numel


def jac_loss_weight(args: Any, step: int) -> float:
    """The Jacobian-loss weight at training step `step` (0-based), with jac_incremental."""
    cfg = DEQConfig.from_any(args)
    weight = float(cfg.jac_loss_weight)
    if cfg.jac_incremental > 0 and weight > 0 and cfg.jac_loss_freq > 0:
        weight += 0.1 * (step // cfg.jac_incremental)
    return weight


def jac_loss(args: Any, f: Callable, z: State, step: int = 0, vecs: int = 1,
             rng: Optional[random.Random] = None) -> torch.Tensor:
    """The Jacobian-regularisation term to add to this step's loss (0 when it is skipped).

    Args:
        args: any config holding jac_loss_weight, jac_loss_freq, jac_incremental.
        f: the DEQ function: `f(z)` for a tensor state, `f(*zs)` for a tuple state.
        z: the equilibrium (e.g. the last state a DEQ returned); it is detached.
        step: the 0-based training step (for jac_incremental).
        vecs: Hutchinson probes.
        rng: the random source deciding whether this step is regularised (Python's
            `random` by default; the draw happens on the host, no device sync).

    Returns:
        weight * jac_reg(f(z'), z') with z' = z.detach().requires_grad_(), or a 0-dim zero
        on z's device when weight or frequency is 0 or the draw skips this step.
    """
    cfg = DEQConfig.from_any(args)
    zs = _as_tuple(z)
    weight = jac_loss_weight(cfg, step)
    draw = (rng or random).random()
    if weight <= 0 or not draw < cfg.jac_loss_freq:
        return torch.zeros((), device=zs[0].device, dtype=zs[0].dtype)
    with torch.enable_grad():
        z0 = tuple(t.detach().requires_grad_() for t in zs)
        f0 = f(z0[0]) if torch.is_tensor(z) else f(*z0)
        return weight * jac_reg(f0, z0 if not torch.is_tensor(z) else z0[0], vecs=vecs, create_graph=True)
