"""Gradient checkpointing of one DEQ step, so an unrolled graph keeps O(1) of f's activations.

`mem_gc(func, in_args)` calls the module `func(*in_args)` through an autograd.Function that
keeps only the inputs; the backward recomputes f with autograd on and takes one
vector-Jacobian product w.r.t. the inputs that require grad and the module's parameters.
In a K-step unrolled graph (`f_max_iter=0, grad=K`) each step then holds one state
instead of all of f's activations, for about one extra forward of f per step.

The random-number state is saved and restored around the recomputation (unless
`preserve_rng_state=False`), so ordinary dropout inside f draws the same mask twice.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["mem_gc"]


def _module_params(func: nn.Module) -> List[torch.Tensor]:
    """Tensors f reads that require grad: parameters, or a DataParallel replica's tensors."""
    if getattr(func, "_is_replica", False):
        return [v for m in func.modules() for v in vars(m).values() if torch.is_tensor(v) and v.requires_grad]
    return [p for p in func.parameters() if p.requires_grad]


def _rng_devices(tensors: Sequence[Any]) -> List[torch.device]:
    return sorted({t.device for t in tensors if torch.is_tensor(t) and t.device.type != "cpu"}, key=str)


def _get_rng(devices):
    return torch.get_rng_state(), [torch.get_device_module(d.type).get_rng_state(d) for d in devices]


def _set_rng(state, devices):
    cpu, others = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, others):
        torch.get_device_module(d.type).set_rng_state(s, d)


class _GradCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, func, preserve_rng_state, n_args, *args):
        in_args, params = args[:n_args], args[n_args:]
        ctx.func, ctx.params = func, params
        tensor_idx = [i for i, a in enumerate(in_args) if torch.is_tensor(a)]
        ctx.others = [a if not torch.is_tensor(a) else None for a in in_args]
        ctx.tensor_idx = tensor_idx
        ctx.save_for_backward(*[in_args[i] for i in tensor_idx])
        ctx.devices = _rng_devices(in_args) if preserve_rng_state else None
        ctx.rng = _get_rng(ctx.devices) if preserve_rng_state else None
        out = func(*in_args)
        ctx.single = torch.is_tensor(out)
        return out if ctx.single else tuple(out)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *out_grads):
        saved = ctx.saved_tensors
        in_args = list(ctx.others)
        for i, t in zip(ctx.tensor_idx, saved):
            in_args[i] = t.detach().requires_grad_(t.requires_grad)
        wanted = [in_args[i] for i in ctx.tensor_idx if in_args[i].requires_grad]
        params = list(ctx.params)
        if ctx.rng is None:
            with torch.enable_grad():
                out = ctx.func(*in_args)
        else:
            with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
                _set_rng(ctx.rng, ctx.devices)
                out = ctx.func(*in_args)
        outs = (out,) if ctx.single else tuple(out)
        pairs = [(o, g) for o, g in zip(outs, out_grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        grads = torch.autograd.grad([o for o, _ in pairs], wanted + params, [g for _, g in pairs],
                                    retain_graph=True, allow_unused=True) if pairs else [None] * (len(wanted) + len(params))
        by_arg = iter(grads[: len(wanted)])
        arg_grads = [next(by_arg) if torch.is_tensor(a) and a.requires_grad else None for a in in_args]
        return (None, None, None, *arg_grads, *grads[len(wanted):])


def mem_gc(func: nn.Module, in_args: Optional[Sequence[Any]] = None, preserve_rng_state: bool = True):
    """`func(*in_args)` without storing f's activations; they are recomputed in backward.

    `func` is an nn.Module (its parameters get gradients); `in_args` may mix tensors and
    other values. Gradients reach only `in_args` and `func`'s parameters, so pass a
    tensor f reads (the injection x) as an argument, not through a closure. Returns what
    `func` returns (a tensor or a tuple of tensors). `preserve_rng_state=False` saves
    the RNG bookkeeping when f draws no random numbers (variational dropout keeps its
    mask, so a DEQ cell usually does not). Under torch.compile it is
    `torch.utils.checkpoint.checkpoint(func, *in_args, use_reentrant=False)`, which dynamo
    captures (same gradients; a tensor in a closure gets its gradient there too).
    """
    in_args = tuple(in_args or ())
    if torch.compiler.is_compiling():
        # dynamo cannot trace a backward that calls autograd.grad; its own checkpoint
        # operator recomputes f the same way (inputs kept, f rerun in backward)
        return checkpoint(func, *in_args, use_reentrant=False,
                          preserve_rng_state=preserve_rng_state)
    params = _module_params(func)
    return _GradCheckpoint.apply(func, preserve_rng_state, len(in_args), *in_args, *params)
