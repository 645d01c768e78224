"""Implicit neural representations: the DEQ-INR of (Implicit)^2 and its explicit baselines.

The model (Huang, Bai and Kolter, "(Implicit)^2: Implicit Layers for Implicit
Representations", NeurIPS 2021; the TorchDEQ zoo's ``deq-inr``) is a multiplicative
filter network (MFN) turned into an equilibrium:

* the injection ``u = x_map(x)``: ONE linear map of the coordinates to ``D * (L + 1)``
  features, its weight scaled by ``input_scale / sqrt(L + 1)`` and its bias uniform in
  (-pi, pi), split into L + 1 chunks ``u_0 .. u_L`` of width D. The `filter` decides
  what a chunk is: ``siren_like`` the raw affine map, ``fourier`` ``sin(.)``, ``gabor``
  ``sin(.) * exp(-gamma / 2 * ||x - mu||^2)`` (learnable centres mu, gamma ~ Gamma(3, 1));
* f_theta(z; u): ``z <- z + g(z_init, u_0)`` (z_init = 0 for siren_like, 1 for the
  multiplicative filters), then for each of the L layers ``z <- g(W_i z + b_i, u_{i+1})``,
  with ``g(h, u) = sin(h + u)`` (siren_like) or ``u * h`` (fourier, gabor); W_i is
  initialised uniform in +-sqrt(1/D) and carries weight norm (``deq.norm_type``);
* a linear decoder ``D -> out_features`` on the equilibrium.

`one_pass=True` is the explicit network with the same parameters: f applied once to
z = 0. `Siren` is Sitzmann et al.'s SIREN (sine layers, omega_0 = 30) for Table 5's
SIREN row. Sizes are named ``<L>L<D>D`` (`SIZES`); the parameter counts are in the README.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from core.config import DEQConfig
from core.deq import get_deq
from core.norm import apply_norm, reset_norm

FILTERS = ("siren_like", "fourier", "gabor")


@dataclass(frozen=True)
class INRSize:
    layers: int  # L: layers of f_theta
    width: int   # D: width of the state z


#: The paper's sizes: camera 1L256D / 1L512D / 4L256D, CelebA 1L128D / 1L256D / 4L128D,
#: video 1L1024D / 1L2048D / 4L1024D, audio 1L256D / 1L512D / 4L256D.
SIZES: dict[str, INRSize] = {name: INRSize(int(l), int(d)) for name, (l, d) in {
    "1L128D": (1, 128), "4L128D": (4, 128), "1L256D": (1, 256), "1L512D": (1, 512),
    "4L256D": (4, 256), "1L1024D": (1, 1024), "4L1024D": (4, 1024), "1L2048D": (1, 2048)}.items()}


def get_size(name: Optional[str] = None, layers: Optional[int] = None, width: Optional[int] = None) -> INRSize:
    """A named size (``"1L256D"``, or any ``<L>L<D>D``), with `layers` / `width` overriding it."""
    base = INRSize(1, 256)
    if name:
        match = re.fullmatch(r"(\d+)L(\d+)D", str(name))
        if match is None:
            raise ValueError(f"model.size={name!r}: use <layers>L<width>D, e.g. one of {sorted(SIZES)}")
        base = INRSize(int(match.group(1)), int(match.group(2)))
    size = INRSize(int(layers) if layers else base.layers, int(width) if width else base.width)
    if size.layers < 1 or size.width < 1:
        raise ValueError(f"model size {size}: layers and width must be >= 1")
    return size


class Injection(nn.Module):
    """``u = filter(x_map(x))`` split into L + 1 chunks of width D (see the module docstring)."""

    def __init__(self, in_features: int, size: INRSize, filter: str, input_scale: float,
                 gabor_alpha: float = 3.0):
        super().__init__()
        if filter not in FILTERS:
            raise ValueError(f"model.filter={filter!r}: choose one of {FILTERS}")
        self.filter, self.chunks = filter, size.layers + 1
        features = size.width * self.chunks
        self.x_map = nn.Linear(in_features, features)
        with torch.no_grad():
            self.x_map.weight.mul_(input_scale / math.sqrt(self.chunks))
            self.x_map.bias.uniform_(-math.pi, math.pi)
        if filter == "gabor":
            self.mu = nn.Parameter(torch.rand(features, in_features) * 2 - 1)
            gamma = torch.distributions.Gamma(float(gabor_alpha), 1.0).sample((features,))
            self.gamma = nn.Parameter(gamma)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        u = list(CoordinateMap.apply(x, self.x_map.weight, self.x_map.bias, self.chunks))
        if self.filter != "siren_like":
            u = [torch.sin(c) for c in u]
        if self.filter == "gabor":
            x_sq = x.square().sum(-1, keepdim=True)
            u = [c * torch.exp(-0.5 * gamma[None] * (x_sq - 2 * x @ mu.t() + mu.square().sum(-1)[None]))
                 for c, mu, gamma in zip(u, self.mu.chunk(self.chunks), self.gamma.chunk(self.chunks))]
        return u


class CoordinateMap(torch.autograd.Function):
    """``(x @ weight.T + bias).chunk(chunks, -1)`` with a backward made for coordinates.

    Autograd's own backward of `F.linear` then `chunk` is slow for inputs of 2 or 3
    columns: it concatenates the chunks' gradients into one (N, features) tensor and forms
    the weight gradient as ``grad.T @ x``, a (features, N) x (N, 2) product that took
    0.18-0.24 s of a 1.3-2.4 s camera step on 2 CPU threads. Here each chunk is its own
    ``addmm`` and the weight gradient is ``(x.T @ grad_chunk).T`` per chunk (0.04 s).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, chunks):
        ctx.save_for_backward(x, weight)
        ctx.chunks = chunks
        return tuple(torch.addmm(b, x, w.t()) for w, b in zip(weight.chunk(chunks), bias.chunk(chunks)))

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        widths = [w.shape[0] for w in weight.chunk(ctx.chunks)]
        grads = [x.new_zeros(x.shape[0], d) if g is None else g for g, d in zip(grads, widths)]
        grad_weight = torch.cat([(x.t() @ g).t() for g in grads])
        grad_bias = torch.cat([g.sum(0) for g in grads])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = sum(g @ w for g, w in zip(grads, weight.chunk(ctx.chunks)))
        return grad_x, grad_weight, grad_bias, None


