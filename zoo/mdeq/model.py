"""Multiscale deep equilibrium model (MDEQ) for image classification.

The architecture follows the MDEQ of the TorchDEQ zoo (specs/zoo.md section 2):

* a stem (two 3x3 conv + BatchNorm + ReLU, strided for ImageNet) and, for ImageNet or
  more than two branches, a 1x1 "injection" conv that makes the input injection u;
* f_theta, `MultiscaleLayer`: one residual block per branch (GroupNorm; the injection is
  added to the highest-resolution branch only), a multiscale fusion (strided 3x3 convs
  down, 1x1 conv + nearest upsample up) and a post-fuse ReLU -> 1x1 conv -> GroupNorm;
* the equilibrium is over the tuple of branch tensors, solved by `core`'s multi-tensor
  solvers (the DEQ calls ``f(*zs)`` and gets a tuple back);
* an HRNet-style classification head on the equilibrium (Bottleneck per branch,
  progressive strided downsample-and-add, 1x1 conv, global average pool, linear).

`SIZES` names the published configurations; their parameter counts (with weight norm on
f_theta) match the reference code to within 3%, which `tests/zoo/mdeq` checks.
"""
from __future__ import annotations

from collections import OrderedDict, abc
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import DEQConfig
from core.deq import get_deq
from core.norm import apply_norm, reset_norm
from core.utils.dropout import VariationalDropout2d, reset_dropout


@dataclass(frozen=True)
class MDEQSize:
    """Widths of one MDEQ configuration (the reference's MODEL.EXTRA fields)."""

    channels: tuple[int, ...]  # NUM_CHANNELS: width of each branch, highest resolution first
    head_channels: tuple[int, ...]  # HEAD_CHANNELS: Bottleneck widths of the head
    final_channels: int  # FINAL_CHANSIZE: width before the pooling and the classifier
    expansion: int = 5  # EXPANSION_FACTOR of the branch block's hidden width
    num_groups: int = 8  # GroupNorm groups inside f_theta (the post-fuse norm uses half)
    downsample_times: int = 0  # number of stride-2 stem convs (0 CIFAR, 2 ImageNet)
    num_classes: int = 10
    in_channels: int = 3

    @property
    def num_branches(self) -> int:
        return len(self.channels)


SIZES: dict[str, MDEQSize] = {
    # CIFAR-10: the TorchDEQ zoo's small.yaml (= original MDEQ TINY) and large.yaml.
    "tiny": MDEQSize((24, 24), (8, 16), 200),
    "large": MDEQSize((32, 64, 128, 256), (14, 28, 56, 112), 1680),
    # ImageNet: the zoo's hard-coded model (= original SMALL), original LARGE and XL.
    "imagenet_small": MDEQSize((32, 64, 128, 256), (24, 48, 96, 192), 2048,
                               downsample_times=2, num_classes=1000),
    "imagenet_large": MDEQSize((80, 160, 320, 640), (32, 64, 128, 256), 2048,
                               downsample_times=2, num_classes=1000),
    "imagenet_xl": MDEQSize((88, 176, 352, 704), (32, 64, 128, 256), 2048, expansion=6,
                            downsample_times=2, num_classes=1000),
}


def get_size(size: str | MDEQSize | Any, **overrides) -> MDEQSize:
    """A named size (with `overrides` of its fields) or an explicit MDEQSize/mapping."""
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"unknown MDEQ size {size!r}; choose one of {sorted(SIZES)}")
        base = SIZES[size]
    elif isinstance(size, MDEQSize):
        base = size
    else:
        base = MDEQSize(**dict(size))
    overrides = {k: tuple(v) if isinstance(v, abc.Sequence) and not isinstance(v, str) else v
                 for k, v in overrides.items() if v is not None}
    return replace(base, **overrides)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(in_ch: int, out_ch: int, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, bias=bias)


def branch_shapes(height: int, width: int, num_branches: int) -> list[tuple[int, int]]:
    """Spatial size of each branch: each stride-2 3x3 conv (padding 1) halves, rounding up."""
    shapes = [(height, width)]
    for _ in range(1, num_branches):
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


