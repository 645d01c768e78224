"""Offline flow data: FlyingChairs-like pairs made from scikit-image's pictures, and a real pair.

`SyntheticFlow` renders, for every index, a background crop of a scikit-image picture
moved by a random affine plus a smooth deformation, with one or two elliptical
"chairs" cut from other pictures on top, each moved by its own affine. The motion T is a
map from frame-1 to frame-2 pixel coordinates, so the dense ground truth is exact:
``flow(p) = T(p) - p``; frame 2 is drawn at ``T^{-1}(q)`` (the deformation is inverted by
fixed-point iteration). Pixels whose target leaves the frame are masked out (``valid``
0); occluded pixels keep their flow, as in FlyingChairs. With the default ranges the
mean |flow| over valid pixels is about 5.8 px (`tests/zoo/deq_flow` checks 4 to 8 px).
``frames=3`` gives a short sequence moved by the same motion twice (flow 1->2 equals
2->3 on the background): the warm-start check and ``eval.warm_start``.

Every item is a function of (seed, index) only, so a validation set is a fixed seed.

`motorcycle_pair` is the Middlebury 2014 motorcycle stereo pair that ships with
scikit-image (``skimage.data.stereo_motorcycle()``): the flow left -> right is
``(-disparity, 0)``, invalid where the disparity is not finite.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["PICTURES", "SyntheticFlow", "motorcycle_pair", "load_pictures", "to_tensor_image"]

# scikit-image pictures that load offline (colour or grey, natural texture).
PICTURES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "brick", "grass",
            "gravel", "moon", "immunohistochemistry", "hubble_deep_field", "page", "text")


@lru_cache(maxsize=None)
def load_pictures(names: tuple = PICTURES, max_side: int = 400) -> tuple:
    """The pictures as (3, H, W) float32 tensors in [0, 1], shrunk so the longer side is <= max_side."""
    import skimage.data as sd
    from skimage.transform import rescale

    out = []
    for name in names:
        img = np.asarray(getattr(sd, name)(), dtype=np.float32)
        img = img / 255.0 if img.max() > 1.5 else img
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        img = img[..., :3]
        scale = max_side / max(img.shape[:2])
        if scale < 1:
            img = rescale(img, scale, channel_axis=-1, anti_aliasing=True).astype(np.float32)
        out.append(torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float())
    return tuple(out)


def to_tensor_image(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) in [0, 1] -> (3, H, W) float32 in [-1, 1] (the models' input range)."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float() * 2 - 1


def _sample(picture: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinear values of `picture` (C, H, W) at float pixel coordinates (x, y): (C, h, w), edge-clamped."""
    hp, wp = picture.shape[-2:]
    grid = torch.stack([2 * x / (wp - 1) - 1, 2 * y / (hp - 1) - 1], dim=-1)[None].float()
    return F.grid_sample(picture[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


class _Affine:
    """p -> c + A (p - c) + t on (x, y) arrays."""

    def __init__(self, centre, matrix, shift):
        self.c, self.a, self.t = np.asarray(centre, float), np.asarray(matrix, float), np.asarray(shift, float)
        self.a_inv = np.linalg.inv(self.a)

    def __call__(self, x, y):
        dx, dy = x - self.c[0], y - self.c[1]
        return (self.c[0] + self.a[0, 0] * dx + self.a[0, 1] * dy + self.t[0],
                self.c[1] + self.a[1, 0] * dx + self.a[1, 1] * dy + self.t[1])

    def inverse(self, x, y):
        dx, dy = x - self.c[0] - self.t[0], y - self.c[1] - self.t[1]
        return (self.c[0] + self.a_inv[0, 0] * dx + self.a_inv[0, 1] * dy,
                self.c[1] + self.a_inv[1, 0] * dx + self.a_inv[1, 1] * dy)


def _random_affine(rng: np.random.Generator, centre, max_rot: float, max_scale: float, max_shift: float):
    theta = rng.uniform(-max_rot, max_rot)
    sx, sy = np.exp(rng.uniform(-max_scale, max_scale, size=2))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return _Affine(centre, rot @ np.diag([sx, sy]), rng.uniform(-max_shift, max_shift, size=2))


class _Motion:
    """T(p) = affine(p) + d(p), d a smooth field (coarse Gaussian noise, cubic-upsampled)."""

    def __init__(self, affine: _Affine, field: Optional[np.ndarray]):
        self.affine, self.field = affine, field  # field: (2, H, W) in pixels, or None

    def _d(self, x, y):
        if self.field is None:
            return 0.0, 0.0
        d = _sample(self.field, x, y)
        return d[0], d[1]

    def __call__(self, x, y):
        ax, ay = self.affine(x, y)
        dx, dy = self._d(x, y)
        return ax + dx, ay + dy

    def inverse(self, x, y, iterations: int = 6):
        """Solves T(p) = (x, y) by p <- A^-1(q - d(p)) (a contraction for a gentle field)."""
        px, py = self.affine.inverse(x, y)
        if self.field is None:
            return px, py
        for _ in range(iterations):
            dx, dy = self._d(px, py)
            px, py = self.affine.inverse(x - dx, y - dy)
        return px, py


class SyntheticFlow(Dataset):
    """FlyingChairs-like pairs (or ``frames``-long sequences) of size ``(height, width)``.

    Items: ``(img1, img2, flow, valid)`` for pairs, with images (3, H, W) in [-1, 1],
    flow (2, H, W) in pixels (u, v) and valid (H, W) in {0, 1}; for ``frames > 2`` a tuple
    ``(images (frames, 3, H, W), flows (frames-1, 2, H, W), valids (frames-1, H, W))``.
    """

    def __init__(self, length: int, size: Sequence[int] = (128, 128), seed: int = 0, frames: int = 2,
                 max_shift: float = 6.0, max_rot: float = 0.08, max_scale: float = 0.08,
                 deform: float = 1.5, objects: Sequence[int] = (1, 2), object_shift: float = 8.0,
                 pictures: Sequence[str] = PICTURES):
        self.length, self.size, self.seed, self.frames = int(length), tuple(int(s) for s in size), int(seed), int(frames)
        if self.frames < 2:
            raise ValueError("SyntheticFlow: frames must be >= 2")
        self.max_shift, self.max_rot, self.max_scale, self.deform = max_shift, max_rot, max_scale, deform
        self.objects, self.object_shift = tuple(objects), object_shift
        self.pictures = load_pictures(tuple(pictures))

    def __len__(self) -> int:
        return self.length

    def render(self, index: int):
        """Frames (K, 3, H, W) in [0, 1], flows (K-1, 2, H, W), valids (K-1, H, W)."""
        rng = np.random.default_rng([self.seed, int(index)])
        h, w = self.size
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        centre = ((w - 1) / 2, (h - 1) / 2)
        # background: a crop of a picture at a random scale (picture pixels per frame pixel)
        bg = self.pictures[rng.integers(len(self.pictures))]
        margin = 3 * self.max_shift + 16
        hb, wb = bg.shape[-2:]
        fit = min((wb - 1) / (w + 2 * margin), (hb - 1) / (h + 2 * margin))
        s0 = min(rng.uniform(0.5, 1.0), 0.99 * fit)
        ox = rng.uniform(s0 * margin, wb - 1 - s0 * (w + margin))
        oy = rng.uniform(s0 * margin, hb - 1 - s0 * (h + margin))
        field = None
        if self.deform > 0:
            coarse = torch.from_numpy(rng.normal(0, self.deform, size=(1, 2, 4, 4))).float()
            field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0]
        motion = _Motion(_random_affine(rng, centre, self.max_rot, self.max_scale, self.max_shift), field)
        layers = []  # (texture picture, offset, scale, mask radii, placement centre, motion)
        for _ in range(int(rng.choice(self.objects)) if self.objects else 0):
            pic = self.pictures[rng.integers(len(self.pictures))]
            rx, ry = rng.uniform(10, 30, size=2)
            cx, cy = rng.uniform(0.15 * w, 0.85 * w), rng.uniform(0.15 * h, 0.85 * h)
            s = rng.uniform(0.5, 1.0)
            tx = rng.uniform(max(rx, ry) * s + 1, pic.shape[2] - 2 - max(rx, ry) * s)
            ty = rng.uniform(max(rx, ry) * s + 1, pic.shape[1] - 2 - max(rx, ry) * s)
            obj_motion = _Motion(_random_affine(rng, (cx, cy), 0.15, 0.1, self.object_shift), None)
            layers.append((pic, (tx, ty), s, (rx, ry), (cx, cy), obj_motion, rng.uniform(0, np.pi)))
        gains = rng.uniform(0.93, 1.07, size=self.frames)

        frames, flows, valids = [], [], []
        for k in range(self.frames):
            px, py = xs, ys  # frame-k pixel -> frame-0 pixel by applying T^-1 k times
            for _ in range(k):
                px, py = motion.inverse(px, py)
            img = _sample(bg, ox + s0 * px, oy + s0 * py)
            fx, fy = [a - b for a, b in zip(motion(xs, ys), (xs, ys))]
            for pic, (tx, ty), s, (rx, ry), (cx, cy), obj_motion, angle in layers:
                ux, uy = xs, ys
                for _ in range(k):
                    ux, uy = obj_motion.inverse(ux, uy)
                ux, uy = ux - cx, uy - cy  # object coordinates (frame-0 placement)
                ca, sa = np.cos(angle), np.sin(angle)
                inside = ((ca * ux + sa * uy) / rx) ** 2 + ((-sa * ux + ca * uy) / ry) ** 2 <= 1
                img = torch.where(inside, _sample(pic, tx + s * ux, ty + s * uy), img)
                ox_, oy_ = obj_motion(xs, ys)
                fx, fy = torch.where(inside, ox_ - xs, fx), torch.where(inside, oy_ - ys, fy)
            frames.append((img * float(gains[k])).clamp(0, 1))
            if k < self.frames - 1:
                valid = (xs + fx >= 0) & (xs + fx <= w - 1) & (ys + fy >= 0) & (ys + fy <= h - 1)
                flows.append(torch.stack([fx, fy]).float())
                valids.append(valid.float())
        return torch.stack(frames), torch.stack(flows), torch.stack(valids)

    def __getitem__(self, index: int):
        frames, flows, valids = self.render(index)
        images = frames * 2 - 1
        if self.frames == 2:
            return images[0], images[1], flows[0], valids[0]
        return images, flows, valids


def motorcycle_pair(downscale: int = 4):
    """The Middlebury 2014 motorcycle pair (skimage): ``(img1, img2, flow, valid)`` tensors.

    ``downscale`` averages ``downscale x downscale`` blocks (the shipped pair is 500x741 with
    a mean disparity of 34 px; 4 gives 125x185 and about 8.6 px, near the synthetic range);
    a block is valid only when all its pixels are, and the flow is divided by the factor.
    """
    import skimage.data as sd

    left, right, disp = sd.stereo_motorcycle()
    f = int(downscale)
    h, w = (disp.shape[0] // f) * f, (disp.shape[1] // f) * f

    def blocks(a):
        a = a[:h, :w]
        return a.reshape(h // f, f, w // f, f, *a.shape[2:]).mean(axis=(1, 3))

    valid_px = np.isfinite(disp)
    u = -np.where(valid_px, disp, 0).astype(np.float64)
    valid = blocks(valid_px.astype(np.float64)) == 1.0
    flow = np.stack([np.where(valid, blocks(u) / f, 0.0), np.zeros(valid.shape)]).astype(np.float32)
    img1 = to_tensor_image(blocks(left.astype(np.float64) / 255.0))
    img2 = to_tensor_image(blocks(right.astype(np.float64) / 255.0))
    return img1, img2, torch.from_numpy(flow), torch.from_numpy(valid.astype(np.float32))
