"""Images for DEQ-DDIM, scaled to [-1, 1] as the DDPM models expect.

- ``cifar10``: the CIFAR-10 python pickles under ``data.root``
  (``<root>/cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``, read by
  `zoo.common.cifar.read_cifar10`); the inversion targets are training images, one per seed.
- ``digits``: scikit-learn's 1797 real 8x8 handwritten digits (values 0..16, inside the
  wheel), split into a training set for the small diffusion model and held-out images for
  inversion (``data.heldout`` of them, chosen by ``data.split_seed``).

`build_datasets(cfg.data)` returns `ImageSplits` (tensors (N, C, H, W), float32).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from zoo.common.cifar import read_cifar10

OFFLINE_HINT = "Or run the offline experiments: +experiment=digits_sampling / digits_inversion"


@dataclass
class ImageSplits:
    train: torch.Tensor     # (N, C, H, W) in [-1, 1]
    heldout: torch.Tensor   # (M, C, H, W) in [-1, 1]; empty for cifar10 (targets are train images)
    channels: int
    resolution: int


def digits_splits(heldout: int, split_seed: int) -> ImageSplits:
    """sklearn digits as (N, 1, 8, 8) in [-1, 1]; `heldout` images (by seed) kept out of training."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32) / 8.0 - 1.0  # 0..16 -> -1..1
    order = np.random.default_rng(split_seed).permutation(len(images))
    x = torch.from_numpy(images[order]).unsqueeze(1)
    return ImageSplits(train=x[heldout:], heldout=x[:heldout], channels=1, resolution=8)


def cifar10_splits(root) -> ImageSplits:
    """CIFAR-10 training images as (50000, 3, 32, 32) in [-1, 1]."""
    images, _ = read_cifar10(root, train=True, hint=OFFLINE_HINT)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return ImageSplits(train=x, heldout=x[:0], channels=3, resolution=32)


def build_datasets(data_cfg) -> ImageSplits:
    name = str(data_cfg.name)
    if name == "digits":
        return digits_splits(int(data_cfg.heldout), int(data_cfg.split_seed))
    if name == "cifar10":
        return cifar10_splits(data_cfg.root)
    raise ValueError(f"data.name={name!r}: use cifar10 or digits")


def inversion_targets(data_cfg, splits: ImageSplits, seed: int) -> torch.Tensor:
    """The images to invert: ``data.num_targets`` held-out digits, or the CIFAR-10 training
    image(s) drawn by `seed` (upstream: one random training image per seed)."""
    n = int(data_cfg.num_targets)
    if len(splits.heldout):
        if n > len(splits.heldout):
            raise ValueError(f"data.num_targets={n} > data.heldout={len(splits.heldout)}")
        return splits.heldout[:n]
    index = torch.from_numpy(np.random.default_rng(seed).choice(len(splits.train), size=n, replace=False))
    return splits.train[index]