class BranchBlock(nn.Module):
    """One branch's residual block inside f_theta.

    conv3x3 (C -> E*C) -> GN -> ReLU -> conv3x3 (E*C -> C) -> dropout (+ injection)
    -> GN -> + residual -> ReLU -> GN. GroupNorm (not BatchNorm) keeps f_theta a function
    of one sample, which the fixed point needs.
    """

    def __init__(self, channels: int, expansion: int, num_groups: int, dropout: float = 0.0):
        super().__init__()
        hidden = expansion * channels
        self.conv1 = conv3x3(channels, hidden)
        self.gn1 = nn.GroupNorm(num_groups, hidden)
        self.conv2 = conv3x3(hidden, channels)
        self.gn2 = nn.GroupNorm(num_groups, channels)
        self.gn3 = nn.GroupNorm(num_groups, channels)
        self.drop = VariationalDropout2d(dropout)

    def forward(self, x: torch.Tensor, injection: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = F.relu(self.gn1(self.conv1(x)))
        out = self.drop(self.conv2(out))
        if injection is not None:
            out = out + injection
        out = self.gn2(out)
        return self.gn3(F.relu(out + x))


class Branch(nn.Module):
    """The residual blocks of one resolution; the first receives the injection."""

    def __init__(self, channels: int, expansion: int, num_groups: int, dropout: float,
                 num_blocks: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList(
            BranchBlock(channels, expansion, num_groups, dropout) for _ in range(num_blocks))

    def forward(self, x: torch.Tensor, injection: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.blocks[0](x, injection)
        for block in self.blocks[1:]:
            x = block(x)
        return x


def make_downsample(channels: Sequence[int], source: int, target: int, num_groups: int) -> nn.Sequential:
    """Chain of (target - source) stride-2 conv3x3 + GN steps from a higher resolution;
    intermediate steps keep the source width and end in ReLU, the last maps to the target width."""
    steps = []
    for k in range(target - source):
        last = k == target - source - 1
        out_ch = channels[target] if last else channels[source]
        layers = [("conv", conv3x3(channels[source], out_ch, stride=2)),
                  ("gn", nn.GroupNorm(num_groups, out_ch))]
        if not last:
            layers.append(("relu", nn.ReLU()))
        steps.append(nn.Sequential(OrderedDict(layers)))
    return nn.Sequential(*steps)


def make_upsample(channels: Sequence[int], source: int, target: int, num_groups: int) -> nn.Sequential:
    """1x1 conv + GN from a lower resolution; the nearest upsample is done by the caller,
    to the target's exact size (so odd sizes work)."""
    return nn.Sequential(OrderedDict([
        ("conv", conv1x1(channels[source], channels[target])),
        ("gn", nn.GroupNorm(num_groups, channels[target])),
    ]))


class MultiscaleLayer(nn.Module):
    """f_theta: branch blocks, multiscale fusion and post-fuse 1x1 conv + GN.

    `forward(zs, injections)` maps a tuple of branch states (highest resolution first)
    to a tuple of the same shapes.
    """

    def __init__(self, size: MDEQSize, dropout: float = 0.0):
        super().__init__()
        ch, groups, n = size.channels, size.num_groups, size.num_branches
        self.branches = nn.ModuleList(
            Branch(c, size.expansion, groups, dropout) for c in ch)
        # fuse[i][j] carries branch j to branch i (identity when i == j).
        self.fuse = nn.ModuleList()
        for i in range(n):
            row = nn.ModuleList()
            for j in range(n):
                if j == i:
                    row.append(nn.Identity())
                elif j > i:
                    row.append(make_upsample(ch, j, i, groups))
                else:
                    row.append(make_downsample(ch, j, i, groups))
            self.fuse.append(row)
        self.post_fuse = nn.ModuleList(
            nn.Sequential(OrderedDict([
                ("relu", nn.ReLU()),
                ("conv", conv1x1(c, c)),
                ("gn", nn.GroupNorm(max(groups // 2, 1), c)),
            ])) for c in ch)

    def forward(self, zs: Sequence[torch.Tensor],
                injections: Sequence[Optional[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        blocks = [branch(z, u) for branch, z, u in zip(self.branches, zs, injections)]
        out = []
        for i, row in enumerate(self.fuse):
            total = blocks[i]
            for j, fuse in enumerate(row):
                if j == i:
                    continue
                y = fuse(blocks[j])
                if j > i:
                    y = F.interpolate(y, size=blocks[i].shape[-2:], mode="nearest")
                total = total + y
            out.append(self.post_fuse[i](total))
        return tuple(out)


class Bottleneck(nn.Module):
    """HRNet head block: 1x1 -> 3x3 -> 1x1 (x4 width), BatchNorm without affine,
    with a 1x1 conv + BN shortcut when the width changes."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int):
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = conv1x1(in_ch, planes)
        self.bn1 = nn.BatchNorm2d(planes, affine=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, affine=False)
        self.conv3 = conv1x1(planes, out_ch)
        self.bn3 = nn.BatchNorm2d(out_ch, affine=False)
        self.shortcut = (nn.Sequential(conv1x1(in_ch, out_ch), nn.BatchNorm2d(out_ch))
                         if in_ch != out_ch else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ClassificationHead(nn.Module):
    """HRNet classification head: widen each branch, downsample-and-add from the
    highest resolution to the lowest, 1x1 conv to `final_channels`, pool, linear."""

    def __init__(self, size: MDEQSize):
        super().__init__()
        head = [c * Bottleneck.expansion for c in size.head_channels]
        self.incre = nn.ModuleList(
            Bottleneck(c, h) for c, h in zip(size.channels, size.head_channels))
        self.down = nn.ModuleList(
            nn.Sequential(conv3x3(head[i], head[i + 1], stride=2, bias=True),
                          nn.BatchNorm2d(head[i + 1]), nn.ReLU())
            for i in range(len(head) - 1))
        self.final = nn.Sequential(conv1x1(head[-1], size.final_channels, bias=True),
                                   nn.BatchNorm2d(size.final_channels), nn.ReLU())
        self.classifier = nn.Linear(size.final_channels, size.num_classes)

    def forward(self, zs: Sequence[torch.Tensor]) -> torch.Tensor:
        y = self.incre[0](zs[0])
        for i, down in enumerate(self.down):
            y = self.incre[i + 1](zs[i + 1]) + down(y)
        y = self.final(y).mean(dim=(2, 3))
        return self.classifier(y)


class MDEQ(nn.Module):
    """MDEQ classifier: stem -> equilibrium of f_theta over the branch tuple -> head.

    `deq` is anything `DEQConfig.from_any` reads (solver, iterations, phantom gradient or
    IFT, norm options). Weight norm (or spectral norm) is applied to f_theta only, as in
    the reference; `norm_filter_out` lists module-name parts to leave unnormalised (the
    ImageNet recipe's ``["fuse"]``, like the reference's ``fuse_layers`` substring, skips
    both the fusion and the post-fuse convs).

    `forward(x, solver_kwargs=None)` returns ``(logits, info)``: `logits` is a list with
    one tensor per returned DEQ state (fixed-point correction uses all of them; the last
    is the best), `info` the solver statistics.
    """

    def __init__(self, size: str | MDEQSize = "tiny", deq: Any = None, dropout: float = 0.0,
                 norm_filter_out: Optional[Sequence[str]] = None):
        super().__init__()
        self.size = size = get_size(size)
        c0 = size.channels[0]
        self.stem = nn.Sequential(
            conv3x3(size.in_channels, c0, stride=2 if size.downsample_times >= 1 else 1),
            nn.BatchNorm2d(c0), nn.ReLU(),
            conv3x3(c0, c0, stride=2 if size.downsample_times >= 2 else 1),
            nn.BatchNorm2d(c0), nn.ReLU())
        needs_injection = size.downsample_times > 0 or size.num_branches > 2
        self.injection = (nn.Sequential(conv1x1(c0, c0), nn.BatchNorm2d(c0), nn.ReLU())
                          if needs_injection else None)
        self.f = MultiscaleLayer(size, dropout)
        self.head = ClassificationHead(size)
        self.deq_config = DEQConfig.from_any(deq)
        self.norm_filter_out = list(norm_filter_out or [])
        apply_norm(self.f, args=self.deq_config, filter_out=self.norm_filter_out or None)
        self.deq = get_deq(self.deq_config)

    def inject(self, x: torch.Tensor) -> torch.Tensor:
        """The input injection u (fed to the highest-resolution branch)."""
        u = self.stem(x)
        return self.injection(u) if self.injection is not None else u

    def initial_state(self, u: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Zeros for every branch, each half the resolution of the previous one."""
        shapes = branch_shapes(u.shape[-2], u.shape[-1], self.size.num_branches)
        return tuple(u.new_zeros(u.shape[0], c, h, w)
                     for c, (h, w) in zip(self.size.channels, shapes))

    def forward(self, x: torch.Tensor, solver_kwargs: Optional[dict] = None
                ) -> tuple[list[torch.Tensor], dict]:
        """Logits per returned state and the solver info; `solver_kwargs` may override the
        budget for this call (``{"f_max_iter": 8}``: accuracy-vs-NFE sweeps)."""
        u = self.inject(x)
        injections = [u] + [None] * (self.size.num_branches - 1)
        reset_norm(self.f)
        reset_dropout(self.f)
        z_states, info = self.deq(lambda *zs: self.f(zs, injections),
                                  self.initial_state(u), solver_kwargs=solver_kwargs)
        return [self.head(z) for z in z_states], info


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
