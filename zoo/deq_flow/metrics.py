"""Optical-flow losses and metrics: the masked L1 sequence loss and the benchmark protocols.

- `flow_loss`: RAFT / DEQ-Flow training loss, the masked L1 of every prediction
  (valid pixels with |gt| < max_flow), weighted gamma^(n-k-1) by `core.fp_correction`.
- `FlowMeter`: accumulates EPE over images under one of two protocols:
  ``pixels`` (Sintel, Chairs, the synthetic set): AEPE and 1/3/5-px accuracy pooled over
  every (valid) pixel of every image; ``kitti``: AEPE = mean over images of each image's
  mean EPE on its valid pixels, F1-all = % of all valid pixels whose EPE > 3 px and
  EPE > 5% of |gt|.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from core import fp_correction

__all__ = ["flow_loss", "masked_l1", "epe_map", "FlowMeter", "PROTOCOLS"]

PROTOCOLS = ("pixels", "kitti")


def masked_l1(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """mean over (N, H, W) of valid * |pred - gt|_1 summed over u, v, divided by 2 (RAFT's mean)."""
    return (valid[:, None] * (pred - gt).abs()).mean()


def flow_loss(preds: Sequence[torch.Tensor], gt: torch.Tensor, valid: torch.Tensor, gamma: float = 0.8,
              max_flow: float = 400.0) -> torch.Tensor:
    """Fixed-point correction over the predictions (last weighted 1, earlier gamma^(n-k-1))."""
    mask = (valid >= 0.5) & (gt.norm(dim=1) < max_flow)
    return fp_correction(masked_l1, (list(preds), gt, mask.to(gt.dtype)), gamma=gamma)


def epe_map(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """Per-pixel end-point error |pred - gt|_2: (N, H, W)."""
    return (pred - gt).norm(dim=1)


class FlowMeter:
    """Accumulates flow errors over batches; `result(prefix)` gives the metric dict."""

    def __init__(self, protocol: str = "pixels"):
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol={protocol!r}: choose one of {PROTOCOLS}")
        self.protocol = protocol
        self.sum_epe = 0.0
        self.count = 0.0
        self.within = {1: 0.0, 3: 0.0, 5: 0.0}
        self.image_means: list[float] = []
        self.outliers = 0.0

    def update(self, pred: torch.Tensor, gt: torch.Tensor, valid: Optional[torch.Tensor] = None) -> None:
        """pred, gt (N, 2, H, W); valid (N, H, W) or None (every pixel counts, Sintel)."""
        epe = epe_map(pred.float(), gt.float())
        mask = torch.ones_like(epe, dtype=torch.bool) if valid is None else valid >= 0.5
        m = mask.to(epe.dtype)
        self.sum_epe += float((epe * m).sum())
        self.count += float(m.sum())
        for px in self.within:
            self.within[px] += float(((epe < px) & mask).sum())
        per_image = (epe * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)
        self.image_means += [float(v) for v, n in zip(per_image, m.flatten(1).sum(1)) if n > 0]
        mag = gt.float().norm(dim=1)
        self.outliers += float(((epe > 3.0) & (epe / mag.clamp_min(1e-12) > 0.05) & mask).sum())

    def result(self, prefix: str) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("FlowMeter: no valid pixel was seen")
        if self.protocol == "kitti":
            return {f"{prefix}/aepe": sum(self.image_means) / len(self.image_means),
                    f"{prefix}/f1_all": 100.0 * self.outliers / self.count}
        out = {f"{prefix}/aepe": self.sum_epe / self.count}
        out.update({f"{prefix}/{px}px": 100.0 * n / self.count for px, n in self.within.items()})
        return out
