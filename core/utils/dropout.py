"""Variational dropout for DEQs: one mask per forward pass, shared by every solver step.

An ordinary dropout layer inside f would draw a new mask at every call, so f would change
from one solver step to the next and have no fixed point. These layers draw a mask on the
first call after `reset_dropout` (which `core.deq.reset_deq` calls once per DEQ forward)
and reuse it until the next reset; the kept entries are scaled by 1 / (1 - p).

Same classes and meaning as TorchDEQ 0.1.0, with three fixes: the mask is made on the
input's device and in its dtype (TorchDEQ's is always a CPU float32 tensor); an input
whose shape no longer fits the mask (a new batch size, a new sequence length) draws a new
mask instead of raising; and p = 1 drops everything instead of dividing by zero.

Shapes (B = batch): `VariationalDropout` masks every element. `VariationalDropoutNd`
drops whole channels: input (B, *spatial, C) with `token_first=True` (the default, as in
TorchDEQ's code), (B, C, *spatial) otherwise. `VariationalDropTokenNd` drops whole
positions (tokens/pixels/voxels) with all their channels, same layouts.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

__all__ = ["VariationalDropout", "VariationalDropout1d", "VariationalDropout2d", "VariationalDropout3d",
           "VariationalDropToken1d", "VariationalDropToken2d", "VariationalDropToken3d", "reset_dropout"]


class _VariationalDropoutNd(nn.Module):
    """Base: holds the mask and applies it; subclasses say which mask shape an input needs."""

    def __init__(self, dropout: float = 0.5):
        super().__init__()
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {dropout}")
        self.dropout = dropout
        self.mask = None

    def mask_shape(self, x: torch.Tensor) -> Tuple[int, ...]:
        """Shape of the mask for input `x` (broadcast against x)."""
        raise NotImplementedError

    def reset_mask(self, x: torch.Tensor) -> None:
        """Draw a new mask for `x`, on its device and in its dtype."""
        keep = 1.0 - self.dropout
        shape = self.mask_shape(x)
        if keep == 0.0:
            self.mask = x.new_zeros(shape)
            return
        kept = torch.rand(shape, device=x.device) < keep
        self.mask = kept.to(x.dtype) / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout == 0.0:
            return x
        if self.mask is None or tuple(self.mask.shape) != self.mask_shape(x):
            self.reset_mask(x)
        elif self.mask.device != x.device or self.mask.dtype != x.dtype:
            self.mask = self.mask.to(device=x.device, dtype=x.dtype)  # same mask, e.g. under autocast
        return x * self.mask

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}"


class _TokenFirst(_VariationalDropoutNd):
    """Base of the layers with a (B, *spatial, C) or (B, C, *spatial) layout."""

    n_spatial = 1
    drop_tokens = False  # False: drop channels; True: drop positions

    def __init__(self, dropout: float = 0.5, token_first: bool = True):
        super().__init__(dropout)
        self.token_first = token_first

    def mask_shape(self, x: torch.Tensor) -> Tuple[int, ...]:
        if x.dim() != self.n_spatial + 2:
            raise ValueError(f"{type(self).__name__} expects a {self.n_spatial + 2}-d input, got shape "
                             f"{tuple(x.shape)}")
        shape = list(x.shape)
        channel = -1 if self.token_first else 1
        spatial = range(1, 1 + self.n_spatial) if self.token_first else range(2, 2 + self.n_spatial)
        if self.drop_tokens:
            shape[channel] = 1
        else:
            for d in spatial:
                shape[d] = 1
        return tuple(shape)

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, token_first={self.token_first}"


class VariationalDropout(_VariationalDropoutNd):
    """Elementwise variational dropout: a mask with the input's full shape."""

    def mask_shape(self, x: torch.Tensor) -> Tuple[int, ...]:
        return tuple(x.shape)


class VariationalDropout1d(_TokenFirst):
    """Drops whole channels of (B, L, C) (token_first) or (B, C, L) inputs."""

    n_spatial = 1


class VariationalDropout2d(_TokenFirst):
    """Drops whole channels of (B, H, W, C) (token_first) or (B, C, H, W) inputs."""

    n_spatial = 2


class VariationalDropout3d(_TokenFirst):
    """Drops whole channels of (B, T, H, W, C) (token_first) or (B, C, T, H, W) inputs."""

    n_spatial = 3


class VariationalDropToken1d(_TokenFirst):
    """Drops whole tokens of (B, L, C) (token_first) or (B, C, L) inputs."""

    n_spatial = 1
    drop_tokens = True


class VariationalDropToken2d(_TokenFirst):
    """Drops whole pixels of (B, H, W, C) (token_first) or (B, C, H, W) inputs."""

    n_spatial = 2
    drop_tokens = True


class VariationalDropToken3d(_TokenFirst):
    """Drops whole voxels of (B, T, H, W, C) (token_first) or (B, C, T, H, W) inputs."""

    n_spatial = 3
    drop_tokens = True


def reset_dropout(model: nn.Module) -> None:
    """Forget every variational dropout mask in `model`; the next call draws new ones."""
    for module in model.modules():
        if isinstance(module, _VariationalDropoutNd):
            module.mask = None
