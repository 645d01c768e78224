"""DEQ-Flow (Bai, Chen, Kolter, CVPR 2022): optical flow as the fixed point of a RAFT update.

A RAFT backbone (Teed & Deng, ECCV 2020) at 1/8 resolution: a feature encoder with
instance norm on both frames, a context encoder with batch norm on frame 1, and an
all-pairs correlation pyramid (4 levels, radius 4: 324 channels looked up). The
equilibrium is over the state tuple ``(h, flow)`` (GRU hidden state and the 1/8-resolution
flow), solved by `core` as a two-tensor state::

    f(h, flow) = (h', flow + head(h')),   h' = SepConvGRU(h, [relu(context), motion(flow, corr(flow))])

The flow is detached inside f unless ``all_grad`` (the Things stage), as upstream. Every
returned DEQ state is decoded by convex 8x upsampling (a mask predicted from h), so the
fixed-point correction loss sees ``deq.n_states`` full-resolution flows.

Module and parameter names follow the TorchDEQ zoo's ``deq-flow`` (``fnet``, ``cnet``,
``update_block.{encoder,gru,flow_head}``, ``mask``), so its checkpoints load after
stripping ``module.`` (zoo/deq_flow/convert.py). Weight norm (``deq.norm_type``) is applied
to ``update_block`` only. `SIZES` holds the published sizes (``tiny`` 2.49M, ``B`` 5.243M,
``large``, ``H`` 13.395M parameters, counted with weight norm) and ``cpu``, a narrower
encoder for the offline run on two CPU cores.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core import DEQConfig, apply_norm, get_deq, reset_norm

__all__ = ["FlowSize", "SIZES", "get_size", "DEQFlow", "RAFTBaseline", "InputPadder", "CorrPyramid",
           "count_parameters"]


@dataclass(frozen=True)
class FlowSize:
    """Widths of one DEQ-Flow configuration (upstream flags: --tiny, default B, --large, --huge)."""

    name: str
    hidden_dim: int = 128          # GRU hidden state h
    context_dim: int = 128         # context features (cnet output), GRU input
    feature_dim: int = 256         # fnet output (correlation features)
    corr_dims: tuple = (256, 192)  # motion encoder: correlation convs
    flow_dims: tuple = (128, 64)   # motion encoder: flow convs
    cat_dim: int = 128             # motion features (incl. the 2 flow channels)
    head_dim: int = 256            # flow head hidden width (2 * cat_dim since v2.0)
    mask_dim: int = 256            # upsampling-mask hidden width
    encoder_dims: tuple = (64, 64, 96, 128)  # stem, layer1, layer2, layer3
    corr_levels: int = 4
    corr_radius: int = 4


SIZES: dict[str, FlowSize] = {
    "tiny": FlowSize("tiny", 32, 32, 64, (64, 48), (32, 16), 32, 64),
    "B": FlowSize("B"),
    "large": FlowSize("large", 192, 192, 256, (384, 288), (192, 96), 192, 384),
    "H": FlowSize("H", 256, 256, 256, (512, 384), (256, 128), 256, 512),
    # Offline CPU size: tiny's update block on a narrower encoder (32/48/64) and mask.
    "cpu": FlowSize("cpu", 32, 32, 64, (64, 48), (32, 16), 32, 64, mask_dim=64,
                    encoder_dims=(32, 32, 48, 64)),
}


def get_size(size: str | FlowSize, **overrides: Any) -> FlowSize:
    """The named size (or `size` itself), with non-null `overrides` replacing its fields."""
    if isinstance(size, FlowSize):
        base = size
    elif size in SIZES:
        base = SIZES[size]
    else:
        raise ValueError(f"model.size={size!r}: choose one of {', '.join(SIZES)}")
    changes = {k: v if isinstance(v, (str, int, float)) else tuple(v)
               for k, v in overrides.items() if v is not None}
    return dataclasses.replace(base, **changes) if changes else base


# --------------------------------------------------------------------------- encoders
def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels)  # no affine parameters, as RAFT
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm {kind!r}: instance, batch or none")


class ResidualBlock(nn.Module):
    """Two 3x3 convs with norm + ReLU and a (strided 1x1 conv + norm) shortcut when striding."""

    def __init__(self, in_ch: int, planes: int, norm: str, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, padding=1, stride=stride)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1)
        self.norm1, self.norm2 = _norm(norm, planes), _norm(norm, planes)
        self.downsample = (nn.Sequential(nn.Conv2d(in_ch, planes, 1, stride=stride), _norm(norm, planes))
                           if stride != 1 or in_ch != planes else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        return F.relu((x if self.downsample is None else self.downsample(x)) + y)


class Encoder(nn.Module):
    """RAFT's basic encoder: 7x7 stride-2 stem, residual stages (s1, s2, s2), 1x1 out: 1/8 scale."""

    def __init__(self, out_dim: int, norm: str, dims: Sequence[int] = (64, 64, 96, 128), dropout: float = 0.0):
        super().__init__()
        stem, d1, d2, d3 = dims
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3)
        self.norm1 = _norm(norm, stem)
        self.layer1 = nn.Sequential(ResidualBlock(stem, d1, norm, 1), ResidualBlock(d1, d1, norm, 1))
        self.layer2 = nn.Sequential(ResidualBlock(d1, d2, norm, 2), ResidualBlock(d2, d2, norm, 1))
        self.layer3 = nn.Sequential(ResidualBlock(d2, d3, norm, 2), ResidualBlock(d3, d3, norm, 1))
        self.conv2 = nn.Conv2d(d3, out_dim, 1)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else None
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        x = self.conv2(self.layer3(self.layer2(self.layer1(x))))
        return self.dropout(x) if self.dropout is not None and self.training else x


