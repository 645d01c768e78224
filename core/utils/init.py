"""Initial states for DEQ solvers."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["mixed_init"]


def mixed_init(z_shape: Sequence[int], device: Optional[torch.device] = None,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A standard normal tensor with about half of its entries zeroed (TorchDEQ's mixed init).

    Starting some coordinates at zero and others at random values exposes the solver to
    varied initial points, which DEQ-INR uses for path-independent training. Unlike
    TorchDEQ's, `dtype` is honoured (not float32 only).
    """
    z = torch.randn(*z_shape, device=device, dtype=dtype)
    keep = torch.rand(*z_shape, device=device) < 0.5
    return z * keep.to(z.dtype)
