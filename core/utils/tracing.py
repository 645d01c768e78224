"""What the solvers need to know about torch.compile / torch.export while being traced.

Eager solves keep their per-sample bookkeeping on the host (numpy on shared memory, one
synchronisation per step), which dynamo cannot trace faithfully: numpy calls on a
tensor's memory become functional tensor ops, so writes through one alias no longer show
in the other. Under a trace the solvers therefore take their sync-free path by
themselves (`FixedPointProblem`), and these helpers tell them

- `tracing()`: whether dynamo (torch.compile) or torch.export is tracing the caller;
- `warn(message)`: a warning that a `fullgraph=True` trace accepts (issued once per
  compilation, when dynamo traces the call).
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["tracing", "warn"]


def tracing() -> bool:
    """True while dynamo (torch.compile) or torch.export traces the calling code."""
    return torch.compiler.is_compiling()


@torch.compiler.assume_constant_result
def _warn_in_trace(message: str) -> bool:
    warnings.warn(message, RuntimeWarning, stacklevel=4)
    return True


def warn(message: str) -> None:
    """`warnings.warn(message, RuntimeWarning)`, also inside a `fullgraph=True` trace."""
    if tracing():
        _warn_in_trace(message)
    else:
        warnings.warn(message, RuntimeWarning, stacklevel=3)