# --------------------------------------------------------------------------- correlation
def coords_grid(batch: int, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(batch, 2, H, W) pixel coordinates, channel 0 = x, channel 1 = y."""
    ys, xs = torch.meshgrid(torch.arange(height, device=device, dtype=dtype),
                            torch.arange(width, device=device, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys]).expand(batch, 2, height, width)


class CorrPyramid:
    """All-pairs correlation of two 1/8 feature maps, average-pooled into `levels` levels.

    ``lookup(coords)`` samples a (2r+1)^2 window around ``coords / 2^level`` at every level
    (bilinear, zero outside) and returns (N, levels*(2r+1)^2, H, W). The window channel
    k = i*(2r+1) + j has x offset i - r and y offset j - r, RAFT's order, which the
    published checkpoints' first motion conv expects.
    """

    def __init__(self, fmap1: torch.Tensor, fmap2: torch.Tensor, levels: int = 4, radius: int = 4):
        n, c, h, w = fmap1.shape
        corr = torch.einsum("nchw,ncij->nhwij", fmap1, fmap2) / c ** 0.5
        corr = corr.reshape(n * h * w, 1, h, w)
        self.pyramid = [corr]
        for _ in range(levels - 1):
            corr = F.avg_pool2d(corr, 2, stride=2)
            self.pyramid.append(corr)
        self.radius, self.shape = radius, (n, h, w)
        r = torch.arange(-radius, radius + 1, device=fmap1.device, dtype=fmap1.dtype)
        dx, dy = torch.meshgrid(r, r, indexing="ij")  # dx varies along the first window axis
        self.delta = torch.stack([dx, dy], dim=-1).view(1, 2 * radius + 1, 2 * radius + 1, 2)

    def lookup(self, coords: torch.Tensor) -> torch.Tensor:
        n, h, w = self.shape
        centre = coords.permute(0, 2, 3, 1).reshape(n * h * w, 1, 1, 2)
        out = []
        for level, corr in enumerate(self.pyramid):
            pts = centre / 2 ** level + self.delta
            hl, wl = corr.shape[-2:]
            grid = torch.stack([2 * pts[..., 0] / max(wl - 1, 1) - 1, 2 * pts[..., 1] / max(hl - 1, 1) - 1], -1)
            sampled = F.grid_sample(corr, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
            out.append(sampled.view(n, h, w, -1))
        return torch.cat(out, dim=-1).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- update block
class MotionEncoder(nn.Module):
    """Correlation and flow features -> (cat_dim - 2) channels, with the flow appended."""

    def __init__(self, size: FlowSize):
        super().__init__()
        planes = size.corr_levels * (2 * size.corr_radius + 1) ** 2
        (c1, c2), (f1, f2) = size.corr_dims, size.flow_dims
        self.convc1 = nn.Conv2d(planes, c1, 1)
        self.convc2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.convf1 = nn.Conv2d(2, f1, 7, padding=3)
        self.convf2 = nn.Conv2d(f1, f2, 3, padding=1)
        self.conv = nn.Conv2d(c2 + f2, size.cat_dim - 2, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        cor = F.relu(self.convc2(F.relu(self.convc1(corr))))
        flo = F.relu(self.convf2(F.relu(self.convf1(flow))))
        return torch.cat([F.relu(self.conv(torch.cat([cor, flo], dim=1))), flow], dim=1)


class SepConvGRU(nn.Module):
    """A convolutional GRU applied twice: 1x5 (horizontal) then 5x1 (vertical) kernels."""

    def __init__(self, hidden_dim: int, input_dim: int):
        super().__init__()
        width = hidden_dim + input_dim
        for tag, kernel, pad in (("1", (1, 5), (0, 2)), ("2", (5, 1), (2, 0))):
            for gate in "zrq":
                setattr(self, f"conv{gate}{tag}", nn.Conv2d(width, hidden_dim, kernel, padding=pad))

    def _gru(self, h: torch.Tensor, x: torch.Tensor, tag: str) -> torch.Tensor:
        hx = torch.cat([h, x], dim=1)
        z = torch.sigmoid(getattr(self, f"convz{tag}")(hx))
        r = torch.sigmoid(getattr(self, f"convr{tag}")(hx))
        q = torch.tanh(getattr(self, f"convq{tag}")(torch.cat([r * h, x], dim=1)))
        return (1 - z) * h + z * q

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self._gru(self._gru(h, x, "1"), x, "2")


class FlowHead(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, hidden_dim, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden_dim, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


class UpdateBlock(nn.Module):
    """f's body: motion features, the GRU step and the flow increment."""

    def __init__(self, size: FlowSize):
        super().__init__()
        self.encoder = MotionEncoder(size)
        self.gru = SepConvGRU(size.hidden_dim, size.cat_dim + size.context_dim)
        self.flow_head = FlowHead(size.hidden_dim, size.head_dim)

    def forward(self, h: torch.Tensor, inp: torch.Tensor, corr: torch.Tensor, flow: torch.Tensor):
        h = self.gru(h, torch.cat([inp, self.encoder(flow, corr)], dim=1))
        return h, self.flow_head(h)


# --------------------------------------------------------------------------- padding
class InputPadder:
    """Pads (..., H, W) tensors to multiples of 8 (replicate) and crops predictions back.

    ``mode="sintel"`` splits the padding between both sides of each axis; ``"kitti"``
    splits the width padding and puts all the height padding at the bottom (RAFT's modes).
    """

    def __init__(self, shape: Sequence[int], mode: str = "sintel", multiple: int = 8):
        if mode not in ("sintel", "kitti"):
            raise ValueError(f"padding mode {mode!r}: sintel or kitti")
        h, w = shape[-2:]
        ph, pw = (-h) % multiple, (-w) % multiple
        top = ph // 2 if mode == "sintel" else 0
        self.pad = (pw // 2, pw - pw // 2, top, ph - top)  # left, right, top, bottom
        self.shape = (h, w)

    def pad_(self, *xs: torch.Tensor) -> list[torch.Tensor]:
        return [F.pad(x, self.pad, mode="replicate") for x in xs]

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        left, _, top, _ = self.pad
        return x[..., top:top + self.shape[0], left:left + self.shape[1]]


# --------------------------------------------------------------------------- the model
class DEQFlow(nn.Module):
    """DEQ-Flow of `size`; ``deq`` is anything `DEQConfig.from_any` reads.

    ``forward(image1, image2, init=None, solver_kwargs=None)`` takes two (N, 3, H, W)
    frames in [-1, 1] with H and W multiples of 8 and returns ``(flows, info, state)``:
    ``flows`` the full-resolution flow of every returned DEQ state (the last is the
    best), ``info`` the solver statistics, ``state`` the final ``(h, flow/8-res)`` pair,
    detached. ``init`` warm-starts the solver: a 1/8-resolution flow (N, 2, H/8, W/8), or an
    ``(h, flow)`` state returned by an earlier call (fixed-point reuse along a sequence).
    ``context_norm`` is the context encoder's norm: ``batch`` (upstream) or ``none``
    (raft_small's choice, and the offline recipe's: at batch 8 from scratch BatchNorm there
    held the DEQ at 0.79 of zero flow's AEPE after 200 steps, against 0.57 without).
    """

    def __init__(self, size: str | FlowSize = "B", deq: Any = None, all_grad: bool = False,
                 dropout: float = 0.0, freeze_bn: bool = False, context_norm: str = "batch"):
        super().__init__()
        self.size = size = get_size(size)
        self.all_grad, self.freeze_bn = bool(all_grad), bool(freeze_bn)
        self.fnet = Encoder(size.feature_dim, "instance", size.encoder_dims, dropout)
        if context_norm not in ("batch", "none"):
            raise ValueError(f"model.context_norm={context_norm!r}: batch or none")
        self.cnet = Encoder(size.context_dim, context_norm, size.encoder_dims, dropout)
        self.update_block = UpdateBlock(size)
        self.mask = nn.Sequential(nn.Conv2d(size.hidden_dim, size.mask_dim, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(size.mask_dim, 64 * 9, 1))
        self.deq_config = DEQConfig.from_any(deq)
        apply_norm(self.update_block, args=self.deq_config)
        self.deq = get_deq(self.deq_config)

    def train(self, mode: bool = True) -> "DEQFlow":
        """As nn.Module.train, but BatchNorm stays in eval mode when ``freeze_bn`` (Things stage)."""
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    @staticmethod
    def upsample(flow: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Convex 8x upsampling: each fine pixel is a softmax-weighted mix of 3x3 coarse ones."""
        n, _, h, w = flow.shape
        weights = torch.softmax(mask.view(n, 1, 9, 8, 8, h, w), dim=2)
        neighbours = F.unfold(8 * flow, (3, 3), padding=1).view(n, 2, 9, 1, 1, h, w)
        up = (weights * neighbours).sum(dim=2)                      # n, 2, 8, 8, h, w
        return up.permute(0, 1, 4, 2, 5, 3).reshape(n, 2, 8 * h, 8 * w)

    def decode(self, h: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        return self.upsample(flow, 0.25 * self.mask(h))

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, init: Any = None,
                solver_kwargs: Optional[dict] = None):
        if image1.shape[-1] % 8 or image1.shape[-2] % 8:
            raise ValueError(f"DEQFlow: image size {tuple(image1.shape[-2:])} is not a multiple of 8; "
                             "pad with InputPadder")
        n = image1.shape[0]
        fmaps = self.fnet(torch.cat([image1, image2], dim=0)).float()
        corr = CorrPyramid(fmaps[:n], fmaps[n:], self.size.corr_levels, self.size.corr_radius)
        inp = F.relu(self.cnet(image1))
        _, _, hh, ww = inp.shape
        coords0 = coords_grid(n, hh, ww, device=inp.device, dtype=inp.dtype)
        if isinstance(init, (tuple, list)):
            h0, flow0 = init
        else:
            h0 = inp.new_zeros(n, self.size.hidden_dim, hh, ww)
            flow0 = inp.new_zeros(n, 2, hh, ww) if init is None else init
        reset_norm(self.update_block)

        def f(h, flow):
            if not self.all_grad:
                flow = flow.detach()
            h, delta = self.update_block(h, inp, corr.lookup(coords0 + flow), flow)
            return h, flow + delta

        states, info = self.deq(f, (h0.detach(), flow0.detach()), solver_kwargs=solver_kwargs)
        flows = [self.decode(h, flow) for h, flow in states]
        h_last, flow_last = states[-1]
        return flows, info, (h_last.detach(), flow_last.detach())


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class RAFTBaseline(nn.Module):
    """torchvision's ``raft_small`` (no weights) with DEQFlow's call signature.

    ``forward(img1, img2, init=None, solver_kwargs=None)`` returns ``(flows, info, None)``:
    the upsampled flow after each of the ``iters`` updates (``eval_iters`` in eval mode;
    ``solver_kwargs={"f_max_iter": k}`` sets k updates, as for the DEQ's sweeps). ``info``
    reports the last update's change as the residual: ``abs_lowest`` = ||flow_K - flow_K-1||
    per sample, ``rel_lowest`` = that over ||flow_K||, ``nstep`` = ``nfe`` = K.
    """

    def __init__(self, iters: int = 12, eval_iters: int = 18):
        super().__init__()
        from torchvision.models.optical_flow import raft_small

        self.raft = raft_small(weights=None, progress=False)
        self.iters, self.eval_iters = int(iters), int(eval_iters)

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, init: Any = None,
                solver_kwargs: Optional[dict] = None):
        k = self.iters if self.training else self.eval_iters
        if solver_kwargs and "f_max_iter" in solver_kwargs:
            k = int(solver_kwargs["f_max_iter"])
        flows = self.raft(image1, image2, num_flow_updates=max(k, 1))
        last = flows[-1].detach().flatten(1)
        prev = flows[-2].detach().flatten(1) if len(flows) > 1 else torch.zeros_like(last)
        res = (last - prev).norm(dim=1)
        info = {"abs_lowest": res, "rel_lowest": res / last.norm(dim=1).clamp_min(1e-8),
                "nstep": torch.full_like(res, float(len(flows))), "nfe": float(len(flows))}
        return flows, info, None
