"""RAFT's training augmentation (Teed & Deng 2020, `FlowAugmentor` / `SparseFlowAugmentor`).

On (3, H, W) float images in [0, 255], a (2, H, W) flow and an (H, W) valid mask:

- photometric: ColorJitter(0.4, 0.4, 0.4, hue 0.5/pi) (sparse: 0.3 / 0.3 / 0.3 / 0.3/pi),
  applied to each frame separately with probability 0.2 (asymmetric), else to both alike;
  an eraser (p 0.5) fills 1-2 boxes of 50-100 px of frame 2 with its mean colour;
- spatial (p 0.8): scale by 2^U(min_scale, max_scale), and (dense, p 0.8) stretch each
  axis by 2^U(-0.2, 0.2), never below the crop + 8 px; the flow is scaled with the images.
  Dense flow is resized bilinearly; sparse flow (KITTI, HD1K) is scattered to the nearest
  target pixel so that no invalid pixel is interpolated;
- flips: horizontal p 0.5 (u negated), vertical p 0.1 (dense only, v negated);
- a random crop to ``crop_size`` (sparse: biased to the lower part, as RAFT, where KITTI has
  its ground truth).

Random draws come from numpy's and torch's global generators, which `zoo.common.Run` seeds.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import ColorJitter

__all__ = ["FlowAugmentor", "STAGE_SCALES"]

# log2 scale ranges of the RAFT / DEQ-Flow stages (train_B.sh / train_H.sh)
STAGE_SCALES = {"chairs": (-0.1, 1.0), "things": (-0.4, 0.8), "sintel": (-0.2, 0.6), "kitti": (-0.2, 0.4)}


class FlowAugmentor:
    def __init__(self, crop_size: Sequence[int], min_scale: float = -0.2, max_scale: float = 0.5,
                 do_flip: bool = True, sparse: bool = False):
        self.crop = (int(crop_size[0]), int(crop_size[1]))
        self.min_scale, self.max_scale, self.do_flip, self.sparse = min_scale, max_scale, do_flip, sparse
        self.spatial_prob, self.stretch_prob, self.max_stretch = 0.8, 0.8, 0.2
        self.asymmetric_prob, self.eraser_prob = 0.2, 0.5
        hue = (0.3 if sparse else 0.5) / 3.14
        strength = 0.3 if sparse else 0.4
        self.jitter = ColorJitter(brightness=strength, contrast=strength, saturation=strength, hue=hue)

    # -------------------------------------------------------------- photometric
    def color(self, img1: torch.Tensor, img2: torch.Tensor):
        if np.random.rand() < self.asymmetric_prob:
            return self._jitter(img1), self._jitter(img2)
        both = self._jitter(torch.cat([img1, img2], dim=-1))  # one set of parameters for both
        return both[..., :img1.shape[-1]], both[..., img1.shape[-1]:]

    def _jitter(self, img: torch.Tensor) -> torch.Tensor:
        return self.jitter(img.clamp(0, 255).to(torch.uint8)).float()

    def erase(self, img2: torch.Tensor) -> torch.Tensor:
        if np.random.rand() >= self.eraser_prob:
            return img2
        img2 = img2.clone()
        h, w = img2.shape[-2:]
        mean = img2.reshape(3, -1).mean(dim=1)
        for _ in range(np.random.randint(1, 3)):
            x0, y0 = np.random.randint(0, w), np.random.randint(0, h)
            dx, dy = np.random.randint(50, 100), np.random.randint(50, 100)
            img2[:, y0:y0 + dy, x0:x0 + dx] = mean[:, None, None]
        return img2

    # -------------------------------------------------------------- spatial
    def _scales(self, h: int, w: int):
        floor = max((self.crop[0] + 8) / h, (self.crop[1] + 8) / w)
        scale = 2 ** np.random.uniform(self.min_scale, self.max_scale)
        sx = sy = scale
        if not self.sparse and np.random.rand() < self.stretch_prob:
            sx *= 2 ** np.random.uniform(-self.max_stretch, self.max_stretch)
            sy *= 2 ** np.random.uniform(-self.max_stretch, self.max_stretch)
        return max(sx, floor), max(sy, floor)

    @staticmethod
    def _resize(x: torch.Tensor, size) -> torch.Tensor:
        return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]

    @staticmethod
    def resize_sparse(flow: torch.Tensor, valid: torch.Tensor, sx: float, sy: float, size):
        """Scatter valid flow vectors (scaled) to the nearest pixel of the resized grid."""
        ys, xs = torch.nonzero(valid >= 0.5, as_tuple=True)
        u, v = flow[0, ys, xs] * sx, flow[1, ys, xs] * sy
        nx, ny = torch.round(xs.float() * sx).long(), torch.round(ys.float() * sy).long()
        keep = (nx >= 0) & (nx < size[1]) & (ny >= 0) & (ny < size[0])
        out, out_valid = torch.zeros(2, *size), torch.zeros(size)
        out[0, ny[keep], nx[keep]], out[1, ny[keep], nx[keep]] = u[keep], v[keep]
        out_valid[ny[keep], nx[keep]] = 1.0
        return out, out_valid

    def spatial(self, img1, img2, flow, valid):
        h, w = img1.shape[-2:]
        sx, sy = self._scales(h, w)
        if np.random.rand() < self.spatial_prob or (h < self.crop[0] + 8 or w < self.crop[1] + 8):
            size = (int(round(h * sy)), int(round(w * sx)))
            img1, img2 = self._resize(img1, size), self._resize(img2, size)
            if self.sparse:
                flow, valid = self.resize_sparse(flow, valid, sx, sy, size)
            else:
                flow = self._resize(flow, size) * torch.tensor([sx, sy]).view(2, 1, 1)
                valid = (self._resize(valid[None], size)[0] > 0.99).float()
        if self.do_flip:
            if np.random.rand() < 0.5:
                img1, img2, flow, valid = img1.flip(-1), img2.flip(-1), flow.flip(-1), valid.flip(-1)
                flow = flow * torch.tensor([-1.0, 1.0]).view(2, 1, 1)
            if not self.sparse and np.random.rand() < 0.1:
                img1, img2, flow, valid = img1.flip(-2), img2.flip(-2), flow.flip(-2), valid.flip(-2)
                flow = flow * torch.tensor([1.0, -1.0]).view(2, 1, 1)
        h, w = img1.shape[-2:]
        ch, cw = self.crop
        if self.sparse:  # RAFT: a margin of 20 px above, 50 px sideways
            y0 = int(np.clip(np.random.randint(0, h - ch + 20 + 1) - 20, 0, h - ch))
            x0 = int(np.clip(np.random.randint(-50, w - cw + 50 + 1), 0, w - cw))
        else:
            y0, x0 = np.random.randint(0, h - ch + 1), np.random.randint(0, w - cw + 1)
        crop = (slice(None), slice(y0, y0 + ch), slice(x0, x0 + cw))
        return img1[crop], img2[crop], flow[crop], valid[y0:y0 + ch, x0:x0 + cw]

    def __call__(self, img1, img2, flow, valid):
        img1, img2 = self.color(img1, img2)
        img2 = self.erase(img2)
        return self.spatial(img1, img2, flow, valid)
