"""The DDPM UNet denoiser eps_theta(x_t, t) (Ho et al. 2020), as used by DEQ-DDIM.

The layout and the parameter names are those of the DDPM CIFAR-10 model as converted to
PyTorch by pesser/pytorch_diffusion (and used by ermongroup/ddim and locuslab/deq-ddim),
so its state dict loads after `zoo.deq_ddim.convert` has removed the wrappers:

    temb.dense.{0,1}                     timestep embedding MLP (ch -> 4ch -> 4ch)
    conv_in                              3x3, in_channels -> ch
    down.<level>.block.<i>               ResnetBlock(norm1, conv1, temb_proj, norm2, conv2[, nin_shortcut])
    down.<level>.attn.<i>                AttnBlock(norm, q, k, v, proj_out) at the attention resolutions
    down.<level>.downsample.conv         3x3 stride 2 after an asymmetric (0, 1, 0, 1) pad
    mid.{block_1, attn_1, block_2}
    up.<level>.block.<i>                 num_res_blocks + 1 blocks, each fed a skip connection
    up.<level>.attn.<i>, up.<level>.upsample.conv
    norm_out, conv_out

GroupNorm (eps 1e-6) and swish everywhere. `SIZES` names the configurations: `cifar10`
(ch 128, multipliers 1,2,2,2, two res blocks, attention at 16x16, dropout 0.1: 35.7M
parameters) and `digits` (a small model of the same design for 8x8 grey images).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNetSize", "SIZES", "get_size", "DiffusionUNet", "build_unet", "timestep_embedding", "count_parameters",
           "unet_sizes"]


@dataclass(frozen=True)
class UNetSize:
    """The hyper-parameters of a DDPM UNet."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resolution: int = 32
    num_groups: int = 32


SIZES: dict[str, UNetSize] = {
    # DDPM CIFAR-10 (pesser's ema_cifar10 / ermongroup ddim configs/cifar10.yml)
    "cifar10": UNetSize(),
    # offline: 8x8 grey digits, two resolutions, attention at 4x4
    "digits": UNetSize(in_channels=1, out_channels=1, ch=16, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(4,), dropout=0.0, resolution=8, num_groups=4),
}


def get_size(name: str, **overrides) -> UNetSize:
    """The named size with the non-None `overrides` applied (lists become tuples)."""
    if name not in SIZES:
        raise ValueError(f"model.size={name!r}: choose one of {', '.join(SIZES)}")
    changes = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in overrides.items() if v is not None}
    return replace(SIZES[name], **changes)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of the integer timesteps t (B,): [sin, cos] of t * 10000^(-i/(h-1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(10000.0) / (half - 1)))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv, + the projected timestep embedding, norm-swish-dropout-conv, + shortcut."""

    def __init__(self, cin: int, cout: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, cout)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels, 1x1 convs for q, k, v and the output."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).reshape(b, c, hh * ww).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DiffusionUNet(nn.Module):
    """eps_theta(x, t): x (N, C, H, W), integer timesteps t (N,) -> predicted noise (N, C, H, W)."""

    def __init__(self, size: UNetSize):
        super().__init__()
        self.size = size
        s, g = size, size.num_groups
        ch, temb_ch = s.ch, 4 * s.ch
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([nn.Linear(ch, temb_ch), nn.Linear(temb_ch, temb_ch)])
        self.conv_in = nn.Conv2d(s.in_channels, ch, 3, padding=1)

        in_mult = (1, *s.ch_mult)
        res, skips = s.resolution, [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(s.ch_mult):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            cin, cout = ch * in_mult[level], ch * mult
            for _ in range(s.num_res_blocks):
                stage.block.append(ResnetBlock(cin, cout, temb_ch, s.dropout, g))
                cin = cout
                if res in s.attn_resolutions:
                    stage.attn.append(AttnBlock(cout, g))
                skips.append(cout)
            if level != len(s.ch_mult) - 1:
                stage.downsample = Downsample(cout)
                res //= 2
                skips.append(cout)
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(cin, cin, temb_ch, s.dropout, g)
        self.mid.attn_1 = AttnBlock(cin, g)
        self.mid.block_2 = ResnetBlock(cin, cin, temb_ch, s.dropout, g)

        up: list[nn.Module] = []
        for level in reversed(range(len(s.ch_mult))):
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            cout = ch * s.ch_mult[level]
            for _ in range(s.num_res_blocks + 1):
                stage.block.append(ResnetBlock(cin + skips.pop(), cout, temb_ch, s.dropout, g))
                cin = cout
                if res in s.attn_resolutions:
                    stage.attn.append(AttnBlock(cout, g))
            if level != 0:
                stage.upsample = Upsample(cout)
                res *= 2
            up.insert(0, stage)  # up[level]: the checkpoint's numbering
        self.up = nn.ModuleList(up)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, s.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = timestep_embedding(t, self.size.ch).to(x.dtype)
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))
        hs = [self.conv_in(x)]
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(hs[-1], temb)
                if len(stage.attn):
                    h = stage.attn[i](h)
                hs.append(h)
            if hasattr(stage, "downsample"):
                hs.append(stage.downsample(hs[-1]))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_unet(name: str, **overrides) -> DiffusionUNet:
    """`DiffusionUNet(get_size(name, **overrides))`."""
    return DiffusionUNet(get_size(name, **overrides))


def unet_sizes(names: Sequence[str] = tuple(SIZES)) -> dict[str, int]:
    """Parameter counts of the named sizes, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return {n: count_parameters(build_unet(n)) for n in names}