class Layer(nn.Module):
    """``z_map``: one W_i z + b_i of f_theta (weight norm is applied to it by the model)."""

    def __init__(self, width: int):
        super().__init__()
        self.z_map = nn.Linear(width, width)
        bound = math.sqrt(1.0 / width)
        nn.init.uniform_(self.z_map.weight, -bound, bound)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.z_map(z)


class MFNCell(nn.Module):
    """f_theta(z; u) of the module docstring; `u` is the list of injection chunks."""

    def __init__(self, size: INRSize, filter: str):
        super().__init__()
        self.filter = filter
        self.layers = nn.ModuleList(Layer(size.width) for _ in range(size.layers))
        init = 0.0 if filter == "siren_like" else 1.0
        self.register_buffer("z_init", torch.full((1, size.width), init))

    def g(self, h: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return torch.sin(h + u) if self.filter == "siren_like" else u * h

    def first(self, u: list[torch.Tensor]) -> torch.Tensor:
        """``g(z_init, u_0)``: the part of f that does not depend on z (computed once a solve)."""
        return self.g(self.z_init, u[0])

    def forward(self, z: torch.Tensor, u: list[torch.Tensor], first: torch.Tensor) -> torch.Tensor:
        z = z + first
        for layer, u_i in zip(self.layers, u[1:]):
            z = self.g(layer(z), u_i)
        return z


class DEQINR(nn.Module):
    """The DEQ-INR (or, with `one_pass`, the explicit MFN with the same parameters).

    ``forward(x, z_init=None, solver_kwargs=None)`` takes coordinates (N, in_features)
    and returns ``(outputs, info, z)``: `outputs` is a list with one (N, out_features)
    prediction per returned DEQ state (fixed-point correction uses them all; the last is
    the best), `info` the solver statistics and `z` the last state, detached (the warm
    start of the next training step). `z_init` defaults to zeros.
    """

    def __init__(self, in_features: int, out_features: int, size: str | INRSize = "1L256D",
                 filter: str = "siren_like", input_scale: float = 256.0, deq: Any = None,
                 one_pass: bool = False, gabor_alpha: float = 3.0):
        super().__init__()
        self.size = size if isinstance(size, INRSize) else get_size(size)
        self.one_pass = bool(one_pass)
        self.injection = Injection(in_features, self.size, filter, input_scale, gabor_alpha)
        self.f = MFNCell(self.size, filter)
        self.output_map = nn.Linear(self.size.width, out_features)
        self.deq_config = DEQConfig.from_any(deq)
        apply_norm(self.f, args=self.deq_config)
        self.deq = get_deq(self.deq_config)

    @property
    def width(self) -> int:
        return self.size.width

    def forward(self, x: torch.Tensor, z_init: Optional[torch.Tensor] = None,
                solver_kwargs: Optional[dict] = None) -> tuple[list[torch.Tensor], dict, torch.Tensor]:
        u = self.injection(x)
        reset_norm(self.f)
        first = self.f.first(u)
        z0 = x.new_zeros(x.shape[0], self.width) if z_init is None else z_init
        if self.one_pass:
            z = self.f(z0, u, first)
            return [self.output_map(z)], {}, z.detach()
        states, info = self.deq(lambda z: self.f(z, u, first), z0, solver_kwargs=solver_kwargs)
        return [self.output_map(z) for z in states], info, states[-1].detach()


class SineLayer(nn.Module):
    """``sin(omega_0 (W x + b))`` with SIREN's initialisation."""

    def __init__(self, in_features: int, out_features: int, omega_0: float, first: bool):
        super().__init__()
        self.omega_0 = omega_0
        self.linear = nn.Linear(in_features, out_features)
        bound = 1.0 / in_features if first else math.sqrt(6.0 / in_features) / omega_0
        nn.init.uniform_(self.linear.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.omega_0 * self.linear(x))


class Siren(nn.Module):
    """SIREN (Sitzmann et al., NeurIPS 2020): `layers` sine layers of `width` (the first
    on the coordinates), then a linear output; the paper's image SIREN is 4 sine layers of
    256. Same calling convention as `DEQINR` (no solver: empty info)."""

    def __init__(self, in_features: int, out_features: int, layers: int = 4, width: int = 256,
                 omega_0: float = 30.0):
        super().__init__()
        widths = [in_features] + [width] * layers
        self.net = nn.Sequential(*(SineLayer(a, b, omega_0, first=(i == 0))
                                   for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))))
        self.output_map = nn.Linear(width, out_features)
        bound = math.sqrt(6.0 / width) / omega_0
        nn.init.uniform_(self.output_map.weight, -bound, bound)
        self.width = width

    def forward(self, x: torch.Tensor, z_init: Optional[torch.Tensor] = None,
                solver_kwargs: Optional[dict] = None) -> tuple[list[torch.Tensor], dict, torch.Tensor]:
        z = self.net(x)
        return [self.output_map(z)], {}, z.detach()


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
